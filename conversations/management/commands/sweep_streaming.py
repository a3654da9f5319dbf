from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from conversations.generation import sweep_interrupted


class Command(BaseCommand):
    help = (
        "Settle answers left 'streaming' by a dead process as 'interrupted' (text, "
        "ledger, quota): those of a process of this machine that no longer runs, and "
        "any without a heartbeat for --stale-after seconds. Running workers do this "
        "themselves; this is the backstop for cron, safe while the site serves."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--stale-after",
            type=float,
            default=max(120.0, settings.CHAT_STALE_AFTER),
            help="Seconds without a heartbeat after which an answer counts as dead "
            "(default %(default)s: the workers settle dead answers themselves after "
            "CHAT_STALE_AFTER; this is the backstop, patient enough not to take a "
            "worker that was briefly cut off from the database for dead).",
        )

    def handle(self, *args: Any, stale_after: float, **options: Any) -> None:
        count = sweep_interrupted(stale_after=stale_after)
        self.stdout.write(f"Marked {count} stuck answer(s) as interrupted.")
