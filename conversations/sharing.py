"""Shared links: a conversation's owner shares a snapshot of it at a long
random address; whoever CHAT_SHARING lets in reads it, and may carry it on
in a copy of their own. The link shows what was shared until the owner
updates it (the address stays); deleting the link revokes it."""

from __future__ import annotations

import contextlib
import logging
import secrets
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.storage import default_storage
from django.db import transaction

from files.models import File
from files.uploads import storage_left

from . import refusals
from .database import update_each
from .models import Attachment, Conversation, Message, Share
from .selectors import conversation_for_user

if TYPE_CHECKING:
    from django.contrib.auth.models import User

log = logging.getLogger(__name__)

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
    of the viewer's, with the owner's system prompt text. The shared files
    are copied into the viewer's files, as many as their storage holds (the
    model reads them as in the original); a question whose file could not be
    copied names it instead. The bytes are copied before the transaction
    (as an upload's are), and those of a copy not kept are deleted."""
    copies = _copy_files(link, viewer)
    kept: dict[str, File] = {}
    try:
        with transaction.atomic():
            # One copy or upload of the viewer's at a time decides the storage left.
            get_user_model().objects.select_for_update().filter(pk=viewer.pk).exists()
            room = storage_left(viewer)
            for original_id, file in copies.items():
                if file.bytes <= room:
                    room -= file.bytes
                    kept[original_id] = file
            File.objects.bulk_create(kept.values())
            conversation = _conversation_copy(link, viewer, kept)
    except BaseException:
        kept = {}  # nothing was stored: every copied byte goes
        raise
    finally:
        for original_id, file in copies.items():
            if original_id not in kept:
                _delete_blob(file.blob.name or "")
    return conversation


def _conversation_copy(link: Share, viewer: User, files: dict[str, File]) -> Conversation:
    """The new conversation and its messages, the copied files attached."""
    copy = Conversation.objects.create(
        owner=viewer,
        title=f"{link.title} (shared)"[:200],
        prompt_text=link.prompt_text,  # as shared, like its messages
        model=link.model,
    )
    rows = []
    for item in link.messages:
        content = item["content"]
        records = item.get("attachments") or []
        held = [{**r, "id": str(files[str(r["id"])].pk)} for r in records if str(r["id"]) in files]
        names = [r["filename"] for r in records if str(r["id"]) not in files]
        if names:
            content = (content + "\n\n" if content else "") + f"(Shared with files: {', '.join(names)})"
        rows.append(
            Message(
                conversation=copy,
                role=item["role"],
                content=content,
                model=item.get("model") or "",
                status=item.get("status") or Message.Status.COMPLETE,
                attachments=held or None,
            )
        )
    made = Message.objects.bulk_create(rows)
    Attachment.objects.bulk_create(
        Attachment(message=message, file_id=record["id"])
        for message in made
        for record in message.attachments or ()
    )
    # One after another, as they were (bulk_create stamps them all at once).
    update_each(
        Message,
        ["created_at"],
        [(message.pk, copy.created_at + timedelta(microseconds=i)) for i, message in enumerate(made)],
    )
    return copy


def _copy_files(link: Share, viewer: User) -> dict[str, File]:
    """Unsaved copies for the viewer of the shared messages' files, their
    bytes stored, by the original's id: as many as the viewer's storage
    seems to hold now (the transaction decides). One deleted since, or
    whose bytes cannot be read or written, is not copied."""
    wanted = list(
        dict.fromkeys(str(r["id"]) for item in link.messages for r in item.get("attachments") or ())
    )
    if not wanted:
        return {}
    originals = {
        str(f.pk): f for f in File.objects.filter(pk__in=wanted, owner_id=link.conversation.owner_id)
    }
    room = storage_left(viewer)
    copies: dict[str, File] = {}
    for file_id in wanted:
        original = originals.get(file_id)
        if original is None or original.bytes > room:
            continue
        copy = File(
            id=uuid.uuid4(),
            owner=viewer,
            filename=original.filename,
            content_type=original.content_type,
            kind=original.kind,
            bytes=original.bytes,
            text=original.text,
            tokens=original.tokens,
        )
        name = copy.blob.field.generate_filename(copy, original.filename)
        try:
            with original.blob.open("rb") as source:
                copy.blob.name = default_storage.save(name, source)
        except Exception:  # gone, unreadable, or the storage refused it: named instead
            log.warning("shared file %s could not be copied", original.pk, exc_info=True)
            _delete_blob(name)  # what a failed write may have left
            continue
        room -= original.bytes
        copies[file_id] = copy
    return copies


def _delete_blob(name: str) -> None:
    if name:
        with contextlib.suppress(Exception):
            default_storage.delete(name)
