"""Titles: after a conversation's first answer the model names it (its own
ledger row, kind `title`), unless the user renamed it meanwhile."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from django.db import transaction

from .. import llm
from ..batches import batches_of
from ..database import update_each
from ..models import Conversation, TokenUsage
from .events import conversation_updated, user_topic
from .fanout import get_hub
from .ledger import price_of, record_call, usage_row

log = logging.getLogger(__name__)

TITLE_CHARS = 60
TITLE_INSTRUCTION = (
    "Write a short title (at most six words) for the conversation below. "
    'Reply with a JSON object only: {"title": "..."}. Plain words: no Markdown, '
    "no quotes, no final period."
)
QUOTES = "\"'\u201c\u201d\u2018\u2019"
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # [text](url) -> text
_MARKS = re.compile(r"(\*\*|\*|`+|~~)")  # emphasis, code, strike-through (not `__`: __init__)
_LEADING = re.compile(r"^\s*(#{1,6}\s+|>\s*|[-*+]\s+|\d+[.)]\s+)+")  # heading, quote, list item


def title_from(content: str) -> str:
    """The provisional title of a new conversation: its first question."""
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def title_of(reply: str) -> str:
    """The title in a model's reply: the JSON object's `title` when the
    reply is one, else the reply itself (a server without JSON output)."""
    text = reply.strip()
    if text.startswith("```"):  # a fenced JSON block
        text = text.strip("`").removeprefix("json").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return clean_title(reply)
    if isinstance(parsed, dict) and isinstance(parsed.get("title"), str):
        return clean_title(parsed["title"])
    return clean_title(reply) if not isinstance(parsed, dict) else ""


def clean_title(text: str) -> str:
    """One plain line: no Markdown (`## **Title**` is `Title`), no quotes, no final period."""
    line = " ".join(text.split())
    line = _LINK.sub(r"\1", line)
    line = _LEADING.sub("", line)
    line = _MARKS.sub("", line)
    title = line.strip().strip(QUOTES).rstrip(".").strip()
    return title[:TITLE_CHARS].strip()


@dataclass
class NewTitle:
    """A title the model made for a conversation, and its call."""

    conversation: Conversation
    title: str
    completion: llm.Completion
    limited: bool  # the user had limits when the answer was accepted

    def usage(self) -> llm.Usage:
        return self.completion.usage or llm.Usage(0, llm.estimate_tokens(self.title))

    def ledger_row(self) -> TokenUsage:
        usage = self.usage()
        return usage_row(
            user_id=self.conversation.owner_id,
            conversation_id=self.conversation.pk,
            kind=TokenUsage.Kind.TITLE,
            model=self.completion.model,
            usage=usage,
            cost=price_of(self.completion.model, usage),
            estimated=self.completion.usage is None,
        )


def save_titles(items: list[NewTitle]) -> list[bool | Exception]:
    """Each title and its ledger row; whether it was kept (only over the
    provisional title: a rename by the user wins). One is a batch of one.
    The titles of users without limits (a burst's) go together: one INSERT
    of their ledger rows and one UPDATE of the titles in one transaction;
    the others, whose calls settle counters, one by one."""
    results: list[bool | Exception | None] = [None] * len(items)
    usual = [i for i, item in enumerate(items) if not item.limited]
    if len(usual) > 1:  # alone, `_save_title` takes a statement fewer
        try:
            with transaction.atomic():
                TokenUsage.objects.bulk_create([items[i].ledger_row() for i in usual])
                provisional = {items[i].conversation.pk: items[i].conversation.title for i in usual}
                unchanged = {
                    pk
                    for pk, title in Conversation.objects.select_for_update()
                    .filter(pk__in=list(provisional))
                    .values_list("pk", "title")
                    if title == provisional[pk]
                }
                titles = [
                    (items[i].conversation.pk, items[i].title)
                    for i in usual
                    if items[i].conversation.pk in unchanged
                ]
                update_each(Conversation, ("title",), titles)
        except Exception as exc:  # the database is away: each hears it
            for i in usual:
                results[i] = exc
        else:
            for i in usual:
                results[i] = items[i].conversation.pk in unchanged
    for i, item in enumerate(items):
        if results[i] is None:
            try:
                results[i] = _save_title(item)
            except Exception as exc:  # this one's caller hears it
                results[i] = exc
    return results  # type: ignore[return-value]


def _save_title(item: NewTitle) -> bool:
    conversation = item.conversation
    with transaction.atomic():
        record_call(
            user_id=conversation.owner_id,
            kind=TokenUsage.Kind.TITLE,
            model=item.completion.model,
            usage=item.usage(),
            estimated=item.completion.usage is None,
            reservation=None,
            conversation_id=conversation.pk,
            limited=item.limited,
        )
        return bool(
            Conversation.objects.filter(pk=conversation.pk, title=conversation.title).update(title=item.title)
        )


async def make_title(conversation: Conversation, question: str, answer: str, *, limited: bool = True) -> None:
    """Ask the model for a title, account for the call, tell the user's tabs."""
    try:
        completion = await llm.complete_chat(
            [
                {"role": "system", "content": TITLE_INSTRUCTION},
                {"role": "user", "content": question[:2000]},
                {"role": "assistant", "content": answer[:2000]},
            ],
            model=conversation.chosen_model,
            max_tokens=40,
            json_object=True,
        )
    except llm.LLMError as exc:
        log.warning("title for %s failed: %s", conversation.pk, exc)
        return
    title = title_of(completion.text)
    if not title:
        return
    try:
        saved = await batches_of(save_titles).submit(NewTitle(conversation, title, completion, limited))
    except Exception as exc:  # the database is away: the provisional title stays
        log.warning("title for %s not saved: %s", conversation.pk, exc)
        return
    if saved:
        get_hub().publish(user_topic(conversation.owner_id), conversation_updated(conversation.pk, title))
