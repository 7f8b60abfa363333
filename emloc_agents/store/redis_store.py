"""``RedisStore``: the byte store on a Redis server, for several hosts sharing one memory cache.

redis-py is optional (``pip install 'emloc-agents[redis]'``) and imported only when a store is built.
Keys are namespaced (``{namespace}:d:{key}`` for data, ``{namespace}:l:{key}`` for locks). Locks are
redis-py's own ``redis.lock.Lock`` (``SET NX PX`` with our random token, Lua compare-and-delete
release, Lua compare-and-reset-TTL renewal), so a holder whose lock expired can never free or extend
the next holder's lock; the waiting loop, timeout, jittered backoff and renewal heartbeat are the
shared ones of ``LockingByteStore.lock``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from emloc_agents.store.base import LockingByteStore, check_key

__all__ = ["RedisStore"]

def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "RedisStore needs the redis package: pip install 'emloc-agents[redis]' (or pip install redis)"
        ) from exc
    return redis


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(LockingByteStore):
    """``ByteStore`` over Redis; ``ttl`` (seconds) optionally expires stored values."""

    def __init__(
        self,
        client: Any | None = None,
        *,
        url: str | None = None,
        namespace: str = "emloc",
        ttl: float | None = None,
    ) -> None:
        redis = _import_redis()
        if client is None:
            client = redis.Redis.from_url(url or "redis://127.0.0.1:6379/0")
        elif url is not None:
            raise ValueError("pass either client or url, not both")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False (values are bytes)")
        if ttl is not None and ttl <= 0:
            raise ValueError("ttl must be > 0 or None")
        self.client = client
        self.namespace = namespace
        self.ttl = ttl
        self._data_prefix = f"{namespace}:d:"
        self._lock_prefix = f"{namespace}:l:"
        self._not_owned = redis.exceptions.LockNotOwnedError

    def _k(self, key: str) -> str:
        return self._data_prefix + check_key(key)

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return list(self.client.mget([self._k(k) for k in keys]))

    def mset(self, key_value_pairs: Sequence[tuple[str, bytes]]) -> None:
        px = None if self.ttl is None else max(1, int(self.ttl * 1000))
        for key, value in key_value_pairs:
            check_key(key)
            if type(value) is not bytes:
                raise TypeError(f"values must be bytes, got {type(value).__name__}")
        with self.client.pipeline(transaction=True) as pipe:
            for key, value in key_value_pairs:
                pipe.set(self._k(key), value, px=px)
            pipe.execute()

    def mdelete(self, keys: Sequence[str]) -> None:
        if keys:
            self.client.delete(*[self._k(k) for k in keys])

    def yield_keys(self, *, prefix: str | None = None) -> Iterator[str]:
        pattern = _glob_escape(self._data_prefix + (prefix or "")) + "*"
        cut = len(self._data_prefix.encode())
        for raw in self.client.scan_iter(match=pattern, count=1000):
            yield raw[cut:].decode("utf-8")

    def _try_acquire(self, key: str, token: bytes, expire: float) -> bool:
        lock = self.client.lock(self._lock_prefix + key, timeout=max(expire, 0.001))
        return bool(lock.acquire(blocking=False, token=token))

    def _extend(self, key: str, token: bytes, expire: float) -> bool:
        # Lock.reacquire: a Lua script resets the TTL to ``timeout`` only if ``token`` still owns the key
        lock = self.client.lock(self._lock_prefix + key, timeout=max(expire, 0.001), thread_local=False)
        lock.local.token = token
        try:
            lock.reacquire()
        except self._not_owned:
            return False
        return True

    def _release(self, key: str, token: bytes) -> bool:
        try:  # Lock.do_release: delete only if ``token`` still owns it
            self.client.lock(self._lock_prefix + key).do_release(token)
        except self._not_owned:
            return False
        return True

    def close(self) -> None:
        self.client.close()
