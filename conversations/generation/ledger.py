"""Usage rows and prices: every model call is accounted, with its cost at
today's price, and the quota reservation it held is settled in the same
transaction."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from accounts import quotas

from .. import llm
from ..history import messages_tokens
from ..models import Conversation, Message, ModelPrice, TokenUsage
from ..rendering import render_many, render_markdown_cached
from .database import update_each
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
    usage, estimated = _usage_or_estimate(usage, messages, text)
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


def _usage_or_estimate(usage: llm.Usage | None, messages: list[Any], text: str) -> tuple[llm.Usage, bool]:
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
        quotas.settle(reservation, user=_UserRef(owner_id), tokens=0, cost=NO_COST)


def stored_usage(answer: Message) -> dict[str, Any]:
    """What the answer's model calls used (one row per call: several with tool rounds)."""
    totals = TokenUsage.objects.filter(message_id=answer.pk, kind=TokenUsage.Kind.ANSWER).aggregate(
        prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), cost=Sum("cost")
    )
    return usage_payload(totals["prompt"] or 0, totals["completion"] or 0, totals["cost"] or NO_COST)


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
            quotas.settle(None, user=_UserRef(owner_id), tokens=-tokens, cost=-estimate.cost)
        estimate.delete()
    return True


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
    tool_rounds: list[dict[str, Any]] | None = None,
    error: str = "",
) -> tuple[dict[str, Any], str, bool]:
    """The answer's final state and its ledger row, together, in one
    transaction. Returns the usage payload, the answer's sanitised HTML and
    whether the conversation wants a title (`first_of_chat`: the answer of
    the question that started it, which can only be its first answer)."""
    usage, estimated = _usage_or_estimate(usage, messages, content)
    with transaction.atomic():
        now = timezone.now()
        final = {
            "content": content,
            "status": status,
            "finish_reason": finish_reason,
            "model": model,
            "worker": "",
            "accounting": None,
            "tool_rounds": tool_rounds or None,
            "error": error,
            "updated_at": now,
        }
        # The UPDATE locks the row until commit: a conversation deleted
        # meanwhile is seen as gone (0 rows) and cannot vanish between this
        # and the ledger row.
        limited = reservation is not None
        alive = bool(Message.objects.filter(pk=answer.pk, status=Message.Status.STREAMING).update(**final))
        swept = False
        if not alive:  # rare: see what ended it
            stored = Message.objects.filter(pk=answer.pk).values_list("status", flat=True).first()
            if stored is not None and (stored != Message.Status.INTERRUPTED or status == stored):
                # This very end is stored already (a retry whose first try
                # committed): never a second ledger row or settlement.
                return stored_usage(answer), render_markdown_cached(content), False
            swept = stored is not None and _end_after_sweep(answer, owner_id, final, limited=limited)
            alive = swept
        if swept:
            reservation = None  # the sweep released it
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
                limited=limited,
            )
        else:
            release(reservation, owner_id)
    wants_title = alive and first_of_chat and status in (Message.Status.COMPLETE, Message.Status.TRUNCATED)
    html = render_markdown_cached(content)  # and so cached for the page
    if tool_rounds and alive:  # several calls: the answer's usage is all of them
        return stored_usage(answer), html, wants_title
    if not called:
        return usage_payload(0, 0, NO_COST), html, False
    return usage_payload(usage.prompt_tokens, usage.completion_tokens, cost), html, wants_title


def save_answers(ends: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str, bool] | Exception]:
    """`save_answer(**end)` for each end, answers that ended together (a
    burst's): one transaction, and for the usual end (a streaming answer,
    one model call, no budget to settle) one UPDATE of the answers, one of
    their conversations and one INSERT of their ledger rows, however many.
    Every other end is saved by `save_answer` itself, in the same call."""
    results: list[tuple[dict[str, Any], str, bool] | Exception | None] = [None] * len(ends)
    usual = [
        i
        for i, end in enumerate(ends)
        if end["called"] and end["reservation"] is None and not end.get("tool_rounds")
    ]
    if len(usual) > 1:
        with transaction.atomic():
            ids = [ends[i]["answer"].pk for i in usual]
            streaming = set(
                Message.objects.select_for_update()
                .filter(pk__in=ids, status=Message.Status.STREAMING)
                .values_list("pk", flat=True)
            )
            together = [i for i in usual if ends[i]["answer"].pk in streaming]
            if together:
                _save_together([ends[i] for i in together])
        htmls = render_many([ends[i]["content"] for i in together]) if together else []
        for i, html in zip(together, htmls, strict=True):
            end = ends[i]
            usage, cost = end["_usage"], end["_cost"]
            wants_title = end.get("first_of_chat", False) and end["status"] in (
                Message.Status.COMPLETE,
                Message.Status.TRUNCATED,
            )
            results[i] = (
                usage_payload(usage.prompt_tokens, usage.completion_tokens, cost),
                html,
                wants_title,
            )
    for i, end in enumerate(ends):
        if results[i] is None:
            try:
                results[i] = save_answer(**{k: v for k, v in end.items() if not k.startswith("_")})
            except Exception as exc:  # this one's caller hears it (and retries if the database was away)
                results[i] = exc
    return results  # type: ignore[return-value]


def _save_together(ends: list[dict[str, Any]]) -> None:
    """The usual ends of streaming answers, in the caller's transaction."""
    now = timezone.now()
    by_pk = {end["answer"].pk: end for end in ends}

    changed = ("content", "status", "finish_reason", "model", "error")
    update_each(
        Message,
        (*changed, "worker", "accounting", "tool_rounds", "updated_at"),
        [(pk, *(end.get(name, "") for name in changed), "", None, None, now) for pk, end in by_pk.items()],
        status=Message.Status.STREAMING,
    )
    Conversation.objects.filter(pk__in={end["answer"].conversation_id for end in ends}).update(updated_at=now)
    rows = []
    for end in ends:
        usage, estimated = _usage_or_estimate(end["usage"], end["messages"], end["content"])
        end["_usage"], end["_cost"] = usage, price_of(end["model"], usage)
        rows.append(
            TokenUsage(
                user_id=end["owner_id"],
                conversation_id=end["answer"].conversation_id,
                message_id=end["answer"].pk,
                kind=TokenUsage.Kind.ANSWER,
                model=end["model"],
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                cost=end["_cost"],
                estimated=estimated,
            )
        )
    TokenUsage.objects.bulk_create(rows)
