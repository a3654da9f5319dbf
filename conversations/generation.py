"""The life of one answer: accept the question, stream the answer, checkpoint
it, stop it, finish it and account for it.

Knows nothing of websockets. It speaks to the channel layer:

- `conversation_group(id)`: every socket following a conversation receives
  `message.created`, `generation.started`, `generation.delta`,
  `generation.error` and `generation.finished` events there;
- `control_group(id)`: the running answer's own task listens there for
  `generation.stop` and `generation.snapshot_request`, so any socket in any
  worker process can reach it;
- `user_group(id)`: `conversation.created` / `conversation.updated` for all
  of a user's sockets.

An answer is a task of its own, not tied to the socket that asked for it:
closing the browser does not stop it, and it is saved when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Sum
from django.db.models.functions import Coalesce, Length
from django.utils import timezone

from accounts import quotas

from . import llm, prompts
from .history import PER_MESSAGE_OVERHEAD, build_messages
from .models import Conversation, Message, ModelPrice, SystemPrompt, TokenUsage
from .rendering import render_markdown_cached

log = logging.getLogger(__name__)

# Which process runs an answer: lets a restarted process tell its own dead
# answers from the live answers of another worker.
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"[:100]

TITLE_CHARS = 60
NO_COST = Decimal("0.000000")  # a model without a ModelPrice row
CONTINUE_INSTRUCTION = "Continue exactly where your last answer stopped, without repeating anything."


def conversation_group(conversation_id: Any) -> str:
    return f"chat.conv.{conversation_id}"


def control_group(conversation_id: Any) -> str:
    return f"chat.gen.{conversation_id}"


def user_group(user_id: Any) -> str:
    return f"chat.user.{user_id}"


class NotFound(Exception):
    """No such conversation for this user (it may exist for someone else)."""


class Busy(Exception):
    """An answer is already streaming in this conversation."""


# --- Payloads (the shapes of the websocket contract) ----------------------------


def conversation_payload(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": str(conversation.id),
        "title": conversation.display_title,
        "created_at": conversation.created_at.isoformat(),
    }


def message_payload(message: Message) -> dict[str, Any]:
    return {
        "id": str(message.id),
        "conversation": str(message.conversation_id),
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "created_at": message.created_at.isoformat(),
        "version_group": str(message.version_group),
    }


# --- Accepting a question (sync: runs in a database thread) ----------------------


def finished_event(
    answer: Message, *, status: str, finish_reason: str, content: str, model: str, usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": "generation.finished",
        "conversation": str(answer.conversation_id),
        "message": str(answer.id),
        "status": str(status),
        "finish_reason": finish_reason,
        "content": content,
        "html": render_markdown_cached(content),  # and so cached for the page
        "model": model,
        "usage": usage,
    }


def streaming_answer_id(conversation_id: Any) -> str | None:
    answer = (
        Message.objects.filter(conversation_id=conversation_id, status=Message.Status.STREAMING)
        .values_list("pk", flat=True)
        .first()
    )
    return str(answer) if answer else None


def last_answer_finished(conversation_id: Any) -> dict[str, Any] | None:
    """The `generation.finished` event of the conversation's latest answer, if it
    has ended: for a socket that was following it and missed the end."""
    answer = (
        Message.objects.filter(conversation_id=conversation_id, role=Message.Role.ASSISTANT)
        .order_by("-created_at")
        .first()
    )
    if answer is None or answer.status == Message.Status.STREAMING:
        return None
    row = TokenUsage.objects.filter(message=answer).first()
    usage = {
        "prompt_tokens": row.prompt_tokens if row else 0,
        "completion_tokens": row.completion_tokens if row else 0,
        "cost": str(row.cost if row else NO_COST),
    }
    return finished_event(
        answer,
        status=answer.status,
        finish_reason=answer.finish_reason,
        content=answer.content,
        model=answer.model,
        usage=usage,
    )


class Refused(Exception):
    """A well-formed request that cannot be done (nothing to regenerate...)."""


class OverQuota(Exception):
    """The user's budget does not cover another answer now."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Accepted:
    """A turn ready to be answered: the question and the empty answer."""

    conversation: Conversation
    question: Message
    answer: Message
    conversation_created: bool = False
    question_created: bool = True  # False when an answer is regenerated or continued
    replaces_question: Message | None = None  # an edit: the question it replaced
    replaces_answer: Message | None = None  # a regenerate or edit: the answer it replaced
    continues: Message | None = None  # a continue: the truncated answer
    reservation: quotas.Reservation | None = None  # budget held until the answer settles


