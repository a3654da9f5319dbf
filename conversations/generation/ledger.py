"""Usage rows and prices: every model call is accounted, with its cost at
today's price, and the quota reservation it held is settled in the same
transaction."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts import quotas

from .. import llm
from ..models import Conversation, Message, ModelPrice, TokenUsage
from ..rendering import render_markdown_cached
from .events import NO_COST, usage_payload


def price_of(model: str, usage: llm.Usage) -> Decimal:
    """What a call cost at today's price (stored: later price changes don't rewrite it)."""
    price = ModelPrice.current(model)
    return price.cost(usage.prompt_tokens, usage.completion_tokens) if price else NO_COST


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
    TokenUsage.objects.create(
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
    if limited or reservation is not None:
        tokens = usage.prompt_tokens + usage.completion_tokens
        quotas.settle(reservation, user=_UserRef(user_id), tokens=tokens, cost=cost)
    return cost


class _UserRef:
    """`quotas.settle` needs only the user's pk."""

    def __init__(self, pk: int) -> None:
        self.pk = pk


def save_answer(
    *,
    answer: Message,
    owner_id: int,
    content: str,
    status: str,
    finish_reason: str,
    model: str,
    usage: llm.Usage | None,
    messages: list[llm.ChatMessage],
    called: bool,
    reservation: quotas.Reservation | None,
    first_of_chat: bool = False,
) -> tuple[dict[str, Any], str, bool]:
    """The answer's final state and its ledger row, together, in one
    transaction. Returns the usage payload, the answer's sanitised HTML and
    whether the conversation wants a title (`first_of_chat`: the answer of
    the question that started it, which can only be its first answer)."""
    estimated = usage is None
    if usage is None:
        usage = llm.Usage(
            prompt_tokens=sum(llm.estimate_tokens(m["content"]) + 4 for m in messages),
            completion_tokens=llm.estimate_tokens(content),
        )
    with transaction.atomic():
        now = timezone.now()
        # The UPDATE locks the row until commit: a conversation deleted
        # meanwhile is seen as gone (0 rows) and cannot vanish between this
        # and the ledger row.
        alive = bool(
            Message.objects.filter(pk=answer.pk).update(
                content=content,
                status=status,
                finish_reason=finish_reason,
                model=model,
                worker="",
                updated_at=now,
            )
        )
        if alive:
            Conversation.objects.filter(pk=answer.conversation_id).update(updated_at=now)
        if called:
            cost = record_call(
                user_id=owner_id,
                kind=TokenUsage.Kind.ANSWER,
                model=model,
                usage=usage,
                estimated=estimated,
                reservation=reservation,
                conversation_id=answer.conversation_id if alive else None,
                message_id=answer.pk if alive else None,
                limited=reservation is not None,
            )
        elif reservation is not None:
            quotas.settle(reservation, user=_UserRef(owner_id), tokens=0, cost=NO_COST)
    wants_title = alive and first_of_chat and status in (Message.Status.COMPLETE, Message.Status.TRUNCATED)
    html = render_markdown_cached(content)  # and so cached for the page
    if not called:
        return usage_payload(0, 0, NO_COST), html, False
    return usage_payload(usage.prompt_tokens, usage.completion_tokens, cost), html, wants_title
