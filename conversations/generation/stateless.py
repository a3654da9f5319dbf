"""A stateless model call (the HTTP API's /chat/completions): the same rules
as an answer (the per-user rate limit, the budget reserved before and
settled after, a ledger row per model call, kind `api`), without a
conversation: the client sends the whole history and nothing is stored but
the ledger.

The client's own tools are offered to the model and their calls handed back
to the client; a built-in tool the request names (`{"type": "function",
"function": {"name": "calculator"}}`) is run here, in tool rounds like an
answer's, while the model calls only such tools."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction

from accounts.limits import take_send

from .. import llm, quotas, refusals, tools
from ..database import in_database
from ..history import messages_tokens
from ..models import TokenUsage
from . import toolrounds
from .ledger import record_model_call, release

log = logging.getLogger(__name__)


@dataclass
class Call:
    """A stateless call that passed the rules: its budget is reserved."""

    user_id: int
    model: str
    messages: list[llm.ChatMessage]
    temperature: float | None = None
    max_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    client_tools: list[dict[str, Any]] = field(default_factory=list)  # passed through
    builtin: list[tools.Tool] = field(default_factory=list)  # run here
    reservation: quotas.Reservation | None = None
    limited: bool = False


def accept_call(*, user: User, call: Call) -> Call:
    """Reserve the call's budget and take one send from the rate limit, in
    one transaction; refused `rate_limited` or `quota_exceeded` with nothing reserved."""
    longest = call.max_tokens or settings.OPENAI_MAX_TOKENS
    try:
        with transaction.atomic():
            call.reservation = quotas.reserve_answer(
                user, estimated_tokens=messages_tokens(call.messages) + longest, model=call.model
            )
            retry_after = take_send(user)
            if retry_after is not None:
                raise refusals.rate_limited(retry_after)
    except quotas.QuotaExceeded as exc:
        raise refusals.over_quota(exc.message, exc.retry_after) from None
    call.limited = call.reservation is not None
    return call


async def run_call(call: Call) -> AsyncGenerator[llm.TextDelta | llm.StreamEnd, None]:
    """The model's text as it streams, then one StreamEnd (with the client's
    tool calls, if the model made any). Raises llm.LLMError. Every model
    call is accounted, also when the client goes away mid-stream (an
    estimate of what was streamed); a refused call costs nothing."""
    messages = list(call.messages)
    rounds = toolrounds.Rounds(call.builtin, passed_on=call.client_tools, answer_unknown=False)
    text: list[str] = []  # of the model call under way
    settled = False
    total = llm.Usage(0, 0)  # of every model call: what the client is told
    try:
        while True:
            text = []
            end: llm.StreamEnd | None = None
            stream = llm.stream_chat(
                messages,
                model=call.model,
                temperature=call.temperature,
                max_tokens=call.max_tokens,
                tools=rounds.offer(),
                response_format=call.response_format,
            )
            async with aclosing(stream):
                async for event in stream:
                    if type(event) is llm.TextDelta:
                        text.append(event.text)
                        yield event
                    elif isinstance(event, llm.StreamEnd):
                        end = event
            assert end is not None
            if rounds.is_round(end):
                said = toolrounds.spoken("".join(text), end)
                total += await in_database(_record)(call, end.model, end.usage, messages, said, final=False)
                context = tools.ToolContext(user_id=call.user_id)
                round_ = await toolrounds.run_round(rounds, end, "".join(text), context)
                messages = [*messages, *toolrounds.messages_of(round_)]
                continue
            used = await in_database(_record)(call, end.model, end.usage, messages, "".join(text), final=True)
            settled = True
            yield dataclasses.replace(end, usage=total + used)
            return
    finally:
        if not settled:
            # An error, or the client went away: account what the model did,
            # or give the reservation back. Shielded: this runs while the
            # request's task is being cancelled.
            spoken = "".join(text)
            ending = asyncio.get_running_loop().create_task(
                in_database(_record_unfinished)(call, call.model, messages, spoken),
                context=contextvars.Context(),  # not the request's: it may be ending
            )
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(ending)


def _record(
    call: Call, model: str, usage: llm.Usage | None, messages: list[Any], text: str, *, final: bool
) -> llm.Usage:
    return record_model_call(
        user_id=call.user_id,
        kind=TokenUsage.Kind.API,
        model=model,
        usage=usage,
        messages=messages,
        text=text,
        reservation=call.reservation if final else None,
        limited=call.limited,
    )


def _record_unfinished(call: Call, model: str, messages: list[Any], text: str) -> None:
    if text:  # the model streamed something: it is billed, so it is counted
        _record(call, model, None, messages, text, final=True)
    else:
        release(call.reservation, call.user_id)
