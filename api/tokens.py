"""Creating, checking and revoking personal API tokens."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta
from typing import TYPE_CHECKING

from django.utils import timezone

from .models import ApiAccess, ApiToken

if TYPE_CHECKING:
    from django.contrib.auth.models import User

PREFIX = "chat_"
LAST_USED_EVERY = timedelta(minutes=1)  # at most one write per token and minute
_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class Refused(Exception):
    """A bad, expired or revoked token (401), or the API is off for this user (403)."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w`."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"Not a duration: {text!r} (say e.g. 30d, 12h, 2w).")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def create(user: User, name: str, *, expires_in: timedelta | None = None) -> tuple[ApiToken, str]:
    """A new token for `user`: the row, and the token itself (shown once, never stored)."""
    token = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken.objects.create(
        user=user,
        name=name.strip()[:100] or "API token",
        prefix=token[: len(PREFIX) + 6],
        digest=digest(token),
        expires_at=timezone.now() + expires_in if expires_in else None,
    )
    return row, token


def revoke(user: User, token_id: int) -> bool:
    return bool(
        ApiToken.objects.filter(pk=token_id, user=user, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
    )


def authenticate(header: str | None) -> User:
    """The user of an `Authorization: Bearer <token>` header, or Refused."""
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Refused(
            "Missing API token: send `Authorization: Bearer <token>` (create one on your account page).",
            status=401,
            code="invalid_api_key",
        )
    row = ApiToken.objects.select_related("user").filter(digest=digest(token)).first()
    now = timezone.now()
    if row is None or not row.user.is_active:
        raise Refused("Invalid API token.", status=401, code="invalid_api_key")
    if row.revoked_at is not None:
        raise Refused("This API token was revoked.", status=401, code="invalid_api_key")
    if row.expires_at is not None and row.expires_at <= now:
        raise Refused("This API token has expired.", status=401, code="invalid_api_key")
    if not allowed(row.user):
        raise Refused("The API is turned off for your account.", status=403, code="api_disabled")
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
    return row.user


def allowed(user: User) -> bool:
    access = ApiAccess.current()
    if not access.enabled:
        return False
    if access.pk is None:
        return True
    return not access.disabled_groups.filter(pk__in=user.groups.values("pk")).exists()
