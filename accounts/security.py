"""Keeping strangers out: the client's address, the throttles on logging in,
signing up and password-reset mails, the sign-up policy, and the `security`
log (one line per event, with the user and the address, never a secret).

Throttles are django-ratelimit counters in Django's cache: local memory on
the embedded default, Redis (shared by every worker) with REDIS_URL. Their
windows are fixed (django-ratelimit's): "10/m" refuses from the eleventh
counted event until the minute's window ends.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import unicodedata
from typing import TYPE_CHECKING, Any, TypedDict

from django.conf import settings
from django_ratelimit.core import get_usage

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser
    from django.contrib.auth.models import AnonymousUser
    from django.http import HttpRequest

log = logging.getLogger("security")

LOGIN_GROUP = "accounts.login"
SIGNUP_GROUP = "accounts.signup"
RESET_GROUP = "accounts.password_reset"
SIGNUP_POLICIES = ("open", "approval", "closed")


def _valid_ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def client_address(meta_remote: str | None, forwarded_for: str | None) -> str:
    """The client's address: the socket's, or behind CHAT_TRUSTED_PROXIES
    proxies the entry of X-Forwarded-For that the first of them added.
    Each proxy appends the address it got the request from, so only the last
    N entries are written by proxies of ours; anything left of them is
    whatever the client sent, and never trusted."""
    remote = meta_remote or "unknown"
    hops = settings.CHAT_TRUSTED_PROXIES
    if hops <= 0 or not forwarded_for:
        return remote
    entries = [e for e in forwarded_for.split(",") if e.strip()]
    if not entries:
        return remote
    picked = entries[-hops] if len(entries) >= hops else entries[0]
    return _valid_ip(picked) or remote


def request_address(request: HttpRequest) -> str:
    meta = request.META
    return client_address(meta.get("REMOTE_ADDR"), meta.get("HTTP_X_FORWARDED_FOR"))


def scope_address(scope: dict[str, Any]) -> str:
    """The client's address of a websocket (an ASGI scope)."""
    client = scope.get("client") or (None, None)
    forwarded = None
    for name, value in scope.get("headers") or []:
        if name == b"x-forwarded-for":
            forwarded = value.decode("latin-1")
    return client_address(client[0], forwarded)


def _field(value: object) -> str:
    """A value as one token of a log line: what a client typed (a username,
    an Origin) in quotes and escaped if it holds spaces, `=`, quotes or
    control characters, so that it can never fake a field or a line."""
    text = str(value)
    if text and text.isprintable() and not any(c.isspace() or c in '="' for c in text):
        return text
    return json.dumps(text)


def event(
    name: str,
    *,
    user: AbstractBaseUser | AnonymousUser | str | None = None,
    address: str | None = None,
    **fields: object,
) -> None:
    """One line on the `security` log: `login_failed user=alice address=…`."""
    who = getattr(user, "username", None) if user is not None and not isinstance(user, str) else user
    parts = [name, f"user={_field(who or '-')}", f"address={_field(address or '-')}"]
    parts += [f"{key}={_field(value)}" for key, value in fields.items()]
    log.warning(" ".join(parts))


# --- Throttles ---------------------------------------------------------------------


class Usage(TypedDict):
    """What django-ratelimit's `get_usage` says of one counter."""

    count: int
    limit: int
    should_limit: bool
    time_left: int


def _usage(request: HttpRequest, group: str, key: str, rate: str, *, increment: bool) -> Usage | None:
    try:
        usage: Usage | None = get_usage(
            request, group=group, key=lambda _g, _r: key, rate=rate, increment=increment
        )
        return usage
    except Exception as exc:  # the shared cache is away: let people in, say so
        log.warning("throttle_unavailable group=%s error=%s", group, exc)
        return None


def describe_wait(seconds: int) -> str:
    """'45 s', '12 min', '1 h 5 min': how long until a throttle lets go."""
    if seconds < 60:
        return f"{seconds} s"
    minutes = -(-seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


def _wait(usage: Usage | None) -> int | None:
    if usage and usage["count"] >= usage["limit"]:
        return max(1, int(usage["time_left"]))
    return None


def username_key(username: str) -> str:
    """The one spelling of a username that its throttle counts under.
    Django's login NFKC-normalises what was typed (fullwidth or
    mathematical-bold letters log in as their plain `bob`), so the throttle
    does too, then folds the case; it is the same for a name that exists
    and one that does not, so it tells nothing."""
    folded = unicodedata.normalize("NFKC", username.strip()).casefold()
    return unicodedata.normalize("NFKC", folded)[:150]


def _login_keys(request: HttpRequest, username: str) -> list[str]:
    return [f"addr:{request_address(request)}", f"user:{username_key(username)}"]


def login_wait(request: HttpRequest, username: str) -> int | None:
    """Seconds until a login may be tried again, or None: too many failures
    from this address, or for this username, in the window."""
    waits = [
        _wait(_usage(request, LOGIN_GROUP, key, settings.CHAT_LOGIN_RATE, increment=False))
        for key in _login_keys(request, username)
    ]
    known = [w for w in waits if w]
    return max(known) if known else None


def count_login_failure(request: HttpRequest, username: str) -> None:
    for key in _login_keys(request, username):
        _usage(request, LOGIN_GROUP, key, settings.CHAT_LOGIN_RATE, increment=True)


def address_wait(request: HttpRequest, group: str, rate: str) -> int | None:
    """Seconds until this address may do `group` again (sign up, ask for a reset)."""
    return _wait(_usage(request, group, f"addr:{request_address(request)}", rate, increment=False))


def count_address(request: HttpRequest, group: str, rate: str) -> None:
    _usage(request, group, f"addr:{request_address(request)}", rate, increment=True)


# --- Sign-up policy ----------------------------------------------------------------


def signup_policy() -> str:
    policy = settings.CHAT_SIGNUP.strip().lower()
    return policy if policy in SIGNUP_POLICIES else "approval"
