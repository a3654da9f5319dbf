"""Per-user budgets: which limits apply, the atomic reservation before an
answer, settling it, and the account usage page."""

from __future__ import annotations

import re
import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.db import connection, transaction
from django.db.models import Sum
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import Quota, QuotaCounter
from conversations import quotas
from conversations.models import ModelPrice, TokenUsage
from tests.factories import make_user

pytestmark = pytest.mark.django_db


def reserve(user: Any, tokens: int, **kw: Any) -> quotas.Reservation | None:
    with transaction.atomic():
        return quotas.reserve_answer(user, estimated_tokens=tokens, **kw)


def day_counter(user: Any) -> QuotaCounter:
    return QuotaCounter.objects.get(user=user, window="day")


# --- Which limits apply -----------------------------------------------------------------


def test_own_quota_wins_over_groups_and_default(alice: Any) -> None:
    Quota.objects.create(is_default=True, tokens_per_day=10)
    staff = Group.objects.create(name="staff")
    Quota.objects.create(group=staff, tokens_per_day=20)
    alice.groups.add(staff)
    Quota.objects.create(user=alice, tokens_per_day=30)
    assert quotas.limits_for(alice).tokens_per_day == 30
    assert quotas.limits_for(alice).source == "user"


def test_groups_give_the_lowest_limit_of_each_kind_and_beat_the_default(alice: Any) -> None:
    Quota.objects.create(is_default=True, tokens_per_day=1)
    small, big = Group.objects.create(name="small"), Group.objects.create(name="big")
    Quota.objects.create(group=small, tokens_per_day=100, cost_per_month=None)
    Quota.objects.create(group=big, tokens_per_day=1000, cost_per_month=Decimal("5"))
    alice.groups.add(small, big)
    limits = quotas.limits_for(alice)
    assert (limits.tokens_per_day, limits.cost_per_month, limits.source) == (100, Decimal("5"), "group")
    assert limits.answers_per_minute is None  # blank everywhere: unlimited


def test_the_site_default_applies_to_everyone_else(alice: Any) -> None:
    assert quotas.limits_for(alice).unlimited
    Quota.objects.create(is_default=True, answers_per_minute=5)
    assert quotas.limits_for(alice).answers_per_minute == 5


def test_no_limits_at_all_reserves_nothing(alice: Any) -> None:
    assert reserve(alice, 10_000) is None
    assert not QuotaCounter.objects.exists()


# --- Reserving and settling -------------------------------------------------------------


def test_daily_tokens_run_out_with_a_message_and_the_time_to_midnight(alice: Any) -> None:
    Quota.objects.create(user=alice, tokens_per_day=1000)
    first = reserve(alice, 600)
    assert first is not None and day_counter(alice).tokens_reserved == 600

    with pytest.raises(quotas.QuotaExceeded) as refused:
        reserve(alice, 600)
    now = timezone.localtime()
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(refused.value.retry_after - (midnight - now).total_seconds()) <= 2
    assert refused.value.message.startswith("Daily token budget nearly used up (400 tokens left")
    assert "resets in" in refused.value.message
    assert day_counter(alice).tokens_reserved == 600  # the refusal reserved nothing


def test_settle_turns_the_reservation_into_real_use(alice: Any) -> None:
    Quota.objects.create(user=alice, tokens_per_day=1000, tokens_per_month=5000)
    reservation = reserve(alice, 600)
    with transaction.atomic():
        quotas.settle(reservation, user_id=alice.pk, tokens=150, cost=Decimal("0.01"))
    counter = day_counter(alice)
    assert (counter.tokens_used, counter.tokens_reserved, counter.cost_used) == (150, 0, Decimal("0.01"))
    assert QuotaCounter.objects.get(user=alice, window="month").tokens_used == 150
    assert reserve(alice, 850) is not None  # 150 used + 850 = the limit, allowed
    with pytest.raises(quotas.QuotaExceeded) as refused:
        reserve(alice, 1)
    assert refused.value.message.startswith("Daily token budget used up; resets in")


def test_title_calls_count_without_a_reservation(alice: Any) -> None:
    Quota.objects.create(user=alice, tokens_per_day=100)
    quotas.settle(reserve(alice, 10), user_id=alice.pk, tokens=10, cost=Decimal(0))
    quotas.settle(None, user_id=alice.pk, tokens=85, cost=Decimal(0))  # a title
    assert day_counter(alice).tokens_used == 95
    with pytest.raises(quotas.QuotaExceeded):
        reserve(alice, 10)


def test_a_counter_starts_from_what_the_ledger_already_holds(alice: Any) -> None:
    TokenUsage.objects.create(user=alice, model="m", prompt_tokens=700, completion_tokens=200)
    old = TokenUsage.objects.create(user=alice, model="m", prompt_tokens=5000)
    TokenUsage.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=40))
    Quota.objects.create(user=alice, tokens_per_day=1000)  # set in the middle of the day
    assert reserve(alice, 100) is not None
    assert day_counter(alice).tokens_used == 900
    with pytest.raises(quotas.QuotaExceeded):
        reserve(alice, 1)


