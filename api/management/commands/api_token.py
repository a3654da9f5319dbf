"""`manage.py api_token --user NAME [--name LABEL] [--expires 30d]`: a new
personal API token, printed on the last line (for scripts and tests)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from api import tokens


class Command(BaseCommand):
    help = "Create a personal API token for a user; the token is printed on the last line, once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, metavar="USERNAME")
        parser.add_argument("--name", default="command line", metavar="LABEL", help="What the token is for.")
        parser.add_argument("--expires", metavar="DURATION", help="e.g. 30d, 12h, 2w; default: never.")

    def handle(self, *args: Any, **options: Any) -> None:
        user = get_user_model().objects.filter(username=options["user"]).first()
        if user is None:
            raise CommandError(f"No such user: {options['user']}.")
        expires_in = None
        if options["expires"]:
            try:
                expires_in = tokens.parse_duration(options["expires"])
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        row, token = tokens.create(user, options["name"], expires_in=expires_in)
        until = f"expires {row.expires_at:%Y-%m-%d %H:%M} UTC" if row.expires_at else "never expires"
        self.stdout.write(f"API token “{row.name}” for {user.get_username()} ({until}). It is shown once:")
        self.stdout.write(token)
