"""The model boundary: the ONLY package that talks to the model.

`stream_chat` yields `TextDelta`s and then exactly one `StreamEnd`, or raises
one of this package's `LLMError`s. Everything the endpoint or the HTTP client
can fail with is mapped here, so the rest of the project never sees an HTTP
type. The requests are the Chat Completions API's, sent by `http` (aiohttp):
through the openai SDK's client, starting a stream cost 2.3 to 3 ms of CPU
and reading 100 chunks 5.4 ms (here 0.3 to 0.6 and 1.3 ms), about a third
of a worker's CPU per answer under load.

Without an API key and without a base URL the offline demo model answers:
a clearly labelled canned reply, streamed like a real one, no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from . import http
from .redaction import redact

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"

# {"role": ..., "content": ...}; an assistant message that called tools has
# "tool_calls" (and content None), a tool result "tool_call_id".
ChatMessage = dict[str, Any]


# --- What the rest of the project sees ---------------------------------------


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class StreamEnd:
    finish_reason: str
    usage: Usage | None
    model: str
    # The model asks for tools instead of (or after) text: finish_reason
    # "tool_calls". Assembled from the streamed deltas; arguments untrusted.
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text exactly as the model streamed it


class LLMError(Exception):
    """A model call went wrong. `code` is the websocket error code to show."""

    code = "upstream_error"
    user_message = "The model service returned an error."
    fallback = False  # another model may do better (OPENAI_FALLBACK_MODELS)

    def __init__(
        self, detail: str = "", *, retry_after: float | None = None, user_message: str | None = None
    ) -> None:
        super().__init__(detail or user_message or self.user_message)
        self.retry_after = retry_after
        if user_message:
            self.user_message = user_message  # this error's own words, e.g. with the upstream's reason


class UpstreamAuthError(LLMError):
    user_message = "The model service refused our credentials. An administrator must fix the API key."


class UpstreamRateLimited(LLMError):
    code = "upstream_unavailable"
    fallback = True
    user_message = "The model service is rate limiting us. Try again shortly."


class UpstreamUnavailable(LLMError):
    code = "upstream_unavailable"
    fallback = True
    user_message = "The model service is unreachable or too slow right now. Try again shortly."


class UpstreamBadRequest(LLMError):
    user_message = "The model service rejected the request."


class ContextTooLong(UpstreamBadRequest):
    user_message = "This conversation is too long for the model. Start a new chat."


class IncompleteStream(LLMError):
    user_message = "The model's answer was cut off before it finished."


# --- Configuration ------------------------------------------------------------


def is_demo() -> bool:
    """True when no model endpoint is configured: the offline demo answers."""
    return not (settings.OPENAI_API_KEY or settings.OPENAI_BASE_URL)


def default_model() -> str:
    return DEMO_MODEL if is_demo() else settings.OPENAI_MODEL


DEFAULT_BASE_URL = "https://api.openai.com/v1"


_endpoints: dict[tuple[Any, ...], http.Endpoint] = {}


def _endpoint() -> http.Endpoint:
    """Where the model is and how to reach it, from the settings (and, as the
    openai SDK does, OPENAI_ORG_ID, OPENAI_PROJECT_ID and the proxy
    variables, read once)."""
    config = (
        settings.OPENAI_API_KEY,
        settings.OPENAI_BASE_URL,
        settings.OPENAI_TIMEOUT,
        settings.OPENAI_CONNECT_TIMEOUT,
        settings.OPENAI_MAX_RETRIES,
    )
    found = _endpoints.get(config)
    if found is None:
        found = _endpoints[config] = _make_endpoint(*config)
    return found


def _make_endpoint(
    api_key: str, base_url: str, read_timeout: float, connect_timeout: float, retries: int
) -> http.Endpoint:
    headers = {
        # Local servers (Ollama, vLLM, llama.cpp) need no key, but some want the header.
        "Authorization": f"Bearer {api_key or 'not-needed'}",
        "Accept": "application/json",
        "User-Agent": f"django-chat (Python {platform.python_version()})",
    }
    for header, variable in (
        ("OpenAI-Organization", "OPENAI_ORG_ID"),
        ("OpenAI-Project", "OPENAI_PROJECT_ID"),
    ):
        if os.environ.get(variable):
            headers[header] = os.environ[variable]
    url = (base_url or DEFAULT_BASE_URL).rstrip("/")
    return http.Endpoint(
        base_url=url,
        headers=tuple(headers.items()),
        read_timeout=read_timeout,
        connect_timeout=connect_timeout,
        # Only a failed request is tried again, before any body arrives:
        # once a token has streamed, nothing is retried.
        retries=retries,
        proxy=http.proxy_for(url),
    )


async def close() -> None:
    """Close this event loop's connections to the model (a command's end)."""
    await http.close_sessions()


# --- Streaming ------------------------------------------------------------------


async def stream_chat(
    messages: Sequence[ChatMessage],
    *,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    fallbacks: Sequence[str] | None = None,
    response_format: dict[str, Any] | None = None,
) -> AsyncIterator[TextDelta | StreamEnd]:
    """Stream one chat completion. Closing the iterator closes the HTTP stream.
    `tools`: the Chat Completions `tools` parameter; a model that calls them
    ends with `StreamEnd.tool_calls`. `fallbacks`: the models to try when this
    one fails before its first token (None: OPENAI_FALLBACK_MODELS).
    `response_format`: passed on as it is (the HTTP API's clients)."""
    if is_demo():
        async for event in _demo_stream(messages):
            yield event
        return

    backups = settings.OPENAI_FALLBACK_MODELS if fallbacks is None else fallbacks
    first, *rest = [model or settings.OPENAI_MODEL, *backups]
    models = [first, *(m for m in dict.fromkeys(rest) if m != first)]
    attempt = 0
    while True:
        current = models[attempt]
        key = (settings.OPENAI_BASE_URL, current)
        offer = tools if tools and key not in _no_tools else None
        started = False
        try:
            async with contextlib.aclosing(
                _stream_one(
                    messages,
                    current,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    tools=offer,
                    response_format=response_format,
                )
            ) as events:  # closed at once when the caller stops: the HTTP stream ends
                async for event in events:
                    started = True
                    yield event
            return
        except LLMError as exc:
            refused_tools = type(exc) is UpstreamBadRequest and "tool" in str(exc).lower()
            if not started and offer and refused_tools and not exc.fallback:
                # A server without function calling refuses `tools`: ask
                # again without them, and remember (a refusal costs nothing).
                log.warning("%s refused a request with tools (%s); no tools from now on", current, exc)
                _no_tools.add(key)
                continue
            # Before its first token a failing model hands over to the next
            # one of OPENAI_FALLBACK_MODELS; once text was shown, never.
            if started or not exc.fallback or attempt == len(models) - 1:
                raise
            attempt += 1
            log.warning(
                "model %s failed before its first token (%s); trying %s", current, exc, models[attempt]
            )


async def _stream_one(
    messages: Sequence[ChatMessage],
    model: str,
    *,
    temperature: float | None,
    max_tokens: int | None,
    tools: Sequence[dict[str, Any]] | None,
    response_format: dict[str, Any] | None = None,
) -> AsyncIterator[TextDelta | StreamEnd]:
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
        response = await http.post(_endpoint(), "/chat/completions", body)
    except http.Failure as exc:
        raise _map_failure(exc, model) from exc
    lines = http.lines(response)
    reading = _read_sse(lines, model)
    try:
        async for event in reading:
            yield event
    except http.StreamBroken as exc:
        if exc.timeout:
            raise UpstreamUnavailable("The model stopped sending mid-answer.") from exc
        # The body broke off midway: a connection reset, a truncated chunk.
        raise IncompleteStream(str(exc)) from exc
    finally:
        await reading.aclose()
        await lines.aclose()
        http.done(response)  # a stop closes the upstream's stream here


async def _read_sse(lines: AsyncIterator[str], model: str) -> AsyncIterator[TextDelta | StreamEnd]:
    """Server-sent events of a Chat Completions stream: `data: {chunk}` lines
    up to `data: [DONE]` (comments and other fields are skipped)."""
    finish_reason: str | None = None
    usage: Usage | None = None
    served_model = model
    calls: dict[int, dict[str, str]] = {}  # tool calls by index, as their deltas arrive
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise IncompleteStream("The stream sent a chunk that is not JSON.") from exc
        if not isinstance(chunk, dict):
            continue
        if chunk.get("error"):
            raise _stream_error(chunk["error"])
        served_model = chunk.get("model") or served_model
        if chunk.get("usage"):
            usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                yield TextDelta(text)
            for piece in delta.get("tool_calls") or ():
                _add_tool_call_piece(calls, piece)
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
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
    index = index if isinstance(index, int) else len(calls)
    call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
    if isinstance(piece.get("id"), str) and not call["id"]:
        call["id"] = piece["id"]
    function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
    if isinstance(function.get("name"), str):
        call["name"] += function["name"]
    if isinstance(function.get("arguments"), str):
        call["arguments"] += function["arguments"]


def _stream_error(error: Any) -> LLMError:
    """An error event inside an otherwise good stream."""
    message = redact(error.get("message", "") if isinstance(error, dict) else str(error))
    log.warning("model stream sent an error: %s", message)
    if "context" in message.lower() and "length" in message.lower():
        return ContextTooLong()
    return LLMError(message, user_message=f"The model service reported an error: {message}")


def _error_object(failure: http.Failure) -> dict[str, Any]:
    """The JSON error a server sent (`{"error": {...}}`, or the object itself)."""
    body = failure.body
    if isinstance(body, dict):
        return body["error"] if isinstance(body.get("error"), dict) else body
    return {"message": body} if isinstance(body, str) else {}


def _reason(failure: http.Failure) -> str:
    """The upstream's own words for a rejected request, if it gave any."""
    message = _error_object(failure).get("message")
    return redact(message) if message else ""


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage | None
    model: str


# Models whose server refused `response_format` once: asked in plain text since.
_no_json_output: set[tuple[str, str]] = set()
# Models whose server refused `tools` once: asked without tools since.
_no_tools: set[tuple[str, str]] = set()


async def complete_chat(
    messages: Sequence[ChatMessage],
    *,
    model: str | None = None,
    max_tokens: int = 64,
    json_object: bool = False,
    demo_text: str | None = None,
) -> Completion:
    """One short, non-streamed completion (titles, summaries). `json_object`:
    ask for JSON output (`response_format`) where the server supports it; a
    server that refuses it (HTTP 400) is asked again in plain text, and
    remembered. A refused request costs nothing. `demo_text`: what the demo
    model answers (default: a title made of the question's first words)."""
    if is_demo():
        question = next((m["content"] for m in messages if m["role"] == "user"), "")
        text = demo_text if demo_text is not None else demo_title(question)
        if json_object:
            text = json.dumps({"title": text}, ensure_ascii=False)
        prompt_tokens = sum(estimate_tokens(m.get("content") or "") + 4 for m in messages)
        return Completion(text, Usage(prompt_tokens, estimate_tokens(text)), DEMO_MODEL)
    model = model or settings.OPENAI_MODEL
    key = (settings.OPENAI_BASE_URL, model)
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": 0.2,
    }
    asked_json = json_object and key not in _no_json_output
    try:
        try:
            response = await http.post(
                _endpoint(),
                "/chat/completions",
                {**body, "response_format": {"type": "json_object"}} if asked_json else body,
            )
        except http.Failure as exc:
            if not asked_json or exc.status != 400:
                raise
            log.info("%s refused JSON output; asking in plain text from now on", model)
            _no_json_output.add(key)
            response = await http.post(_endpoint(), "/chat/completions", body)
        reply = await http.read_json(response)
    except http.Failure as exc:
        raise _map_failure(exc, model) from exc
    if not isinstance(reply, dict):
        raise LLMError("The model service answered with something that is not a completion.")
    choices = reply.get("choices") or []
    message = (choices[0].get("message") if choices and isinstance(choices[0], dict) else None) or {}
    text = message.get("content") if isinstance(message, dict) else None
    usage = _usage(reply["usage"]) if isinstance(reply.get("usage"), dict) else None
    return Completion((text if isinstance(text, str) else "").strip(), usage, reply.get("model") or model)


