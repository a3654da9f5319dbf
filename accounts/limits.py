"""Per-user limits on sending messages: CHAT_RATE_LIMIT turns per window
(`20/m`, `100/h`, `500/d`, `30/10m`), counted in fixed windows in Django's
cache: local memory on the embedded default, Redis (shared by every worker)
when REDIS_URL is set. A burst of sends is counted in one round trip."""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.cache import cache

if TYPE_CHECKING:
    from django.contrib.auth.models import User

log = logging.getLogger(__name__)

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# Users this process has seen over their limit, until their window ends: a
# flood of frames from one of them costs no cache round trip.
_blocked_until: dict[int, float] = {}
MAX_BLOCKED = 10_000


def parse_rate(rate: str) -> tuple[int, int]:
    """`20/m` -> (20, 60); `30/10m` -> (30, 600)."""
    found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([smhd])\s*", rate)
    if found is None:
        raise ValueError(f"Not a rate: {rate!r} (expected like 20/m, 100/h, 30/10m).")
    return int(found[1]), int(found[2] or 1) * UNITS[found[3]]


def take_send(user: User) -> int | None:
    """Count one turn against the user's rate limit. Returns None if it is
    allowed, else the seconds until it would be. Call it last, once every
    other rule has passed (inside the turn's transaction), so that refused
    turns never count: a turn refused here is over the limit already, and in
    a fixed window that changes nothing."""
    return take_sends([user])[0]


def take_sends(users: Sequence[User]) -> list[int | None]:
    """`take_send` for each of `users` in turn (one user may come several
    times), with one cache round trip for all."""
    limit, period = parse_rate(settings.CHAT_RATE_LIMIT)
    now = time.time()
    window = int(now // period)
    wait = max(1, math.ceil((window + 1) * period - now))
    outcomes: list[int | None] = [None] * len(users)
    counting: Counter[int] = Counter()
    for index, user in enumerate(users):
        until = _blocked_until.get(user.pk)
        if until is not None and until > now:
            outcomes[index] = max(1, math.ceil(until - now))
        else:
            _blocked_until.pop(user.pk, None)
            counting[user.pk] += 1
    if not counting:
        return outcomes
    keys = {pk: f"chat.send:{pk}:{period}:{window}" for pk in counting}
    try:
        totals = _count({keys[pk]: n for pk, n in counting.items()}, timeout=period + 1)
    except Exception as exc:
        # The shared cache (Redis) is away: chatting goes on. Budgets still
        # hold (they are counted in the database); only the per-minute rate
        # is not counted until it is back.
        log.warning("rate limit not counted, cache unavailable: %s", exc)
        return outcomes
    # Each user's turns in order: the total before this call, plus one each.
    taken = {pk: totals[keys[pk]] - n for pk, n in counting.items()}
    for index, user in enumerate(users):
        if outcomes[index] is not None:
            continue
        taken[user.pk] += 1
        if taken[user.pk] > limit:
            outcomes[index] = wait
            if len(_blocked_until) >= MAX_BLOCKED:
                _blocked_until.clear()
            _blocked_until[user.pk] = now + wait
    return outcomes


def _count(counts: dict[str, int], *, timeout: int) -> dict[str, int]:
    """Add each count to its counter (made at 0, living `timeout` seconds);
    the new totals."""
    if hasattr(cache, "add_counts"):  # Redis: one pipeline (chatsite/cache.py)
        counted: dict[str, int] = cache.add_counts(counts, timeout=timeout)
        return counted
    totals = {}
    for key, n in counts.items():
        cache.add(key, 0, timeout)
        try:
            totals[key] = cache.incr(key, n)
        except ValueError:  # expired between the two: a new window
            cache.set(key, n, timeout)
            totals[key] = n
    return totals


def take_upload(user: User) -> int | None:
    """Count one file upload against CHAT_FILE_UPLOAD_RATE (its own window,
    not the messages'). None if it is allowed, else the seconds until it
    would be. A lost cache lets uploads through (storage limits still hold)."""
    limit, period = parse_rate(settings.CHAT_FILE_UPLOAD_RATE)
    now = time.time()
    window = int(now // period)
    key = f"chat.upload:{user.pk}:{period}:{window}"
    try:
        total = _count({key: 1}, timeout=period + 1)[key]
    except Exception as exc:
        log.warning("upload rate not counted, cache unavailable: %s", exc)
        return None
    if total > limit:
        return max(1, math.ceil((window + 1) * period - now))
    return None
