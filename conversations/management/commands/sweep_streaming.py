from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from conversations.generation import sweep_interrupted


class Command(BaseCommand):
    help = (
        "Mark answers left 'streaming' by a dead process as 'interrupted': those of a "
        "process of this machine that no longer runs, and any not checkpointed for "
        "--stale-after seconds. Safe to run from cron while the site serves."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--stale-after",
            type=float,
            default=settings.CHAT_STALE_AFTER,
            help="Seconds without a checkpoint after which an answer counts as dead "
            "(default: CHAT_STALE_AFTER, %(default)s).",
        )

    def handle(self, *args: Any, stale_after: float, **options: Any) -> None:
        count = sweep_interrupted(stale_after=stale_after)
        self.stdout.write(f"Marked {count} stuck answer(s) as interrupted.")
