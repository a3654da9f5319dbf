"""Running an answer: stream from the model, coalesce tokens into frames,
hand them to the answer's log, checkpoint, stop, finish and account.

An answer is a task of its own, not tied to the socket that asked for it:
closing the browser does not stop it, and it is saved when it ends. Its
frames go through this process's `Hub` (fanout.py); a stop from any socket
in any worker reaches it there.

Per token an answer does a list append and a clock read; per frame (one
every CHAT_DELTA_INTERVAL at most) one dict and one JSON encoding, handed to
each follower; per CHAT_CHECKPOINT_INTERVAL one process-wide database write
for every running answer together. Never a database write per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.db.models.functions import Now

from .. import llm, tools
from ..batches import batches_of
from ..database import in_database, update_each
from ..models import Message, TokenUsage, ToolRound
from ..tools import mcp
from . import events, summaries, toolrounds
from .fanout import get_hub
from .ledger import AnswerEnd, Saved, record_model_call, save_answers
from .pace import pace
from .titles import make_title
from .turns import Accepted, Send, accept_messages

log = logging.getLogger(__name__)

_running: set[asyncio.Task[None]] = set()  # strong references: tasks outlive sockets


async def accept_send(**send: Any) -> Accepted:
    """`turns.accept_message(**send)`, in one database call with the sends
    that arrive meanwhile (batches.py). An answer whose socket went away
    while it was being accepted is written all the same."""
    return await batches_of(accept_messages, abandoned=_launch_abandoned).submit(Send(**send))


async def _launch_abandoned(_send: Send, accepted: Accepted) -> None:
    await launch(accepted)


async def launch(accepted: Accepted) -> asyncio.Task[None]:
    """Announce the question and start its answer as a task of its own."""
    hub = get_hub()
    conversation_id = str(accepted.conversation.id)
    if accepted.conversation_created:
        created = events.conversation_created(accepted.conversation)
        # To the socket that asked, in order with what follows; to the user's
        # other tabs on the user's topic (the asking tab skips the repeat).
        hub.publish(conversation_id, created)
        hub.publish(events.user_topic(accepted.conversation.owner_id), created)
    if accepted.question_created:
        hub.publish(
            conversation_id, events.message_created(accepted.question, replaces=accepted.replaces_question)
        )
    generation = Generation(accepted)
    hub.register(conversation_id, generation)  # before any await: a stop or join finds it at once
    # A context of its own: an answer started by an HTTP request must not
    # inherit the request's (its database thread ends with the response).
    task = asyncio.create_task(
        generation.run(), name=f"generation-{accepted.answer.id}", context=contextvars.Context()
    )
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


def _question_text(question: Message) -> str:
    """What a title is made of: the question, else the names of its files."""
    names = ", ".join(record["filename"] for record in question.attachments or ())
    return question.content if question.content.strip() or not names else names


def running_tasks() -> set[asyncio.Task[None]]:
    """The answers this process is writing now."""
    return set(_running)


async def wait_all(timeout: float = 30.0) -> None:
    """Wait for every answer of this process to end (tests, graceful shutdown)."""
    if _running:
        await asyncio.wait_for(asyncio.gather(*list(_running)), timeout)


async def release_connections() -> None:
    """Close this event loop's connections to the model (a command's end)."""
    await llm.close()


async def request_stop(conversation_id: Any) -> None:
    """Ask the running answer of a conversation, in whatever process, to stop."""
    await get_hub().stop(str(conversation_id))


class Generation:
    """One answer being written."""

    def __init__(self, accepted: Accepted) -> None:
        self.accepted = accepted
        self.conversation = accepted.conversation
        self.answer = accepted.answer
        self.conversation_id = str(self.conversation.id)
        self.answer_id = str(self.answer.id)
        self.hub = get_hub()
        self.seq = 0
        self.sent: list[str] = []  # the text of deltas 1..seq
        self.pending: list[str] = []  # received, not yet sent
        self.checkpointed = 0  # the seq the database has
        self.last_frame = 0.0
        self.stopping = False
        self._stopped = asyncio.Event()  # set with `stopping`: a tool round waits on it too
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the timer should fire (loop time)
        self._reader: asyncio.Task[_Outcome] | None = None
        self._ending: asyncio.Future[tuple[str, bool]] | None = None
        self.messages = list(accepted.messages)  # what the next model call sends
        self.tool_rounds: list[ToolRound] = []

    # --- what followers and other workers ask of it ----------------------------------

    def snapshot(self) -> tuple[int, str]:
        return self.seq, "".join(self.sent)

    def deltas_after(self, seq: int) -> list[tuple[int, str]]:
        return [(i + 1, text) for i, text in enumerate(self.sent) if i + 1 > seq]

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stopped.set()
        if self._reader is not None:
            self._reader.cancel()  # closes the upstream HTTP stream

    # --- the answer's life ------------------------------------------------------------

    async def run(self) -> None:
        try:
            _status, first_answer = await self._answer()
        finally:
            self.hub.unregister(self.conversation_id, self)
            checkpointer().discard(self)
        # The title comes after the answer has left the registry, so that a
        # next answer's stop never reaches this one.
        if first_answer and settings.CHAT_AUTO_TITLE:
            await make_title(
                self.conversation,
                _question_text(self.accepted.question),
                "".join(self.sent),
                limited=self.accepted.reservation is not None,
            )

    async def _answer(self) -> tuple[str, bool]:
        try:
            self._publish(
                events.generation_started(
                    self.answer, replaces=self.accepted.replaces_answer, continues=self.accepted.continues
                )
            )
            checkpointer().add(self)
            outcome = await self._read_until_done()
            return await self._finish(outcome)
        except asyncio.CancelledError:
            # The process is going down (a deploy's grace period ran out):
            # settle the answer as `interrupted` with what was shown, unless
            # its end is being saved already (then that end stands).
            if self._ending is None:
                self._flush()
                self._ending = asyncio.ensure_future(self._end(_Outcome(interrupted=True)))
            with contextlib.suppress(Exception):
                await asyncio.shield(self._ending)
            raise
        except Exception:
            log.exception("answer %s crashed", self.answer_id)
            return await self._finish(_Outcome(error=llm.LLMError("Internal error.")))

    async def _read_until_done(self) -> _Outcome:
        if self.stopping:  # stopped before it started
            return _Outcome(stopped=True)
        self._reader = asyncio.create_task(self._read())
        try:
            return await self._reader
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.stopping and self._reader.cancelled() and not (current and current.cancelling()):
                self._flush()
                return _Outcome(stopped=True)
            self._reader.cancel()
            raise

    def _publish(self, event: events.Event) -> None:
        self.hub.publish(self.conversation_id, event)

    async def _read(self) -> _Outcome:
        """The model's calls for this answer: each streams into the answer;
        one that ends in tool calls runs them (a tool round, toolrounds.py)
        and asks again with their results."""
        history = self.accepted.history
        if history is not None and history.pending:
            await self._summarize(history)
        prompt = self.conversation.prompt
        setting = (prompt.tools if prompt else "") or None
        offered = tools.offered(setting)
        if not tools.none_wanted(setting):  # beside them, the MCP servers' this user and prompt may use
            offered += await mcp.offered(
                user_id=self.conversation.owner_id, prompt_id=self.conversation.prompt_id
            )
        rounds = toolrounds.Rounds(offered)
        while True:
            first_seq = self.seq
            outcome = await self._read_call(rounds.offer())
            if self.stopping:  # stopped as the call ended: its tools are not run
                raise asyncio.CancelledError
            if not rounds.is_round(outcome.end):
                return outcome
            assert outcome.end is not None
            await self._tool_round(rounds, outcome.end, "".join(self.sent[first_seq:]))
            if self.stopping:  # stopped during the round (a tool that swallowed the cancellation)
                raise asyncio.CancelledError

    async def _summarize(self, history: Any) -> None:
        """A long chat: fold the turns that overflow into the conversation's
        summary first, and send it in their place; tell the followers where
        the summarised part now ends."""
        summary = await summaries.refresh(
            self.conversation,
            history,
            answer_id=self.answer.pk,
            limited=self.accepted.reservation is not None,
        )
        if summary is None:
            return
        self.messages = history.with_summary(summary)
        self._publish(events.conversation_summary(self.conversation_id, history.through, summary))

    async def _tool_round(self, rounds: toolrounds.Rounds, end: llm.StreamEnd, text: str) -> None:
        """Account the call, run the tools it asked for, show each result,
        and add the round to what the next call sends."""
        # Its own ledger row (the answer's final call is recorded by
        # `save_answers`, which settles the reservation).
        await in_database(record_model_call)(
            user_id=self.conversation.owner_id,
            kind=TokenUsage.Kind.ANSWER,
            model=end.model,
            usage=end.usage,
            messages=self.messages,
            text=toolrounds.spoken(text, end),
            limited=self.accepted.reservation is not None,
            conversation_id=self.answer.conversation_id,
            message_id=self.answer.pk,
        )

        def show(call: llm.ToolCall, result: tools.ToolResult) -> None:
            self._publish(
                events.tool_event(
                    self.conversation_id,
                    self.answer_id,
                    call_id=call.id,
                    name=call.name,
                    summary=result.summary,
                    ok=result.ok,
                    arguments=call.arguments,
                    result=result.content,
                )
            )

        context = tools.ToolContext(user_id=self.conversation.owner_id, conversation_id=self.conversation_id)
        # The round and the stop, whichever comes first: a cancellation can be held back (a
        # database call, asyncio.wait_for in Python 3.11), the stop's event cannot.
        running = asyncio.ensure_future(
            toolrounds.run_round(rounds, end, text, context, on_result=show, stopping=lambda: self.stopping)
        )
        stop = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({running, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not running.done():
                running.cancel()  # a stop (or this task's own cancellation): the calls end here
        if not running.done() or running.cancelled():
            raise asyncio.CancelledError
        round_ = running.result()
        self.tool_rounds.append(round_)
        self.messages = [*self.messages, *toolrounds.messages_of(round_)]
        try:  # kept with the answer at once: a reload shows the chips, a dead worker's answer keeps them
            await in_database(_write_tool_rounds)(self.answer.pk, self.tool_rounds)
        except (OperationalError, InterfaceError) as exc:  # the answer's end stores them again
            log.warning("answer %s: tool rounds not stored yet (%s)", self.answer_id, exc)

    async def _read_call(self, offer: list[dict[str, Any]] | None) -> _Outcome:
        """Read one model call's stream; the first token goes out at once,
        then a frame per interval with whatever arrived meanwhile."""
        prompt = self.conversation.prompt
        stream = llm.stream_chat(
            self.messages,
            model=self.answer.model,
            temperature=prompt.temperature if prompt else None,
            max_tokens=prompt.max_tokens if prompt else None,
            tools=offer,
            fallbacks=_names(prompt.fallback_models) if prompt and prompt.fallback_models else None,
        )
        end: llm.StreamEnd | None = None
        try:
            async with aclosing(stream):
                async for event in stream:
                    if type(event) is llm.TextDelta:
                        self.pending.append(event.text)
                        if self.seq == 0:  # the first token goes out at once, however busy
                            self._flush()
                        elif self._timer is None:
                            interval = pace.interval()
                            wait = self.last_frame + interval - time.monotonic()
                            if wait <= 0:
                                self._flush()
                            else:
                                loop = asyncio.get_running_loop()
                                self._due = loop.time() + wait
                                self._timer = loop.call_at(self._due, self._on_timer)
                    elif isinstance(event, llm.StreamEnd):
                        end = event
        except llm.LLMError as exc:
            self._flush()
            return _Outcome(error=exc)
        self._flush()
        return _Outcome(end=end)

    def _on_timer(self) -> None:
        self._timer = None
        pace.observe(asyncio.get_running_loop().time() - self._due)
        self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.pending:
            return
        text = "".join(self.pending)
        self.pending.clear()
        self.seq += 1
        self.sent.append(text)
        self.last_frame = time.monotonic()
        self._publish(events.delta_event(self.conversation_id, self.answer_id, self.seq, text))

    async def _finish(self, outcome: _Outcome) -> tuple[str, bool]:
        """Save and announce the end, once: a task of its own, so that a
        cancellation meanwhile (the drain) waits for it instead of saving a
        second end."""
        if self._ending is None:
            self._ending = asyncio.ensure_future(self._end(outcome))
        return await asyncio.shield(self._ending)

    async def _end(self, outcome: _Outcome) -> tuple[str, bool]:
        content = "".join(self.sent)
        status, finish_reason = outcome.status()
        model = outcome.end.model if outcome.end else self.answer.model
        usage, html, first_answer = await self._save(
            AnswerEnd(
                answer=self.answer,
                owner_id=self.conversation.owner_id,
                content=content,
                status=status,
                finish_reason=finish_reason,
                model=model,
                usage=outcome.end.usage if outcome.end else None,
                messages=self.messages,
                tool_rounds=self.tool_rounds,
                called=outcome.called(content),
                reservation=self.accepted.reservation,
                first_of_chat=self.accepted.first_turn,
                error=outcome.error.user_message if outcome.error is not None else "",
            )
        )
        if outcome.error is not None:
            self._publish(events.answer_error(self.answer, outcome.error))
        self._publish(
            events.finished_event(
                self.answer,
                status=status,
                finish_reason=finish_reason,
                content=content,
                html=html,
                model=model,
                usage=usage,
                seq=self.seq,
                error=outcome.error.user_message if outcome.error is not None else "",
            ),
        )
        log.info("answer %s %s: %d chars, %d frames", self.answer_id, status, len(content), self.seq)
        return status, first_answer

    async def _save(self, end: AnswerEnd) -> Saved:
        """`save_answers` (with the other answers ending now: batches.py),
        tried again while the database is away (restarted,
        failed over): the answer's end is one transaction, so a retry
        stores it once. Its followers have every delta meanwhile; the
        `generation.finished` waits for the database."""
        deadline = time.monotonic() + settings.CHAT_SAVE_RETRY_SECONDS
        delay = 0.2
        while True:
            try:
                return await batches_of(save_answers).submit(end)
            except (OperationalError, InterfaceError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("answer %s: database away (%s); retry in %.1f s", self.answer_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass
class _Outcome:
    end: llm.StreamEnd | None = None
    error: llm.LLMError | None = None
    stopped: bool = False
    interrupted: bool = False  # this process is going down

    def status(self) -> tuple[str, str]:
        if self.interrupted:
            return Message.Status.INTERRUPTED, ""
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
        if self.interrupted:
            return bool(content)
        return self.end is not None or bool(content) or self.stopped


# --- Checkpoints: one write for every running answer of the process ----------------------


class Checkpointer:
    """Every CHAT_CHECKPOINT_INTERVAL, the text of every running answer that
    grew goes to the database in ONE statement, and every running answer's
    `updated_at` is refreshed (its heartbeat: a live answer is never stale)."""

    def __init__(self) -> None:
        self.answers: set[Generation] = set()
        self._task: asyncio.Task[None] | None = None
        self.writes = 0

    def add(self, generation: Generation) -> None:
        self.answers.add(generation)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="checkpointer")

    def discard(self, generation: Generation) -> None:
        self.answers.discard(generation)

    async def _loop(self) -> None:
        while self.answers:
            await asyncio.sleep(settings.CHAT_CHECKPOINT_INTERVAL)
            try:
                await self.checkpoint()
            except Exception as exc:  # the database is away: the next tick tries again
                log.warning("checkpoint failed: %s", exc)

    async def checkpoint(self) -> None:
        grew = {g.answer.pk: "".join(g.sent) for g in self.answers if g.seq > g.checkpointed}
        seqs = {g: g.seq for g in self.answers}
        alive = [g.answer.pk for g in self.answers]
        if not alive:
            return
        await in_database(_write_checkpoints)(grew, alive)
        self.writes += 1
        for generation, seq in seqs.items():
            generation.checkpointed = seq


def _write_tool_rounds(answer_id: Any, tool_rounds: list[ToolRound]) -> None:
    Message.objects.filter(pk=answer_id, status=Message.Status.STREAMING).update(tool_rounds=tool_rounds)


def _write_checkpoints(grew: dict[Any, str], alive: list[Any]) -> None:
    """The texts that grew, and every running answer's heartbeat, stamped
    with the database's clock (recovery.py compares it with the database's
    clock too: the hosts of the workers may disagree)."""
    with transaction.atomic():
        update_each(Message, ("content",), grew.items(), status=Message.Status.STREAMING)
        Message.objects.filter(status=Message.Status.STREAMING, pk__in=alive).update(updated_at=Now())


_checkpointers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Checkpointer] = (
    weakref.WeakKeyDictionary()
)


def checkpointer() -> Checkpointer:
    loop = asyncio.get_running_loop()
    found = _checkpointers.get(loop)
    if found is None:
        found = _checkpointers[loop] = Checkpointer()
    return found
