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


def client() -> openai.AsyncOpenAI:
    """This event loop's client for the configured endpoint."""
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    config = _config()
    found = clients.get(config)
    if found is None:
        api_key, base_url, read_timeout, connect_timeout, retries = config
        timeout = httpx2.Timeout(read_timeout, connect=connect_timeout)
        found = clients[config] = openai.AsyncOpenAI(
            # Local servers (Ollama, vLLM, llama.cpp) need no key, but some want the header.
            api_key=api_key or "not-needed",
            base_url=(base_url or DEFAULT_BASE_URL).rstrip("/"),
            timeout=timeout,
            max_retries=retries,
            http_client=openai.DefaultAioHttpClient(timeout=timeout, limits=LIMITS),
        )
    return found


async def close() -> None:
    """Close this event loop's clients (a command's end, a test's)."""
    for found in _clients.pop(asyncio.get_running_loop(), {}).values():
        await found.close()
