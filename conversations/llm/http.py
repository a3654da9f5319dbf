"""HTTP to the model endpoint: one aiohttp session (one connection pool) per
event loop and configuration, a POST with the SDK's retry rules, and the
lines of a streamed body.

Why not the openai SDK's own client: measured on this project's load
benchmark, starting a stream through the SDK cost 2.3 to 3 ms of CPU and
reading 100 chunks 5.4 ms, against 0.3 to 0.6 ms and 1.3 ms here; under a
burst of 200 answers, on one core, that was most of the time to the first
token. What the SDK did for us is kept: the same headers, timeouts, retries
(connection errors, 408, 409, 429 and 5xx, before any body; `Retry-After`
up to 60 s, else 0.5 s doubling to 8 s with jitter; `x-should-retry`), and
its errors are turned into this package's by `llm`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
import urllib.parse
import urllib.request
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

MAX_LINE = 16 * 1024 * 1024  # bytes of one SSE line (a chunk): far beyond any real one
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends without "/"
    headers: tuple[tuple[str, str], ...]
    read_timeout: float  # s between bytes
    connect_timeout: float
    retries: int
    proxy: str | None = None  # from HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read once (`proxy_for`)


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY, HTTP_PROXY,
    ALL_PROXY, NO_PROXY), as the openai SDK honours them. Read once per
    endpoint: aiohttp's `trust_env` reads the environment (and ~/.netrc) in
    a thread on every request."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass_environment(parts.hostname):
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get(parts.scheme) or proxies.get("all") or None


class Failure(Exception):
    """The request failed before a response (`status` 0) or with a non-2xx
    status; `body` is the parsed JSON error body when there was one."""

    def __init__(
        self, message: str, *, status: int = 0, headers: Any = None, body: Any = None, timeout: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.timeout = timeout


class StreamBroken(Exception):
    """The body broke off midway (`timeout`: nothing came for read_timeout)."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Endpoint, aiohttp.ClientSession]] = (
    weakref.WeakKeyDictionary()
)


def _session(endpoint: Endpoint) -> aiohttp.ClientSession:
    sessions = _sessions.setdefault(asyncio.get_running_loop(), {})
    session = sessions.get(endpoint)
    if session is None or session.closed:
        session = sessions[endpoint] = aiohttp.ClientSession(
            headers=dict(endpoint.headers),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=endpoint.connect_timeout, sock_read=endpoint.read_timeout
            ),
            connector=aiohttp.TCPConnector(limit=1000, ttl_dns_cache=300),
            json_serialize=_dumps,
        )
    return session


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def close_sessions() -> None:
    """Close this loop's sessions (the end of a command, a test)."""
    for session in _sessions.pop(asyncio.get_running_loop(), {}).values():
        await session.close()


async def post(endpoint: Endpoint, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
    """POST `body` as JSON; the response once its status is 2xx (its body
    unread: the caller reads and releases it), after up to `retries` tries
    again. Raises Failure."""
    url = endpoint.base_url + path
    session = _session(endpoint)
    tries_left = endpoint.retries
    while True:
        try:
            response = await session.post(url, json=body, proxy=endpoint.proxy)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            failure = Failure("The model service timed out.", timeout=True)
            failure.__cause__ = exc
            headers: Any = {}
        except aiohttp.ClientError as exc:
            failure = Failure(f"Could not connect to the model service: {type(exc).__name__}")
            failure.__cause__ = exc
            headers = {}
        else:
            if response.status < 300:
                return response
            try:
                failure = await _status_failure(response)
            finally:
                response.release()
            headers = response.headers
            if not _should_retry(response.status, headers):
                raise failure
        if tries_left <= 0:
            raise failure
        await asyncio.sleep(_retry_delay(endpoint.retries - tries_left, headers))
        tries_left -= 1


async def _status_failure(response: aiohttp.ClientResponse) -> Failure:
    try:
        text = await response.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        text = ""
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = text[:1000] or None
    return Failure(f"HTTP {response.status}", status=response.status, headers=response.headers, body=body)


def _should_retry(status: int, headers: Any) -> bool:
    explicit = headers.get("x-should-retry")
    if explicit in ("true", "false"):
        return explicit == "true"
    return status in (408, 409, 429) or status >= 500


def retry_after(headers: Any) -> float | None:
    """The server's `Retry-After` (or `retry-after-ms`) in seconds, if any."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        moment = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, moment.timestamp() - time.time()) if moment else None


def _retry_delay(retried: int, headers: Any) -> float:
    asked = retry_after(headers)
    if asked is not None and 0 < asked <= MAX_RETRY_AFTER:
        return asked
    return min(INITIAL_RETRY_DELAY * 2**retried, MAX_RETRY_DELAY) * (1 - 0.25 * random.random())


async def lines(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The body's lines, decoded and without their line ends. Raises
    StreamBroken when the body breaks off or stalls. The caller ends the
    response with `done` (which closes its connection when the body was
    not read to its end: an answer stopped midway)."""
    content = response.content
    while True:
        try:
            line = await content.readline(max_line_length=MAX_LINE)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise StreamBroken("The model stopped sending mid-answer.", timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise StreamBroken(f"The stream was cut: {type(exc).__name__}") from exc
        if not line:
            return
        yield line.decode("utf-8", "replace").rstrip("\r\n")


def done(response: aiohttp.ClientResponse) -> None:
    """The connection back to the pool if the body was read to its end, else closed."""
    if response.content.at_eof():
        response.release()
    else:
        response.close()


async def read_json(response: aiohttp.ClientResponse) -> Any:
    """A whole JSON body (a completion that is not streamed)."""
    try:
        return await response.json(content_type=None)
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise Failure("The model service timed out.", timeout=True) from exc
    except aiohttp.ClientError as exc:
        raise Failure(f"The model service's answer broke off: {type(exc).__name__}") from exc
    except ValueError as exc:
        raise Failure("The model service answered with something that is not JSON.") from exc
    finally:
        response.release()
