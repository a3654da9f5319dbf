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
    found = authenticate_all([header])[0]
    if isinstance(found, Refused):
        raise found
    return found


def authenticate_all(headers: list[str | None]) -> list[User | Refused]:
    """`authenticate` of each header (requests that arrive together), with
    one query for the tokens, one for the API switch, one for the groups it
    is off for (if any) and one UPDATE of the tokens whose `last_used_at` is
    more than a minute old, however many there are."""
    results: list[User | Refused | None] = [None] * len(headers)
    digests: dict[int, str] = {}
    for index, header in enumerate(headers):
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            results[index] = Refused(
                "Missing API token: send `Authorization: Bearer <token>` (create one on your account page).",
                status=401,
                code="invalid_api_key",
            )
        else:
            digests[index] = digest(token)
    rows = {
        row.digest: row
        for row in ApiToken.objects.select_related("user").filter(digest__in=set(digests.values()))
    }
    now = timezone.now()
    found: dict[int, ApiToken] = {}
    for index, token_digest in digests.items():
        row = rows.get(token_digest)
        if row is None or not row.user.is_active:
            results[index] = Refused("Invalid API token.", status=401, code="invalid_api_key")
        elif row.revoked_at is not None:
            results[index] = Refused("This API token was revoked.", status=401, code="invalid_api_key")
        elif row.expires_at is not None and row.expires_at <= now:
            results[index] = Refused("This API token has expired.", status=401, code="invalid_api_key")
        else:
            found[index] = row
    if found:
        barred = _barred([row.user for row in found.values()])
        for index, row in found.items():
            if row.user_id in barred:
                results[index] = Refused(
                    "The API is turned off for your account.", status=403, code="api_disabled"
                )
            else:
                results[index] = row.user
        stale = {
            row.pk
            for index, row in found.items()
            if results[index] is row.user
            and (row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY)
        }
        if stale:
            ApiToken.objects.filter(pk__in=stale).update(last_used_at=now)
    return results  # type: ignore[return-value]


def allowed(user: User) -> bool:
    return user.pk not in _barred([user])


def _barred(users: list[User]) -> set[int]:
    """Those of `users` the API is off for: all when staff turned it off,
    else the members of the groups it is off for."""
    access = ApiAccess.current()
    if not access.enabled:
        return {user.pk for user in users}
    if access.pk is None:
        return set()
    from django.contrib.auth.models import User

    members = User.groups.through.objects.filter(
        group__in=access.disabled_groups.all(), user__in=[user.pk for user in users]
    )
    return set(members.values_list("user_id", flat=True))
