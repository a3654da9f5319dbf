from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from conversations import attachments
from conversations.models import Attachment, Conversation, Message, TokenUsage
from files.models import File

_AGE = re.compile(r"^(\d+)\s*([hdw])$")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}
UNSENT_FILE_AGE = timedelta(days=1)


def parse_age(text: str) -> timedelta:
    """'90d', '12w', '36h' -> a timedelta."""
    match = _AGE.match(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise CommandError(f"--older-than wants a positive age like 90d, 12w or 36h, not {text!r}.")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@dataclass
class Pruned:
    conversations: int = 0
    messages: int = 0
    usage_unlinked: int = 0
    files: int = 0


class Command(BaseCommand):
    help = (
        "Delete chat history older than an age. By default whole conversations whose last "
        "activity is older; with --what messages, also the old messages of conversations "
        "still in use. Pinned conversations are always kept, and so is the token ledger: "
        "usage rows stay, only their links to the deleted conversation or message are "
        "cleared. The files of deleted messages go with them (unless a kept message holds them "
        "too), and so do files uploaded more than a day ago and never sent. Works in batches, "
        "so memory stays flat whatever the size."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--older-than", required=True, metavar="AGE", help="Age such as 90d, 12w or 36h.")
        parser.add_argument(
            "--what",
            choices=["conversations", "messages"],
            default="conversations",
            help="conversations (default): whole conversations idle for longer than AGE. "
            "messages: every message older than AGE, and conversations left empty.",
        )
        parser.add_argument(
            "--user",
            action="append",
            dest="users",
            metavar="USERNAME",
            help="Only this user's history (repeat for several users).",
        )
        parser.add_argument(
            "--batch-size", type=int, default=2000, help="Rows deleted per transaction (default 2000)."
        )
        parser.add_argument("--dry-run", action="store_true", help="Count what would go; delete nothing.")

    def handle(self, *args: Any, **options: Any) -> None:
        age = parse_age(options["older_than"])
        cutoff = timezone.now() - age
        batch = options["batch_size"]
        if batch < 1:
            raise CommandError("--batch-size must be at least 1.")
        owners = self._owners(options["users"])
        conversations = Conversation.objects.filter(updated_at__lt=cutoff, pinned=False)
        old_messages = Message.objects.filter(created_at__lt=cutoff, conversation__pinned=False).exclude(
            status=Message.Status.STREAMING
        )
        if owners is not None:
            conversations = conversations.filter(owner__in=owners)
            old_messages = old_messages.filter(conversation__owner__in=owners)
        pinned = Conversation.objects.filter(updated_at__lt=cutoff, pinned=True)
        if owners is not None:
            pinned = pinned.filter(owner__in=owners)
        kept = pinned.count()
        scope = f"older than {options['older_than']} (before {timezone.localtime(cutoff):%Y-%m-%d %H:%M %Z})"
        if options["users"]:
            scope += " of " + ", ".join(options["users"])

        if options["dry_run"]:
            self._dry_run(conversations, old_messages, options["what"], scope, kept, owners)
            return
        pruned = Pruned()
        self._prune_conversations(conversations, batch, pruned)
        if options["what"] == "messages":
            self._prune_messages(old_messages, batch, pruned)
        pruned.files += self._prune_unsent_files(owners)
        self.stdout.write(
            f"Deleted {pruned.conversations} conversation(s) and {pruned.messages} message(s) {scope}; "
            f"kept {kept} pinned conversation(s). Deleted {pruned.files} file(s) no message holds."
        )
        self.stdout.write(
            f"Token ledger untouched: {pruned.usage_unlinked} usage row(s) kept, "
            "unlinked from the deleted history."
        )

    def _unsent_files(self, owners: list[int] | None) -> QuerySet[File]:
        old = timezone.now() - UNSENT_FILE_AGE
        # A project's file is held by the project, however old.
        unsent = File.objects.filter(created_at__lt=old, attachments__isnull=True, project_files__isnull=True)
        return unsent.filter(owner__in=owners) if owners is not None else unsent

    def _prune_unsent_files(self, owners: list[int] | None) -> int:
        """Files uploaded more than a day ago that no message or project
        holds (never sent, or let go of by a message deleted since)."""
        ids = list(self._unsent_files(owners).values_list("pk", flat=True))
        # Locked and checked again: a send or a project taking one meanwhile keeps it.
        return sum(attachments.delete_unattached(ids[i : i + 500]) for i in range(0, len(ids), 500))

    def _owners(self, usernames: list[str] | None) -> list[int] | None:
        if not usernames:
            return None
        found = dict(get_user_model().objects.filter(username__in=usernames).values_list("username", "pk"))
        missing = sorted(set(usernames) - set(found))
        if missing:
            raise CommandError(f"No such user: {', '.join(missing)}.")
        return list(found.values())

    def _dry_run(
        self,
        conversations: QuerySet[Conversation],
        old_messages: QuerySet[Message],
        what: str,
        scope: str,
        kept: int,
        owners: list[int] | None,
    ) -> None:
        n_conversations = conversations.count()
        going = Message.objects.filter(conversation__in=conversations)
        if what == "messages":
            going = going | old_messages
        n_messages = going.count()
        # The files only going messages hold, and the old ones never sent.
        still_held = Attachment.objects.exclude(message__in=going.values("pk")).values("file_id")
        n_files = (
            File.objects.filter(attachments__message__in=going.values("pk"))
            .exclude(pk__in=still_held)
            .distinct()
            .count()
        ) + self._unsent_files(owners).count()
        self.stdout.write(
            f"Dry run: would delete {n_conversations} conversation(s) and {n_messages} message(s) {scope}, "
            f"and {n_files} file(s) no message would hold; would keep {kept} pinned conversation(s). "
            "Nothing was deleted."
        )

    def _prune_conversations(self, conversations: QuerySet[Conversation], batch: int, pruned: Pruned) -> None:
        # Keyset over the primary key: each batch is one indexed range read,
        # and only its ids are held in memory.
        last = None
        per_batch = max(1, batch // 20)  # conversations hold many messages each
        while True:
            page = conversations.order_by("pk")
            if last is not None:
                page = page.filter(pk__gt=last)
            ids = list(page.values_list("pk", flat=True)[:per_batch])
            if not ids:
                return
            last = ids[-1]
            with transaction.atomic():
                # The ledger rows stay; only their pointers to this history go.
                pruned.usage_unlinked += TokenUsage.objects.filter(conversation_id__in=ids).update(
                    conversation=None, message=None
                )
                messages = Message.objects.filter(conversation_id__in=ids)
                files = _unhold(messages)
                pruned.messages += _raw_delete(messages)
                # Still idle: a conversation that came back to life meanwhile
                # stays (and its new messages with it, through the cascade).
                _, per_model = conversations.filter(pk__in=ids).delete()
                pruned.conversations += per_model.get("conversations.Conversation", 0)
                pruned.messages += per_model.get("conversations.Message", 0)
                pruned.files += attachments.delete_unattached(files)

    def _prune_messages(self, old_messages: QuerySet[Message], batch: int, pruned: Pruned) -> None:
        # Batches are ranges of `created_at` (indexed): find where the next
        # `batch` messages end, delete everything up to there, repeat.
        while True:
            ends = list(
                old_messages.order_by("created_at").values_list("created_at", flat=True)[batch - 1 : batch]
            )
            chunk = old_messages.filter(created_at__lte=ends[0]) if ends else old_messages
            with transaction.atomic():
                pruned.usage_unlinked += TokenUsage.objects.filter(message__in=chunk.values("pk")).update(
                    message=None
                )
                # The raw delete runs no on_delete: a summary's mark on a
                # deleted message is cleared here (its summary stays).
                Conversation.objects.filter(summary_through__in=chunk.values("pk")).update(
                    summary_through=None
                )
                files = _unhold(chunk)
                pruned.messages += _raw_delete(chunk)
                pruned.files += attachments.delete_unattached(files)
            if not ends:
                return


def _unhold(messages: QuerySet[Message]) -> list[Any]:
    """Let go of the files these messages hold (before their raw delete);
    the ids of those files."""
    files = attachments.held_by(messages)
    held = Attachment.objects.filter(message__in=messages.values("pk"))
    held._raw_delete(held.db)
    return files


def _raw_delete(messages: QuerySet[Message]) -> int:
    """One DELETE statement, no rows loaded into Python. Only for messages
    nothing refers to any more: the ledger's pointers are cleared first."""
    return messages._raw_delete(messages.db)
