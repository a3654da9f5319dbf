"""A socket lives no longer than the sign-in it was opened with.

The session cookie is checked once, at the handshake; a socket then stays
open for hours. So a socket asks again (`still_signed_in`, many sockets in
one database call) before it acts, when its last answer is older than
CHAT_SESSION_RECHECK seconds; and it is told at once (on the user's topic,
in every worker) when one of its user's sign-ins ends:

- a logout ends that session: `session.ended` names it (by a digest, never
  the key), and the sockets opened with it close with 4401;
- a deactivation, a new password or a deletion changes the account:
  `session.check` makes each of the user's sockets ask again now.

A check is what Django's `get_user` does for a request: the session exists
and has not expired, names this user and an enabled backend, its hash
matches the user's password (or a fallback key's), and the user may log in
(`is_active`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from importlib import import_module
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.db import transaction
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from .generation import events

log = logging.getLogger(__name__)


def session_digest(session_key: str) -> str:
    return hashlib.sha256(session_key.encode()).hexdigest()[:32]


def still_signed_in(sign_ins: Sequence[tuple[str | None, Any]]) -> list[bool]:
    """For each (session key, user id): is that sign-in still good? Two
    queries for all of them (sessions in the database)."""
    keys = {key for key, _ in sign_ins if key}
    sessions = _session_data(keys)
    users = get_user_model()._default_manager.in_bulk({user_id for _, user_id in sign_ins})
    return [_good(sessions.get(key or ""), users.get(user_id)) for key, user_id in sign_ins]


def _session_data(keys: set[str]) -> dict[str, dict[str, Any]]:
    store = import_module(settings.SESSION_ENGINE).SessionStore
    if not keys:
        return {}
    if settings.SESSION_ENGINE == "django.contrib.sessions.backends.db":
        from django.contrib.sessions.models import Session

        rows = Session.objects.filter(session_key__in=keys, expire_date__gt=timezone.now())
        return {key: store().decode(data) for key, data in rows.values_list("session_key", "session_data")}
    return {key: store(key).load() for key in keys}


def _good(session: dict[str, Any] | None, user: Any) -> bool:
    if not session or user is None:
        return False
    if session.get(SESSION_KEY) != user._meta.pk.value_to_string(user):
        return False
    backend_path = session.get(BACKEND_SESSION_KEY)
    if backend_path not in settings.AUTHENTICATION_BACKENDS:
        return False
    can = getattr(load_backend(backend_path), "user_can_authenticate", None)
    if can is not None and not can(user):
        return False
    if not hasattr(user, "get_session_auth_hash"):
        return True
    session_hash = session.get(HASH_SESSION_KEY)
    if not session_hash:
        return False
    if constant_time_compare(session_hash, user.get_session_auth_hash()):
        return True
    return any(constant_time_compare(session_hash, h) for h in user.get_session_auth_fallback_hash())


# --- Telling the sockets -------------------------------------------------------------------


def _tell(user_id: Any, event: dict[str, Any]) -> None:
    from . import generation

    try:
        async_to_sync(generation.tell)(generation.user_topic(user_id), event)
    except Exception as exc:  # the sockets ask again within CHAT_SESSION_RECHECK all the same
        log.warning("sockets of user %s not told of %s: %s", user_id, event["type"], exc)


def on_logged_out(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and key:
        _tell(user.pk, events.session_ended(session_digest(key)))


def on_user_saved(
    sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any
) -> None:
    """A saved account may no longer sign in (deactivated, new password):
    its sockets ask again once the change is committed. A login's save of
    `last_login` changes nothing."""
    if created or (update_fields is not None and not {"is_active", "password"} & set(update_fields)):
        return
    accounts_changed([instance.pk])


def on_user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    accounts_changed([instance.pk])


def accounts_changed(user_ids: Sequence[Any], **kwargs: Any) -> None:
    """The sockets of these users ask again whether they are signed in (after
    the change commits, so that they see it)."""
    ids = list(user_ids)

    def tell() -> None:
        for user_id in ids:
            _tell(user_id, events.session_check())

    transaction.on_commit(tell)
