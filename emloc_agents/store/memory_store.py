"""``MemoryStore``: LangChain's ``InMemoryByteStore`` plus thread locks, for tests and single-process use."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

from langchain_core.stores import InMemoryByteStore

from emloc_agents.store.base import LockingByteStore, check_key

__all__ = ["MemoryStore"]


class MemoryStore(LockingByteStore):
    """Process-local byte store; locks are exclusive across threads and expire like the others."""

    def __init__(self) -> None:
        self._data = InMemoryByteStore()
        self._mutex = threading.Lock()
        self._held: dict[str, tuple[bytes, float]] = {}  # key -> (token, monotonic deadline)

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._data.mget([check_key(k) for k in keys])

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        for key, value in key_value_pairs:
            check_key(key)
            if type(value) is not bytes:
                raise TypeError(f"values must be bytes, got {type(value).__name__}")
        self._data.mset(list(key_value_pairs))

    def mdelete(self, keys: Sequence[str]) -> None:
        self._data.mdelete([check_key(k) for k in keys])

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        yield from list(self._data.yield_keys(prefix=prefix))

    def _try_acquire(self, key: str, token: bytes, expire: float) -> bool:
        now = time.monotonic()
        with self._mutex:
            held = self._held.get(key)
            if held is not None and held[1] > now:
                return False
            self._held[key] = (token, now + expire)
            return True

    def _extend(self, key: str, token: bytes, expire: float) -> bool:
        now = time.monotonic()
        with self._mutex:
            held = self._held.get(key)
            if held is None or held[0] != token or held[1] <= now:
                return False
            self._held[key] = (token, now + expire)
            return True

    def _release(self, key: str, token: bytes) -> bool:
        with self._mutex:
            held = self._held.get(key)
            if held is None or held[0] != token:
                return False
            del self._held[key]
            return held[1] > time.monotonic()