def find_sent(*, user: Any, client_id: uuid.UUID) -> Message | None:
    """The user message already stored for this `client_id`, if any."""
    return (
        Message.objects.filter(conversation__owner=user, client_id=client_id)
        .select_related("conversation")
        .first()
    )


def _prompt_for_new_conversation(prompt_id: uuid.UUID | None) -> SystemPrompt | None:
    if prompt_id is not None:
        prompt = SystemPrompt.objects.filter(pk=prompt_id).first()
        if prompt is None:
            raise NotFound("No such system prompt.")
        return prompt
    return SystemPrompt.objects.filter(is_default=True).first()


def _own_conversation(user: Any, conversation_id: Any) -> Conversation:
    conversation = (
        Conversation.objects.select_related("prompt").filter(pk=conversation_id, owner=user).first()
    )
    if conversation is None:
        raise NotFound("No such conversation.")
    return conversation


def _last_active(conversation: Conversation, role: str) -> Message | None:
    return (
        Message.objects.filter(conversation=conversation, role=role, is_active=True)
        .order_by("-created_at")
        .first()
    )


def _new_answer(conversation: Conversation, **fields: Any) -> Message:
    return Message.objects.create(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.STREAMING,
        model=_model_for(conversation),
        worker=WORKER_ID,
        **fields,
    )


def _atomic_turn(build: Any) -> Accepted:
    """Run `build` in one transaction, with the budget check: everything it
    stores and reserves, or nothing."""
    try:
        with transaction.atomic():
            accepted = build()
            accepted.reservation = quotas.reserve_answer(
                accepted.conversation.owner,
                estimated_tokens=_most_tokens(accepted),
                model=accepted.answer.model,
            )
            if not accepted.conversation_created:  # a new one has just been stamped
                Conversation.objects.filter(pk=accepted.conversation.pk).update(updated_at=timezone.now())
            return accepted
    except IntegrityError as exc:
        # The partial unique index on streaming answers, or the same client_id
        # racing in on a second socket: either way, nothing was stored.
        raise Busy(str(exc)) from exc
    except quotas.QuotaExceeded as exc:
        raise OverQuota(exc.message, retry_after=exc.retry_after) from exc


def _most_tokens(accepted: Accepted) -> int:
    """What the answer may cost at most, reserved before it starts: the
    history it sends (capped by the context budget) and its longest reply.
    Settling gives back what it did not use."""
    # Summed by the database: a long conversation's text is not loaded for this.
    history = Message.objects.filter(conversation=accepted.conversation, is_active=True).aggregate(
        chars=Coalesce(Sum(Length("content")), 0), count=Count("pk")
    )
    prompt_tokens = (
        llm.estimate_tokens(accepted.conversation.prompt_text)
        + (history["chars"] + 3) // 4
        + history["count"] * PER_MESSAGE_OVERHEAD
    )
    prompt = accepted.conversation.prompt
    longest = (prompt.max_tokens if prompt and prompt.max_tokens else None) or settings.OPENAI_MAX_TOKENS
    return min(prompt_tokens, settings.CHAT_CONTEXT_TOKENS) + longest