def _usage(raw: dict[str, Any]) -> Usage:
    """From a chunk's or a completion's `usage`."""
    details = raw.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=raw.get("prompt_tokens") or 0,
        completion_tokens=raw.get("completion_tokens") or 0,
        cached_tokens=(details.get("cached_tokens") if isinstance(details, dict) else 0) or 0,
    )


def _map_failure(failure: http.Failure, model: str = "") -> LLMError:
    """The error to show for a failed call; the upstream's reason goes to
    the log for staff and, where the person can act on it, to the page."""
    status = failure.status
    reason = _reason(failure)
    log.warning(
        "model call failed: %s%s%s",
        redact(str(failure)) if not status else "",
        f"HTTP {status}" if status else "",
        f": {reason}" if reason else "",
    )
    if not status:
        if failure.timeout:
            return UpstreamUnavailable("The model service timed out.")
        return UpstreamUnavailable("Could not connect to the model service.")
    if status in (401, 403):
        return UpstreamAuthError()
    if status == 429:
        return UpstreamRateLimited(retry_after=http.retry_after(failure.headers))
    if status in (400, 422):
        if _is_context_error(failure):
            return ContextTooLong()
        if reason:
            rejected = f"The model service rejected the request: {reason}"
            return UpstreamBadRequest(reason, user_message=rejected)
        return UpstreamBadRequest()
    if status == 404:
        known = f"the model “{model}”" if model else "this model"
        unknown = f"The model service does not know {known}. An administrator must pick another model."
        error = UpstreamBadRequest(reason or "model not found", user_message=unknown)
        error.fallback = True
        return error
    if status >= 500:
        return UpstreamUnavailable(
            f"The model service failed (HTTP {status}).", retry_after=http.retry_after(failure.headers)
        )
    return LLMError()


