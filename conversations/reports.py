"""Spend: selectors over the token ledger (`TokenUsage`), shared by the admin
(change list totals, the spend report page) and `manage.py spend_report`.

Everything is aggregated in the database: one GROUP BY query per report, over
the `created_at` range, which the covering index `usage_report_idx` answers
on PostgreSQL without touching the table.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from django.contrib.auth import get_user_model
from django.db import connections
from django.db.models import Aggregate, Count, F, Q, QuerySet, Sum
from django.db.models.functions import Substr, TruncDate, TruncMonth
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from .models import TokenUsage
from .money import money

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

GROUPINGS = ("user", "model", "day", "month")
COLUMNS = (
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "cost",
    "estimated",
)


@dataclass(frozen=True)
class SpendRow:
    key: str  # a username, a model, a day (YYYY-MM-DD) or a month (YYYY-MM)
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: Decimal
    estimated: int  # calls whose counts are our estimate

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, **{name: getattr(self, name) for name in COLUMNS}}


def _aggregates() -> dict[str, Aggregate]:
    return {
        # COUNT(*), not COUNT(id): the covering index holds no id.
        "calls": Count("*"),
        "prompt_tokens": Sum("prompt_tokens"),
        "completion_tokens": Sum("completion_tokens"),
        "cached_tokens": Sum("cached_tokens"),
        "cost": Sum("cost"),
        "estimated": Count("estimated", filter=Q(estimated=True)),
    }


def _row(key: str, values: Mapping[str, Any]) -> SpendRow:
    return SpendRow(
        key=key,
        calls=values["calls"] or 0,
        prompt_tokens=values["prompt_tokens"] or 0,
        completion_tokens=values["completion_tokens"] or 0,
        cached_tokens=values["cached_tokens"] or 0,
        cost=Decimal(values["cost"] or 0).quantize(Decimal("0.000001")),
        estimated=values["estimated"] or 0,
    )


def day_start(day: date) -> datetime:
    """Midnight at the start of `day` in the site's time zone."""
    return timezone.make_aware(datetime.combine(day, time.min))


def ledger(
    *, since: date | None = None, until: date | None = None, user: str | None = None, model: str | None = None
) -> QuerySet[TokenUsage]:
    """Ledger rows from the start of `since` to the end of `until` (both
    included, site time zone), optionally of one username and one model."""
    rows = TokenUsage.objects.all()
    if since is not None:
        rows = rows.filter(created_at__gte=day_start(since))
    if until is not None:
        rows = rows.filter(created_at__lt=day_start(until + timedelta(days=1)))
    if user:
        rows = rows.filter(user__username=user)
    if model:
        rows = rows.filter(model=model)
    return rows


def spend_totals(rows: QuerySet[TokenUsage]) -> SpendRow:
    """The totals of a set of ledger rows, in one aggregate query."""
    return _row("total", rows.order_by().aggregate(**_aggregates()))


def total_of(spend: list[SpendRow]) -> SpendRow:
    """The totals of a grouped report, added up here: no second scan of the
    ledger (every row is in exactly one group)."""
    return SpendRow(
        key="total",
        calls=sum(row.calls for row in spend),
        prompt_tokens=sum(row.prompt_tokens for row in spend),
        completion_tokens=sum(row.completion_tokens for row in spend),
        cached_tokens=sum(row.cached_tokens for row in spend),
        cost=sum((row.cost for row in spend), Decimal("0.000000")),
        estimated=sum(row.estimated for row in spend),
    )


def spend_by(rows: QuerySet[TokenUsage], by: str) -> list[SpendRow]:
    """Totals per user, model, day or month: one GROUP BY query. Users and
    models come dearest first; days and months in order."""
    if by not in GROUPINGS:
        raise ValueError(f"cannot group spend by {by!r}; choose one of {', '.join(GROUPINGS)}")
    rows = rows.order_by()
    if by in ("day", "month") and connections[rows.db].vendor == "sqlite" and _whole_hour_zone():
        return _spend_by_period_sqlite(rows, by)
    grouped: QuerySet[TokenUsage, Mapping[str, Any]]  # rows: the bucket, then the aggregates
    if by == "day":
        grouped = rows.annotate(bucket=TruncDate("created_at")).values("bucket")
    elif by == "month":
        grouped = rows.annotate(bucket=TruncMonth("created_at")).values("bucket")
    elif by == "model":
        grouped = rows.values(bucket=F("model"))
    else:
        grouped = rows.values(bucket=F("user_id"))
    result = list(grouped.annotate(**_aggregates()).order_by("bucket"))
    if by in ("day", "month"):
        fmt = "%Y-%m-%d" if by == "day" else "%Y-%m"
        return [_row(_bucket_label(values["bucket"], fmt), values) for values in result]
    if by == "user":
        names = _usernames(values["bucket"] for values in result)
        spend = [_row(names.get(values["bucket"], "(deleted user)"), values) for values in result]
    else:
        spend = [_row(values["bucket"], values) for values in result]
    return sorted(spend, key=lambda row: (-row.cost, -row.total_tokens, row.key))


def _whole_hour_zone() -> bool:
    zone = timezone.get_current_timezone()
    now = timezone.now()
    offsets = [now.astimezone(zone).utcoffset() for now in (now, now - timedelta(days=182))]
    return all(offset is not None and offset.total_seconds() % 3600 == 0 for offset in offsets)