def accept_message(
    *,
    user: Any,
    conversation_id: uuid.UUID | None,
    content: str,
    client_id: uuid.UUID,
    prompt_id: uuid.UUID | None = None,
) -> Accepted:
    """Store the question and an empty `streaming` answer, in one transaction.

    Raises NotFound for a conversation that is not the user's, Busy when an
    answer already streams there (the question is then not stored either).
    """

    def build() -> Accepted:
        if conversation_id is None:
            prompt = _prompt_for_new_conversation(prompt_id)
            version = prompts.version_for_new_conversation(prompt) if prompt else None
            conversation = Conversation.objects.create(
                owner=user,
                title=_title_from(content),
                prompt=prompt,
                prompt_version=version,
                prompt_text=version.text if version else "",
            )
        else:
            conversation = _own_conversation(user, conversation_id)
        question = Message.objects.create(
            conversation=conversation, role=Message.Role.USER, content=content, client_id=client_id
        )
        answer = _new_answer(conversation)
        return Accepted(conversation, question, answer, conversation_created=conversation_id is None)

    return _atomic_turn(build)


def accept_regenerate(*, user: Any, conversation_id: uuid.UUID) -> Accepted:
    """A new version of the last answer (also "retry" of a failed one); the
    old one stays as a replaced version."""

    def build() -> Accepted:
        conversation = _own_conversation(user, conversation_id)
        old = _last_active(conversation, Message.Role.ASSISTANT)
        question = _last_active(conversation, Message.Role.USER)
        if old is None or question is None or old.created_at < question.created_at:
            raise Refused("There is no answer to regenerate.")
        if old.status == Message.Status.STREAMING:
            raise Busy("The answer is still being written.")
        Message.objects.filter(pk=old.pk).update(is_active=False)
        answer = _new_answer(conversation, version_group=old.version_group)
        return Accepted(conversation, question, answer, question_created=False, replaces_answer=old)

    return _atomic_turn(build)


def accept_edit(
    *, user: Any, conversation_id: uuid.UUID, message_id: uuid.UUID, content: str, client_id: uuid.UUID
) -> Accepted:
    """Replace the last question with new text and answer it anew; the old
    question and its answers stay as replaced versions."""

    def build() -> Accepted:
        conversation = _own_conversation(user, conversation_id)
        old_question = _last_active(conversation, Message.Role.USER)
        if old_question is None or old_question.pk != message_id:
            raise Refused("Only the last question can be edited.")
        old_answer = _last_active(conversation, Message.Role.ASSISTANT)
        if old_answer is not None and old_answer.created_at < old_question.created_at:
            old_answer = None
        if old_answer is not None and old_answer.status == Message.Status.STREAMING:
            raise Busy("The answer is still being written.")
        Message.objects.filter(
            conversation=conversation, is_active=True, created_at__gte=old_question.created_at
        ).update(is_active=False)
        question = Message.objects.create(
            conversation=conversation,
            role=Message.Role.USER,
            content=content,
            client_id=client_id,
            version_group=old_question.version_group,
        )
        answer = _new_answer(
            conversation, **({"version_group": old_answer.version_group} if old_answer else {})
        )
        return Accepted(
            conversation, question, answer, replaces_question=old_question, replaces_answer=old_answer
        )

    return _atomic_turn(build)


def accept_continue(*, user: Any, conversation_id: uuid.UUID) -> Accepted:
    """Go on with a truncated last answer, as a new answer after it."""

    def build() -> Accepted:
        conversation = _own_conversation(user, conversation_id)
        truncated = _last_active(conversation, Message.Role.ASSISTANT)
        question = _last_active(conversation, Message.Role.USER)
        if truncated is None or truncated.status != Message.Status.TRUNCATED or question is None:
            raise Refused("The last answer was not cut short: there is nothing to continue.")
        answer = _new_answer(conversation)
        return Accepted(conversation, question, answer, question_created=False, continues=truncated)

    return _atomic_turn(build)


