"""Writes on conversations that are not an answer's: rename, delete, move
into a project or out, and deleting a project. Each tells the user's open
tabs (in every worker) through the hub."""

from __future__ import annotations

import functools
from typing import Any

from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.db import transaction

from . import attachments, generation, inputs, projects
from .generation import events
from .models import Conversation, Message, Project

MAX_TITLE_CHARS = 200


class InvalidTitle(ValueError):
    pass


def _tell_user(user_id: int, event: events.Event) -> None:
    async_to_sync(generation.tell)(generation.user_topic(user_id), event)


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    title = " ".join(title.split())
    if not title:
        raise InvalidTitle("The title is empty.")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidTitle(f"The title is longer than {MAX_TITLE_CHARS} characters.")
    problem = inputs.text_problem(title)
    if problem:
        raise InvalidTitle(f"The title {problem}.")
    conversation.title = title
    conversation.save(update_fields=["title"])
    updated = events.conversation_updated(conversation.pk, title)
    transaction.on_commit(lambda: _tell_user(conversation.owner_id, updated))
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete a conversation, its messages and their files; its usage rows
    stay in the ledger. A streaming answer is stopped first."""
    conversation_id, owner_id = conversation.pk, conversation.owner_id
    if Message.objects.filter(conversation=conversation, status=Message.Status.STREAMING).exists():
        async_to_sync(generation.request_stop)(conversation_id)
    with transaction.atomic():
        # Lock the messages first: an answer finishing at this moment (in
        # another thread or worker) either saves its ledger row before the
        # delete collects it, or sees its message gone and keeps the row alone.
        list(Message.objects.select_for_update().filter(conversation=conversation).values_list("pk"))
        files = attachments.held_by(Message.objects.filter(conversation=conversation))
        conversation.delete()
        attachments.delete_unattached(files)  # its files, unless another chat holds one too
    transaction.on_commit(lambda: _tell_user(owner_id, events.conversation_deleted(conversation_id)))


def conversation_move(user: User, conversation: Conversation, project_id: Any | None) -> Conversation:
    """Put the user's conversation in one of their projects, or out (None)."""
    project = projects.own(user, project_id) if project_id else None
    conversation.project = project
    conversation.save(update_fields=["project"])
    moved = events.conversation_moved(conversation, str(project.pk) if project else None)
    transaction.on_commit(lambda: _tell_user(conversation.owner_id, moved))
    return conversation


def project_delete(project: Project, *, with_chats: bool) -> int:
    """Delete a project; its chats go with it (`with_chats`) or stay, out of
    any project. Its files stay the user's. How many chats went."""
    gone = 0
    with transaction.atomic():
        # Locked: a send starting a chat in it meanwhile waits, then finds it gone.
        locked = Project.objects.select_for_update().filter(pk=project.pk).first()
        if locked is None:
            return 0
        if with_chats:
            for conversation in Conversation.objects.filter(project=locked):
                conversation_delete(conversation=conversation)
                gone += 1
        else:
            moved = list(Conversation.objects.filter(project=locked).only("id", "title", "owner_id"))
            Conversation.objects.filter(project=locked).update(project=None)
            for conversation in moved:
                out = events.conversation_moved(conversation, None)
                transaction.on_commit(functools.partial(_tell_user, conversation.owner_id, out))
        project_id, owner_id = locked.pk, locked.owner_id
        locked.delete()
        # After its chats' own events: a tab has moved them out before it drops the project.
        transaction.on_commit(functools.partial(_tell_user, owner_id, events.project_deleted(project_id)))
    return gone


def project_create(user: User, **fields: Any) -> Project:
    """`projects.create`, and the user's tabs list it."""
    project = projects.create(user, **fields)
    created = events.project_created(project)
    transaction.on_commit(lambda: _tell_user(project.owner_id, created))
    return project


def project_update(project: Project, **fields: Any) -> Project:
    """`projects.update`; the user's tabs show a new name."""
    before = project.name
    changed = projects.update(project, **fields)
    if changed.name != before:
        updated = events.project_updated(changed)
        transaction.on_commit(lambda: _tell_user(changed.owner_id, updated))
    return changed