def _spend_by_period_sqlite(rows: QuerySet[TokenUsage], by: str) -> list[SpendRow]:
    """Days or months on SQLite. Django's TruncDate calls a Python function
    per row there (seconds at a million rows); instead group by the UTC hour
    in SQL (datetimes are stored as 'YYYY-MM-DD HH:MM:SS' in UTC) and fold
    the hours into local days here: exact in any zone whose offset is whole
    hours, which the caller checks."""
    hours = cast(
        "QuerySet[TokenUsage, dict[str, Any]]",  # the hour and the aggregates
        rows.annotate(hour=Substr("created_at", 1, 13))
        .values("hour")
        .annotate(**_aggregates())
        .order_by("hour"),
    )
    fmt = "%Y-%m-%d" if by == "day" else "%Y-%m"
    folded: dict[str, dict[str, Any]] = {}
    for values in hours:
        moment = datetime.strptime(values.pop("hour"), "%Y-%m-%d %H").replace(tzinfo=UTC)
        key = timezone.localtime(moment).strftime(fmt)
        total = folded.setdefault(key, dict.fromkeys(values, 0))
        for name, value in values.items():
            total[name] += value or 0
    return [_row(key, values) for key, values in sorted(folded.items())]


def _bucket_label(bucket: date, fmt: str) -> str:
    if isinstance(bucket, datetime):
        bucket = timezone.localtime(bucket) if timezone.is_aware(bucket) else bucket
    return bucket.strftime(fmt)


def _usernames(ids: Iterable[int | None]) -> dict[int | None, str]:
    wanted = [pk for pk in ids if pk is not None]
    names: dict[int | None, str] = dict(
        get_user_model().objects.filter(pk__in=wanted).values_list("pk", "username")
    )
    return names


# --- Output formats ---------------------------------------------------------------------


def write_csv(spend: list[SpendRow], by: str, out: SupportsWrite[str]) -> None:
    writer = csv.writer(out)
    writer.writerow([by, *COLUMNS])
    for row in spend:
        writer.writerow([row.key, *(getattr(row, name) for name in COLUMNS)])


def to_json(spend: list[SpendRow], total: SpendRow, by: str) -> str:
    def plain(row: SpendRow) -> dict[str, Any]:
        return {**row.as_dict(), "cost": str(row.cost)}

    return json.dumps({"by": by, "rows": [plain(row) for row in spend], "total": plain(total)}, indent=2)


def to_table(spend: list[SpendRow], total: SpendRow, by: str) -> str:
    header = [by, "calls", "prompt", "completion", "cached", "tokens", "cost", "estimated"]
    lines = [
        [row.key, row.calls, row.prompt_tokens, row.completion_tokens, row.cached_tokens,
         row.total_tokens, row.cost, row.estimated]
        for row in [*spend, total]
    ]  # fmt: skip
    cells = [header, *[[str(cell) for cell in line] for line in lines]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        first = line[0].ljust(widths[0])
        return "  ".join(
            [first, *(cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))]
        )

    rule = "  ".join("-" * width for width in widths)
    body = [fmt(line) for line in cells[1:-1]]
    return "\n".join([fmt(cells[0]), rule, *body, rule, fmt(cells[-1])])


# --- The chart, drawn on the server -----------------------------------------------------

CHART_WIDTH = 720
BAR_HEIGHT = 18
LABEL_WIDTH = 180
VALUE_WIDTH = 110


def spend_chart_svg(spend: list[SpendRow], *, metric: str = "cost", limit: int = 60) -> SafeString:
    """A horizontal bar chart of `metric` ("cost" or "tokens") per row, as
    inline SVG: no script, no inline style, so it passes the CSP and prints."""
    shown = spend[:limit]
    values = [float(row.cost) if metric == "cost" else float(row.total_tokens) for row in shown]
    peak = max(values, default=0.0) or 1.0
    bar_space = CHART_WIDTH - LABEL_WIDTH - VALUE_WIDTH
    height = max(1, len(shown)) * (BAR_HEIGHT + 4) + 8
    bars = format_html_join(
        "\n",
        '<g transform="translate(0,{})"><text x="{}" y="13" text-anchor="end" class="chart-label">{}</text>'
        '<rect x="{}" y="0" width="{}" height="{}" class="chart-bar"><title>{}: {}</title></rect>'
        '<text x="{}" y="13" class="chart-value">{}</text></g>',
        (
            (
                4 + i * (BAR_HEIGHT + 4),
                LABEL_WIDTH - 8,
                row.key[:28],
                LABEL_WIDTH,
                f"{bar_space * value / peak:.1f}",
                BAR_HEIGHT,
                row.key,
                _metric_text(row, metric),
                LABEL_WIDTH + bar_space * value / peak + 6,
                _metric_text(row, metric),
            )
            for i, (row, value) in enumerate(zip(shown, values, strict=True))
        ),
    )
    empty = mark_safe('<text x="8" y="16" class="chart-label">No spend in this range.</text>')
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="spend-chart" role="img" width="{}" height="{}" '
        'viewBox="0 0 {} {}" aria-label="{}">{}</svg>',
        CHART_WIDTH,
        height,
        CHART_WIDTH,
        height,
        f"Spend by {metric}",
        bars if shown else empty,
    )


def _metric_text(row: SpendRow, metric: str) -> str:
    return money(row.cost) if metric == "cost" else f"{row.total_tokens:,}"


def unpriced_models(rows: QuerySet[TokenUsage]) -> list[str]:
    """The models of these ledger rows that have no price: their calls are
    accounted at cost 0, which staff must be told (at most 20 named)."""
    from .models import ModelPrice

    used = rows.order_by().values_list("model", flat=True).distinct()[:200]
    priced = set(ModelPrice.objects.values_list("model", flat=True))
    return sorted({m for m in used if m not in priced})[:20]
