"""The pluggable byte-store interface: LangChain's ``ByteStore`` plus an expiring cross-process lock.

The store knows bytes only (what the bytes mean is ``format.py``'s business). The lock exists for
"compress once": several processes asking for the same skill memory must not all compress it, and a
holder that dies (``kill -9``) must not wedge everyone else forever, hence the expiry.
"""

from __future__ import annotations

import logging
import os
import random
import time
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from langchain_core.stores import ByteStore

__all__ = ["DEFAULT_LOCK_EXPIRE", "DEFAULT_LOCK_TIMEOUT", "LockingByteStore", "StoreLockTimeout", "new_token"]

logger = logging.getLogger(__name__)

DEFAULT_LOCK_EXPIRE = 600.0
"""Seconds after which a lock whose holder vanished is free again."""
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

    Backends implement the two atomic primitives ``_try_acquire`` / ``_release``; the waiting loop
    is shared. Lock names live in their own namespace: they never show up in ``yield_keys``.
    """

    @abstractmethod
    def _try_acquire(self, key: str, token: bytes, expire: float) -> bool:
        """Atomically take ``key`` for ``expire`` seconds unless someone holds it (unexpired)."""

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
    ) -> Iterator[None]:
        """Hold an exclusive, auto-expiring lock on ``key`` across threads and processes.

        Blocks until acquired; raises ``StoreLockTimeout`` after ``timeout`` seconds (``None`` waits
        forever). The lock frees itself ``expire`` seconds after acquisition if never released, so
        ``expire`` must exceed the work done under it.
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
        try:
            yield
        finally:
            if not self._release(key, token):
                logger.warning("lock %r expired before release (expire=%s s was too short)", key, expire)
