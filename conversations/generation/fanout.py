"""The answer's log and its fan-out: how an answer's frames reach every
socket that follows its conversation, in this process and in others.

One `Hub` per process (per event loop). A follower (a socket, the terminal
client) registers for a conversation; `publish` hands each frame to every
local follower at once, synchronously: a frame for a socket of the same
process never leaves the process, never waits on a queue that can fill, and
is encoded to JSON once however many sockets get it.

Topics are conversation ids (an answer's frames) and `user.<id>` (a user's
rare events: conversation created, renamed, deleted), so that a socket needs
no channel-layer channel of its own.

The running answers of this process are registered here too, so that a stop,
a snapshot or a catch-up from a socket of this process reaches its answer
directly.

With REDIS_URL set (several workers), the hub also keeps:

- the answer's log (answer_log.py: a Redis Stream per answer, the key of
  each conversation's streaming answer), where a follower in another
  worker takes its snapshot and catches up after its last `seq`;
- the live tail: each frame is PUBLISHed on `<prefix>:topic:<topic>`. One
  pub/sub connection per process subscribes to the topics its sockets
  follow (and to `<prefix>:ctl`, on which stops travel) and hands what
  other workers publish to its local followers;
- batched writes: frames published while the previous pipeline was in flight
  go together in the next one, so a busy worker makes a few Redis round
  trips per tick, not a few per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections import defaultdict
from typing import Any, Protocol

from django.conf import settings

from . import answer_log
from .answer_log import Snapshot
from .events import Frame
from .identity import WORKER_ID

log = logging.getLogger(__name__)

MAX_PIPELINE = 500  # Redis commands per round trip of the writer
RECONNECT_DELAY = (0.1, 0.5, 1.0, 2.0)


class Follower(Protocol):
    def deliver(self, frame: Frame) -> None:
        """Take one frame; never block, never raise."""

    def resync(self, conversation_id: str) -> None:
        """Frames may have been missed (the live tail was cut): catch up."""


class RunningAnswer(Protocol):
    answer_id: str

    def snapshot(self) -> tuple[int, str]: ...

    def deltas_after(self, seq: int) -> list[tuple[int, str]]: ...

    def stop(self) -> None: ...


class Hub:
    def __init__(self) -> None:
        self.followers: dict[str, set[Follower]] = defaultdict(set)
        self.running: dict[str, RunningAnswer] = {}  # conversation id -> this process's answer
        self.remote = RedisLink(self, settings.REDIS_URL) if settings.REDIS_URL else None

    # --- followers ------------------------------------------------------------

    async def follow(self, conversation_id: str, follower: Follower) -> None:
        followers = self.followers[conversation_id]
        first = not followers
        followers.add(follower)
        if first and self.remote is not None:
            await self.remote.subscribe(conversation_id)

    async def unfollow(self, conversation_id: str, follower: Follower) -> None:
        followers = self.followers.get(conversation_id)
        if followers is None:
            return
        followers.discard(follower)
        if not followers:
            del self.followers[conversation_id]
            if self.remote is not None:
                await self.remote.unsubscribe(conversation_id)

    def deliver_local(self, conversation_id: str, frame: Frame) -> None:
        for follower in tuple(self.followers.get(conversation_id, ())):
            try:
                follower.deliver(frame)
            except Exception:  # one broken follower must not starve the others
                log.exception("follower of %s failed", conversation_id)

    # --- publishing -----------------------------------------------------------

    def publish(self, conversation_id: str, data: dict[str, Any]) -> Frame:
        """Hand a conversation event to every follower, here and in other
        workers; a delta also goes to the answer's log."""
        frame = Frame(data, conversation_id)
        self.deliver_local(conversation_id, frame)
        if self.remote is not None:
            self.remote.publish(conversation_id, frame)
        return frame

    # --- running answers -------------------------------------------------------

    def register(self, conversation_id: str, answer: RunningAnswer) -> None:
        self.running[conversation_id] = answer

    def unregister(self, conversation_id: str, answer: RunningAnswer) -> None:
        if self.running.get(conversation_id) is answer:
            del self.running[conversation_id]

    async def snapshot(self, conversation_id: str) -> Snapshot | None:
        """The streaming answer of a conversation and its text so far, from
        whichever worker runs it; None if no answer is streaming (or its
        worker is gone)."""
        local = self.running.get(conversation_id)
        if local is not None:
            seq, content = local.snapshot()
            return Snapshot(local.answer_id, seq, content)
        if self.remote is not None:
            return await self.remote.snapshot(conversation_id)
        return None

    async def deltas_after(self, conversation_id: str, answer_id: str, seq: int) -> list[tuple[int, str]]:
        local = self.running.get(conversation_id)
        if local is not None and local.answer_id == answer_id:
            return local.deltas_after(seq)
        if self.remote is not None:
            return await self.remote.deltas_after(answer_id, seq)
        return []

    async def shown_text(self, answer_id: str) -> str | None:
        """What followers were sent of an answer, from its log (for settling
        an answer whose worker died)."""
        if self.remote is None:
            return None
        try:
            return answer_log.log_text(await self.remote.client.xrange(self.remote.names.log(answer_id)))
        except Exception as exc:
            log.warning("answer log of %s unreadable: %s", answer_id, exc)
            return None

    async def stop(self, conversation_id: str) -> None:
        """Ask the running answer of a conversation, in whatever worker, to stop."""
        local = self.running.get(conversation_id)
        if local is not None:
            local.stop()
        elif self.remote is not None:
            await self.remote.send_stop(conversation_id)

    async def flush(self) -> None:
        """Wait until everything published so far has reached Redis."""
        if self.remote is not None:
            await self.remote.flush()