def test_cost_budget_counts_the_estimate_at_the_models_price(alice: Any) -> None:
    ModelPrice.objects.create(model="pricey", input_per_million=Decimal("1"), output_per_million=Decimal("4"))
    Quota.objects.create(user=alice, cost_per_day=Decimal("0.01"))
    # 1,000 tokens at the dearer price (4 per million) = 0.004
    reserve(alice, 1000, model="pricey")
    reserve(alice, 1000, model="pricey")
    assert day_counter(alice).cost_reserved == Decimal("0.008")
    with pytest.raises(quotas.QuotaExceeded) as refused:
        reserve(alice, 1000, model="pricey")
    assert refused.value.message.startswith("Daily spending budget used up")


def test_cost_budget_without_a_price_needs_some_budget_left(alice: Any) -> None:
    Quota.objects.create(user=alice, cost_per_month=Decimal("1"))
    quotas.settle(reserve(alice, 10), user_id=alice.pk, tokens=10, cost=Decimal("1"))
    with pytest.raises(quotas.QuotaExceeded) as refused:
        reserve(alice, 10)
    assert refused.value.message.startswith("Monthly spending budget used up")
    assert refused.value.retry_after > 0


def test_answers_per_minute(alice: Any) -> None:
    Quota.objects.create(user=alice, answers_per_minute=2)
    reserve(alice, 1)
    reserve(alice, 1)
    with pytest.raises(quotas.QuotaExceeded) as refused:
        reserve(alice, 1)
    assert 1 <= refused.value.retry_after <= 60
    assert refused.value.message.startswith("Too many answers this minute")


def test_a_refusal_in_one_window_undoes_the_holds_of_the_others(alice: Any) -> None:
    Quota.objects.create(user=alice, answers_per_minute=10, tokens_per_day=100)
    with transaction.atomic():
        with pytest.raises(quotas.QuotaExceeded):
            quotas.reserve_answer(alice, estimated_tokens=500)
        # the caller carried on in its transaction: nothing may stay held
    held = QuotaCounter.objects.filter(user=alice).aggregate(
        answers=Sum("answers"), tokens=Sum("tokens_reserved")
    )
    assert held["answers"] in (0, None) and held["tokens"] in (0, None)
    assert quotas.limits_for(alice).answers_per_minute == 10


@pytest.mark.django_db(transaction=True)
def test_concurrent_reservations_never_overspend(alice: Any) -> None:
    Quota.objects.create(user=alice, tokens_per_day=1000)
    TokenUsage.objects.create(user=alice, model="m", prompt_tokens=650)  # nearly spent: 350 left
    threads, barrier = 8, threading.Barrier(8)
    granted: list[int] = []
    refused: list[int] = []
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            barrier.wait()
            with transaction.atomic():
                quotas.reserve_answer(alice, estimated_tokens=100)
            granted.append(i)
        except quotas.QuotaExceeded:
            refused.append(i)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)

    assert not errors, errors
    assert (len(granted), len(refused)) == (3, 5)
    counter = day_counter(alice)
    assert counter.tokens_used + counter.tokens_reserved == 950 <= 1000


# --- The account page -------------------------------------------------------------------


def test_usage_page_shows_spend_and_what_is_left(alice: Any) -> None:
    Quota.objects.create(user=alice, tokens_per_day=1000, cost_per_month=Decimal("2"), answers_per_minute=4)
    TokenUsage.objects.create(
        user=alice, model="m", prompt_tokens=200, completion_tokens=50, cost=Decimal("0.5")
    )
    client = Client()
    client.force_login(alice)
    page = client.get(reverse("usage"))
    assert page.status_code == 200
    today, month = page.context["windows"]
    assert (today.tokens, today.tokens_left, month.cost_left) == (250, 750, Decimal("1.5"))
    assert "750 tokens left" in page.text
    assert "$1.50 left" in page.text  # money as everywhere else (conversations/money.py)
    assert "$0.50</span> of $2.00" in page.text
    assert "$0.50</span> (no limit)" in page.text  # today: no cost limit
    assert "At most 4 answers a minute" in page.text
    # The CSP allows neither inline script nor inline style.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text)
    assert not re.search(r"\sstyle=", page.text)


def test_usage_page_without_limits_and_for_strangers(bob: Any) -> None:
    client = Client()
    assert client.get(reverse("usage")).status_code == 302  # to the login page
    client.force_login(bob)
    page = client.get(reverse("usage"))
    assert "no spending limits" in page.text
    assert make_user("carol") is not None
