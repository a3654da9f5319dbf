"""The websocket protocol (docs/architecture.md, README's "Websocket
protocol"): parse, authorise, delegate.

No business logic here: `generation` owns an answer's life; this consumer
turns frames into calls and channel-layer events into frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Coroutine
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth.models import User
from django.db import InterfaceError, OperationalError

from accounts import security, sessions

from . import attachments, generation, inputs, refusals
from .batches import batches_of
from .generation import Frame, events
from .generation.follow import Follow
from .sockets import socket_counts

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
# The user has CHAT_MAX_SOCKETS_PER_USER sockets open already (HTTP's 429).
CLOSE_TOO_MANY_SOCKETS = 4429
# A socket that sent more than CHAT_MAX_BAD_FRAMES bad frames in a minute:
# 1008 (policy violation) in the 4000s, as 4012 is 1012: daphne sends no
# close code but 1000 and 3000-4999.
CLOSE_POLICY = 4008
BAD_FRAME_WINDOW = 60.0  # s
# A worker shutting down (a deploy) closes its sockets with this; the page
# reconnects at once, to another worker. It is 1012 (service restart) in the
# 4000s: daphne (autobahn) sends no close code but 1000 and 3000-4999.
CLOSE_SERVICE_RESTART = 4012
MAX_FRAME_BYTES = 256 * 1024
MAX_OUTBOX = 2000  # frames queued for one socket before its deltas are cut back to a snapshot
# Daphne refuses to send a websocket message over 1 MiB (and many clients to
# receive one): a longer frame (the `generation.finished` of a very long
# answer, a snapshot) goes as consecutive `frame.part` messages whose `data`
# joined is the frame's JSON. 100k characters stay under 1 MiB escaped.
MAX_MESSAGE_CHARS = 100_000


class FrameError(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    @classmethod
    def of(cls, refusal: refusals.Refusal, **extra: Any) -> FrameError:
        """A refusal as an `error` frame: its code is the contract's."""
        if refusal.retry_after is not None:
            extra["retry_after"] = refusal.retry_after
        return cls(refusal.code, refusal.message, **extra)


def _uuid(frame: dict[str, Any], name: str, *, optional: bool = False) -> uuid.UUID | None:
    value = frame.get(name)
    if value is None and optional:
        return None
    try:
        if not isinstance(value, str):
            raise TypeError(name)
        return uuid.UUID(value)
    except (TypeError, ValueError):
        raise FrameError("invalid_request", f"`{name}` must be a UUID string.") from None


def _about(frame: dict[str, Any]) -> dict[str, Any]:
    """The ids an error about `frame` carries, where they are ids."""
    return {k: frame[k] for k in ("client_id", "conversation") if _clean_id(frame.get(k))}


