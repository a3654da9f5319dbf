"""Is a sign-in still good? What Django's `get_user` asks for a request,
asked of many sessions at once (a burst of sockets' sends): the session
exists and has not expired, names this user and an enabled backend, its
hash matches the user's password (or a fallback key's), and the user may
log in (`is_active`). Two queries for any number (sessions in the database).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import (
    BACKEND_SESSION_KEY,
    HASH_SESSION_KEY,
    SESSION_KEY,
    get_user_model,
    load_backend,
)
from django.contrib.auth.models import User
from django.utils import timezone
from django.utils.crypto import constant_time_compare


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


def _good(session: dict[str, Any] | None, user: User | None) -> bool:
    if not session or user is None:
        return False
    if session.get(SESSION_KEY) != user._meta.pk.value_to_string(user):
        return False
    backend_path = session.get(BACKEND_SESSION_KEY)
    if not isinstance(backend_path, str) or backend_path not in settings.AUTHENTICATION_BACKENDS:
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
