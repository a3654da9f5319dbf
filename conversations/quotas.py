"""Per-user budgets: tokens and cost per day and per month, answers per
minute.

`reserve_answer` runs before an answer starts, inside the caller's
transaction: for each window with a limit it moves the answer's estimate
into `reserved` with ONE conditional UPDATE of the user's counter row
(`... WHERE used + reserved + estimate <= limit`). Concurrent answers queue
on that row, and the database re-checks the condition against the committed
value, so no two answers can spend the same remainder. `settle` then turns
the reservation into what the answer really used.

Counters of a day or month start from the ledger (`TokenUsage`), so a limit
set in the middle of a month counts what was already spent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from accounts.models import Quota, QuotaCounter

from .models import ModelPrice, TokenUsage

Window = QuotaCounter.Window
LIMIT_FIELDS = ("tokens_per_day", "tokens_per_month", "cost_per_day", "cost_per_month", "answers_per_minute")
_WINDOW_NAMES: dict[str, str] = {Window.MINUTE: "minute", Window.DAY: "Daily", Window.MONTH: "Monthly"}


@dataclass(frozen=True)
class Limits:
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    cost_per_day: Decimal | None = None
    cost_per_month: Decimal | None = None
    answers_per_minute: int | None = None
    source: str = "none"  # "user", "group", "default" or "none"

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, name) is None for name in LIMIT_FIELDS)

    def of(self, window: str) -> tuple[int | None, Decimal | None, int | None]:
        """(tokens, cost, answers) limits of one window."""
        if window == Window.MINUTE:
            return None, None, self.answers_per_minute
        if window == Window.DAY:
            return self.tokens_per_day, self.cost_per_day, None
        return self.tokens_per_month, self.cost_per_month, None


@dataclass
class Hold:
    counter_id: int
    tokens: int
    cost: Decimal


@dataclass
class Reservation:
    user_id: int
    holds: list[Hold] = field(default_factory=list)


class QuotaExceeded(Exception):
    """The answer would go over a limit. `message` is for a person;
    `retry_after` is the number of seconds until that window resets."""

    def __init__(self, message: str, *, retry_after: int, window: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.window = window


# --- Which limits apply -------------------------------------------------------------


def _limits_of(quota: Quota, source: str) -> Limits:
    return Limits(**{name: getattr(quota, name) for name in LIMIT_FIELDS}, source=source)


# Limits are read before every answer: each process keeps them for
# CHAT_LIMITS_CACHE_SECONDS. A quota saved or deleted, or a group membership
# changed, in this process forgets them at once; other workers within that time.
_limits_cache: dict[Any, tuple[float, Limits]] = {}


def forget_limits(**_kwargs: Any) -> None:
    _limits_cache.clear()


def limits_for(user: User) -> Limits:
    """The user's own quota; else, field by field, the lowest limit among their
    groups' quotas (blank = unlimited); else the site default; else none."""
    return limits_for_many([user])[user.pk]


def limits_for_many(users: Sequence[User]) -> dict[Any, Limits]:
    """`limits_for` of each user (by pk), with one query for those not
    cached (a burst of sends)."""
    ttl = settings.CHAT_LIMITS_CACHE_SECONDS
    now = time.monotonic()
    found: dict[Any, Limits] = {}
    for user in users:
        cached = _limits_cache.get(user.pk)
        if cached is not None and cached[0] > now:
            found[user.pk] = cached[1]
    missing = list({user.pk for user in users if user.pk not in found})
    if not missing:
        return found
    read = _read_limits(missing)
    found.update(read)
    if ttl > 0:
        if len(_limits_cache) + len(read) > 10_000:
            _limits_cache.clear()
        for pk, limits in read.items():
            _limits_cache[pk] = (now + ttl, limits)
    return found


def _read_limits(user_ids: list[Any]) -> dict[Any, Limits]:
    rows = list(
        Quota.objects.filter(
            Q(user_id__in=user_ids) | Q(group__user__in=user_ids) | Q(is_default=True)
        ).distinct()
    )
    group_ids = {q.group_id for q in rows if q.group_id is not None}
    members: dict[Any, set[Any]] = {}
    if group_ids:
        memberships = get_user_model().groups.through.objects.filter(
            user_id__in=user_ids, group_id__in=group_ids
        )
        for user_id, group_id in memberships.values_list("user_id", "group_id"):
            members.setdefault(user_id, set()).add(group_id)
    default = next((q for q in rows if q.is_default), None)
    return {pk: _limits_from(rows, pk, members.get(pk, set()), default) for pk in user_ids}


