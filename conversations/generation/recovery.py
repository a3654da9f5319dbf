"""Answers whose worker died: found by their heartbeat (a live answer's
`updated_at` is refreshed every CHAT_CHECKPOINT_INTERVAL by its worker, see
runner.Checkpointer, with the database's clock) or by their worker id (a
process of this machine that no longer exists: identity.py), and settled
as `interrupted` by whichever worker finds them first: the text as far as
it was shown (the answer's log in Redis has every delta the sockets got;
the database has the last checkpoint), the usage estimated into the
ledger, the quota reservation released, every follower told. A live answer
is never touched: its heartbeat is fresh."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction
from django.db.models.functions import Now
from django.utils import timezone

from .. import llm
from ..models import Message, TokenUsage
from ..rendering import render_markdown_cached
from . import answer_log
from .events import NO_COST, finished_event, usage_payload
from .fanout import tell
from .identity import WORKER_ID, worker_dead
from .ledger import record_call, release, reservation_of

__all__ = ["WORKER_ID", "dead_answers", "settle_dead", "sweep_interrupted"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadAnswer:
    pk: Any
    conversation_id: Any


def dead_answers(*, stale_after: float | None, include_self: bool = False) -> list[DeadAnswer]:
    """Streaming answers whose worker is gone: run by a process of this
    machine that no longer exists (with `include_self`, this process too: at
    start-up it has run nothing yet), or, when `stale_after` is given, whose
    heartbeat is older than that, whoever ran them."""
    streaming = Message.objects.filter(status=Message.Status.STREAMING)
    found: dict[Any, DeadAnswer] = {}
    if stale_after is not None:
        # The database's clock, as the heartbeats' (runner.Checkpointer): the
        # workers' hosts may disagree by more than CHAT_STALE_AFTER.
        stale = streaming.filter(updated_at__lt=Now() - timedelta(seconds=stale_after))
        for pk, conversation_id in stale.values_list("pk", "conversation_id"):
            found[pk] = DeadAnswer(pk, conversation_id)
    for pk, conversation_id, worker in streaming.values_list("pk", "conversation_id", "worker"):
        if pk not in found and worker_dead(worker, include_self=include_self):
            found[pk] = DeadAnswer(pk, conversation_id)
    return list(found.values())


def settle_dead(pk: Any, shown: str | None = None) -> dict[str, Any] | None:
    """Settle one dead answer in one transaction; returns its
    `generation.finished` event for the followers, or None if it was not
    streaming any more (another worker settled it, or it ended).

    `shown`: the text its followers were shown (from the answer's log), used
    when it is longer than the last checkpoint."""
    with transaction.atomic():
        answer = (
            Message.objects.select_related("conversation")
            .filter(pk=pk, status=Message.Status.STREAMING)
            .first()
        )
        if answer is None:
            return None
        content = answer.content
        if shown is not None and len(shown) > len(content) and shown.startswith(content):
            content = shown
        accounting = answer.accounting or {}
        claimed = Message.objects.filter(pk=pk, status=Message.Status.STREAMING).update(
            status=Message.Status.INTERRUPTED,
            content=content,
            worker="",
            accounting=None,
            updated_at=timezone.now(),
        )
        if not claimed:  # another worker settled it between the two statements
            return None
        owner_id = answer.conversation.owner_id
        reservation = reservation_of(accounting, owner_id)
        if content:
            # The model was working: its prompt and what it wrote, estimated
            # (the usage chunk comes only at the end of a stream).
            usage = llm.Usage(
                prompt_tokens=int(accounting.get("prompt_tokens") or 0),
                completion_tokens=llm.estimate_tokens(content),
            )
            cost = record_call(
                user_id=owner_id,
                kind=TokenUsage.Kind.ANSWER,
                model=answer.model,
                usage=usage,
                estimated=True,
                reservation=reservation,
                conversation_id=answer.conversation_id,
                message_id=answer.pk,
                limited=reservation is not None,
            )
            payload = usage_payload(usage.prompt_tokens, usage.completion_tokens, cost)
        else:
            # Nothing came back: no sign the model ever ran; the hold goes back.
            release(reservation, owner_id)
            payload = usage_payload(0, 0, NO_COST)
    log.warning("answer %s: its worker is gone; settled as interrupted (%d chars kept)", pk, len(content))
    return finished_event(
        answer,
        status=Message.Status.INTERRUPTED,
        finish_reason="",
        content=content,
        html=render_markdown_cached(content),
        model=answer.model,
        usage=payload,
    )


def sweep_interrupted(*, stale_after: float | None = None, at_startup: bool = False) -> int:
    """Settle every dead answer (see `dead_answers`); for cron
    (`manage.py sweep_streaming`), start-up and tests. Running workers do the
    same by themselves every few seconds (process.Worker.sweep).

    At start-up only dead processes of this machine count: heartbeats are not
    judged by a process that has just come up (the database may have just
    come back too, before any worker could beat again)."""
    if at_startup:
        stale_after = None
    elif stale_after is None:
        stale_after = settings.CHAT_STALE_AFTER
    count = 0
    for dead in dead_answers(stale_after=stale_after, include_self=at_startup):
        event = settle_dead(dead.pk, answer_log.shown_text(dead.pk))
        if event is None:
            continue
        count += 1
        try:
            async_to_sync(tell)(str(dead.conversation_id), event)
        except Exception as exc:  # the database has it; pages see it on their next join
            log.warning("could not tell the followers of %s: %s", dead.conversation_id, exc)
    return count
