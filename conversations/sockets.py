"""How many sockets each user has open, in this worker and in all of them:
at most CHAT_MAX_SOCKETS_PER_USER (the next is closed with 4429).

In one process (the embedded default) the count is this process's. With
REDIS_URL it is a sorted set per user in Redis (socket id -> the time its
entry expires, in Redis's own clock), pushed back every REFRESH seconds by
the worker that holds the socket, so that a dead worker's sockets stop
counting by themselves. Redis away: this worker's count only.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from django.conf import settings

from .generation.answer_log import RedisNames

log = logging.getLogger(__name__)

TTL = 90.0  # s: a socket's entry in its user's count lives this long unless refreshed
REFRESH = 30.0  # s


class SocketCounts:
    def __init__(self) -> None:
        self.local: dict[Any, set[str]] = {}  # user id -> this process's open sockets
        self.client: Any = None
        self.names = RedisNames.for_settings()
        if settings.REDIS_URL:
            import redis.asyncio as redis

            self.client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
        self._refresher: asyncio.Task[None] | None = None

    async def open(self, user_id: Any, socket_id: str, limit: int) -> bool:
        """Count a user's new socket. False (and not counted) if the user has
        `limit` open already, in this worker and, with Redis, in the others."""
        local = self.local.setdefault(user_id, set())
        allowed = len(local) < limit
        if self.client is not None:
            try:
                allowed = await self._open_shared(user_id, socket_id, limit)
            except Exception as exc:  # Redis away: this worker's count only
                log.warning("socket count of user %s unavailable: %s", user_id, exc)
        if allowed:
            local.add(socket_id)
        elif not local:
            del self.local[user_id]
        return allowed

    async def close(self, user_id: Any, socket_id: str) -> None:
        local = self.local.get(user_id)
        if local is None or socket_id not in local:
            return
        local.discard(socket_id)
        if not local:
            del self.local[user_id]
        if self.client is not None:
            try:
                await self.client.zrem(self.names.sockets(user_id), socket_id)
            except Exception as exc:  # its entry expires by itself
                log.warning("socket of user %s not uncounted: %s", user_id, exc)

    async def _now(self) -> float:
        """Redis's clock: the workers' hosts may disagree (an entry's expiry
        written by one is judged by every other)."""
        seconds, microseconds = await self.client.time()
        return float(seconds + microseconds / 1e6)

    async def _open_shared(self, user_id: Any, socket_id: str, limit: int) -> bool:
        key, now = self.names.sockets(user_id), await self._now()
        pipe = self.client.pipeline(transaction=True)
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zadd(key, {socket_id: now + TTL})
        pipe.zcard(key)
        pipe.expire(key, int(TTL))
        count = (await pipe.execute())[2]
        if count > limit:  # two at once over the limit: both refused, never both let in
            await self.client.zrem(key, socket_id)
            return False
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh(), name="socket-counts")
        return True

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH)
            try:
                expires = await self._now() + TTL
                pipe = self.client.pipeline(transaction=False)
                for user_id, sockets in list(self.local.items()):
                    if sockets:
                        pipe.zadd(self.names.sockets(user_id), dict.fromkeys(sockets, expires))
                        pipe.expire(self.names.sockets(user_id), int(TTL))
                await pipe.execute()
            except Exception as exc:  # Redis away: the next round tries again
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # redis-py turned the cancellation into an error
                    raise asyncio.CancelledError from exc
                log.warning("open sockets not refreshed: %s", exc)


_counts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SocketCounts] = weakref.WeakKeyDictionary()


def socket_counts() -> SocketCounts:
    """This event loop's counts (one per process when serving)."""
    loop = asyncio.get_running_loop()
    found = _counts.get(loop)
    if found is None:
        found = _counts[loop] = SocketCounts()
    return found