def _limits_from(rows: list[Quota], user_id: Any, group_ids: set[Any], default: Quota | None) -> Limits:
    own = next((q for q in rows if q.user_id == user_id), None)
    if own is not None:
        return _limits_of(own, "user")
    groups = [q for q in rows if q.group_id is not None and q.group_id in group_ids]
    if groups:
        lowest = {
            name: min((v for q in groups if (v := getattr(q, name)) is not None), default=None)
            for name in LIMIT_FIELDS
        }
        return Limits(**lowest, source="group")
    if default is not None:
        return _limits_of(default, "default")
    return Limits()


# --- Windows ------------------------------------------------------------------------


def window_start(window: str, now: datetime) -> datetime:
    """Windows follow the site's TIME_ZONE: a day starts at its midnight."""
    local = timezone.localtime(now)
    if window == Window.MINUTE:
        return local.replace(second=0, microsecond=0)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if window == Window.DAY else day.replace(day=1)


def window_end(window: str, start: datetime) -> datetime:
    if window == Window.MINUTE:
        return start + timedelta(minutes=1)
    if window == Window.DAY:
        naive = start.replace(tzinfo=None) + timedelta(days=1)
    else:
        naive = (start.replace(tzinfo=None, day=28) + timedelta(days=4)).replace(day=1)
    return timezone.make_aware(naive)  # DST-safe: midnight in the site's zone


def describe_wait(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _seconds_until(moment: datetime, now: datetime) -> int:
    return max(1, math.ceil((moment - now).total_seconds()))


# --- Counters -----------------------------------------------------------------------


def _ledger_spent(user_id: int, since: datetime) -> tuple[int, Decimal]:
    totals = TokenUsage.objects.filter(user_id=user_id, created_at__gte=since).aggregate(
        prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), cost=Sum("cost")
    )
    return (totals["prompt"] or 0) + (totals["completion"] or 0), totals["cost"] or Decimal(0)


def _counter_id(user_id: int, window: str, start: datetime) -> int:
    """The id of the user's counter row for this window, made if missing."""
    found = QuotaCounter.objects.filter(user_id=user_id, window=window, start=start)
    counter_id = found.values_list("pk", flat=True).first()
    if counter_id is not None:
        return counter_id
    tokens, cost = (0, Decimal(0)) if window == Window.MINUTE else _ledger_spent(user_id, start)
    # ON CONFLICT DO NOTHING: a concurrent first reservation may insert it too.
    QuotaCounter.objects.bulk_create(
        [QuotaCounter(user_id=user_id, window=window, start=start, tokens_used=tokens, cost_used=cost)],
        ignore_conflicts=True,
    )
    if window == Window.MINUTE:  # only the current minute matters
        QuotaCounter.objects.filter(user_id=user_id, window=window, start__lt=start).delete()
    return found.values_list("pk", flat=True).get()


def _estimated_cost(model: str | None, tokens: int) -> Decimal:
    price = ModelPrice.current(model) if model else None
    if price is None:
        return Decimal(0)
    # Every token at the dearer of the two prices: an upper bound.
    return (
        price.cost(tokens, 0)
        if price.input_per_million >= price.output_per_million
        else price.cost(0, tokens)
    )


def _hold(
    counter_id: int, *, tokens: int, cost: Decimal, limits: tuple[int | None, Decimal | None, int | None]
) -> bool:
    """Reserve on one counter if every limit of its window allows it: a single
    conditional UPDATE (rowcount 0 = refused)."""
    token_limit, cost_limit, answer_limit = limits
    row = QuotaCounter.objects.filter(pk=counter_id).alias(
        tokens_spent=F("tokens_used") + F("tokens_reserved"),
        cost_spent=F("cost_used") + F("cost_reserved"),
    )
    if token_limit is not None:
        row = row.filter(tokens_spent__lte=token_limit - tokens)
    if cost_limit is not None:
        # Without a price the estimate is 0: then some budget must be left.
        row = row.filter(cost_spent__lte=cost_limit - cost) if cost else row.filter(cost_spent__lt=cost_limit)
    if answer_limit is not None:
        row = row.filter(answers__lt=answer_limit)
    updated = row.update(
        tokens_reserved=F("tokens_reserved") + tokens,
        cost_reserved=F("cost_reserved") + cost,
        answers=F("answers") + 1,
    )
    return updated == 1


