"""The model boundary: the ONLY module that imports the openai SDK.

`stream_chat` yields `TextDelta`s and then exactly one `StreamEnd`, or raises
one of this module's `LLMError`s. Everything the SDK or its HTTP client can
raise is mapped here, so the rest of the project never sees an SDK type.

Without an API key and without a base URL the offline demo model answers:
a clearly labelled canned reply, streamed like a real one, no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
from django.conf import settings

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


# One client (one connection pool) per event loop and configuration: a server
# process has one loop, so one client; each test has a loop of its own.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], openai.AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)


def _get_client() -> openai.AsyncOpenAI:
    config = (
        settings.OPENAI_API_KEY,
        settings.OPENAI_BASE_URL,
        settings.OPENAI_TIMEOUT,
        settings.OPENAI_CONNECT_TIMEOUT,
        settings.OPENAI_MAX_RETRIES,
    )
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    if config not in clients:
        api_key, base_url, read_timeout, connect_timeout, retries = config
        clients[config] = openai.AsyncOpenAI(
            # Local servers (Ollama, vLLM, llama.cpp) need no key but the SDK wants one.
            api_key=api_key or "not-needed",
            base_url=base_url or None,
            timeout=openai.Timeout(read_timeout, connect=connect_timeout),
            # The SDK retries only a failed request, before any body arrives:
            # once a token has streamed, nothing is retried.
            max_retries=retries,
        )
    return clients[config]


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
    extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
    if response_format:
        extra["response_format"] = response_format
    async with contextlib.AsyncExitStack() as stack:
        try:
            # The raw response, parsed here: the SDK's pydantic object per
            # chunk was a fifth of the server's CPU under load.
            response = await stack.enter_async_context(
                _get_client().chat.completions.with_streaming_response.create(
                    model=model,
                    messages=list(messages),
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=max_tokens or settings.OPENAI_MAX_TOKENS,
                    temperature=settings.OPENAI_TEMPERATURE if temperature is None else temperature,
                    **extra,
                )
            )
        except openai.OpenAIError as exc:
            raise _map_error(exc, model) from exc
        reading = _read_sse(response.iter_lines(), model)
        try:
            async for event in reading:
                yield event
        except (openai.APITimeoutError, httpx2.TimeoutException) as exc:
            raise UpstreamUnavailable("The model stopped sending mid-answer.") from exc
        except (openai.APIConnectionError, httpx2.HTTPError) as exc:
            # The body broke off midway: a connection reset, a truncated chunk.
            raise IncompleteStream(f"The stream was cut: {type(exc).__name__}") from exc
        finally:
            await reading.aclose()


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
    message = _redact(error.get("message", "") if isinstance(error, dict) else str(error))
    log.warning("model stream sent an error: %s", message)
    if "context" in message.lower() and "length" in message.lower():
        return ContextTooLong()
    return LLMError(message, user_message=f"The model service reported an error: {message}")


_SECRET = re.compile(r"\b(sk|key|api[_-]?key)[-_A-Za-z0-9*.]{6,}", re.IGNORECASE)


def _redact(text: str, limit: int = 300) -> str:
    """One line of an upstream's message, safe for a page and a log: no key
    (servers quote the bad one back, partly masked), bounded."""
    line = " ".join(str(text).split())
    line = _SECRET.sub("[key]", line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _reason(exc: openai.OpenAIError) -> str:
    """The upstream's own words for a rejected request, if it gave any."""
    body = getattr(exc, "body", None)  # the SDK keeps the `error` object
    if isinstance(body, dict):
        inner = body["error"] if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return _redact(inner["message"])
    return ""


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
    extra: dict[str, Any] = {}
    if json_object and key not in _no_json_output:
        extra["response_format"] = {"type": "json_object"}
    try:
        try:
            response = await _get_client().chat.completions.create(
                model=model, messages=list(messages), max_tokens=max_tokens, temperature=0.2, **extra
            )
        except openai.BadRequestError:
            if not extra:
                raise
            log.info("%s refused JSON output; asking in plain text from now on", model)
            _no_json_output.add(key)
            response = await _get_client().chat.completions.create(
                model=model, messages=list(messages), max_tokens=max_tokens, temperature=0.2
            )
    except openai.OpenAIError as exc:
        raise _map_error(exc, model) from exc
    choice = response.choices[0] if response.choices else None
    text = (choice.message.content if choice and choice.message else None) or ""
    usage = _usage(response.usage) if response.usage is not None else None
    return Completion(text.strip(), usage, getattr(response, "model", None) or model)


def _usage(raw: Any) -> Usage:
    """From the SDK's object or a raw chunk's dict."""
    if isinstance(raw, dict):
        details = raw.get("prompt_tokens_details") or {}
        return Usage(
            prompt_tokens=raw.get("prompt_tokens") or 0,
            completion_tokens=raw.get("completion_tokens") or 0,
            cached_tokens=(details.get("cached_tokens") if isinstance(details, dict) else 0) or 0,
        )
    details = getattr(raw, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(
        prompt_tokens=raw.prompt_tokens or 0,
        completion_tokens=raw.completion_tokens or 0,
        cached_tokens=cached,
    )


def _map_error(exc: openai.OpenAIError, model: str = "") -> LLMError:
    """The error to show for a failed call; the upstream's reason goes to
    the log for staff and, where the person can act on it, to the page."""
    status = getattr(exc, "status_code", None)
    reason = _reason(exc)
    log.warning(
        "model call failed: %s%s%s",
        type(exc).__name__,
        f" (HTTP {status})" if status else "",
        f": {reason}" if reason else "",
    )
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamUnavailable("The model service timed out.")
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamUnavailable("Could not connect to the model service.")
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return UpstreamAuthError()
    if isinstance(exc, openai.RateLimitError):
        return UpstreamRateLimited(retry_after=_retry_after(exc))
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        if _is_context_error(exc):
            return ContextTooLong()
        if reason:
            rejected = f"The model service rejected the request: {reason}"
            return UpstreamBadRequest(reason, user_message=rejected)
        return UpstreamBadRequest()
    if isinstance(exc, openai.NotFoundError):
        known = f"the model “{model}”" if model else "this model"
        unknown = f"The model service does not know {known}. An administrator must pick another model."
        error = UpstreamBadRequest(reason or "model not found", user_message=unknown)
        error.fallback = True
        return error
    if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
        return UpstreamUnavailable(
            f"The model service failed (HTTP {exc.status_code}).", retry_after=_retry_after(exc)
        )
    return LLMError()


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _is_context_error(exc: openai.APIStatusError) -> bool:
    code = getattr(exc, "code", None) or ""
    text = f"{code} {exc.message}".lower()
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