def _clean_id(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _model(frame: dict[str, Any]) -> str | None:
    """A new conversation's model, by name (optional)."""
    value = frame.get("model")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 100:
        raise FrameError("invalid_request", "`model` must be a model's name.")
    return value


def _attachments(frame: dict[str, Any], extra: dict[str, Any]) -> list[uuid.UUID] | None:
    """A send's files (`attachments`: file ids); None when the frame has none."""
    if frame.get("attachments") is None:
        return None
    ids = attachments.parse_ids(frame["attachments"])
    if isinstance(ids, str):
        raise FrameError("invalid_request", ids, **extra)
    return ids


def _content(frame: dict[str, Any], extra: dict[str, Any], *, files: bool = False) -> str:
    """The message's text; empty only when `files` go with it."""
    content = frame.get("content", "" if files else None)
    if not isinstance(content, str) or not (content.strip() or files):
        raise FrameError("invalid_request", "The message is empty.", **extra)
    limit = settings.CHAT_MAX_MESSAGE_CHARS
    if len(content) > limit:
        raise FrameError(
            "invalid_request", f"The message is too long ({len(content)} > {limit} characters).", **extra
        )
    problem = inputs.text_problem(content)
    if problem:
        raise FrameError("invalid_request", f"The message {problem}.", **extra)
    return content


def frame_parts(text: str) -> list[str]:
    """One long frame as `frame.part` messages, in order."""
    size = MAX_MESSAGE_CHARS
    count = -(-len(text) // size)
    return [
        json.dumps(
            {"type": "frame.part", "part": i, "parts": count, "data": text[i * size : (i + 1) * size]},
            ensure_ascii=False,
        )
        for i in range(count)
    ]


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """One browser tab. Frames from the answers it follows arrive through
    `deliver` (called by the hub, synchronously) and leave through one
    ordered, bounded outbox."""

    channel_layer_alias = "none"  # no Channels layer is configured: every frame comes through the hub
    user: User
    following: dict[str, Follow]

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' own, without its `close_old_connections` before every
        message: a hop to the database thread per frame received (7% of a
        worker's samples under a burst, queued behind the answers' database
        work). Every database call here goes through `database_sync_to_async`
        or `generation`, which close old connections themselves."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        if generation.draining():
            # This worker is shutting down: refuse the handshake (403), which
            # the proxy retries on another worker (proxy_next_upstream).
            await self.close()
            return
        # Accept first, then close: a refused handshake reaches the browser as
        # a bare 403 and the page could not tell "log in again" from a fault.
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.hub = generation.get_hub()
        self.address = security.scope_address(self.scope)
        self.socket_id = uuid.uuid4().hex
        if not await socket_counts().open(user.pk, self.socket_id, settings.CHAT_MAX_SOCKETS_PER_USER):
            security.event(
                "socket_refused", user=user, address=self.address, limit=settings.CHAT_MAX_SOCKETS_PER_USER
            )
            await self.close(code=CLOSE_TOO_MANY_SOCKETS)
            return
        self.user = user
        session_key = getattr(self.scope.get("session"), "session_key", None)
        self.sign_in = (session_key, user.pk)  # asked again before acting (signins.py)
        self._session_digest = sessions.session_digest(session_key) if session_key else ""
        self._signed_in_checked = time.monotonic()
        self.following = {}
        self._bad: deque[float] = deque()  # when the last bad frames came
        self._joins: deque[float] = deque()  # when the last conversation.join frames came
        self._closing = False
        self._outbox: deque[tuple[str, str | None, str]] = deque()  # (type, conversation, json)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()  # catch-ups under way
        self._announced: set[str] = set()  # conversations whose creation this tab was shown
        self._sender = asyncio.create_task(self._send_loop())
        self.user_topic = generation.user_topic(user.pk)
        await self.hub.follow(self.user_topic, self)
        worker = generation.this_worker()
        worker.sockets.add(self)
        if worker.draining:  # the drain began during this handshake
            await self.close_for_restart()

    async def close_for_restart(self) -> None:
        """Close with 4012 (service restart): the page reconnects, through the
        proxy, to another worker and re-joins its conversation."""
        await self.close(code=CLOSE_SERVICE_RESTART)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Channels' consumer, and whatever ends it (a close, a crash, a
        cancellation), the socket is uncounted and unfollowed: a socket
        that died of an exception kept its slot in the user's count."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._forget()

    async def disconnect(self, code: int) -> None:
        await self._forget()

    async def _forget(self) -> None:
        if not hasattr(self, "user") or getattr(self, "_forgotten", False):
            return
        self._forgotten = True
        self._sender.cancel()
        generation.this_worker().sockets.discard(self)
        await socket_counts().close(self.user.pk, self.socket_id)
        await self.hub.unfollow(self.user_topic, self)
        following, self.following = self.following, {}
        for conversation_id, follow in following.items():
            follow.ended = True
            await self.hub.unfollow(conversation_id, self)
        # Any answer this socket started runs on: it is not ours to stop.

    # --- Client -> server ---------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if not hasattr(self, "user") or self._closing:
            return
        frame: dict[str, Any] = {}
        try:
            frame = self._parse(text_data, bytes_data)
            handler = {
                "message.send": self._message_send,
                "message.edit": self._message_edit,
                "message.regenerate": self._answer_again,
                "message.continue": self._answer_again,
                "generation.stop": self._generation_stop,
                "conversation.join": self._conversation_join,
            }.get(str(frame.get("type")))
            if handler is None:
                raise FrameError("invalid_request", f"Unknown frame type: {frame.get('type')!r}.")
            # A send asks in the same call that accepts it (`_message_send`).
            if handler != self._message_send and not await self._still_signed_in():
                return
            await handler(frame)
        except FrameError as exc:
            if exc.code in ("invalid_request", "not_found", "rate_limited_join"):
                if exc.code == "not_found":
                    security.event(
                        "ownership_refused",
                        user=self.user,
                        address=self.address,
                        conversation=frame.get("conversation"),
                    )
                if await self._bad_frame():
                    return
            code = "rate_limited" if exc.code == "rate_limited_join" else exc.code
            self._emit(events.error_event(code, exc.message, **exc.extra))
        except (OperationalError, InterfaceError) as exc:
            # The database is away (restarting): nothing was stored; say so.
            log.warning("frame refused, database unavailable: %s", exc)
            self._emit(
                events.error_event(
                    "unavailable",
                    "The service is briefly unavailable; try again in a moment.",
                    retry_after=2,
                    **_about(frame),
                )
            )
        except Exception:
            # A fault of ours: this frame is refused, the socket lives on
            # (and still counts its bad frames: a frame that keeps finding
            # the fault cannot keep the worker busy).
            log.exception("frame of type %r failed", frame.get("type"))
            if await self._bad_frame():
                return
            self._emit(
                events.error_event(
                    "internal_error",
                    "Something went wrong on our side with that request; try again.",
                    **_about(frame),
                )
            )

    async def _still_signed_in(self, *, now: bool = False) -> bool:
        """Is the sign-in this socket was opened with still good (not logged
        out, the account active, its password unchanged)? Asked again when
        the last answer is older than CHAT_SESSION_RECHECK (or `now`); if
        not, the socket is closed with 4401 and False returned."""
        if self._closing:
            return False
        checked = time.monotonic()
        if not now and checked - self._signed_in_checked < settings.CHAT_SESSION_RECHECK:
            return True
        good = await batches_of(sessions.still_signed_in).submit(self.sign_in)
        if good:
            self._signed_in_checked = checked
            return True
        self._closing = True
        await self._close_signed_out("sign_in_ended")
        return False

    async def _close_signed_out(self, why: str) -> None:
        security.event("socket_signed_out", user=self.user, address=self.address, why=why)
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def _check_sign_in_now(self) -> None:
        with contextlib.suppress(Exception):  # the database away: the next frame asks again
            await self._still_signed_in(now=True)

    async def _bad_frame(self) -> bool:
        """Count a bad frame (malformed, unknown, someone else's conversation,
        too many joins); past CHAT_MAX_BAD_FRAMES in a minute the socket is
        closed (4008). True if it was."""
        now = time.monotonic()
        self._bad.append(now)
        while self._bad and now - self._bad[0] > BAD_FRAME_WINDOW:
            self._bad.popleft()
        if len(self._bad) <= settings.CHAT_MAX_BAD_FRAMES:
            return False
        self._closing = True
        security.event("socket_flood", user=self.user, address=self.address, bad_frames=len(self._bad))
        await self.close(code=CLOSE_POLICY)
        return True

    def _parse(self, text_data: str | None, bytes_data: bytes | None) -> dict[str, Any]:
        raw = text_data if text_data is not None else (bytes_data or b"").decode("utf-8", "replace")
        if len(raw) > MAX_FRAME_BYTES or len(raw.encode("utf-8", "replace")) > MAX_FRAME_BYTES:
            raise FrameError("invalid_request", "Frame too large.")
        try:
            frame = inputs.load_json(raw, what="The frame")
        except inputs.BadInput as exc:
            if exc.parsed is None:  # not JSON, or nested too deeply
                raise FrameError("invalid_request", str(exc)) from None
            # Parsed, but a string in it cannot be stored: the error names
            # the send it refuses, so that the page can show it there.
            about = _about(exc.parsed) if isinstance(exc.parsed, dict) else {}
            raise FrameError("invalid_request", str(exc), **about) from None
        if not isinstance(frame, dict):
            raise FrameError("invalid_request", "Frames must be JSON objects.")
        return frame

    async def _message_send(self, frame: dict[str, Any]) -> None:
        client_id = _uuid(frame, "client_id")
        extra: dict[str, Any] = {"client_id": str(client_id)}
        conversation_id = _uuid(frame, "conversation", optional=True)
        prompt_id = _uuid(frame, "prompt", optional=True) if conversation_id is None else None
        model = _model(frame) if conversation_id is None else None
        # A new conversation's project (the chat is started in it).
        project_id = _uuid(frame, "project", optional=True) if conversation_id is None else None
        if conversation_id is not None:
            extra["conversation"] = str(conversation_id)
        files = _attachments(frame, extra) or []
        content = _content(frame, extra, files=bool(files))
        asked = time.monotonic()
        due = asked - self._signed_in_checked >= settings.CHAT_SESSION_RECHECK
        await self._start(
            generation.accept_send,
            extra,
            conversation_id=conversation_id,
            content=content,
            client_id=client_id,
            prompt_id=prompt_id,
            model=model,
            sign_in=self.sign_in if due else None,
            attachments=files,
            project_id=project_id,
        )
        if due and not self._closing:
            self._signed_in_checked = asked

    async def _message_edit(self, frame: dict[str, Any]) -> None:
        client_id = _uuid(frame, "client_id")
        conversation_id = _uuid(frame, "conversation")
        extra: dict[str, Any] = {"client_id": str(client_id), "conversation": str(conversation_id)}
        message_id = _uuid(frame, "message")
        files = _attachments(frame, extra)
        # Without `attachments` the edited question keeps its files (it may then be only them).
        content = _content(frame, extra, files=files is None or bool(files))
        await self._start(
            generation.in_database(generation.accept_edit),
            extra,
            conversation_id=conversation_id,
            message_id=message_id,
            content=content,
            client_id=client_id,
            attachments=files,
        )

    async def _answer_again(self, frame: dict[str, Any]) -> None:
        """`message.regenerate` and `message.continue`: a new answer, no new question."""
        conversation_id = _uuid(frame, "conversation")
        accept = (
            generation.accept_regenerate
            if frame["type"] == "message.regenerate"
            else generation.accept_continue
        )
        await self._start(
            generation.in_database(accept),
            {"conversation": str(conversation_id)},
            conversation_id=conversation_id,
        )

    async def _start(self, accept: Any, extra: dict[str, Any], **arguments: Any) -> None:
        """Let `generation` accept the turn (every rule lives there), then
        follow the conversation and start the answer. `accept`: awaitable."""
        try:
            accepted = await accept(user=self.user, **arguments)
        except refusals.Refusal as refusal:
            if refusal.code == refusals.SIGNED_OUT:
                self._closing = True
                await self._close_signed_out("sign_in_ended")
                return
            if refusal.code == refusals.RESENT:
                # A frame sent again (after a reconnect): show what exists, create nothing.
                sent = refusal.sent
                await self._follow(str(sent.conversation_id))
                self._emit(events.message_created(sent))
                return
            raise FrameError.of(refusal, **extra) from None
        await self._follow(str(accepted.conversation.id))
        await generation.launch(accepted)

    async def _own(self, conversation_id: uuid.UUID | None) -> None:
        try:
            await database_sync_to_async(generation.check_owner)(
                user=self.user, conversation_id=conversation_id
            )
        except refusals.Refusal as refusal:
            # Same answer for someone else's conversation: never reveal it exists.
            raise FrameError.of(refusal, conversation=str(conversation_id)) from None

    async def _generation_stop(self, frame: dict[str, Any]) -> None:
        conversation_id = _uuid(frame, "conversation")
        await self._own(conversation_id)
        await generation.request_stop(conversation_id)

    async def _conversation_join(self, frame: dict[str, Any]) -> None:
        now = time.monotonic()
        self._joins.append(now)
        while self._joins and now - self._joins[0] > 60.0:
            self._joins.popleft()
        if len(self._joins) > settings.CHAT_JOIN_RATE:
            raise FrameError(
                "rate_limited_join", "Too many conversation.join frames; wait a minute.", retry_after=60
            )
        conversation_id = _uuid(frame, "conversation")
        after = frame.get("after")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise FrameError("invalid_request", "`after` must be a non-negative integer.")
        await self._own(conversation_id)
        follow = await self._follow(str(conversation_id))
        try:
            await follow.join(missed_end=after is not None)
        except Exception as exc:  # Redis or the database away: the socket stays; try again
            log.warning("join of %s failed (%s); trying again", conversation_id, exc)
            follow.resync()

    async def _follow(self, conversation_id: str) -> Follow:
        follow = self.following.get(conversation_id)
        if follow is None:
            follow = self.following[conversation_id] = Follow(
                conversation_id, self._show(conversation_id), self._spawn, hub=self.hub
            )
            await self.hub.follow(conversation_id, self)
        return follow

    def _show(self, conversation_id: str) -> Any:
        def show(frame: Frame) -> None:
            if frame.data["type"] == "conversation.created":
                self._announced.add(conversation_id)  # the user topic repeats it
            self._queue(frame.data["type"], conversation_id, frame.text)

        return show

    async def _rejoin(self, conversation_id: str, *, missed_end: bool) -> None:
        follow = await self._follow(conversation_id)
        await follow.join(missed_end=missed_end)

    def resync(self, conversation_id: str) -> None:
        """The hub's live tail was cut: frames may be missing; catch up."""
        follow = self.following.get(conversation_id)
        if follow is not None:
            follow.resync()

    # --- Answer frames (from the hub) -> client --------------------------------------

    def deliver(self, frame: Frame) -> None:
        if frame.conversation == self.user_topic:
            self._user_event(frame)
            return
        follow = self.following.get(frame.conversation)
        if follow is not None:
            follow.take(frame)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        # A context of its own: `deliver` runs in whoever published's (a view's
        # `async_to_sync`, whose database thread ends with it).
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- The outbox: every frame to the client, in order --------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        conversation = event.get("conversation")
        self._queue(
            event["type"],
            conversation if isinstance(conversation, str) else None,
            json.dumps(event, ensure_ascii=False),
        )

    def _queue(self, kind: str, conversation_id: str | None, text: str) -> None:
        if len(self._outbox) >= MAX_OUTBOX:
            self._cut_back()
        self._outbox.append((kind, conversation_id, text))
        self._wake.set()

    def _cut_back(self) -> None:
        """The client does not keep up: drop its queued deltas and send it a
        fresh snapshot instead (memory stays bounded, other sockets unslowed)."""
        behind = {c for kind, c, _ in self._outbox if kind == "generation.delta" and c}
        self._outbox = deque(item for item in self._outbox if item[0] != "generation.delta")
        log.warning(
            "socket of user %s fell %d frames behind: cut back to a snapshot", self.user.pk, MAX_OUTBOX
        )
        for conversation_id in behind:
            follow = self.following.get(conversation_id)
            if follow is not None:
                follow.forget()

    async def _send_loop(self) -> None:
        outbox_send = self.base_send
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                _kind, _conversation, text = self._outbox.popleft()
                if len(text) <= MAX_MESSAGE_CHARS:
                    await outbox_send({"type": "websocket.send", "text": text})
                    continue
                for part in frame_parts(text):
                    await outbox_send({"type": "websocket.send", "text": part})

    def _user_event(self, frame: Frame) -> None:
        """conversation.created / updated / deleted and project.created / updated
        / deleted, for all of a user's tabs;
        and, never shown to them, that a sign-in of theirs ended."""
        kind = frame.data["type"]
        if kind == events.SESSION_ENDED:
            if (
                self._session_digest
                and frame.data.get("session") == self._session_digest
                and not self._closing
            ):
                self._closing = True  # no frame of this socket is acted on from now
                self._spawn(self._close_signed_out("logged_out"))
            return
        if kind == events.SESSION_CHECK:
            self._spawn(self._check_sign_in_now())
            return
        if kind == "conversation.created" and frame.data["conversation"]["id"] in self._announced:
            return  # this tab had it already, before its answer's first frame
        if kind == "conversation.deleted":
            conversation_id = frame.data["conversation"]
            follow = self.following.pop(conversation_id, None)
            if follow is not None:
                follow.ended = True
                self._spawn(self.hub.unfollow(conversation_id, self))
        self._queue(kind, None, frame.text)
