"""The events of the websocket contract (DESIGN.md) and their payloads.

A `Frame` is one event, encoded to JSON at most once however many sockets
it goes to."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from .. import llm
from ..models import Conversation, Message

NO_COST = Decimal("0.000000")  # a model without a ModelPrice row

# How a failed model call is named in the contract's `error` frame.
UPSTREAM_CODES = {"rate_limited": "upstream_unavailable", "unavailable": "upstream_unavailable"}


def upstream_code(error: llm.LLMError) -> str:
    """The contract's error code of a failed model call: `upstream_unavailable`
    (try again shortly) or `upstream_error`."""
    return UPSTREAM_CODES.get(error.reason, "upstream_error")


def user_topic(user_id: Any) -> str:
    """The hub topic of all of a user's sockets: small, rare events
    (conversation created, renamed, deleted). A conversation's own topic is
    its id."""
    return f"user.{user_id}"


class Frame:
    """One event for the sockets following a conversation."""

    __slots__ = ("_text", "conversation", "data")

    def __init__(self, data: dict[str, Any], conversation: str = "", text: str | None = None) -> None:
        self.data = data
        self.conversation = conversation  # the id of the conversation it belongs to
        self._text = text

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = json.dumps(self.data, ensure_ascii=False)
        return self._text


def conversation_payload(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": str(conversation.id),
        "title": conversation.display_title,
        "created_at": conversation.created_at.isoformat(),
        "model": conversation.chosen_model,
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


def usage_payload(prompt_tokens: int, completion_tokens: int, cost: Decimal) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cost": str(cost)}


def finished_event(
    answer: Message,
    *,
    status: str,
    finish_reason: str,
    content: str,
    html: str,
    model: str,
    usage: dict[str, Any],
    seq: int | None = None,
    error: str = "",
) -> dict[str, Any]:
    event = {
        "type": "generation.finished",
        "conversation": str(answer.conversation_id),
        "message": str(answer.id),
        "status": str(status),
        "finish_reason": finish_reason,
        "content": content,
        "html": html,
        "model": model,
        "usage": usage,
    }
    if error:
        event["error"] = error  # a failed answer: why, for the person
    if seq is not None:
        event["seq"] = seq  # the last delta's seq: a follower can tell it missed none
    return event
