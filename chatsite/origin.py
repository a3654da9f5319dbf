"""The websocket handshake's origin check, the way Django's CSRF check does
it for a form: the browser's `Origin` must be this site as the browser
reached it (scheme, host and port) or one of CSRF_TRUSTED_ORIGINS, and the
host one of ALLOWED_HOSTS.

Channels' AllowedHostsOriginValidator compares the host only, so a page on
`http://localhost:9999` (another program on the user's machine, or any
port of a shared host name) could open a socket with the user's cookie.
A refused handshake is closed before it is accepted (the client sees a
403) and logged on the `security` logger."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain

from accounts import security

DEFAULT_PORTS = {"http": 80, "https": 443}


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or a site address, default ports filled in."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = (parts.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def _secure(scope: dict[str, Any]) -> bool:
    if scope.get("scheme") in ("wss", "https"):
        return True
    proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy_header:
        name, value = proxy_header
        header = name.removeprefix("HTTP_").lower().replace("_", "-").encode()
        forwarded = _header(scope, header)
        return forwarded is not None and forwarded.split(",")[0].strip() == value
    return False


def _allowed_hosts() -> list[str]:
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return hosts


def _trusted(origin: str, parsed: tuple[str, str, int]) -> bool:
    """One of CSRF_TRUSTED_ORIGINS: exactly, or under a `scheme://*.domain` entry."""
    for entry in settings.CSRF_TRUSTED_ORIGINS:
        if "*" in entry:
            scheme, _, netloc = entry.partition("://")
            if scheme.lower() == parsed[0] and is_same_domain(
                urlsplit(origin).netloc.lower(), netloc.removeprefix("*").lower()
            ):
                return True
        elif _origin_of(entry) == parsed:
            return True
    return False


def origin_refusal(scope: dict[str, Any]) -> str | None:
    """Why this handshake's Origin is refused, or None if it is this site's."""
    origin = _header(scope, b"origin")
    if not origin:
        return "no Origin"
    parsed = _origin_of(origin)
    if parsed is None:
        return "an Origin that is no site"
    host = _header(scope, b"host") or ""
    domain, _port = split_domain_port(host)
    if not domain or not validate_host(domain, _allowed_hosts()):
        return "a Host not in ALLOWED_HOSTS"
    own = _origin_of(f"{'https' if _secure(scope) else 'http'}://{host}")
    if parsed == own or _trusted(origin, parsed):
        return None
    return "another site's Origin"


class SameOriginValidator:
    """ASGI middleware in front of the websocket router."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        refusal = origin_refusal(scope)
        if refusal is None:
            return await self.application(scope, receive, send)
        security.event(
            "origin_refused",
            address=security.scope_address(scope),
            origin=(_header(scope, b"origin") or "-")[:200],
            host=(_header(scope, b"host") or "-")[:200],
            why=refusal,
        )
        return await WebsocketDenier()(scope, receive, send)
