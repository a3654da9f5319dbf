"""Usage rows and prices: every model call is accounted, with its cost at
today's price, and the quota reservation it held is settled in the same
transaction. One builder for a ledger row (`usage_row`); one way to save an
answer's end (`save_answers`: one end is a batch of one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from .. import llm, quotas
from ..database import update_each
from ..history import messages_tokens
from ..models import Conversation, Message, ModelPrice, TokenUsage, ToolRound, UsagePayload
from ..rendering import render_many, render_markdown_cached
from .events import NO_COST, usage_payload


def price_of(model: str, usage: llm.Usage) -> Decimal:
    """What a call cost at today's price (stored: later price changes don't rewrite it)."""
    price = ModelPrice.current(model)
    return price.cost(usage.prompt_tokens, usage.completion_tokens) if price else NO_COST


def usage_row(
    *,
    user_id: int,
    kind: str,
    model: str,
    usage: llm.Usage,
    cost: Decimal,
    estimated: bool,
    conversation_id: Any = None,
    message_id: Any = None,
) -> TokenUsage:
    """One ledger row, unsaved: every model call's, whatever made it."""
    return TokenUsage(
        user_id=user_id,
        conversation_id=conversation_id,
        message_id=message_id,
        kind=kind,
        model=model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        cost=cost,
        estimated=estimated,
    )


def record_call(
    *,
    user_id: int,
    kind: str,
    model: str,
    usage: llm.Usage,
    estimated: bool,
    reservation: quotas.Reservation | None,
    conversation_id: Any = None,
    message_id: Any = None,
    limited: bool = True,
) -> Decimal:
    """One ledger row and the quota settlement of one model call. Call it in
    the transaction that stores what the call produced. `limited=False`: the
    user had no limits when the answer was accepted, so there are no counters
    to keep (counters made later start from the ledger)."""
    cost = price_of(model, usage)
    usage_row(
        user_id=user_id,
        kind=kind,
        model=model,
        usage=usage,
        cost=cost,
        estimated=estimated,
        conversation_id=conversation_id,
        message_id=message_id,
    ).save(force_insert=True)
    if limited or reservation is not None:
        tokens = usage.prompt_tokens + usage.completion_tokens
        quotas.settle(reservation, user_id=user_id, tokens=tokens, cost=cost)
    return cost


def record_model_call(
    *,
    user_id: int,
    kind: str,
    model: str,
    usage: llm.Usage | None,
    messages: list[Any],
    text: str,
    limited: bool,
    reservation: quotas.Reservation | None = None,
    conversation_id: Any = None,
    message_id: Any = None,
) -> llm.Usage:
    """`record_call` for a call whose usage the server may not have sent (a
    stream cut before its usage chunk): estimated from what was sent
    (`messages`) and what came back (`text`). A tool round's call, a summary,
    an API call. Returns the usage recorded."""
    usage, estimated = usage_or_estimate(usage, messages, text)
    with transaction.atomic():
        record_call(
            user_id=user_id,
            kind=kind,
            model=model,
            usage=usage,
            estimated=estimated,
            reservation=reservation,
            conversation_id=conversation_id,
            message_id=message_id,
            limited=limited,
        )
    return usage


def usage_or_estimate(usage: llm.Usage | None, messages: list[Any], text: str) -> tuple[llm.Usage, bool]:
    """The call's usage as the server reported it, else an estimate (the
    usage chunk comes only at the end of a stream); and whether estimated."""
    if usage is not None:
        return usage, False
    return llm.Usage(
        prompt_tokens=messages_tokens(messages), completion_tokens=llm.estimate_tokens(text)
    ), True


def release(reservation: quotas.Reservation | None, owner_id: int) -> None:
    """Give a reservation back whole: the call it held budget for cost nothing."""
    if reservation is not None:
        quotas.settle(reservation, user_id=owner_id, tokens=0, cost=NO_COST)


def stored_usage(answer: Message) -> UsagePayload:
    """What the answer's model calls used (one row per call: several with tool rounds)."""
    totals = TokenUsage.objects.filter(message_id=answer.pk, kind=TokenUsage.Kind.ANSWER).aggregate(
        prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), cost=Sum("cost")
    )
    return usage_payload(totals["prompt"] or 0, totals["completion"] or 0, totals["cost"] or NO_COST)


