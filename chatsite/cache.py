"""Django's Redis cache with one connection pool per process.

Django makes a cache object per async context (under ASGI, every
`sync_to_async` call of every socket has one), and each object made its own
connection pool: a new TCP connection to Redis per operation (seen under
load: 7% of a worker's CPU in `connect` for the rate limit alone). Here the
pools are shared by every cache object of the process."""

from __future__ import annotations

import threading
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

_pools: dict[tuple[str, ...], dict[int, Any]] = {}
_lock = threading.Lock()


class SharedPoolRedisCacheClient(RedisCacheClient):
    def __init__(self, servers: list[str], **options: Any) -> None:
        super().__init__(servers, **options)
        with _lock:
            self._pools = _pools.setdefault(tuple(servers), {})

    def _get_connection_pool(self, write: bool) -> Any:
        with _lock:  # one pool per server, even when two threads ask at once
            return super()._get_connection_pool(write)  # type: ignore[misc]  # private, not in django-stubs


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient

    def add_counts(self, counts: dict[str, int], *, timeout: int) -> dict[str, int]:
        """Add each count to its counter, made at 0 to live `timeout` seconds
        if it is new, in one round trip; the new totals. (Django stores an int
        as an int, so `get` and `incr` read these counters too.)"""
        keys = {key: self.make_and_validate_key(key) for key in counts}
        pipe = self._cache.get_client(write=True).pipeline(transaction=False)
        for key, n in counts.items():
            pipe.set(keys[key], 0, nx=True, ex=timeout)
            pipe.incrby(keys[key], n)
        replies = pipe.execute()
        return {key: int(total) for key, total in zip(counts, replies[1::2], strict=True)}
