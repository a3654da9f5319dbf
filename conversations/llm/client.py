"""The openai SDK's client, the only way to the model: `AsyncOpenAI` on the
SDK's aiohttp backend (`DefaultAioHttpClient`), one per event loop and
configuration (its connection pool belongs to the loop that opened it).

The SDK does what a client of the model must: the headers (the key,
OPENAI_ORG_ID, OPENAI_PROJECT_ID), the proxy variables, the timeouts, and
the retries of a request that failed before any body (connection errors,
408, 409, 429 and 5xx; `Retry-After` up to 60 s, else a backoff;
`x-should-retry`). Once a token has streamed, nothing is retried.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import httpx2
import openai
from django.conf import settings

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Streams open at once per worker: a burst is hundreds of answers.
LIMITS = httpx2.Limits(max_connections=2000, max_keepalive_connections=500)

Config = tuple[str, str, float, float, int]

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Config, openai.AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)


def _config() -> Config:
    return (
        settings.OPENAI_API_KEY,
        settings.OPENAI_BASE_URL,
        settings.OPENAI_TIMEOUT,
        settings.OPENAI_CONNECT_TIMEOUT,
        settings.OPENAI_MAX_RETRIES,
    )


class _Transport(openai.DefaultAioHttpClient):
    """The SDK's aiohttp client, with the URL of each request parsed once.

    Every request of the SDK is built from a URL string: parsing it and
    merging it with the base URL cost about a fifth of an answer's start
    (measured: 1,000 streams, 200 at a time). The parsed URL is kept; an
    `httpx2.URL` is immutable, so the request built is the same."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._urls: dict[str, httpx2.URL] = {}

    def build_request(self, method: str, url: httpx2.URL | str, **kwargs: Any) -> httpx2.Request:
        if isinstance(url, str):
            parsed = self._urls.get(url)
            if parsed is None:
                if len(self._urls) >= _KEPT_URLS:
                    self._urls.clear()
                parsed = self._urls[url] = self._merge_url(url)
            url = parsed
        return super().build_request(method, url, **kwargs)


class _OpenAI(openai.AsyncOpenAI):
    """`AsyncOpenAI`, with the URL of each path merged once (as above)."""

    def _prepare_url(self, url: str) -> httpx2.URL:
        key = (str(self.base_url), url)
        kept: dict[tuple[str, str], httpx2.URL] = self.__dict__.setdefault("_kept_urls", {})
        found = kept.get(key)
        if found is None:
            if len(kept) >= _KEPT_URLS:
                kept.clear()
            found = kept[key] = super()._prepare_url(url)
        return found


_KEPT_URLS = 64  # paths per client: a handful are used


def client() -> openai.AsyncOpenAI:
    """This event loop's client for the configured endpoint."""
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    config = _config()
    found = clients.get(config)
    if found is None:
        api_key, base_url, read_timeout, connect_timeout, retries = config
        timeout = httpx2.Timeout(read_timeout, connect=connect_timeout)
        found = clients[config] = _OpenAI(
            # Local servers (Ollama, vLLM, llama.cpp) need no key, but some want the header.
            api_key=api_key or "not-needed",
            base_url=(base_url or DEFAULT_BASE_URL).rstrip("/"),
            timeout=timeout,
            max_retries=retries,
            http_client=_Transport(timeout=timeout, limits=LIMITS),
        )
    return found


async def close() -> None:
    """Close this event loop's clients (a command's end, a test's)."""
    for found in _clients.pop(asyncio.get_running_loop(), {}).values():
        await found.close()
