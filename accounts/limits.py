"""Per-user limits on sending messages. The counters live in Django's cache:
local memory on the embedded default, Redis (shared by every worker) when
REDIS_URL is set."""

from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django_ratelimit.core import get_usage

SEND_GROUP = "chat.message_send"

log = logging.getLogger(__name__)


def _usage(user: Any, *, increment: bool) -> dict[str, Any] | None:
    # django-ratelimit keys on a request; a socket frame has a user and no request.
    request = SimpleNamespace(user=user, method="WS", META={})
    return get_usage(
        request,
        group=SEND_GROUP,
        key=lambda _group, req: str(req.user.pk),
        rate=settings.CHAT_RATE_LIMIT,
        increment=increment,
    )


# Users this process has seen over their limit, until their window ends: a
# flood of frames from one of them costs no cache round trip.
_blocked_until: dict[Any, float] = {}
MAX_BLOCKED = 10_000


def take_send(user: Any) -> int | None:
    """Count one turn against the user's rate limit. Returns None if it is
    allowed, else the seconds until it would be. Call it last, once every
    other rule has passed (inside the turn's transaction), so that refused
    turns never count: a turn refused here is over the limit already, and in
    a fixed window that changes nothing."""
    now = time.time()
    until = _blocked_until.get(user.pk)
    if until is not None:
        if until > now:
            return max(1, math.ceil(until - now))
        del _blocked_until[user.pk]
    try:
        usage = _usage(user, increment=True)
    except Exception as exc:
        # The shared cache (Redis) is away: chatting goes on. Budgets still
        # hold (they are counted in the database); only the per-minute rate
        # is not counted until it is back.
        log.warning("rate limit not counted, cache unavailable: %s", exc)
        return None
    if usage is None or not usage["should_limit"]:
        return None
    time_left = max(1, int(usage["time_left"]))
    if len(_blocked_until) >= MAX_BLOCKED:
        _blocked_until.clear()
    _blocked_until[user.pk] = now + time_left
    return time_left