def accounting_of(prompt_tokens: int, reservation: quotas.Reservation | None) -> dict[str, Any]:
    """What settling a streaming answer needs if its worker dies (its
    `Message.accounting`): the prompt's estimated tokens and the quota holds."""
    return {
        "prompt_tokens": prompt_tokens,
        "limited": reservation is not None,
        "holds": [[h.counter_id, h.tokens, str(h.cost)] for h in reservation.holds] if reservation else [],
    }


def reservation_of(accounting: dict[str, Any] | None, user_id: int) -> quotas.Reservation | None:
    """The quota reservation an answer holds, from its `accounting`."""
    if not accounting or not accounting.get("limited"):
        return None
    holds = [quotas.Hold(int(c), int(t), Decimal(cost)) for c, t, cost in accounting.get("holds", [])]
    return quotas.Reservation(user_id=user_id, holds=holds)


# --- An answer's end -----------------------------------------------------------------------


@dataclass
class AnswerEnd:
    """What an answer's end stores: its final state and its last model call."""

    answer: Message
    owner_id: int
    content: str
    status: str
    finish_reason: str
    model: str
    usage: llm.Usage | None  # the last call's, as the server reported it
    messages: list[llm.ChatMessage]  # what that call sent (for an estimate)
    called: bool  # the model did billable work
    reservation: quotas.Reservation | None
    first_of_chat: bool = False  # the answer of the conversation's first question
    tool_rounds: list[ToolRound] = field(default_factory=list)
    error: str = ""

    def final_fields(self, now: Any) -> dict[str, Any]:
        """The answer's row as the end leaves it."""
        return {
            "content": self.content,
            "status": self.status,
            "finish_reason": self.finish_reason,
            "model": self.model,
            "worker": "",
            "accounting": None,
            "tool_rounds": self.tool_rounds or None,
            "error": self.error,
            "updated_at": now,
        }

    def wants_title(self) -> bool:
        """The conversation gets a model-made title after this answer."""
        return self.first_of_chat and self.status in (Message.Status.COMPLETE, Message.Status.TRUNCATED)


class Saved(NamedTuple):
    usage: UsagePayload  # the answer's usage payload (all its model calls)
    html: str  # its sanitised HTML
    wants_title: bool


def save_answers(ends: list[AnswerEnd]) -> list[Saved | Exception]:
    """Each answer's final state and its ledger row, in one transaction;
    one end is a batch of one. The usual end (a streaming answer, one model
    call, no budget to settle) of however many answers is one UPDATE of the
    answers, one of their conversations and one INSERT of their ledger rows;
    every other end (a budget to settle, tool rounds, one that was swept or
    is stored already) is saved on its own, in the same call."""
    results: list[Saved | Exception | None] = [None] * len(ends)
    usual = [
        i for i, end in enumerate(ends) if end.called and end.reservation is None and not end.tool_rounds
    ]
    if len(usual) > 1:  # alone, `_save_one` takes a statement fewer
        try:
            with transaction.atomic():
                ids = [ends[i].answer.pk for i in usual]
                streaming = set(
                    Message.objects.select_for_update()
                    .filter(pk__in=ids, status=Message.Status.STREAMING)
                    .values_list("pk", flat=True)
                )
                together = [i for i in usual if ends[i].answer.pk in streaming]
                costs = _save_together([ends[i] for i in together]) if together else []
        except Exception as exc:  # the database is away: each hears it, and retries
            for i in usual:
                results[i] = exc
        else:
            htmls = render_many([ends[i].content for i in together]) if together else []
            for i, html, (usage, cost) in zip(together, htmls, costs, strict=True):
                payload = usage_payload(usage.prompt_tokens, usage.completion_tokens, cost)
                results[i] = Saved(payload, html, ends[i].wants_title())
    for i, end in enumerate(ends):
        if results[i] is None:
            try:
                results[i] = _save_one(end)
            except Exception as exc:  # this one's caller hears it (and retries if the database was away)
                results[i] = exc
    return results  # type: ignore[return-value]


