"""Reads for pages and exports: what a user may see of their conversations."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any, TypedDict

from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import ValidationError
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Sum

from files.uploads import describe_bytes

from . import refusals
from .attachments import cut_note
from .models import AnswerUsage, ChatModel, Conversation, Message, SystemPrompt, TokenUsage
from .rendering import render_many

PAGE_SIZE = 50
SNIPPET_CHARS = 120


class BadCursor(ValueError):
    pass


def conversation_for_user(
    *, user: User | AnonymousUser, conversation_id: uuid.UUID | str, with_prompt: bool = False
) -> Conversation:
    """This user's conversation, or a `not_found` refusal (it may exist for
    someone else: every interface answers the same, so as never to reveal
    that): the one answer to "may this user see it" for views, sockets, the
    API and commands."""
    conversations = Conversation.objects.filter(owner_id=getattr(user, "pk", None))
    if with_prompt:
        conversations = conversations.select_related("prompt")
    try:
        return conversations.get(pk=conversation_id)
    except (Conversation.DoesNotExist, ValueError, ValidationError):
        raise refusals.not_found() from None


def _encode_cursor(conversation: Conversation) -> str:
    raw = f"{conversation.updated_at.isoformat()}|{conversation.pk}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """What `_encode_cursor` wrote, or BadCursor for anything else (a
    crafted cursor never reaches the query)."""
    try:
        updated_at, pk = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        moment = datetime.fromisoformat(updated_at)
        if moment.tzinfo is None:
            raise ValueError("a cursor's time has its offset")
        return moment, uuid.UUID(pk)
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise BadCursor("Bad cursor.") from exc


def sidebar_page(
    *,
    user: User | int,
    cursor: str | None = None,
    query: str = "",
    size: int = PAGE_SIZE,
    outside_projects: bool = False,
) -> tuple[list[Conversation], str | None]:
    """A page of the user's conversations, newest first (keyset pagination:
    as fast on page 20 as on page 1), optionally only those whose title or
    message text contains `query`; `outside_projects`: only chats in no
    project (the page lists a project's chats under it; a search finds all)."""
    conversations: QuerySet[Conversation] = Conversation.objects.filter(owner=user).only(
        "id", "title", "updated_at", "pinned", "project_id"
    )
    query = query.strip()
    if outside_projects and not query:
        conversations = conversations.filter(project__isnull=True)
    if query:
        matching = Message.objects.filter(conversation=OuterRef("pk"), content__icontains=query)
        conversations = conversations.filter(Q(title__icontains=query) | Exists(matching))
    if cursor:
        updated_at, pk = _decode_cursor(cursor)
        conversations = conversations.filter(
            Q(updated_at__lt=updated_at) | Q(updated_at=updated_at, pk__lt=pk)
        )
    page = list(conversations.order_by("-updated_at", "-pk")[: size + 1])
    more = len(page) > size
    page = page[:size]
    if query:
        _attach_snippets(page, query)
    return page, _encode_cursor(page[-1]) if more else None


def _attach_snippets(conversations: list[Conversation], query: str) -> None:
    for conversation in conversations:
        conversation.snippet = ""
        if query.lower() in conversation.title.lower():
            continue
        text = (
            Message.objects.filter(conversation=conversation, content__icontains=query)
            .values_list("content", flat=True)
            .first()
        ) or ""
        at = text.lower().find(query.lower())
        start = max(0, at - SNIPPET_CHARS // 3)
        excerpt = " ".join(text[start : start + SNIPPET_CHARS].split())
        conversation.snippet = (
            ("…" if start else "") + excerpt + ("…" if start + SNIPPET_CHARS < len(text) else "")
        )


class SidebarItem(TypedDict):
    id: str
    title: str
    updated_at: str
    pinned: bool
    snippet: str
    project: str | None


def sidebar_item(conversation: Conversation) -> SidebarItem:
    return {
        "id": str(conversation.pk),
        "title": conversation.display_title,
        "updated_at": conversation.updated_at.isoformat(),
        "pinned": conversation.pinned,
        "snippet": getattr(conversation, "snippet", ""),
        "project": str(conversation.project_id) if conversation.project_id else None,
    }


def answers_usage(conversation: Conversation) -> dict[uuid.UUID, AnswerUsage]:
    """Each answer's model calls (several with tool rounds), summed, by the
    answer's id; a summary call made for an answer is the conversation's."""
    return {
        row["message_id"]: row
        for row in TokenUsage.objects.filter(
            conversation=conversation, message__isnull=False, kind=TokenUsage.Kind.ANSWER
        )
        .values("message_id")
        .annotate(
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cost=Sum("cost"),
            estimated_calls=Count("pk", filter=Q(estimated=True)),
        )
        .order_by()
    }


def messages_for_page(conversation: Conversation) -> list[Message]:
    """Every message, active and replaced, in order, each with its sanitised
    HTML, its usage row and its place among its versions (`version_index` of
    `version_count`)."""
    messages = list(conversation.messages.order_by("created_at"))
    usage = answers_usage(conversation)
    answers = [m for m in messages if m.role == Message.Role.ASSISTANT]
    for answer, html in zip(answers, render_many([a.content for a in answers]), strict=True):
        answer.html = html
    groups: dict[uuid.UUID, list[Message]] = defaultdict(list)
    for message in messages:
        groups[message.version_group].append(message)
        message.usage = usage.get(message.pk)
        message.files = [
            {
                **record,
                "note": cut_note(record),
                "size": describe_bytes(record["bytes"]),
                "image": record["content_type"].startswith("image/"),
            }
            for record in message.attachments or ()
        ]
        if message.role != Message.Role.ASSISTANT:
            message.html = ""
    for versions in groups.values():
        for index, message in enumerate(versions, start=1):
            message.version_index = index
            message.version_count = len(versions)
    return messages


def export_markdown(conversation: Conversation) -> str:
    lines = [f"# {conversation.display_title}", ""]
    if conversation.prompt_text:
        lines += ["> System prompt: " + conversation.prompt_text.replace("\n", "\n> "), ""]
    for message in conversation.messages.filter(is_active=True).order_by("created_at"):
        who = "You" if message.role == Message.Role.USER else f"Assistant ({message.model or 'model'})"
        note = "" if message.status in ("complete",) else f" _[{message.status}]_"
        lines += [f"**{who}:**{note}", "", message.content, ""]
        if message.attachments:
            named = ", ".join(f"{a['filename']} ({describe_bytes(a['bytes'])})" for a in message.attachments)
            lines += [f"_Files: {named}_", ""]
    return "\n".join(lines).rstrip() + "\n"


def export_json(conversation: Conversation) -> dict[str, Any]:
    usage = answers_usage(conversation)
    messages = []
    for message in conversation.messages.order_by("created_at"):
        row = usage.get(message.pk)
        messages.append(
            {
                "id": str(message.pk),
                "role": message.role,
                "content": message.content,
                "status": message.status,
                "finish_reason": message.finish_reason,
                "model": message.model,
                "created_at": message.created_at.isoformat(),
                "is_active": message.is_active,
                "version_group": str(message.version_group),
                "attachments": message.attachments or [],
                "usage": (
                    {
                        "prompt_tokens": row["prompt_tokens"],
                        "completion_tokens": row["completion_tokens"],
                        "cost": str(row["cost"]),
                        "estimated": bool(row["estimated_calls"]),
                    }
                    if row
                    else None
                ),
            }
        )
    return {
        "id": str(conversation.pk),
        "title": conversation.display_title,
        "created_at": conversation.created_at.isoformat(),
        "system_prompt": conversation.prompt_text,
        "messages": messages,
    }


def default_model() -> str:
    """The model a chat gets when it picks none: the default prompt's, else
    OPENAI_MODEL (llm.resolve_model)."""
    from . import llm

    prompt = SystemPrompt.objects.filter(is_default=True).only("model").first()
    return llm.resolve_model(prompt_model=prompt.model if prompt else "")


def usable_models() -> list[ChatModel]:
    """The models users may use: the default one first, then the ones staff
    enabled in the admin (unsaved rows for models not listed there)."""
    listed = ChatModel.choices()
    default = default_model()
    if any(m.name == default for m in listed):
        return listed
    return [ChatModel(name=default, label="Default"), *listed]
