"""Streaming one chat completion: the request through the SDK
(`with_streaming_response`: the raw server-sent lines, no object per chunk),
the lines read here, the fallback models, and a server that refuses tools."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import httpx2
import openai
from django.conf import settings

from . import demo
from .client import client
from .errors import (
    IncompleteStream,
    LLMError,
    UpstreamBadRequest,
    from_broken_stream,
    from_sdk,
    from_stream_event,
)
from .types import ChatMessage, StreamEnd, StreamEvent, TextDelta, ToolCall, Usage

log = logging.getLogger("conversations.llm")

# Models whose server refused `tools` once: asked without tools since.
no_tools: set[tuple[str, str]] = set()


def is_demo() -> bool:
    """True when no model endpoint is configured: the offline demo answers."""
    return not (settings.OPENAI_API_KEY or settings.OPENAI_BASE_URL)


async def stream_chat(
    messages: Sequence[ChatMessage],
    *,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    fallbacks: Sequence[str] | None = None,
    response_format: dict[str, Any] | None = None,
) -> AsyncGenerator[StreamEvent, None]:
    """Stream one chat completion: `TextDelta`s, then exactly one `StreamEnd`,
    or an LLMError. Closing the iterator closes the HTTP stream.
    `tools`: the Chat Completions `tools` parameter; a model that calls them
    ends with `StreamEnd.tool_calls`. `fallbacks`: the models to try when this
    one fails before its first token (None: OPENAI_FALLBACK_MODELS).
    `response_format`: passed on as it is (the HTTP API's clients). Without
    a configured endpoint the demo model answers, whatever `model` says."""
    if is_demo():
        async for event in demo.stream(messages):
            yield event
        return

    backups: Sequence[str] = settings.OPENAI_FALLBACK_MODELS if fallbacks is None else fallbacks
    first: str = model or settings.OPENAI_MODEL
    rest = list(backups)
    models = [first, *(m for m in dict.fromkeys(rest) if m != first)]
    attempt = 0
    while True:
        current = models[attempt]
        key = (settings.OPENAI_BASE_URL, current)
        offer = tools if tools and key not in no_tools else None
        started = False
        try:
            response = await _request(
                messages,
                current,
                temperature=temperature,
                max_tokens=max_tokens,
                tools=offer,
                response_format=response_format,
            )
            try:
                # Read here, not through a generator of each layer: every
                # chunk passes each one (a stream is a hundred chunks or more).
                async with contextlib.aclosing(_read_sse(response, current)) as events:
                    async for event in events:
                        started = True
                        yield event
            except LLMError:
                raise
            except Exception as exc:  # the body broke off (httpx's errors, over aiohttp's)
                raise from_broken_stream(exc) from None
            finally:
                # A stop closes the upstream's stream here (the connection is
                # not reused when its body was not read to the end).
                with contextlib.suppress(Exception):
                    await response.aclose()
            return
        except LLMError as exc:
            refused_tools = type(exc) is UpstreamBadRequest and "tool" in str(exc).lower()
            if not started and offer and refused_tools and not exc.fallback:
                # A server without function calling refuses `tools`: ask
                # again without them, and remember (a refusal costs nothing).
                log.warning("%s refused a request with tools (%s); no tools from now on", current, exc)
                no_tools.add(key)
                continue
            # Before its first token a failing model hands over to the next
            # one of OPENAI_FALLBACK_MODELS; once text was shown, never.
            if started or not exc.fallback or attempt == len(models) - 1:
                raise
            attempt += 1
            log.warning(
                "model %s failed before its first token (%s); trying %s", current, exc, models[attempt]
            )


async def _request(
    messages: Sequence[ChatMessage],
    model: str,
    *,
    temperature: float | None,
    max_tokens: int | None,
    tools: Sequence[dict[str, Any]] | None,
    response_format: dict[str, Any] | None = None,
) -> httpx2.Response:
    """The request of one streamed completion, answered: its body unread."""
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens or settings.OPENAI_MAX_TOKENS,
        "temperature": settings.OPENAI_TEMPERATURE if temperature is None else temperature,
    }
    if tools:
        body["tools"] = list(tools)
    if response_format:
        body["response_format"] = response_format
    try:
        # The SDK's request (its headers, timeouts, retries, errors), its
        # answer as the raw HTTP response: `chat.completions.create` would
        # walk every message to validate it and wrap the stream, 3.5 to 4 ms
        # of CPU more per answer (measured: 400 streams of 100 chunks).
        return await client().post("/chat/completions", body=body, cast_to=httpx2.Response, stream=True)
    except openai.APIError as exc:
        raise from_sdk(exc, model) from None  # its message quotes the body: never passed on


async def _read_sse(response: httpx2.Response, model: str) -> AsyncGenerator[StreamEvent, None]:
    """Server-sent events of a Chat Completions stream: `data: {chunk}` lines
    up to `data: [DONE]` (comments and other fields are skipped). The lines
    are split here, straight from the transport's byte stream (httpx's own
    line, text and byte layers cost a third of reading a stream), unless the
    server compressed it."""
    encoding = response.headers.get("content-encoding", "identity").lower()
    chunks: AsyncIterator[bytes] = (
        response.aiter_bytes() if encoding not in ("", "identity") else response.stream.__aiter__()  # type: ignore[union-attr]  # an AsyncByteStream
    )
    finish_reason: str | None = None
    usage: Usage | None = None
    served_model = model
    calls: dict[int, dict[str, str]] = {}  # tool calls by index, as their deltas arrive
    rest = b""
    ended = done = False
    try:
        while not (done or ended):
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                if not rest:
                    break
                chunk, ended = b"\n", True  # the last line had no newline
            lines = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
            rest = lines.pop()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    parsed = json.loads(data)
                except ValueError as exc:
                    raise IncompleteStream("The stream sent a chunk that is not JSON.") from exc
                if not isinstance(parsed, dict):
                    continue
                if parsed.get("error"):
                    raise from_stream_event(parsed["error"])
                served_model = parsed.get("model") or served_model
                if parsed.get("usage"):
                    usage = usage_of(parsed["usage"])
                for choice in parsed.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text:
                        yield TextDelta(text)
                    for piece in delta.get("tool_calls") or ():
                        _add_tool_call_piece(calls, piece)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
    finally:
        closing = getattr(chunks, "aclose", None)
        if closing is not None:
            with contextlib.suppress(Exception):
                await closing()
    if finish_reason is None:
        raise IncompleteStream("The stream ended without a finish_reason.")
    tool_calls = tuple(
        ToolCall(id=call["id"] or f"call_{index}", name=call["name"], arguments=call["arguments"])
        for index, call in sorted(calls.items())
    )
    yield StreamEnd(finish_reason=finish_reason, usage=usage, model=served_model, tool_calls=tool_calls)


def _add_tool_call_piece(calls: dict[int, dict[str, str]], piece: Any) -> None:
    """One streamed delta of a tool call: its id and name come first, its
    arguments in pieces; `index` says which call (several may interleave)."""
    if not isinstance(piece, dict):
        return
    index = piece.get("index")
    call = calls.setdefault(
        index if isinstance(index, int) else len(calls), {"id": "", "name": "", "arguments": ""}
    )
    if isinstance(piece.get("id"), str) and not call["id"]:
        call["id"] = piece["id"]
    function = piece.get("function")
    if not isinstance(function, dict):
        function = {}
    if isinstance(function.get("name"), str):
        call["name"] += function["name"]
    if isinstance(function.get("arguments"), str):
        call["arguments"] += function["arguments"]


def usage_of(raw: dict[str, Any]) -> Usage:
    """From a chunk's or a completion's `usage`."""
    details = raw.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=raw.get("prompt_tokens") or 0,
        completion_tokens=raw.get("completion_tokens") or 0,
        cached_tokens=(details.get("cached_tokens") if isinstance(details, dict) else 0) or 0,
    )