def _save_together(ends: list[AnswerEnd]) -> list[tuple[llm.Usage, Decimal]]:
    """The usual ends of streaming answers, in the caller's transaction; the
    usage and cost of each."""
    now = timezone.now()
    changed = ("content", "status", "finish_reason", "model", "worker", "accounting", "tool_rounds", "error")
    rows = []
    for end in ends:
        final = end.final_fields(now)
        rows.append((end.answer.pk, *(final[name] for name in changed), now))
    update_each(Message, (*changed, "updated_at"), rows, status=Message.Status.STREAMING)
    Conversation.objects.filter(pk__in={end.answer.conversation_id for end in ends}).update(updated_at=now)
    accounted, ledger = [], []
    for end in ends:
        usage, estimated = usage_or_estimate(end.usage, end.messages, end.content)
        cost = price_of(end.model, usage)
        accounted.append((usage, cost))
        ledger.append(
            usage_row(
                user_id=end.owner_id,
                kind=TokenUsage.Kind.ANSWER,
                model=end.model,
                usage=usage,
                cost=cost,
                estimated=estimated,
                conversation_id=end.answer.conversation_id,
                message_id=end.answer.pk,
            )
        )
    TokenUsage.objects.bulk_create(ledger)
    return accounted


def _save_one(end: AnswerEnd) -> Saved:
    """An end that is not the usual one: a budget to settle, tool rounds, an
    answer that was swept meanwhile, one stored already (a retry)."""
    answer, owner_id = end.answer, end.owner_id
    usage, estimated = usage_or_estimate(end.usage, end.messages, end.content)
    reservation = end.reservation
    with transaction.atomic():
        now = timezone.now()
        final = end.final_fields(now)
        # The UPDATE locks the row until commit: a conversation deleted
        # meanwhile is seen as gone (0 rows) and cannot vanish between this
        # and the ledger row.
        limited = reservation is not None
        alive = bool(Message.objects.filter(pk=answer.pk, status=Message.Status.STREAMING).update(**final))
        swept = False
        if not alive:  # rare: see what ended it
            stored = Message.objects.filter(pk=answer.pk).values_list("status", flat=True).first()
            if stored is not None and (stored != Message.Status.INTERRUPTED or end.status == stored):
                # This very end is stored already (a retry whose first try
                # committed): never a second ledger row or settlement.
                return Saved(stored_usage(answer), render_markdown_cached(end.content), False)
            swept = stored is not None and _end_after_sweep(answer, owner_id, final, limited=limited)
            alive = swept
        if swept:
            reservation = None  # the sweep released it
        if alive:
            Conversation.objects.filter(pk=answer.conversation_id).update(updated_at=now)
        cost = NO_COST
        if end.called:
            cost = record_call(
                user_id=owner_id,
                kind=TokenUsage.Kind.ANSWER,
                model=end.model,
                usage=usage,
                estimated=estimated,
                reservation=reservation,
                conversation_id=answer.conversation_id if alive else None,
                message_id=answer.pk if alive else None,
                limited=limited,
            )
        else:
            release(reservation, owner_id)
    html = render_markdown_cached(end.content)  # and so cached for the page
    wants_title = alive and end.wants_title()
    if end.tool_rounds and alive:  # several calls: the answer's usage is all of them
        return Saved(stored_usage(answer), html, wants_title)
    if not end.called:
        return Saved(usage_payload(0, 0, NO_COST), html, False)
    return Saved(usage_payload(usage.prompt_tokens, usage.completion_tokens, cost), html, wants_title)


def _end_after_sweep(answer: Message, owner_id: int, final: dict[str, Any], *, limited: bool) -> bool:
    """The answer is not `streaming` any more although it ran here to its
    end: this worker was cut off from the database long enough for another
    worker to settle it as `interrupted` (with an estimate). The real end
    wins: its text and status replace the sweep's, and the estimate leaves
    the ledger and the counters (the real call is recorded by the caller).
    False if the answer is gone (its conversation was deleted)."""
    replaced = Message.objects.filter(pk=answer.pk, status=Message.Status.INTERRUPTED).update(**final)
    if not replaced:
        return False
    estimate = TokenUsage.objects.filter(
        message_id=answer.pk, kind=TokenUsage.Kind.ANSWER, estimated=True
    ).first()
    if estimate is not None:
        if limited:
            tokens = estimate.prompt_tokens + estimate.completion_tokens
            quotas.settle(None, user_id=owner_id, tokens=-tokens, cost=-estimate.cost)
        estimate.delete()
    return True