class RedisLink:
    """The hub's side in Redis: the answers' logs, the live tail, stops."""

    def __init__(self, hub: Hub, url: str) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.hub = hub
        self.names = answer_log.RedisNames.for_settings()
        # No silent retries inside redis-py: a Redis that restarted (empty)
        # must be seen here, so that the logs are rewritten (below).
        self.client = redis.Redis.from_url(
            url, socket_timeout=15, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)
        )
        self.origin = WORKER_ID.encode()
        self._queue: list[tuple[Any, ...]] = []
        self._wake = asyncio.Event()
        # Flushes waiting: (how many commands had been queued then, its future).
        self._flushed: list[tuple[int, asyncio.Future[None]]] = []
        self._queued = 0  # commands ever queued
        self._written = 0  # commands ever written (or given up on)
        self._writer: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._subscribed: set[str] = set()
        self._ready: asyncio.Future[None] | None = None
        # Writes were lost (Redis was away or restarted empty): the logs of
        # this worker's running answers are rewritten from memory first.
        self._lost = False

    # --- writes: batched ---------------------------------------------------------

    def _enqueue(self, *commands: tuple[Any, ...]) -> None:
        self._queue.extend(commands)
        self._queued += len(commands)
        self._wake_writer()

    def _wake_writer(self) -> None:
        self._wake.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="answer-log-writer"
            )

    def publish(self, conversation_id: str, frame: Frame) -> None:
        # The publishing worker first: a worker skips its own frames (its
        # sockets had them already) without decoding them.
        commands = answer_log.frame_commands(self.names, conversation_id, frame.data)
        commands.append(("PUBLISH", self.names.topic(conversation_id), WORKER_ID + "\n" + frame.text))
        self._enqueue(*commands)

    async def send_stop(self, conversation_id: str) -> None:
        self._enqueue(("PUBLISH", self.names.control, json.dumps({"stop": conversation_id})))
        await self.flush()

    async def flush(self) -> None:
        if not self._queue and (self._writer is None or self._writer.done()):
            return
        done = asyncio.get_running_loop().create_future()
        self._flushed.append((self._queued, done))
        self._wake_writer()
        await done

    async def _write_loop(self) -> None:
        try:
            await self._write_rounds()
        except asyncio.CancelledError:
            for _upto, done in self._flushed:  # nobody waits on a writer that is gone
                done.cancel()
            self._flushed = []
            raise

    async def _write_rounds(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # At most MAX_PIPELINE commands a round trip: packing and parsing
            # thousands at once held the event loop for 100-300 ms (every
            # socket's frames waited).
            batch, self._queue = self._queue[:MAX_PIPELINE], self._queue[MAX_PIPELINE:]
            if self._queue:
                self._wake.set()
            if batch or self._lost:
                await self._write(batch)
            self._written += len(batch)
            waiting = [done for upto, done in self._flushed if upto <= self._written]
            self._flushed = [(upto, done) for upto, done in self._flushed if upto > self._written]
            for done in waiting:
                if not done.done():
                    done.set_result(None)

    async def _write(self, batch: list[tuple[Any, ...]]) -> None:
        for attempt, delay in enumerate((*RECONNECT_DELAY, None)):
            try:
                rewrite, self._lost = self._lost, False  # set again by a failure meanwhile
                commands = self._rebuilt(batch) if rewrite else batch
                pipe = self.client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command)
                await pipe.execute(raise_on_error=False)
                _raise_if_cancelled()
                if rewrite:
                    running = len(self.hub.running)
                    log.warning("answer log: Redis is back; logs of %d running answer(s) rewritten", running)
                return
            except Exception as exc:  # Redis down: local followers still have every frame
                _raise_if_cancelled()
                self._lost = True  # it may come back empty
                with contextlib.suppress(Exception):
                    await self.client.connection_pool.disconnect()  # dead connections out
                if delay is None:
                    # The running answers' logs are rewritten whole on the
                    # next write that gets through; followers elsewhere
                    # resync when their live tail reconnects.
                    log.error("answer log: %d Redis writes lost after %d tries: %s", len(batch), attempt, exc)
                    return
                await asyncio.sleep(delay)

    def _rebuilt(self, batch: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The logs of this worker's running answers as they are in memory
        (Redis may have restarted empty), then the batch without the deltas
        those logs already hold."""
        commands: list[tuple[Any, ...]] = []
        rewritten = set()
        for conversation_id, answer in list(self.hub.running.items()):
            rewritten.add(self.names.log(answer.answer_id))
            commands += answer_log.rewrite_commands(
                self.names, conversation_id, answer.answer_id, answer.deltas_after(0)
            )
        commands.extend(c for c in batch if not (c[0] == "XADD" and c[1] in rewritten))
        return commands

    # --- reads -------------------------------------------------------------------

    async def snapshot(self, conversation_id: str) -> Snapshot | None:
        running = await self.client.get(self.names.running(conversation_id))
        if running is None:
            return None
        answer_id = running.decode() if isinstance(running, bytes) else str(running)
        return answer_log.snapshot_of(answer_id, await self.client.xrange(self.names.log(answer_id)))

    async def deltas_after(self, answer_id: str, seq: int) -> list[tuple[int, str]]:
        return answer_log.deltas_of(await self.client.xrange(self.names.log(answer_id)), seq)

    # --- the live tail -----------------------------------------------------------------

    async def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            self._reader = loop.create_task(self._read_loop(), name="answer-log-reader")
        assert self._ready is not None
        await asyncio.shield(self._ready)

    async def subscribe(self, conversation_id: str) -> None:
        self._subscribed.add(conversation_id)
        await self._ensure_reader()
        with contextlib.suppress(Exception):  # the reader resubscribes after a reconnect
            await self._pubsub.subscribe(self.names.topic(conversation_id))

    async def unsubscribe(self, conversation_id: str) -> None:
        self._subscribed.discard(conversation_id)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(self.names.topic(conversation_id))

    async def _read_loop(self) -> None:
        failures = 0
        while True:
            try:
                self._pubsub = self.client.pubsub()
                channels = [self.names.control, *(self.names.topic(c) for c in self._subscribed)]
                await self._pubsub.subscribe(*channels)
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)
                if failures:
                    log.warning("answer log: live tail reconnected; followers catch up")
                    # Redis restarted: the pooled connections are dead ones.
                    with contextlib.suppress(Exception):
                        await self.client.connection_pool.disconnect()
                    # Redis may have restarted empty: rewrite our answers' logs.
                    self._lost = True
                    self._wake_writer()
                    self._resync_all()
                failures = 0
                while True:
                    message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    _raise_if_cancelled()
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _raise_if_cancelled()
                delay = RECONNECT_DELAY[min(failures, len(RECONNECT_DELAY) - 1)]
                failures += 1
                log.warning("answer log: live tail lost (%s); reconnecting in %.1f s", exc, delay)
                with contextlib.suppress(Exception):
                    await self._pubsub.aclose()
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)  # subscribers go on; resync follows
                await asyncio.sleep(delay)

    def _resync_all(self) -> None:
        for conversation_id, followers in list(self.hub.followers.items()):
            for follower in tuple(followers):
                with contextlib.suppress(Exception):
                    follower.resync(conversation_id)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        name = channel.decode()
        if name == self.names.control:
            try:
                conversation_id = json.loads(data).get("stop", "")
            except (ValueError, AttributeError):
                return
            answer = self.hub.running.get(conversation_id)
            if answer is not None:
                answer.stop()
            return
        origin, _, body = data.partition(b"\n")
        if origin == self.origin:
            return  # our own frame: local followers had it already
        try:
            event = json.loads(body)
        except ValueError:
            return
        topic = name.removeprefix(self.names.topics)
        self.hub.deliver_local(topic, Frame(event, topic, body.decode()))


def _raise_if_cancelled() -> None:
    """redis-py sometimes swallows a cancellation, or turns it into a
    ConnectionError (redis/redis-py#2028, #2717): a reader cancelled while
    it waits would then reconnect and wait forever (a loop that never shuts
    down). The task still knows it was asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = weakref.WeakKeyDictionary()


async def tell(topic: str, event: dict[str, Any]) -> None:
    """Publish one event and wait until other workers can see it (for callers
    outside the server's loop: a view, a command)."""
    hub = get_hub()
    hub.publish(topic, event)
    await hub.flush()


def get_hub() -> Hub:
    """This process's hub (one per event loop: each test has a loop of its own)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = Hub()
    return hub
