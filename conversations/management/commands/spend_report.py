from __future__ import annotations

import io
from datetime import date, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from conversations import reports


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise CommandError(f"Dates look like 2026-01-31, not {text!r}.") from exc


class Command(BaseCommand):
    help = (
        "Token spend from the usage ledger, totalled by user, model, day or month over a "
        "range of days (both ends included, site time zone), as a table, CSV or JSON. "
        "Default: the last 30 days by user."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--by", choices=reports.GROUPINGS, default="user", help="Grouping (default: user)."
        )
        parser.add_argument(
            "--since", type=_date, metavar="YYYY-MM-DD", help="First day (default: --days ago)."
        )
        parser.add_argument("--until", type=_date, metavar="YYYY-MM-DD", help="Last day (default: today).")
        parser.add_argument(
            "--days", type=int, default=30, help="Range length when --since is not given (30)."
        )
        parser.add_argument("--user", metavar="USERNAME", help="Only this user's spend.")
        parser.add_argument("--model", help="Only this model's spend.")
        parser.add_argument(
            "--format",
            choices=["table", "csv", "json"],
            default="table",
            help="Output format (default: table).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        until = options["until"] or timezone.localdate()
        if options["days"] < 1:
            raise CommandError("--days must be at least 1.")
        since = options["since"] or until - timedelta(days=options["days"] - 1)
        if since > until:
            raise CommandError(f"The range starts ({since}) after it ends ({until}).")
        rows = reports.ledger(since=since, until=until, user=options["user"], model=options["model"])
        by = options["by"]
        spend = reports.spend_by(rows, by)
        total = reports.total_of(spend)
        if options["format"] == "csv":
            out = io.StringIO()
            reports.write_csv(spend, by, out)
            self.stdout.write(out.getvalue(), ending="")
        elif options["format"] == "json":
            self.stdout.write(reports.to_json(spend, total, by))
        else:
            self.stdout.write(f"Spend by {by} from {since} to {until}:")
            self.stdout.write(reports.to_table(spend, total, by))
            if total.estimated:
                self.stdout.write(
                    f"{total.estimated} call(s) had no usage from the model; their counts are estimates."
                )