def _refusal(counter_id: int, window: str, limits: Limits, now: datetime) -> QuotaExceeded:
    counter = QuotaCounter.objects.get(pk=counter_id)
    retry_after = _seconds_until(window_end(window, counter.start), now)
    wait = describe_wait(retry_after)
    if window == Window.MINUTE:
        message = f"Too many answers this minute; try again in {wait}."
        return QuotaExceeded(message, retry_after=retry_after, window=window)
    token_limit, cost_limit, _ = limits.of(window)
    name = _WINDOW_NAMES[window]
    tokens_left = None if token_limit is None else token_limit - counter.tokens_used - counter.tokens_reserved
    cost_left = None if cost_limit is None else cost_limit - counter.cost_used - counter.cost_reserved
    if tokens_left is not None and tokens_left > 0 and (cost_left is None or cost_left > 0):
        message = (
            f"{name} token budget nearly used up ({tokens_left} tokens left, not enough for an answer); "
            f"resets in {wait}."
        )
    elif tokens_left is not None and tokens_left <= 0:
        message = f"{name} token budget used up; resets in {wait}."
    else:
        message = f"{name} spending budget used up; resets in {wait}."
    return QuotaExceeded(message, retry_after=retry_after, window=window)


# --- The two calls of an answer -----------------------------------------------------


def reserve_answer(user: User, *, estimated_tokens: int, model: str | None = None) -> Reservation | None:
    """Reserve `estimated_tokens` (and their cost at `model`'s price, if
    known) against every window with a limit, and count one answer.

    Call it inside the transaction that creates the answer: the reservation
    commits or rolls back with it. Raises QuotaExceeded (nothing reserved);
    returns None when the user has no limits at all.
    """
    limits = limits_for(user)
    if limits.unlimited:
        return None
    now = timezone.now()
    tokens = max(1, estimated_tokens)
    cost = _estimated_cost(model, tokens)
    reservation = Reservation(user_id=user.pk)
    # A savepoint: a refusal in a later window undoes the holds of earlier ones
    # even if the caller catches QuotaExceeded and carries on.
    with transaction.atomic():
        for window in (Window.MINUTE, Window.DAY, Window.MONTH):
            window_limits = limits.of(window)
            if all(limit is None for limit in window_limits):
                continue
            counter_id = _counter_id(user.pk, window, window_start(window, now))
            if not _hold(counter_id, tokens=tokens, cost=cost, limits=window_limits):
                raise _refusal(counter_id, window, limits, now)
            reservation.holds.append(Hold(counter_id, tokens, cost))
    return reservation


def settle(reservation: Reservation | None, *, user_id: int, tokens: int, cost: Decimal) -> None:
    """Release the reservation and count what the call really used, in the
    counters of the current day and month (kept only for users with limits;
    a counter made later starts from the ledger). Call it in the transaction
    that writes the call's TokenUsage row; title and summary calls pass
    `reservation=None`."""
    now = timezone.now()
    with transaction.atomic():
        for hold in reservation.holds if reservation else []:
            QuotaCounter.objects.filter(pk=hold.counter_id).update(
                tokens_reserved=F("tokens_reserved") - hold.tokens,
                cost_reserved=F("cost_reserved") - hold.cost,
            )
        current = Q(window=Window.DAY, start=window_start(Window.DAY, now)) | Q(
            window=Window.MONTH, start=window_start(Window.MONTH, now)
        )
        QuotaCounter.objects.filter(current, user_id=user_id).update(
            tokens_used=F("tokens_used") + tokens, cost_used=F("cost_used") + cost
        )


# --- What the account page shows -------------------------------------------------------


@dataclass(frozen=True)
class WindowUsage:
    name: str  # "Today", "This month"
    tokens: int
    cost: Decimal
    token_limit: int | None
    cost_limit: Decimal | None
    resets_at: datetime

    @property
    def tokens_left(self) -> int | None:
        return None if self.token_limit is None else max(0, self.token_limit - self.tokens)

    @property
    def cost_left(self) -> Decimal | None:
        return None if self.cost_limit is None else max(Decimal(0), self.cost_limit - self.cost)

    @property
    def tokens_percent(self) -> int | None:
        if not self.token_limit:
            return None
        return min(100, round(100 * self.tokens / self.token_limit))

    @property
    def cost_percent(self) -> int | None:
        if not self.cost_limit:
            return None
        return min(100, round(100 * self.cost / self.cost_limit))


def usage_summary(user: User, *, now: datetime | None = None) -> tuple[Limits, list[WindowUsage]]:
    """Spend today and this month, from the ledger, beside the user's limits."""
    now = now or timezone.now()
    limits = limits_for(user)
    windows = []
    for window, name in ((Window.DAY, "Today"), (Window.MONTH, "This month")):
        start = window_start(window, now)
        tokens, cost = _ledger_spent(user.pk, start)
        token_limit, cost_limit, _ = limits.of(window)
        windows.append(WindowUsage(name, tokens, cost, token_limit, cost_limit, window_end(window, start)))
    return limits, windows
