"""The websocket protocol of DESIGN.md: parse, authorise, delegate.

No business logic here: `generation` owns an answer's life; this consumer
turns frames into calls and channel-layer events into frames.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from accounts.limits import record_send, send_retry_after

from . import generation
from .models import Conversation

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
MAX_FRAME_BYTES = 256 * 1024
SNAPSHOT_TIMEOUT = 3.0  # seconds to wait for a running answer to send its text


class FrameError(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


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


def _content(frame: dict[str, Any], extra: dict[str, Any]) -> str:
    content = frame.get("content")
    if not isinstance(content, str) or not content.strip():
        raise FrameError("invalid_request", "The message is empty.", **extra)
    limit = settings.CHAT_MAX_MESSAGE_CHARS
    if len(content) > limit:
        raise FrameError(
            "invalid_request", f"The message is too long ({len(content)} > {limit} characters).", **extra
        )
    return content


@dataclass
class _Following:
    """What this socket has shown of one conversation."""

    snapshot_of: str | None = None  # the streaming answer whose snapshot is awaited
    held: list[dict[str, Any]] = field(default_factory=list)  # deltas before the snapshot
    last_seq: dict[str, int] = field(default_factory=dict)  # per answer


class ChatConsumer(AsyncJsonWebsocketConsumer):
    user: Any
    following: dict[str, _Following]

    async def connect(self) -> None:
        # Accept first, then close: a refused handshake reaches the browser as
        # a bare 403 and the page could not tell "log in again" from a fault.
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.following = {}
        await self.channel_layer.group_add(generation.user_group(user.pk), self.channel_name)

    async def disconnect(self, code: int) -> None:
        if not hasattr(self, "user"):
            return
        await self.channel_layer.group_discard(generation.user_group(self.user.pk), self.channel_name)
        following, self.following = self.following, {}
        for conversation_id in following:
            await self.channel_layer.group_discard(
                generation.conversation_group(conversation_id), self.channel_name
            )
        # Any answer this socket started runs on: it is not ours to stop.

    # --- Client -> server ---------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if not hasattr(self, "user"):
            return
        try:
            frame = self._parse(text_data, bytes_data)
            handler = {
                "message.send": self._message_send,
                "message.edit": self._message_edit,
                "message.regenerate": self._answer_again,
                "message.continue": self._answer_again,
                "generation.stop": self._generation_stop,
                "conversation.join": self._conversation_join,
            }.get(frame.get("type"))
            if handler is None:
                raise FrameError("invalid_request", f"Unknown frame type: {frame.get('type')!r}.")
            await handler(frame)
        except FrameError as exc:
            await self.send_json({"type": "error", "code": exc.code, "message": exc.message, **exc.extra})

    def _parse(self, text_data: str | None, bytes_data: bytes | None) -> dict[str, Any]:
        raw = text_data if text_data is not None else (bytes_data or b"").decode("utf-8", "replace")
        if len(raw.encode("utf-8", "replace")) > MAX_FRAME_BYTES:
            raise FrameError("invalid_request", "Frame too large.")
        try:
            frame = json.loads(raw)
        except ValueError:
            raise FrameError("invalid_request", "Frames must be JSON objects.") from None
        if not isinstance(frame, dict):
            raise FrameError("invalid_request", "Frames must be JSON objects.")
        return frame

    async def _message_send(self, frame: dict[str, Any]) -> None:
        client_id = _uuid(frame, "client_id")
        extra: dict[str, Any] = {"client_id": str(client_id)}
        conversation_id = _uuid(frame, "conversation", optional=True)
        prompt_id = _uuid(frame, "prompt", optional=True) if conversation_id is None else None
        if conversation_id is not None:
            extra["conversation"] = str(conversation_id)
        content = _content(frame, extra)
        if await self._resent(client_id):
            return
        await self._start(
            generation.accept_message,
            extra,
            conversation_id=conversation_id,
            content=content,
            client_id=client_id,
            prompt_id=prompt_id,
        )

    async def _message_edit(self, frame: dict[str, Any]) -> None:
        client_id = _uuid(frame, "client_id")
        conversation_id = _uuid(frame, "conversation")
        extra: dict[str, Any] = {"client_id": str(client_id), "conversation": str(conversation_id)}
        message_id = _uuid(frame, "message")
        content = _content(frame, extra)
        if await self._resent(client_id):
            return
        await self._start(
            generation.accept_edit,
            extra,
            conversation_id=conversation_id,
            message_id=message_id,
            content=content,
            client_id=client_id,
        )

    async def _answer_again(self, frame: dict[str, Any]) -> None:
        """`message.regenerate` and `message.continue`: a new answer, no new question."""
        conversation_id = _uuid(frame, "conversation")
        accept = (
            generation.accept_regenerate
            if frame["type"] == "message.regenerate"
            else generation.accept_continue
        )
        await self._start(accept, {"conversation": str(conversation_id)}, conversation_id=conversation_id)

    async def _resent(self, client_id: uuid.UUID) -> bool:
        """A frame sent again (after a reconnect): show what exists, create nothing."""
        sent = await database_sync_to_async(generation.find_sent)(user=self.user, client_id=client_id)
        if sent is None:
            return False
        await self._follow(sent.conversation_id)
        await self.send_json(
            {
                "type": "message.created",
                "message": generation.message_payload(sent),
                "client_id": str(client_id),
            }
        )
        return True

    async def _start(self, accept: Any, extra: dict[str, Any], **arguments: Any) -> None:
        """Rate limit, then let `generation` accept the turn and start its answer."""
        retry_after = await sync_to_async(send_retry_after)(self.user)
        if retry_after is not None:
            raise FrameError(
                "rate_limited",
                f"Too many messages. Try again in {retry_after} s.",
                retry_after=retry_after,
                **extra,
            )
        try:
            accepted = await database_sync_to_async(accept)(user=self.user, **arguments)
        except generation.NotFound:
            raise FrameError("not_found", "No such conversation.", **extra) from None
        except generation.Busy:
            raise FrameError(
                "busy", "An answer is still being written in this conversation.", **extra
            ) from None
        except generation.Refused as exc:
            raise FrameError("invalid_request", str(exc), **extra) from None
        except generation.OverQuota as exc:
            raise FrameError("quota_exceeded", str(exc), retry_after=exc.retry_after, **extra) from None
        await sync_to_async(record_send)(self.user)
        await self._follow(accepted.conversation.id)
        await generation.launch(accepted)

    async def _generation_stop(self, frame: dict[str, Any]) -> None:
        conversation_id = _uuid(frame, "conversation")
        await self._own(conversation_id)
        await generation.request_stop(conversation_id)

    async def _conversation_join(self, frame: dict[str, Any]) -> None:
        conversation_id = _uuid(frame, "conversation")
        after = frame.get("after")
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise FrameError("invalid_request", "`after` must be a non-negative integer.")
        await self._own(conversation_id)
        state = await self._follow(conversation_id)
        streaming = await database_sync_to_async(generation.streaming_answer_id)(conversation_id)
        if streaming is not None:
            state.snapshot_of = streaming
            state.held.clear()
            await generation.request_snapshot(conversation_id, self.channel_name)
            asyncio.get_running_loop().call_later(
                SNAPSHOT_TIMEOUT, lambda: asyncio.ensure_future(self._snapshot_timeout(str(conversation_id)))
            )
        elif after is not None:
            # The client was following an answer that has ended since.
            await self._send_last_finished(conversation_id)

    async def _send_last_finished(self, conversation_id: Any) -> None:
        finished = await database_sync_to_async(generation.last_answer_finished)(conversation_id)
        if finished is not None:
            await self.send_json(finished)

    async def _own(self, conversation_id: uuid.UUID | None) -> None:
        exists = await Conversation.objects.filter(pk=conversation_id, owner=self.user).aexists()
        if not exists:
            # Same answer for someone else's conversation: never reveal it exists.
            raise FrameError("not_found", "No such conversation.", conversation=str(conversation_id))

    async def _follow(self, conversation_id: Any) -> _Following:
        key = str(conversation_id)
        if key not in self.following:
            await self.channel_layer.group_add(generation.conversation_group(key), self.channel_name)
            self.following[key] = _Following()
        return self.following[key]

    async def _snapshot_timeout(self, conversation_id: str) -> None:
        state = self.following.get(conversation_id)
        if state is not None and state.snapshot_of is not None:
            # No running answer replied: its process may have died. Deltas
            # without their start would only mislead; sweep, and if that
            # settled the answer, say how it ended.
            state.snapshot_of = None
            state.held.clear()
            await database_sync_to_async(generation.sweep_interrupted)()
            await self._send_last_finished(conversation_id)

    # --- Channel layer -> client ---------------------------------------------

    async def _forward(self, event: dict[str, Any]) -> None:
        await self.send_json(event)

    async def conversation_created(self, event: dict[str, Any]) -> None:
        await self._forward(event)

    async def conversation_updated(self, event: dict[str, Any]) -> None:
        await self._forward(event)

    async def conversation_deleted(self, event: dict[str, Any]) -> None:
        if self.following.pop(event["conversation"], None) is not None:
            await self.channel_layer.group_discard(
                generation.conversation_group(event["conversation"]), self.channel_name
            )
        await self._forward(event)

    async def message_created(self, event: dict[str, Any]) -> None:
        await self._forward(event)

    async def generation_started(self, event: dict[str, Any]) -> None:
        await self._forward(event)

    async def generation_error(self, event: dict[str, Any]) -> None:
        await self._forward({**event, "type": "error"})

    async def generation_finished(self, event: dict[str, Any]) -> None:
        state = self.following.get(event["conversation"])
        if state is not None and state.snapshot_of == event["message"]:
            # The answer ended before its snapshot came: the full text is here.
            state.snapshot_of = None
            state.held.clear()
        await self._forward(event)

    async def generation_delta(self, event: dict[str, Any]) -> None:
        state = self.following.get(event["conversation"])
        if state is None:
            return
        if state.snapshot_of is not None:
            state.held.append(event)
            return
        await self._send_delta(state, event)

    async def generation_snapshot(self, event: dict[str, Any]) -> None:
        state = self.following.get(event["conversation"])
        if state is None or state.snapshot_of != event["message"]:
            return  # not asked for, or the text of an answer that has just ended
        state.snapshot_of = None
        state.last_seq[event["message"]] = event["seq"]
        await self._forward(event)
        await self._release_held(state)

    async def _release_held(self, state: _Following) -> None:
        held, state.held = state.held, []
        for delta in held:
            await self._send_delta(state, delta)

    async def _send_delta(self, state: _Following, event: dict[str, Any]) -> None:
        message = event["message"]
        if event["seq"] <= state.last_seq.get(message, 0):
            return  # already covered by the snapshot
        state.last_seq[message] = event["seq"]
        await self._forward(event)
