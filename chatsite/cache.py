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
            return super()._get_connection_pool(write)


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
