"""Every event of the websocket contract (docs/architecture.md, README's
"Websocket protocol") and its payloads: each is built here and nowhere else,
for every interface (a socket's frames, the API's SSE, the terminal).

A `Frame` is one event, encoded to JSON at most once however many sockets
it goes to."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from .. import llm
from ..models import Conversation, Message, Project, UsagePayload

NO_COST = Decimal("0.000000")  # a model without a ModelPrice row

Event = dict[str, Any]  # one frame of the contract, as built here

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
        "project": str(conversation.project_id) if conversation.project_id else None,
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
        "attachments": message.attachments or [],  # a question's files
    }


def usage_payload(prompt_tokens: int, completion_tokens: int, cost: Decimal) -> UsagePayload:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cost": str(cost)}


def finished_event(
    answer: Message,
    *,
    status: str,
    finish_reason: str,
    content: str,
    html: str,
    model: str,
    usage: UsagePayload,
    seq: int | None = None,
    error: str = "",
) -> dict[str, Any]:
    event: Event = {
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


# --- A conversation's events ------------------------------------------------------------


def conversation_created(conversation: Conversation) -> Event:
    return {"type": "conversation.created", "conversation": conversation_payload(conversation)}


def conversation_updated(conversation_id: Any, title: str) -> Event:
    return {"type": "conversation.updated", "conversation": {"id": str(conversation_id), "title": title}}


def conversation_moved(conversation: Conversation, project: str | None) -> Event:
    """Into a project, or out of one (`project` None)."""
    return {
        "type": "conversation.updated",
        "conversation": {"id": str(conversation.pk), "title": conversation.display_title, "project": project},
    }


def project_payload(project: Project) -> dict[str, Any]:
    """What a tab's sidebar shows of a project (the API's object has more)."""
    return {"id": str(project.pk), "name": project.name}


def project_created(project: Project) -> Event:
    return {"type": "project.created", "project": project_payload(project)}


def project_updated(project: Project) -> Event:
    return {"type": "project.updated", "project": project_payload(project)}


def project_deleted(project_id: Any) -> Event:
    """Sent after its chats' own events: each moved out (`conversation.updated`)
    or deleted (`conversation.deleted`)."""
    return {"type": "project.deleted", "project": {"id": str(project_id)}}


def conversation_deleted(conversation_id: Any) -> Event:
    # A bare id, as the contract has always had it (created/updated carry an object).
    return {"type": "conversation.deleted", "conversation": str(conversation_id)}


def conversation_summary(conversation_id: str, through: Any, summary: str) -> Event:
    return {
        "type": "conversation.summary",
        "conversation": conversation_id,
        "through": str(through),
        "summary": summary,
    }


def message_created(question: Message, *, replaces: Message | None = None) -> Event:
    event = {
        "type": "message.created",
        "conversation": str(question.conversation_id),
        "message": message_payload(question),
        "client_id": str(question.client_id),
    }
    if replaces is not None:
        event["replaces"] = str(replaces.id)  # an edit: the question it replaced
    return event


# --- An answer's events ------------------------------------------------------------------


def generation_started(
    answer: Message, *, replaces: Message | None = None, continues: Message | None = None
) -> Event:
    event = {
        "type": "generation.started",
        "conversation": str(answer.conversation_id),
        "message": str(answer.id),
        "version_group": str(answer.version_group),
    }
    if replaces is not None:
        event["replaces"] = str(replaces.id)
    if continues is not None:
        event["continues"] = str(continues.id)
    return event


def delta_event(conversation_id: str, answer_id: str, seq: int, text: str) -> Event:
    return {
        "type": "generation.delta",
        "conversation": conversation_id,
        "message": answer_id,
        "seq": seq,
        "text": text,
    }


def snapshot_event(conversation_id: str, answer_id: str, seq: int, content: str) -> Event:
    """All of a streaming answer's text up to `seq` (a socket that joined mid-answer)."""
    return {
        "type": "generation.snapshot",
        "conversation": conversation_id,
        "message": answer_id,
        "seq": seq,
        "content": content,
    }


TOOL_FRAME_CHARS = 2000  # of a tool call's arguments and result in its frame


def tool_event(
    conversation_id: str,
    answer_id: str,
    *,
    call_id: str,
    name: str,
    summary: str,
    ok: bool,
    arguments: str,
    result: str,
) -> Event:
    return {
        "type": "generation.tool",
        "conversation": conversation_id,
        "message": answer_id,
        "call_id": call_id,
        "name": name,
        "summary": summary,
        "ok": ok,
        "arguments": arguments[:TOOL_FRAME_CHARS],
        "result": result[:TOOL_FRAME_CHARS],
    }


def error_event(code: str, message: str, **about: Any) -> Event:
    """An `error`: `message` is for a person; `about` names what it is about
    (`client_id`, `conversation`, `answer`) and `retry_after` (s)."""
    return {"type": "error", "code": code, "message": message, **about}


def answer_error(answer: Message, error: llm.LLMError) -> Event:
    """A failed answer's `error` (its `generation.finished` follows)."""
    return error_event(
        upstream_code(error),
        error.user_message,
        conversation=str(answer.conversation_id),
        answer=str(answer.id),
        retry_after=error.retry_after,
    )


# --- Not shown to anyone: a user's sign-in ended (conversations/signins.py) ---------------

SESSION_ENDED = "session.ended"  # `session`: the digest of the session that ended
SESSION_CHECK = "session.check"  # the user's sockets ask again whether they are signed in


def session_ended(session_digest: str) -> Event:
    return {"type": SESSION_ENDED, "session": session_digest}


def session_check() -> Event:
    return {"type": SESSION_CHECK}
