"""Per-user limits on sending messages. The counters live in Django's cache:
local memory on the embedded default, Redis (shared by every worker) when
REDIS_URL is set."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django_ratelimit.core import get_usage

SEND_GROUP = "chat.message_send"


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


def send_retry_after(user: Any) -> int | None:
    """Seconds until `user` may send again, or None if a send is allowed now.
    Looking does not count: only `record_send` does."""
    usage = _usage(user, increment=False)
    if usage is None or usage["count"] < usage["limit"]:
        return None
    return max(1, int(usage["time_left"]))


def record_send(user: Any) -> None:
    _usage(user, increment=True)