def _title_from(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


def _model_for(conversation: Conversation) -> str:
    if llm.is_demo():
        return llm.DEMO_MODEL
    prompt = conversation.prompt
    return (prompt.model if prompt and prompt.model else "") or settings.OPENAI_MODEL


# --- Running an answer ----------------------------------------------------------

_running: set[asyncio.Task[None]] = set()  # strong references: tasks outlive sockets


async def launch(accepted: Accepted) -> asyncio.Task[None]:
    """Announce the question and start its answer as a task of its own."""
    layer = get_channel_layer()
    if accepted.conversation_created:
        await layer.group_send(
            user_group(accepted.conversation.owner_id),
            {
                "type": "conversation.created",
                "conversation": conversation_payload(accepted.conversation),
            },
        )
    if accepted.question_created:
        created: dict[str, Any] = {
            "type": "message.created",
            "message": message_payload(accepted.question),
            "client_id": str(accepted.question.client_id),
        }
        if accepted.replaces_question is not None:
            created["replaces"] = str(accepted.replaces_question.id)
        await layer.group_send(conversation_group(accepted.conversation.id), created)
    answer = Generation(accepted)
    task = asyncio.create_task(answer.run(), name=f"generation-{accepted.answer.id}")
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


async def wait_all(timeout: float = 30.0) -> None:
    """Wait for every answer of this process to end (tests, graceful shutdown)."""
    if _running:
        await asyncio.wait_for(asyncio.gather(*list(_running)), timeout)


_STOP = object()


@dataclass
class Generation:
    accepted: Accepted
    seq: int = 0
    sent: list[str] = field(default_factory=list)  # the text of deltas 1..seq
    pending: list[str] = field(default_factory=list)  # received, not yet sent
    frames: int = 0
    checkpoints: int = 0

    def __post_init__(self) -> None:
        self.conversation = self.accepted.conversation
        self.answer = self.accepted.answer
        self.layer = get_channel_layer()
        self.group = conversation_group(self.conversation.id)
        self.events: asyncio.Queue[Any] = asyncio.Queue()

    # The conversation group hears what the answer says.
    async def _publish(self, event: dict[str, Any]) -> None:
        event = {"conversation": str(self.conversation.id), "message": str(self.answer.id), **event}
        await self.layer.group_send(self.group, event)

    async def run(self) -> None:
        status = await self._answer()
        # The title comes after the answer has left the control group, so
        # that a next answer's stop or snapshot requests never reach this one.
        if settings.CHAT_AUTO_TITLE and status in (Message.Status.COMPLETE, Message.Status.TRUNCATED):
            if await database_sync_to_async(_needs_title)(self.conversation.pk):
                await make_title(self.conversation, self.accepted.question.content, "".join(self.sent))

    async def _answer(self) -> str:
        control = await self.layer.new_channel()
        await self.layer.group_add(control_group(self.conversation.id), control)
        listener = asyncio.create_task(self._listen(control))
        reader: asyncio.Task[None] | None = None
        try:
            await self._publish(self._started_event())
            messages = await database_sync_to_async(self._messages)()
            reader = asyncio.create_task(self._read(messages))
            outcome = await self._stream()
            reader.cancel()  # closes the upstream HTTP stream when stopped
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            return await self._finish(messages, outcome)
        except asyncio.CancelledError:
            # The process is going down: say so in the database if we still can.
            await asyncio.shield(self._mark_interrupted())
            raise
        except Exception:
            log.exception("answer %s crashed", self.answer.id)
            return await self._finish([], _Outcome(error=llm.LLMError("Internal error.")))
        finally:
            if reader is not None:
                reader.cancel()
            await self.layer.group_discard(control_group(self.conversation.id), control)
            await self._stop_listening(control, listener)

    def _started_event(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "generation.started",
            "version_group": str(self.answer.version_group),
        }
        if self.accepted.replaces_answer is not None:
            event["replaces"] = str(self.accepted.replaces_answer.id)
        if self.accepted.continues is not None:
            event["continues"] = str(self.accepted.continues.id)
        return event

    def _messages(self) -> list[llm.ChatMessage]:
        if self.accepted.continues is None:
            return build_messages(self.conversation, upto=self.accepted.question)
        # The truncated answer is the last turn; ask the model to go on.
        messages = build_messages(self.conversation, upto=self.accepted.continues)
        return [*messages, {"role": "user", "content": CONTINUE_INSTRUCTION}]

    async def _stop_listening(self, control: str, listener: asyncio.Task[None]) -> None:
        # Ask, don't cancel: with channels-redis, a receive cancelled at the
        # wrong moment can lose a message meant for another channel of this
        # process (such as a socket's `generation.finished`).
        if not listener.done():
            await self.layer.send(control, {"type": "generation.listener.exit"})
        try:
            await asyncio.wait_for(listener, 10)
        except TimeoutError:
            log.warning("control listener of answer %s did not exit", self.answer.id)

    async def _listen(self, control: str) -> None:
        while True:
            event = await self.layer.receive(control)
            if event.get("type") == "generation.listener.exit":
                return
            if event.get("type") == "generation.stop":
                self.events.put_nowait(_STOP)
            elif event.get("type") == "generation.snapshot_request":
                await self.layer.send(
                    event["reply_to"],
                    {
                        "type": "generation.snapshot",
                        "conversation": str(self.conversation.id),
                        "message": str(self.answer.id),
                        "seq": self.seq,
                        "content": "".join(self.sent),
                    },
                )

    async def _read(self, messages: list[llm.ChatMessage]) -> None:
        prompt = self.conversation.prompt
        try:
            async for event in llm.stream_chat(
                messages,
                model=None if llm.is_demo() else self.answer.model,
                temperature=prompt.temperature if prompt else None,
                max_tokens=prompt.max_tokens if prompt else None,
            ):
                self.events.put_nowait(event)
        except llm.LLMError as exc:
            self.events.put_nowait(exc)
        except Exception:
            log.exception("model stream crashed")
            self.events.put_nowait(llm.LLMError())

    async def _stream(self) -> _Outcome:
        """Coalesce deltas into frames until the stream ends, fails or is stopped."""
        interval = settings.CHAT_DELTA_INTERVAL
        last_frame = last_checkpoint = time.monotonic()
        while True:
            timeout = None
            if self.pending:
                timeout = max(0.0, last_frame + interval - time.monotonic())
            try:
                event = await asyncio.wait_for(self.events.get(), timeout)
            except TimeoutError:
                await self._flush()
                last_frame = time.monotonic()
                continue
            if isinstance(event, llm.TextDelta):
                self.pending.append(event.text)
                now = time.monotonic()
                # The first token goes out at once; then one frame per interval.
                if self.seq == 0 or now - last_frame >= interval:
                    await self._flush()
                    last_frame = now
                if now - last_checkpoint >= settings.CHAT_CHECKPOINT_INTERVAL:
                    await self._checkpoint()
                    last_checkpoint = now
                continue
            await self._flush()
            if isinstance(event, llm.StreamEnd):
                return _Outcome(end=event)
            if isinstance(event, llm.LLMError):
                return _Outcome(error=event)
            return _Outcome(stopped=True)

    async def _flush(self) -> None:
        if not self.pending:
            return
        text = "".join(self.pending)
        self.pending.clear()
        self.seq += 1
        self.sent.append(text)
        self.frames += 1
        await self._publish({"type": "generation.delta", "seq": self.seq, "text": text})

    async def _checkpoint(self) -> None:
        self.checkpoints += 1
        await Message.objects.filter(pk=self.answer.pk, status=Message.Status.STREAMING).aupdate(
            content="".join(self.sent), updated_at=timezone.now()
        )

    async def _finish(self, messages: list[llm.ChatMessage], outcome: _Outcome) -> str:
        content = "".join(self.sent)
        status, finish_reason = outcome.status()
        model = outcome.end.model if outcome.end else self.answer.model
        usage = await database_sync_to_async(_save_answer)(
            answer=self.answer,
            content=content,
            status=status,
            finish_reason=finish_reason,
            model=model,
            usage=outcome.end.usage if outcome.end else None,
            messages=messages,
            called=outcome.called(content),
            reservation=self.accepted.reservation,
        )
        if outcome.error is not None:
            await self._publish(
                {
                    "type": "generation.error",
                    "code": outcome.error.code,
                    "message": outcome.error.user_message,  # for a person, as in every error
                    "answer": str(self.answer.id),
                    "retry_after": outcome.error.retry_after,
                }
            )
        await self.layer.group_send(
            self.group,
            finished_event(
                self.answer,
                status=status,
                finish_reason=finish_reason,
                content=content,
                model=model,
                usage=usage,
            ),
        )
        log.info(
            "answer %s %s: %d chars, %d frames, %d checkpoints",
            self.answer.id, status, len(content), self.frames, self.checkpoints,
        )  # fmt: skip
        return status

    async def _mark_interrupted(self) -> None:
        with contextlib.suppress(Exception):
            await Message.objects.filter(pk=self.answer.pk, status=Message.Status.STREAMING).aupdate(
                content="".join(self.sent),
                status=Message.Status.INTERRUPTED,
                worker="",
                updated_at=timezone.now(),
            )


@dataclass
class _Outcome:
    end: llm.StreamEnd | None = None
    error: llm.LLMError | None = None
    stopped: bool = False

    def status(self) -> tuple[str, str]:
        if self.stopped:
            return Message.Status.STOPPED, ""
        if self.error is not None or self.end is None:
            return Message.Status.FAILED, ""
        if self.end.finish_reason == "length":
            return Message.Status.TRUNCATED, "length"
        return Message.Status.COMPLETE, self.end.finish_reason

    def called(self, content: str) -> bool:
        """Did the model do billable work? A refused request (401, 429,
        connection refused) produced nothing and costs nothing."""
        return self.end is not None or bool(content) or self.stopped


def _save_answer(
    *,
    answer: Message,
    content: str,
    status: str,
    finish_reason: str,
    model: str,
    usage: llm.Usage | None,
    messages: list[llm.ChatMessage],
    called: bool,
    reservation: quotas.Reservation | None,
) -> dict[str, Any]:
    """The answer's final state and its ledger row, together."""
    estimated = usage is None
    if usage is None:
        usage = llm.Usage(
            prompt_tokens=sum(llm.estimate_tokens(m["content"]) + 4 for m in messages),
            completion_tokens=llm.estimate_tokens(content),
        )
    cost = price_of(model, usage)
    with transaction.atomic():
        # Locked, so that a conversation deleted meanwhile is seen as gone and
        # cannot vanish between this check and the ledger row.
        alive = Message.objects.select_for_update().filter(pk=answer.pk).exists()
        if alive:
            Message.objects.filter(pk=answer.pk).update(
                content=content,
                status=status,
                finish_reason=finish_reason,
                model=model,
                worker="",
                updated_at=timezone.now(),
            )
            Conversation.objects.filter(pk=answer.conversation_id).update(updated_at=timezone.now())
        if called:
            TokenUsage.objects.create(
                user_id=answer.conversation.owner_id,
                conversation_id=answer.conversation_id if alive else None,
                message_id=answer.pk if alive else None,
                kind=TokenUsage.Kind.ANSWER,
                model=model,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                cost=cost,
                estimated=estimated,
            )
        quotas.settle(
            reservation,
            user=answer.conversation.owner,
            tokens=usage.prompt_tokens + usage.completion_tokens if called else 0,
            cost=cost if called else NO_COST,
        )
    if not called:
        return {"prompt_tokens": 0, "completion_tokens": 0, "cost": str(NO_COST)}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost": str(cost),
    }


