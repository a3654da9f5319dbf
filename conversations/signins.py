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

The check itself is accounts/sessions.py's; a send asks it in the same
database call that accepts it (generation/turns.py).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.db import transaction
from django.http import HttpRequest

from accounts.sessions import session_digest

from . import generation
from .generation import events

log = logging.getLogger(__name__)


# --- Telling the sockets -------------------------------------------------------------------


def _tell(user_id: int, event: events.Event) -> None:
    try:
        async_to_sync(generation.tell)(generation.user_topic(user_id), event)
    except Exception as exc:  # the sockets ask again within CHAT_SESSION_RECHECK all the same
        log.warning("sockets of user %s not told of %s: %s", user_id, event["type"], exc)


def on_logged_out(sender: Any, request: HttpRequest, user: User | None, **kwargs: Any) -> None:
    key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and key:
        _tell(user.pk, events.session_ended(session_digest(key)))


def on_user_saved(
    sender: Any, instance: User, created: bool, update_fields: Collection[str] | None = None, **kwargs: Any
) -> None:
    """A saved account may no longer sign in (deactivated, new password):
    its sockets ask again once the change is committed. A login's save of
    `last_login` changes nothing."""
    if created or (update_fields is not None and not {"is_active", "password"} & set(update_fields)):
        return
    accounts_changed([instance.pk])


def on_user_deleted(sender: Any, instance: User, **kwargs: Any) -> None:
    accounts_changed([instance.pk])


def accounts_changed(user_ids: Sequence[int], **kwargs: Any) -> None:
    """The sockets of these users ask again whether they are signed in (after
    the change commits, so that they see it)."""
    ids = list(user_ids)

    def tell() -> None:
        for user_id in ids:
            _tell(user_id, events.session_check())

    transaction.on_commit(tell)
