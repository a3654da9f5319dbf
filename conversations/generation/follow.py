"""Following a conversation's answers: the one place that knows how a reader
is shown an answer, whatever the reader (a socket, an SSE response, the
terminal client).

A `Follow` is one reader's view of one conversation. The hub hands it each
frame as it is published (`take`, synchronously: a socket's frames cost no
task and no queue of their own); it shows them in order: an answer's deltas
once each and without a gap (a gap, when the live tail from another worker
dropped frames, is filled from the answer's log, the frames that come
meanwhile held back until it is), and the end. `join` says where a
conversation stands when a reader comes (or comes back): for a socket the
streaming answer's snapshot, then only newer deltas; for a reader that knows
the last `seq` it has, the deltas after it; for one that may have missed
the end, the last answer's `generation.finished`.

`answer_events` is the same, as an async iterator of one answer's events,
for readers that pull (the HTTP API's SSE, the terminal client).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

from ..database import in_database
from ..models import Message
from ..rendering import render_markdown_cached
from .events import Frame, delta_event, finished_event, snapshot_event
from .fanout import Hub, Snapshot, get_hub
from .ledger import stored_usage
from .process import sweep_dead

log = logging.getLogger(__name__)

SNAPSHOT_RETRY = (0.05, 0.1, 0.2, 0.4, 0.8)  # s: an answer just started elsewhere shows up in its log
CATCH_UP_RETRY = (0.2, 0.5, 1.0, 2.0, 4.0)  # s: while Redis restarts
KEEP_ALIVE = 15.0  # s between keep-alives (an SSE comment) of a reader that pulls, while nothing else comes


class Follow:
    """One reader's view of one conversation. `show(frame)` hands the reader
    a frame, in order; `spawn(work)` runs the catch-ups the reader owns (its
    tasks end with it). `snapshots`: on a (re)join, show the streaming
    answer's text as one `generation.snapshot` (a socket); else as the
    deltas after the last one shown (a reader that resumes from a `seq`)."""

    def __init__(
        self,
        conversation_id: str,
        show: Callable[[Frame], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        *,
        snapshots: bool = True,
        hub: Hub | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        self.show = show
        self.spawn = spawn
        self.snapshots = snapshots
        self.hub = hub or get_hub()
        self.holding = False  # a snapshot or catch-up is on its way: deltas wait for it
        self.held: list[Frame] = []
        self.last_seq: dict[str, int] = {}  # per answer: the last delta shown
        self.ended = False  # the reader stopped following

    # --- frames as they are published -------------------------------------------------

    def take(self, frame: Frame) -> None:
        data = frame.data
        kind = data["type"]
        if kind == "generation.delta":
            if self.holding:
                self.held.append(frame)
            else:
                self._delta(frame, lenient=False)
            return
        if kind == "generation.started":
            self.last_seq.setdefault(data["message"], 0)
        elif kind == "generation.finished":
            if self.holding:
                # The answer ended before its snapshot came: the full text is here.
                self.holding = False
                self.held.clear()
            self.last_seq.pop(data["message"], None)
        self.show(frame)

    def _delta(self, frame: Frame, *, lenient: bool) -> None:
        data = frame.data
        answer, seq = data["message"], data["seq"]
        last = self.last_seq.get(answer, 0)
        if seq <= last:
            return  # shown already (a snapshot covered it)
        if seq > last + 1 and not lenient:
            # A gap (the live tail from another worker dropped frames): fill
            # it from the answer's log, holding what comes meanwhile.
            self.holding = True
            self.held.append(frame)
            self.spawn(self._patiently(self._catch_up, answer, last))
            return
        self.last_seq[answer] = seq
        self.show(frame)

    async def _catch_up(self, answer: str, after: int) -> None:
        deltas = await self.hub.deltas_after(self.conversation_id, answer, after)
        if self.ended or not self.holding or answer not in self.last_seq:
            return  # ended meanwhile: its `generation.finished` has the whole text
        for seq, text in deltas:
            self._delta(
                Frame(delta_event(self.conversation_id, answer, seq, text), self.conversation_id),
                lenient=True,
            )
        self._release()

    def _release(self) -> None:
        held, self.held = self.held, []
        self.holding = False
        for frame in held:
            self._delta(frame, lenient=True)

    def resync(self) -> None:
        """Frames may have been missed (the live tail was cut, the reader fell
        behind): show where the conversation stands again."""
        self.spawn(self._patiently(self.join, missed_end=True))

    def forget(self) -> None:
        """The reader dropped what it had queued: show everything again from a snapshot."""
        self.last_seq.clear()
        self.resync()

    # --- where the conversation stands -----------------------------------------------------

    async def join(self, *, missed_end: bool) -> None:
        """Show the streaming answer so far (then only newer deltas); with
        `missed_end`, also the last answer's end if it ended unseen."""
        self.holding = True
        snapshot = await self.hub.snapshot(self.conversation_id)
        streaming = None
        if snapshot is None or not snapshot.local:
            # Redis's word is checked against the database: a log it kept of
            # an answer whose end's writes were lost (Redis away) is no snapshot.
            streaming = await in_database(streaming_answer_id)(self.conversation_id)
            if snapshot is not None and snapshot.answer_id != streaming:
                snapshot = None
            if snapshot is None and streaming is not None:
                snapshot = await self._snapshot_soon(streaming)
        if self.ended:
            return
        if snapshot is not None and self.holding:
            await self._show_snapshot(snapshot)
        self._release()
        if snapshot is None:
            await self._settle_missed(missed_end=missed_end, streaming=streaming)

    async def _show_snapshot(self, snapshot: Snapshot) -> None:
        answer = snapshot.answer_id
        last = self.last_seq.get(answer, 0)
        if self.snapshots:
            self.last_seq[answer] = max(last, snapshot.seq)
            event = snapshot_event(self.conversation_id, answer, snapshot.seq, snapshot.content)
            self.show(Frame(event, self.conversation_id))
            return
        self.last_seq.setdefault(answer, last)  # known to stream: a later gap is caught up, not dropped
        for seq, text in await self.hub.deltas_after(self.conversation_id, answer, last):
            self._delta(
                Frame(delta_event(self.conversation_id, answer, seq, text), self.conversation_id),
                lenient=True,
            )

    async def _snapshot_soon(self, answer_id: str) -> Snapshot | None:
        """The database says an answer streams but no worker shows it yet: its
        log in Redis may be a moment behind its start. Ask again, briefly."""
        for delay in SNAPSHOT_RETRY:
            await asyncio.sleep(delay)
            snapshot = await self.hub.snapshot(self.conversation_id)
            if snapshot is not None and snapshot.answer_id == answer_id:
                return snapshot
        return None

    async def _settle_missed(self, *, missed_end: bool, streaming: str | None) -> None:
        if streaming is not None:
            # The database says streaming but no worker shows it: its process
            # may have died. Sweep (a live answer is never touched), and if
            # that settled it, say how it ended.
            await sweep_dead()
            missed_end = True
        if missed_end:
            finished = await in_database(last_answer_finished)(self.conversation_id)
            if finished is not None and not self.ended:
                self.take(Frame(finished, self.conversation_id))

    async def _patiently(self, work: Callable[..., Awaitable[None]], *args: Any, **kwargs: Any) -> None:
        """A catch-up tried again while Redis is away (restarting): the reader
        is shown everything once it is back."""
        for delay in (*CATCH_UP_RETRY, None):
            if self.ended:
                return
            try:
                await work(*args, **kwargs)
                return
            except Exception as exc:
                if delay is None:
                    log.warning("catch-up of %s failed for good: %s", self.conversation_id, exc)
                    if self.holding:
                        self._release()  # show what came, at least
                    return
                log.warning("catch-up of %s failed (%s); again in %.1f s", self.conversation_id, exc, delay)
                await asyncio.sleep(delay)