def price_of(model: str, usage: llm.Usage) -> Decimal:
    """What a call cost at today's price (stored: later price changes don't rewrite it)."""
    price = ModelPrice.objects.filter(model=model).first()
    return price.cost(usage.prompt_tokens, usage.completion_tokens) if price else NO_COST


# --- Titles -------------------------------------------------------------------------

TITLE_INSTRUCTION = (
    "Write a short title (at most six words) for the conversation below. "
    "Reply with the title only: no quotes, no final period."
)


def _needs_title(conversation_id: Any) -> bool:
    """After the first answer of a conversation, once."""
    return Message.objects.filter(conversation_id=conversation_id, role=Message.Role.ASSISTANT).count() == 1


def _save_title(conversation: Conversation, title: str, completion: llm.Completion) -> bool:
    usage = completion.usage or llm.Usage(0, llm.estimate_tokens(title))
    cost = price_of(completion.model, usage)
    with transaction.atomic():
        quotas.settle(
            None, user=conversation.owner, tokens=usage.prompt_tokens + usage.completion_tokens, cost=cost
        )
        TokenUsage.objects.create(
            user_id=conversation.owner_id,
            conversation_id=conversation.pk,
            kind=TokenUsage.Kind.TITLE,
            model=completion.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            cost=cost,
            estimated=completion.usage is None,
        )
        # Only over the provisional title: a rename by the user wins.
        return bool(
            Conversation.objects.filter(pk=conversation.pk, title=conversation.title).update(title=title)
        )


