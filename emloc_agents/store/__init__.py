"""Storage of compressed memories: ``format`` turns a memory into bytes, the stores keep bytes.

"Store knows bytes": backends are LangChain ``ByteStore``s (str -> bytes) with an expiring
cross-process ``lock`` so a memory is compressed once even when many processes ask for it.
The format names are imported lazily so that using a byte store does not pull in torch and the
engine (worker processes that only wait on a lock start in well under a second).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from emloc_agents.store.base import (
    DEFAULT_LOCK_EXPIRE,
    DEFAULT_LOCK_TIMEOUT,
    LockingByteStore,
    StoreLockTimeout,
)
from emloc_agents.store.diskcache_store import DEFAULT_SIZE_LIMIT, DiskCacheStore, SafeDisk, UnsafeEntryError
from emloc_agents.store.memory_store import MemoryStore
from emloc_agents.store.redis_store import RedisStore

if TYPE_CHECKING:
    from emloc_agents.store.format import (
        FORMAT_VERSION,
        MemoryFormatError,
        dump_memory,
        load_memory,
        read_info,
    )

_LAZY = {"FORMAT_VERSION", "MemoryFormatError", "dump_memory", "load_memory", "read_info"}

__all__ = [
    "DEFAULT_LOCK_EXPIRE",
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_SIZE_LIMIT",
    "FORMAT_VERSION",
    "DiskCacheStore",
    "LockingByteStore",
    "MemoryFormatError",
    "MemoryStore",
    "RedisStore",
    "SafeDisk",
    "StoreLockTimeout",
    "UnsafeEntryError",
    "dump_memory",
    "load_memory",
    "read_info",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module("emloc_agents.store.format"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
