"""What tests make, in one place: users, logged-in clients, conversations
and messages with the fields a test does not care about filled in."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from conversations.models import Conversation, Message

PASSWORD = "correct-horse-battery-staple"


def make_user(username: str, **extra: Any) -> Any:
    return get_user_model().objects.create_user(username=username, password=PASSWORD, **extra)


def logged_in_client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def session_cookie(user: Any) -> str:
    """The session id a browser or websocket client of `user` would send."""
    return logged_in_client(user).cookies[settings.SESSION_COOKIE_NAME].value


def make_conversation(owner: Any, **fields: Any) -> Conversation:
    return Conversation.objects.create(owner=owner, **fields)


def make_message(conversation: Conversation, role: str = "user", content: str = "", **fields: Any) -> Message:
    return Message.objects.create(conversation=conversation, role=role, content=content, **fields)


def make_turn(conversation: Conversation, question: str, answer: str, **answer_fields: Any) -> Message:
    """A question and its settled answer; returns the answer."""
    make_message(conversation, "user", question)
    return make_message(conversation, "assistant", answer, **answer_fields)