QUOTES = "\"'\u201c\u201d\u2018\u2019"


def clean_title(text: str) -> str:
    title = " ".join(text.split()).strip().strip(QUOTES).rstrip(".").strip()
    return title[:TITLE_CHARS].strip()


async def make_title(conversation: Conversation, question: str, answer: str) -> None:
    """Ask the model for a title, account for the call, tell the user's tabs."""
    try:
        completion = await llm.complete_chat(
            [
                {"role": "system", "content": TITLE_INSTRUCTION},
                {"role": "user", "content": question[:2000]},
                {"role": "assistant", "content": answer[:2000]},
            ],
            model=_model_for(conversation) if not llm.is_demo() else None,
            max_tokens=24,
        )
    except llm.LLMError as exc:
        log.warning("title for %s failed: %s", conversation.pk, exc)
        return
    title = clean_title(completion.text)
    if not title:
        return
    if await database_sync_to_async(_save_title)(conversation, title, completion):
        await get_channel_layer().group_send(
            user_group(conversation.owner_id),
            {"type": "conversation.updated", "conversation": {"id": str(conversation.pk), "title": title}},
        )


# --- Answers whose process died -------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_dead(worker: str, *, include_self: bool) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's worker: only staleness can tell
    if worker == WORKER_ID:
        return include_self
    return not _pid_alive(int(pid))


