"""The pluggable byte-store interface: LangChain's ``ByteStore`` plus an expiring cross-process lock.

The store knows bytes only (what the bytes mean is ``format.py``'s business). The lock exists for
"compress once": several processes asking for the same skill memory must not all compress it, and a
holder that dies (``kill -9``) must not wedge everyone else forever, hence the expiry. A live holder
renews its lock while the work runs (a heartbeat thread), so work longer than the expiry is never
entered twice; the expiry only bounds how long a dead holder blocks the others.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from langchain_core.stores import ByteStore

__all__ = ["DEFAULT_LOCK_EXPIRE", "DEFAULT_LOCK_TIMEOUT", "LockingByteStore", "StoreLockTimeout", "new_token"]

logger = logging.getLogger(__name__)

DEFAULT_LOCK_EXPIRE = 600.0
"""Seconds after which a lock whose holder vanished is free again (a live holder renews it)."""
DEFAULT_LOCK_TIMEOUT = 900.0
"""Seconds ``lock()`` waits before giving up (longer than the expiry, so a dead holder is outwaited)."""


class StoreLockTimeout(TimeoutError):
    """The lock could not be acquired within ``timeout`` seconds."""


def new_token() -> bytes:
    """A random owner token: release checks it so we never free a lock someone else now holds."""
    return os.urandom(16).hex().encode("ascii")


def check_key(key: object) -> str:
    if type(key) is not str:
        raise TypeError(f"store keys must be str, got {type(key).__name__}")
    return key


class LockingByteStore(ByteStore):
    """A ``ByteStore`` (str -> bytes) with ``lock(key, expire)``.

    Backends implement the atomic primitives ``_try_acquire`` / ``_extend`` / ``_release``; the
    waiting loop and the renewal heartbeat are shared. Lock names live in their own namespace: they
    never show up in ``yield_keys``.
    """

    @abstractmethod
    def _try_acquire(self, key: str, token: bytes, expire: float) -> bool:
        """Atomically take ``key`` for ``expire`` seconds unless someone holds it (unexpired)."""

    @abstractmethod
    def _extend(self, key: str, token: bytes, expire: float) -> bool:
        """Atomically make ``key`` expire ``expire`` seconds from now, only if ``token`` still owns
        it (unexpired); return whether it did."""

    @abstractmethod
    def _release(self, key: str, token: bytes) -> bool:
        """Free ``key`` only if ``token`` still owns it; return whether it did."""

    @contextmanager
    def lock(
        self,
        key: str,
        expire: float = DEFAULT_LOCK_EXPIRE,
        timeout: float | None = DEFAULT_LOCK_TIMEOUT,
        poll: float = 0.1,
        renew: bool = True,
    ) -> Iterator[None]:
        """Hold an exclusive, auto-expiring lock on ``key`` across threads and processes.

        Blocks until acquired; raises ``StoreLockTimeout`` after ``timeout`` seconds (``None`` waits
        forever). While the body runs, a heartbeat thread pushes the expiry ``expire`` seconds ahead
        every ``expire / 3`` seconds (``renew=False``: never), so the body may take longer than
        ``expire``; a holder that dies (``kill -9``) stops renewing and its lock frees itself at most
        ``expire`` seconds later. A lock found lost (it expired while the process stalled, and
        another holder may have it) is logged; the heartbeat then stops.
        """
        check_key(key)
        if expire <= 0:
            raise ValueError("expire must be > 0")
        token = new_token()
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while not self._try_acquire(key, token, expire):
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreLockTimeout(f"could not lock {key!r} within {timeout} s")
            # Jittered backoff: spread waiters out so they do not hammer the backend in lockstep.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, poll)
        stop = threading.Event()
        beat = None
        if renew:
            beat = threading.Thread(target=self._heartbeat, args=(key, token, expire, stop),
                                    name=f"lock-heartbeat {key}", daemon=True)
            beat.start()
        try:
            yield
        finally:
            stop.set()
            if beat is not None:
                beat.join()
            if not self._release(key, token):
                logger.warning("lock %r expired before release (expire=%s s; renew=%s: not renewed in time)",
                               key, expire, renew)

    def _heartbeat(self, key: str, token: bytes, expire: float, stop: threading.Event) -> None:
        """Renew the lock every ``expire / 3`` seconds until ``stop`` is set or the lock is lost. A
        backend error (a dropped Redis connection) is logged and retried at the next beat: the lock
        holds for ``expire`` seconds after the last renewal that worked."""
        while not stop.wait(expire / 3):
            try:
                if not self._extend(key, token, expire):
                    logger.warning("lock %r was lost while held (it expired before its renewal); "
                                   "another process may be doing the same work", key)
                    return
            except Exception:  # noqa: BLE001 - the holder's work goes on; the next beat retries
                logger.warning("could not renew lock %r; retrying", key, exc_info=True)
