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

from accounts.limits import take_send, take_sends

from .. import llm, quotas, refusals, selectors, tools
from ..attachments import has_images
from ..batches import batches_of
from ..database import in_database
from ..history import messages_tokens
from ..models import ChatModel, SystemPrompt, TokenUsage
from . import toolrounds
from .ledger import record_model_call, release
from .pace import pace

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


class UnknownModel(Exception):
    """The call names a model that does not exist or that users may not use."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")
        self.model = model


async def accept(user: User, call: Call) -> Call:
    """`accept_calls` of this call, in one database call with the calls that
    arrive meanwhile (a script's burst), each with the outcome it would get
    alone: the call with its model, the staff's default prompt and its
    reservation, or the exception (UnknownModel, a Refusal)."""
    return await batches_of(accept_calls).submit((user, call))


def accept_calls(asks: list[tuple[User, Call]]) -> list[Call | Exception]:
    """Calls that arrive together: the usable models and the default prompt
    read once; the rate limit of users without a quota taken in one cache
    round trip; a user with a quota has each call reserved on its own, in
    order (`accept_call`)."""
    results: list[Call | Exception | None] = [None] * len(asks)
    usable = {m.name for m in selectors.usable_models()}
    default = selectors.default_model()
    needs_prompt = any(not any(m["role"] == "system" for m in call.messages) for _user, call in asks)
    prompt = SystemPrompt.objects.filter(is_default=True).only("text").first() if needs_prompt else None
    for index, (_user, call) in enumerate(asks):
        call.model = call.model or default
        if call.model not in usable:
            results[index] = UnknownModel(call.model)
            continue
        if has_images(call.messages) and not ChatModel.can_see(call.model):
            results[index] = refusals.invalid(f"The model “{call.model[:100]}” cannot see images.")
            continue
        if prompt is not None and prompt.text and not any(m["role"] == "system" for m in call.messages):
            call.messages = [{"role": "system", "content": prompt.text}, *call.messages]
    waiting = [index for index in range(len(asks)) if results[index] is None]
    limits = quotas.limits_for_many([asks[index][0] for index in waiting])
    together = [index for index in waiting if limits[asks[index][0].pk].unlimited]
    if together:
        try:
            waits = take_sends([asks[index][0] for index in together])
        except Exception as exc:  # not expected (take_sends survives a lost cache): each alone
            log.warning("the rate limit of %d calls failed together (%r): each alone", len(together), exc)
        else:
            for index, retry_after in zip(together, waits, strict=True):
                call = asks[index][1]
                results[index] = call if retry_after is None else refusals.rate_limited(retry_after)
    for index in waiting:
        if results[index] is None:
            user, call = asks[index]
            try:
                results[index] = accept_call(user=user, call=call)
            except Exception as exc:  # a refusal: its caller hears it
                results[index] = exc
    return results  # type: ignore[return-value]


def accept_call(*, user: User, call: Call) -> Call:
    """Reserve the call's budget and take one send from the rate limit, in
    one transaction; refused `rate_limited` or `quota_exceeded` with nothing
    reserved. `call.model` is already resolved and checked."""
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


async def paced(
    events: AsyncGenerator[llm.TextDelta | llm.StreamEnd, None],
) -> AsyncGenerator[llm.TextDelta | llm.StreamEnd, None]:
    """`events` (what follows a call's first token) at the page's pace: the
    text that arrives within one frame interval as one delta, fewer and
    fuller while this worker is late (pace.py), then the end. A task of its
    own reads the model meanwhile; closing this closes `events` (the call is
    accounted there)."""
    loop = asyncio.get_running_loop()
    pending: list[str] = []
    ended: list[llm.StreamEnd | Exception] = []
    arrived = asyncio.Event()

    async def read() -> None:
        try:
            async for event in events:
                if isinstance(event, llm.TextDelta):
                    pending.append(event.text)
                    arrived.set()
                else:
                    ended.append(event)
        except Exception as exc:  # the model's error after the first token: the caller's to tell
            ended.append(exc)
        finally:
            arrived.set()

    reader = loop.create_task(read())
    last = loop.time()  # the first token went out just before
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            due = last + pace.interval()
            if not ended and due > loop.time():
                await asyncio.sleep(due - loop.time())  # what arrives meanwhile goes in the same delta
                pace.observe(loop.time() - due)
            if pending:
                text = "".join(pending)
                pending.clear()
                last = loop.time()
                yield llm.TextDelta(text)
            if ended and reader.done():
                end = ended[0]
                if isinstance(end, Exception):
                    raise end
                yield end
                return
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await events.aclose()


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
