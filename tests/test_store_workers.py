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
