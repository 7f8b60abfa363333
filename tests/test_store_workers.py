"""Child-process bodies for the cross-process lock tests in test_store.py (no tests here).

Kept apart from test_store.py so spawned children import only the byte stores, not torch and the
engine: four children then start in about a second instead of tens of seconds.
"""

from __future__ import annotations

import os
import pathlib
import time

from emloc_agents.store import DiskCacheStore, RedisStore


def open_store(kind: str, where: str):
    """Build a store in this or a child process (``where`` = directory, or ``redis-url#namespace``)."""
    if kind == "diskcache":
        return DiskCacheStore(where)
    url, namespace = where.rsplit("#", 1)
    return RedisStore(url=url, namespace=namespace)


def compress_once(kind: str, where: str, counter: str, keys: list[str]) -> None:
    """The "compress once" pattern: under the key's lock, do the work only if nobody stored it yet."""
    store = open_store(kind, where)
    for key in keys:
        with store.lock(key, expire=60, timeout=60):
            if store.mget([key])[0] is None:
                with open(counter, "a") as f:
                    f.write(f"{key} {os.getpid()}\n")
                time.sleep(0.1)
                store.mset([(key, b"memory:" + key.encode())])
    store.close()


def hold_lock_forever(kind: str, where: str, ready: str) -> None:
    """Take a 1-second lock, say so, then hang until the parent SIGKILLs us."""
    store = open_store(kind, where)
    held = store.lock("held", expire=1.0)  # keep a reference: a collected generator would release
    held.__enter__()
    pathlib.Path(ready).touch()
    time.sleep(600)


def _note(log: str, line: str) -> None:
    with open(log, "a") as f:
        f.write(line + "\n")
        f.flush()


def _wait_for(path: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def hold_past_expiry(kind: str, where: str, log: str, trying: str, seconds: float) -> None:
    """A "compression" under a 1-second lock that lasts ``seconds`` once the rival is waiting."""
    store = open_store(kind, where)
    with store.lock("job", expire=1.0, timeout=30):
        _note(log, "first in")
        _wait_for(trying)
        time.sleep(seconds)
        _note(log, "first out")
    store.close()


def enter_after(kind: str, where: str, log: str, trying: str) -> None:
    """The rival: asks for the same lock while the first holder works."""
    store = open_store(kind, where)
    pathlib.Path(trying).touch()
    with store.lock("job", expire=1.0, timeout=60):
        _note(log, "second in")
    store.close()


def hold_and_log(kind: str, where: str, log: str, ready: str, seconds: float) -> None:
    """Hold a 0.5-second lock for ``seconds``, logging the store's warnings to ``log``."""
    import logging

    logging.basicConfig(filename=log, level=logging.WARNING, format="%(message)s")
    store = open_store(kind, where)
    with store.lock("stalled", expire=0.5, timeout=30):
        pathlib.Path(ready).touch()
        time.sleep(seconds)
    store.close()
