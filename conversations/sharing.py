"""Shared links: a conversation's owner shares a snapshot of it at a long
random address; whoever CHAT_SHARING lets in reads it, and may carry it on
in a copy of their own. The link shows what was shared until the owner
updates it (the address stays); deleting the link revokes it."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction

from files.models import File

from . import refusals
from .models import Conversation, Message, Share
from .selectors import conversation_for_user

if TYPE_CHECKING:
    from django.contrib.auth.models import User

MODES = ("off", "members", "public")


class SharingOff(Exception):
    """CHAT_SHARING is `off`."""


class SignInNeeded(Exception):
    """Under `members`, a stranger must sign in first."""


def mode() -> str:
    value = settings.CHAT_SHARING.strip().lower()
    return value if value in MODES else "members"


def _snapshot(conversation: Conversation) -> list[dict[str, Any]]:
    rows = (
        Message.objects.filter(conversation=conversation, is_active=True)
        .exclude(status=Message.Status.STREAMING)
        .order_by("created_at")
    )
    return [
        {
            "id": str(m.pk),
            "role": m.role,
            "content": m.content,
            "model": m.model,
            "status": m.status,
            "created_at": m.created_at.isoformat(),
            "attachments": m.attachments or [],
        }
        for m in rows
    ]


def share(*, user: User, conversation_id: Any, show_owner: bool | None = None) -> tuple[Share, bool]:
    """Share the user's conversation as it is now, or update its link's
    snapshot (the token stays); (the link, whether it is new)."""
    if mode() == "off":
        raise SharingOff
    with transaction.atomic():
        conversation = conversation_for_user(user=user, conversation_id=conversation_id)
        # The conversation's row is the lock: two first shares at once make one link.
        Conversation.objects.select_for_update().filter(pk=conversation.pk).exists()
        found = Share.objects.filter(conversation=conversation).first()
        made = found is None
        link = found or Share(conversation=conversation, token=secrets.token_urlsafe(32))
        link.title = conversation.display_title
        link.messages = _snapshot(conversation)
        link.prompt_text = conversation.prompt_text
        link.model = conversation.model
        if show_owner is not None:
            link.show_owner = show_owner
        link.save()
    return link, made


def revoke(*, user: User, conversation_id: Any) -> None:
    """Revoke the link of the user's conversation (`not_found` when there is none)."""
    conversation = conversation_for_user(user=user, conversation_id=conversation_id)
    if not Share.objects.filter(conversation=conversation).delete()[0]:
        raise refusals.not_found("shared link")


def links_of(user: User) -> list[Share]:
    return list(Share.objects.filter(conversation__owner=user).select_related("conversation"))


def opened(token: str, viewer: Any) -> Share:
    """The link `viewer` (a user, or an anonymous one) may open. Raises
    `refusals.Refusal` (not_found: unknown, revoked, or sharing off) or
    SignInNeeded (`members`, a stranger)."""
    current = mode()
    link = Share.objects.filter(token=token).select_related("conversation__owner").first() if token else None
    if link is None or current == "off" or not link.conversation.owner.is_active:
        raise refusals.not_found("shared link")
    if current == "members" and not viewer.is_authenticated:
        raise SignInNeeded
    return link


def owner_name(link: Share) -> str:
    """The owner's name on the page, only if they chose to show it."""
    if not link.show_owner:
        return ""
    owner = link.conversation.owner
    return owner.get_full_name() or owner.get_username()


def shared_file(link: Share, file_id: Any) -> File:
    """A file of a shared message, through its link only."""
    held = {str(record["id"]) for message in link.messages for record in message.get("attachments") or ()}
    found = (
        File.objects.filter(pk=file_id, owner_id=link.conversation.owner_id).first()
        if str(file_id) in held
        else None
    )
    if found is None:
        raise refusals.not_found("file")
    return found


def copy_for(link: Share, viewer: User) -> Conversation:
    """'Continue in your own chat': the shared messages as a new conversation
    of the viewer's, with the owner's system prompt text. The files stay the
    owner's: a copied question names them, and the model is told so."""
    with transaction.atomic():
        copy = Conversation.objects.create(
            owner=viewer,
            title=f"{link.title} (shared)"[:200],
            prompt_text=link.prompt_text,  # as shared, like its messages
            model=link.model,
        )
        rows = []
        for item in link.messages:
            content = item["content"]
            names = [record["filename"] for record in item.get("attachments") or ()]
            if names:
                content = (content + "\n\n" if content else "") + f"(Shared with files: {', '.join(names)})"
            rows.append(
                Message(
                    conversation=copy,
                    role=item["role"],
                    content=content,
                    model=item.get("model") or "",
                    status=item.get("status") or Message.Status.COMPLETE,
                )
            )
        made = Message.objects.bulk_create(rows)
        # One after another, as they were (bulk_create stamps them all at once).
        for index, message in enumerate(made):
            Message.objects.filter(pk=message.pk).update(
                created_at=copy.created_at + timedelta(microseconds=index)
            )
    return copy