def sweep_interrupted(*, stale_after: float | None = None, at_startup: bool = False) -> int:
    """Mark answers left `streaming` by a dead process as `interrupted`.

    Dead means: run by a process of this machine that no longer exists (at
    start-up this process's own id counts too, as it has run nothing yet), or
    not checkpointed for `stale_after` seconds, whoever ran it.
    """
    stale_after = settings.CHAT_STALE_AFTER if stale_after is None else stale_after
    streaming = Message.objects.filter(status=Message.Status.STREAMING)
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    ids = set(streaming.filter(updated_at__lt=cutoff).values_list("pk", flat=True))
    for pk, worker in streaming.exclude(pk__in=ids).values_list("pk", "worker"):
        if _worker_dead(worker, include_self=at_startup):
            ids.add(pk)
    if not ids:
        return 0
    count = Message.objects.filter(pk__in=ids, status=Message.Status.STREAMING).update(
        status=Message.Status.INTERRUPTED, worker="", updated_at=timezone.now()
    )
    log.warning("marked %d answer(s) left streaming by a dead process as interrupted", count)
    return count


async def request_stop(conversation_id: Any) -> None:
    """Ask the running answer of a conversation, in whatever process, to stop."""
    await get_channel_layer().group_send(control_group(conversation_id), {"type": "generation.stop"})


async def request_snapshot(conversation_id: Any, reply_to: str) -> None:
    """Ask the running answer to send its text so far to channel `reply_to`."""
    await get_channel_layer().group_send(
        control_group(conversation_id),
        {"type": "generation.snapshot_request", "reply_to": reply_to},
    )