def _is_context_error(failure: http.Failure) -> bool:
    error = _error_object(failure)
    text = f"{error.get('code') or ''} {error.get('message') or ''}".lower()
    return "context_length" in text or "context length" in text or "maximum context" in text


# --- The offline demo model -----------------------------------------------------

DEMO_DELAY = 0.02  # seconds between demo tokens: enough to watch it stream


def demo_answer(question: str) -> str:
    excerpt = " ".join(question.split())[:200]
    return (
        "**Demo mode.** No model is configured, so this is a canned answer from the "
        "offline demo model, not an AI.\n\n"
        f"You wrote: _{excerpt}_\n\n"
        "To chat with a real model, set `OPENAI_API_KEY` (and `OPENAI_MODEL`), or "
        "`OPENAI_BASE_URL` for any OpenAI-compatible server such as Ollama or vLLM, "
        "then restart the server. For example:\n\n"
        "```sh\nOPENAI_BASE_URL=http://127.0.0.1:11434/v1 OPENAI_MODEL=llama3.2 make run\n```\n"
    )


def demo_title(question: str) -> str:
    """The demo model's title: the question's first words, as a person would."""
    words = question.split()
    title = " ".join(words[:6]).strip(" .,:;!?")
    return (title[:1].upper() + title[1:] + ("…" if len(words) > 6 else "")) or "New chat"


def estimate_tokens(text: str) -> int:
    """A download-free token estimate: about four characters a token in English."""
    return (len(text) + 3) // 4


async def _demo_stream(messages: Sequence[ChatMessage]) -> AsyncIterator[TextDelta | StreamEnd]:
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    answer = demo_answer(question)
    words = answer.split(" ")
    for i, word in enumerate(words):
        await asyncio.sleep(DEMO_DELAY)
        yield TextDelta(word if i == len(words) - 1 else word + " ")
    prompt_tokens = sum(estimate_tokens(m.get("content") or "") + 4 for m in messages)
    yield StreamEnd(
        finish_reason="stop",
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=estimate_tokens(answer)),
        model=DEMO_MODEL,
    )