# --- The database's word on an answer --------------------------------------------------------


def streaming_answer_id(conversation_id: Any) -> str | None:
    answer = (
        Message.objects.filter(conversation_id=conversation_id, status=Message.Status.STREAMING)
        .values_list("pk", flat=True)
        .first()
    )
    return str(answer) if answer else None


def last_answer_finished(conversation_id: Any) -> dict[str, Any] | None:
    """The `generation.finished` event of the conversation's latest answer, if it
    has ended: for a reader that was following it and missed the end."""
    answer = (
        Message.objects.filter(conversation_id=conversation_id, role=Message.Role.ASSISTANT)
        .order_by("-created_at")
        .first()
    )
    if answer is None or answer.status == Message.Status.STREAMING:
        return None
    return finished_event(
        answer,
        status=answer.status,
        finish_reason=answer.finish_reason,
        content=answer.content,
        html=render_markdown_cached(answer.content),
        model=answer.model,
        usage=stored_usage(answer),
        error=answer.error,
    )


# --- Readers that pull ---------------------------------------------------------------------


class _Queued:
    """A hub follower that queues one conversation's frames for one puller."""

    def __init__(self, conversation_id: str, *, snapshots: bool) -> None:
        self.queue: asyncio.Queue[Frame] = asyncio.Queue()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.follow = Follow(conversation_id, self.queue.put_nowait, self._spawn, snapshots=snapshots)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def deliver(self, frame: Frame) -> None:
        self.follow.take(frame)

    def resync(self, conversation_id: str) -> None:
        self.follow.resync()


class Reader:
    """One conversation's frames for a reader that pulls, followed from
    `open()` (before its answer starts, so that nothing is missed) until
    `close()`."""

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self._queued = _Queued(conversation_id, snapshots=False)
        self.hub = get_hub()

    async def open(self) -> Reader:
        await self.hub.follow(self.conversation_id, self._queued)
        return self

    async def close(self) -> None:
        self._queued.follow.ended = True
        for task in list(self._queued.tasks):
            task.cancel()
        await self.hub.unfollow(self.conversation_id, self._queued)

    async def resume(self, answer_id: str, after: int) -> None:
        """Show an answer's deltas after `after` (a reader that resumes from a seq)."""
        follow = self._queued.follow
        follow.last_seq[answer_id] = after
        await follow.join(missed_end=True)

    async def answer_events(
        self, answer_id: str | None, *, first: Iterable[dict[str, Any]] = (), keep_alive: float = KEEP_ALIVE
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The events of one answer (the first that starts, if `answer_id` is
        None) until its `generation.finished`, with `{"type": "_keepalive"}`
        when nothing came for `keep_alive` seconds. Other answers' events and
        the conversation's creation are left out. Closes the reader at the end."""
        try:
            for event in first:
                yield event
                if event["type"] == "generation.finished":
                    return
            while True:
                try:
                    frame = await asyncio.wait_for(self._queued.queue.get(), keep_alive)
                except TimeoutError:
                    yield {"type": "_keepalive"}
                    continue
                event = frame.data
                kind = event["type"]
                if kind == "conversation.created":
                    continue
                if answer_id is None and kind == "generation.started":
                    answer_id = event["message"]
                about = event.get("answer") if kind == "error" else event.get("message")
                if kind.startswith("generation.") or kind == "error":
                    if about != answer_id:
                        continue
                yield event
                if kind == "generation.finished":
                    return
        finally:
            await self.close()
