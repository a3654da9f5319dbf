"""Spend selectors over the ledger: grouping, ranges in the site's time zone,
totals, and the output formats (table, CSV, JSON, SVG)."""

from __future__ import annotations

import io
import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations import reports
from conversations.models import TokenUsage
from tests.factories import make_user

pytestmark = pytest.mark.django_db

UTC = ZoneInfo("UTC")


def row(user: Any, at: datetime, *, model: str = "m", prompt: int = 10, completion: int = 5,
        cost: str = "0.01", cached: int = 0, estimated: bool = False) -> TokenUsage:  # fmt: skip
    usage = TokenUsage.objects.create(
        user=user, model=model, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
        cost=Decimal(cost), estimated=estimated,
    )  # fmt: skip
    TokenUsage.objects.filter(pk=usage.pk).update(created_at=at)
    return usage


def test_spend_by_user_model_day_and_month(alice: Any, bob: Any) -> None:
    row(alice, datetime(2026, 3, 1, 10, tzinfo=UTC), model="a", cost="1", cached=3)
    row(alice, datetime(2026, 3, 2, 10, tzinfo=UTC), model="b", cost="2", estimated=True)
    row(bob, datetime(2026, 4, 5, 10, tzinfo=UTC), model="b", cost="5")
    rows = reports.ledger(since=date(2026, 3, 1), until=date(2026, 4, 30))

    by_user = reports.spend_by(rows, "user")
    assert [(r.key, r.calls, r.cost, r.estimated, r.cached_tokens) for r in by_user] == [
        ("bob", 1, Decimal("5"), 0, 0),
        ("alice", 2, Decimal("3"), 1, 3),
    ]
    assert [(r.key, r.cost) for r in reports.spend_by(rows, "model")] == [
        ("b", Decimal("7")),
        ("a", Decimal("1")),
    ]
    assert [r.key for r in reports.spend_by(rows, "day")] == ["2026-03-01", "2026-03-02", "2026-04-05"]
    assert [(r.key, r.cost) for r in reports.spend_by(rows, "month")] == [
        ("2026-03", Decimal("3")),
        ("2026-04", Decimal("5")),
    ]
    total = reports.spend_totals(rows)
    assert (total.calls, total.total_tokens, total.cost, total.estimated) == (3, 45, Decimal("8"), 1)
    for by in reports.GROUPINGS:  # the report's own total adds up to the same
        assert reports.total_of(reports.spend_by(rows, by)) == total


def test_range_ends_are_whole_days_in_the_site_time_zone(alice: Any, settings: Any) -> None:
    settings.TIME_ZONE = "Europe/Paris"
    with timezone.override("Europe/Paris"):
        row(alice, datetime(2026, 3, 1, 23, 30, tzinfo=UTC), cost="1")  # 2 March, 00:30 in Paris
        row(alice, datetime(2026, 3, 1, 22, 30, tzinfo=UTC), cost="2")  # 1 March, 23:30 in Paris
        march_first = reports.ledger(since=date(2026, 3, 1), until=date(2026, 3, 1))
        assert reports.spend_totals(march_first).cost == Decimal("2")
        days = reports.spend_by(reports.ledger(since=date(2026, 3, 1), until=date(2026, 3, 2)), "day")
        assert [(r.key, r.cost) for r in days] == [("2026-03-01", Decimal("2")), ("2026-03-02", Decimal("1"))]


def test_ledger_filters_by_user_and_model(alice: Any, bob: Any) -> None:
    at = datetime(2026, 3, 1, 10, tzinfo=UTC)
    row(alice, at, model="a", cost="1")
    row(alice, at, model="b", cost="2")
    row(bob, at, model="a", cost="4")
    assert reports.spend_totals(reports.ledger(user="alice")).cost == Decimal("3")
    assert reports.spend_totals(reports.ledger(model="a")).cost == Decimal("5")
    assert reports.spend_totals(reports.ledger(user="alice", model="a")).cost == Decimal("1")


def test_rows_of_deleted_users_still_count(alice: Any) -> None:
    gone = make_user("gone")
    row(gone, datetime(2026, 3, 1, tzinfo=UTC), cost="9")
    gone.delete()
    spend = reports.spend_by(reports.ledger(), "user")
    assert [(r.key, r.cost) for r in spend] == [("(deleted user)", Decimal("9"))]


def test_a_report_is_one_grouped_query(alice: Any, bob: Any) -> None:
    for day in range(1, 29):
        row(alice if day % 2 else bob, datetime(2026, 2, day, tzinfo=UTC))
    rows = reports.ledger(since=date(2026, 2, 1), until=date(2026, 2, 28))
    with CaptureQueriesContext(connection) as queries:
        assert len(reports.spend_by(rows, "day")) == 28
    assert len(queries) == 1
    with CaptureQueriesContext(connection) as queries:
        assert len(reports.spend_by(rows, "user")) == 2
    assert len(queries) == 2  # the grouped rows, then the usernames


def test_unknown_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot group spend by"):
        reports.spend_by(reports.ledger(), "week")


def test_csv_json_and_table(alice: Any) -> None:
    row(alice, datetime(2026, 3, 1, tzinfo=UTC), prompt=1200, completion=34, cost="0.123456", estimated=True)
    rows = reports.ledger()
    spend, total = reports.spend_by(rows, "user"), reports.spend_totals(rows)

    out = io.StringIO()
    reports.write_csv(spend, "user", out)
    assert out.getvalue().splitlines()[1] == "alice,1,1200,34,0,1234,0.123456,1"
    assert json.loads(reports.to_json(spend, total, "user"))["rows"][0]["cost"] == "0.123456"
    table = reports.to_table(spend, total, "user").splitlines()
    assert table[0].split()[0] == "user" and table[2].split() == ["alice", "1", "1200", "34", "0", "1234",
                                                                   "0.123456", "1"]  # fmt: skip
    assert table[-1].split()[0] == "total"


def test_svg_chart_scales_bars_and_escapes_names(alice: Any) -> None:
    sneaky = make_user("<script>x</script>")
    row(alice, datetime(2026, 3, 1, tzinfo=UTC), cost="4")
    row(sneaky, datetime(2026, 3, 1, tzinfo=UTC), cost="1")
    svg = str(reports.spend_chart_svg(reports.spend_by(reports.ledger(), "user"), metric="cost"))
    assert svg.startswith("<svg") and svg.count('class="chart-bar"') == 2
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    bar_space = reports.CHART_WIDTH - reports.LABEL_WIDTH - reports.VALUE_WIDTH
    assert f'width="{bar_space:.1f}"' in svg and f'width="{bar_space / 4:.1f}"' in svg
    assert "No spend in this range." in str(reports.spend_chart_svg([], metric="tokens"))
