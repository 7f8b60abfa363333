"""``DiskCacheStore``: a size-bounded LRU byte store in a local directory, safe against pickle attacks.

diskcache 5.6.3 unpickles values (and non-raw keys) on read (CVE-2025-69872): anyone who can write
to the cache directory could run code in every process that reads it. ``SafeDisk`` therefore only
ever writes str keys and bytes values, and refuses to decode anything else; a refused entry is
logged, deleted and reported as a miss.

Eviction is ours, not diskcache's: its built-in cull deletes the 10 oldest rows at once whenever the
cache is over ``size_limit`` (including the row just written when there are few, large entries, as
memories are), so ``mset`` would silently lose what it stored. We set ``cull_limit=0`` and evict one
least-recently-used entry at a time, never one written by the same ``mset``. Locks use ``Cache.add`` with ``expire`` in a separate,
never-evicted cache so LRU eviction cannot silently break mutual exclusion; a holder renews its lock by
``touch`` with a new expiry, inside a transaction that first checks the owner token.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW
from langchain_core.runnables.config import run_in_executor

from emloc_agents.store.base import LockingByteStore, check_key

__all__ = ["DEFAULT_SIZE_LIMIT", "UNREADABLE_KEY", "DiskCacheStore", "SafeDisk", "UnsafeEntryError"]

logger = logging.getLogger(__name__)

DEFAULT_SIZE_LIMIT = 4 * 1024**3


class UnsafeEntryError(ValueError):
    """A cache entry (key or value) that would need unpickling, or is not plain str/bytes."""


class _UnreadableKey:
    """Stands for a cache key ``SafeDisk`` refused to decode (pickled or not text)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unreadable cache key>"


UNREADABLE_KEY = _UnreadableKey()


class SafeDisk(diskcache.Disk):
    """A ``diskcache.Disk`` that never pickles or unpickles: str keys, bytes values, nothing else."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise UnsafeEntryError(f"SafeDisk only stores str keys, got {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        """Decode a key read from a row (iteration, ``peekitem``): a pickled or non-text key is never
        decoded; it comes back as ``UNREADABLE_KEY``, so iterating skips it instead of aborting."""
        if not raw or type(key) is not str:
            return UNREADABLE_KEY
        return key

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> tuple[Any, ...]:
        if read or type(value) is not bytes:
            raise UnsafeEntryError(f"SafeDisk only stores bytes values, got {type(value).__name__}")
        return super().store(value, False, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> bytes:
        if mode == MODE_RAW and type(value) in (bytes, sqlite3.Binary):
            return bytes(value)
        if mode == MODE_BINARY and filename is not None and not read:
            return super().fetch(mode, filename, value, False)
        raise UnsafeEntryError(f"refusing to decode cache entry of mode {mode!r} (only raw bytes are safe)")


class DiskCacheStore(LockingByteStore):
    """``ByteStore`` over ``diskcache.Cache`` (LRU, ``size_limit`` bytes) shared by local processes."""

    def __init__(
        self, directory: str | os.PathLike[str], size_limit: int = DEFAULT_SIZE_LIMIT, timeout: float = 60.0
    ):
        self.directory = os.fspath(directory)
        self.size_limit = int(size_limit)
        self._cache = diskcache.Cache(
            self.directory,
            timeout=timeout,
            disk=SafeDisk,
            size_limit=self.size_limit,
            eviction_policy="least-recently-used",  # keeps access_time current on every read
            cull_limit=0,  # see the module docstring: _evict() does it
        )
        self._locks = diskcache.Cache(
            os.path.join(self.directory, ".locks"), timeout=timeout, disk=SafeDisk, eviction_policy="none"
        )

    # -- ByteStore ---------------------------------------------------------------------------------
    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            check_key(key)
            try:
                value = self._cache.get(key, default=None, retry=True)
            except UnsafeEntryError as exc:
                logger.warning("dropping unsafe cache entry %r in %s: %s", key, self.directory, exc)
                self._drop_unsafe(key)
                value = None
            out.append(value)
        return out

    def _drop_unsafe(self, key: str) -> None:
        # Re-check inside one transaction so a valid value written meanwhile is not deleted.
        with self._cache.transact(retry=True):
            try:
                self._cache.get(key, retry=True)
            except UnsafeEntryError:
                self._cache.delete(key, retry=True)

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        for key, value in key_value_pairs:
            check_key(key)
            if type(value) is not bytes:
                raise TypeError(f"values must be bytes, got {type(value).__name__}")
        for key, value in key_value_pairs:
            self._cache.set(key, value, retry=True)
        self._evict(keep={key for key, _ in key_value_pairs})

    def _evict(self, keep: set[str]) -> None:
        """Drop least-recently-used entries one by one until under ``size_limit``; spare ``keep``.

        An entry larger than ``size_limit`` on its own survives its ``mset`` and goes on the next one.
        """
        while self._cache.volume() > self.size_limit:
            # The one private call: no public diskcache API lists keys by access time without deleting
            # them (``Cache.cull`` drops 10 rows at a time, the row just written among them when entries
            # are few and large, as memories are), so read the LRU order from the table.
            rows = self._cache._sql(
                "SELECT key FROM Cache WHERE raw = 1 AND typeof(key) = 'text' ORDER BY access_time LIMIT ?",
                (len(keep) + 1,),
            ).fetchall()
            victims = [key for (key,) in rows if key not in keep]
            if not victims:
                return
            self._cache.delete(victims[0], retry=True)

    def mdelete(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._cache.delete(check_key(key), retry=True)

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        # diskcache's own iteration (insertion order); SafeDisk.get hands pickled or non-text keys back
        # as UNREADABLE_KEY, never decoded, and they are skipped. Values are not read.
        for key in self._cache:
            if type(key) is str and (prefix is None or key.startswith(prefix)):
                yield key

    async def ayield_keys(self, *, prefix: str | None = None) -> AsyncIterator[str]:
        # LangChain's default runs each next() in an executor thread, possibly a different one each
        # time, and diskcache's iterator holds its thread's SQLite connection: list the keys in one call.
        keys = await run_in_executor(None, lambda: list(self.yield_keys(prefix=prefix)))
        for key in keys:
            yield key

    # -- locks -------------------------------------------------------------------------------------
    def _try_acquire(self, key: str, token: bytes, expire: float) -> bool:
        return bool(self._locks.add(key, token, expire=expire, retry=True))

    def _extend(self, key: str, token: bytes, expire: float) -> bool:
        # check and renew in one transaction: a lock that expired and was taken meanwhile is not ours
        with self._locks.transact(retry=True):
            try:
                owner = self._locks.get(key, default=None, retry=True)  # None once expired
            except UnsafeEntryError:
                owner = None
            return owner == token and bool(self._locks.touch(key, expire=expire, retry=True))

    def _release(self, key: str, token: bytes) -> bool:
        with self._locks.transact(retry=True):
            try:
                owner = self._locks.get(key, default=None, retry=True)
            except UnsafeEntryError:
                owner = None
            if owner == token:
                self._locks.delete(key, retry=True)
                return True
        return False

    # -- housekeeping ------------------------------------------------------------------------------
    def volume(self) -> int:
        """Estimated bytes on disk (database + value files)."""
        return int(self._cache.volume())

    def close(self) -> None:
        self._cache.close()
        self._locks.close()

    def __enter__(self) -> DiskCacheStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
