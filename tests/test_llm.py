"""conversations.llm against the scripted fake OpenAI server, through the real SDK."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import Any, cast

import httpx2
import pytest

from conversations import llm
from conversations.generation.events import upstream_code
from conversations.llm import (
    ContextTooLong,
    IncompleteStream,
    LLMError,
    StreamEnd,
    TextDelta,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
    Usage,
    stream_chat,
)
from tests.conftest import free_port
from tests.fake_llm import FakeLLM, Reply

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
API_KEY = "sk-test-fake-key"


async def collect(messages: Any = QUESTION, **kwargs: Any) -> list[TextDelta | StreamEnd]:
    return [event async for event in stream_chat(messages, **kwargs)]


async def collect_until_error(
    messages: Any = QUESTION, **kwargs: Any
) -> tuple[list[TextDelta | StreamEnd], LLMError]:
    events: list[TextDelta | StreamEnd] = []
    with pytest.raises(LLMError) as info:
        async for event in stream_chat(messages, **kwargs):
            events.append(event)
    return events, info.value


def texts(events: list[TextDelta | StreamEnd]) -> list[str]:
    return [e.text for e in events if isinstance(e, TextDelta)]


# --- A good stream ---------------------------------------------------------------


async def test_stream_yields_deltas_in_order_then_one_stream_end(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply(chunks=["Hel", "lo", " there"], usage=(12, 3), cached_tokens=4, model="served-x"))

    events = await collect()

    assert events[:-1] == [TextDelta("Hel"), TextDelta("lo"), TextDelta(" there")]
    assert events[-1] == StreamEnd(
        finish_reason="stop",
        usage=Usage(prompt_tokens=12, completion_tokens=3, cached_tokens=4),
        model="served-x",
    )


async def test_request_asks_for_a_stream_with_usage_and_sends_the_key(
    fake_llm: FakeLLM, settings: Any
) -> None:
    settings.OPENAI_MAX_TOKENS = 321
    settings.OPENAI_TEMPERATURE = 0.3

    await collect()

    assert len(fake_llm.requests) == 1
    request = fake_llm.requests[0]
    assert request.path.endswith("/chat/completions")
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert request.body["max_tokens"] == 321
    assert request.body["temperature"] == 0.3
    assert request.body["model"] == "fake-model"
    assert request.body["messages"] == QUESTION
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["authorization"] == f"Bearer {API_KEY}"


async def test_explicit_model_temperature_and_max_tokens_override_settings(fake_llm: FakeLLM) -> None:
    await collect(model="other-model", temperature=0.0, max_tokens=17)

    body = fake_llm.requests[0].body
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("other-model", 0.0, 17)


async def test_finish_reason_length_comes_through(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply(chunks=["a", "b"], finish_reason="length"))

    events = await collect()

    assert texts(events) == ["a", "b"]
    assert isinstance(events[-1], StreamEnd)
    assert events[-1].finish_reason == "length"


async def test_stream_without_usage_chunk_ends_with_no_usage(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply(chunks=["x"], usage=None))

    events = await collect()

    assert events[-1] == StreamEnd(finish_reason="stop", usage=None, model="fake-model")


# --- HTTP errors --------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_refusal_maps_to_upstream_auth_error(fake_llm: FakeLLM, status: int) -> None:
    fake_llm.script(Reply.error_reply(status, "Incorrect API key provided"))

    events, error = await collect_until_error()

    assert events == []
    assert type(error) is UpstreamAuthError
    assert upstream_code(error) == "upstream_error"


async def test_rate_limit_maps_to_upstream_rate_limited_with_retry_after(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.error_reply(429, "Slow down", headers={"Retry-After": "7"}))

    _, error = await collect_until_error()

    assert type(error) is UpstreamRateLimited
    assert error.retry_after == 7.0
    assert upstream_code(error) == "upstream_unavailable"


async def test_server_error_maps_to_upstream_unavailable(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.error_reply(500, "boom"))

    _, error = await collect_until_error()

    assert type(error) is UpstreamUnavailable
    assert upstream_code(error) == "upstream_unavailable"


async def test_context_length_error_maps_to_context_too_long(fake_llm: FakeLLM) -> None:
    fake_llm.script(
        Reply.error_reply(
            400, "This model's maximum context length is 8192 tokens", code="context_length_exceeded"
        )
    )

    _, error = await collect_until_error()

    assert type(error) is ContextTooLong
    assert isinstance(error, UpstreamBadRequest)
    assert upstream_code(error) == "upstream_error"


async def test_other_bad_request_maps_to_upstream_bad_request(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.error_reply(400, "Invalid value for temperature", code="invalid_value"))

    _, error = await collect_until_error()

    assert type(error) is UpstreamBadRequest
    assert upstream_code(error) == "upstream_error"


# --- Broken streams -------------------------------------------------------------------


async def test_cut_stream_yields_the_first_deltas_then_incomplete_stream(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply(chunks=["one", "two", "three", "four"], cut_after=2))

    events, error = await collect_until_error()

    assert events == [TextDelta("one"), TextDelta("two")]
    assert type(error) is IncompleteStream


async def test_stream_ending_without_finish_reason_is_incomplete(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply(chunks=["one", "two"], finish_reason=None))

    events, error = await collect_until_error()

    assert texts(events) == ["one", "two"]
    assert not any(isinstance(e, StreamEnd) for e in events)
    assert type(error) is IncompleteStream


async def test_stalled_stream_times_out_as_upstream_unavailable(fake_llm: FakeLLM, settings: Any) -> None:
    settings.OPENAI_TIMEOUT = 0.5
    fake_llm.script(Reply(chunks=["one", "two", "three"], hang_after=1))

    started = time.monotonic()
    events, error = await collect_until_error()

    assert time.monotonic() - started < 4
    assert events == [TextDelta("one")]
    assert type(error) is UpstreamUnavailable


async def test_connection_refused_maps_to_upstream_unavailable(fake_llm: FakeLLM, settings: Any) -> None:
    settings.OPENAI_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"

    started = time.monotonic()
    _, error = await collect_until_error()

    assert time.monotonic() - started < 4
    assert type(error) is UpstreamUnavailable
    assert fake_llm.requests == []


# --- Retries -------------------------------------------------------------------------


async def test_a_failed_request_is_retried_before_the_first_token(fake_llm: FakeLLM, settings: Any) -> None:
    settings.OPENAI_MAX_RETRIES = 1
    fake_llm.script(
        Reply.error_reply(500, "transient", headers={"retry-after-ms": "10"}),
        Reply(chunks=["good", " answer"]),
    )

    events = await collect()

    assert texts(events) == ["good", " answer"]
    assert isinstance(events[-1], StreamEnd)
    assert len(fake_llm.requests) == 2


async def test_a_stream_cut_after_tokens_is_not_retried(fake_llm: FakeLLM, settings: Any) -> None:
    settings.OPENAI_MAX_RETRIES = 1
    fake_llm.script(Reply(chunks=["one", "two", "three"], cut_after=1), Reply(chunks=["again"]))

    events, error = await collect_until_error()

    assert events == [TextDelta("one")]
    assert type(error) is IncompleteStream
    assert len(fake_llm.requests) == 1


async def test_stream_chat_works_on_a_new_event_loop_after_an_earlier_loop_closed(fake_llm: FakeLLM) -> None:
    # The cached client's pooled keep-alive connection belongs to the loop that
    # opened it; a later loop (another test, asyncio.run in a command) must still work.
    first = await asyncio.to_thread(asyncio.run, collect())
    assert isinstance(first[-1], StreamEnd)

    events = await collect()

    assert isinstance(events[-1], StreamEnd)
    assert len(fake_llm.requests) == 2


# --- Secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Reply.error_reply(401, f"Incorrect API key provided: {API_KEY}"),
        Reply.error_reply(429, f"Rate limit for key {API_KEY}", headers={"Retry-After": "1"}),
        Reply.error_reply(500, f"internal error for {API_KEY}"),
        Reply.error_reply(400, f"bad request from {API_KEY}"),
        Reply(chunks=["a", "b"], cut_after=1),
    ],
    ids=["401", "429", "500", "400", "cut"],
)
async def test_api_key_never_appears_in_exception_messages(fake_llm: FakeLLM, reply: Reply) -> None:
    fake_llm.script(reply)

    _, error = await collect_until_error()

    assert API_KEY not in str(error)
    assert API_KEY not in repr(error)
    assert API_KEY not in error.user_message


# --- The offline demo model ---------------------------------------------------------------


def test_demo_mode_is_on_without_key_and_base_url(demo_mode: None) -> None:
    assert llm.is_demo() is True
    assert llm.resolve_model() == "demo"


def test_demo_mode_is_off_with_the_fake_server(fake_llm: FakeLLM) -> None:
    assert llm.is_demo() is False
    assert llm.resolve_model() == "fake-model"


async def test_demo_stream_labels_itself_and_echoes_the_question(
    demo_mode: None, fake_llm_server: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm.demo, "DEMO_DELAY", 0)
    fake_llm_server.reset()
    question = [{"role": "user", "content": "What is the capital of Peru?"}]

    events = await collect(question)

    text = "".join(texts(events))
    assert len(texts(events)) > 1  # streamed, not one blob
    assert "Demo mode" in text
    assert "What is the capital of Peru?" in text
    end = events[-1]
    assert isinstance(end, StreamEnd)
    assert end.model == "demo"
    assert end.finish_reason == "stop"
    assert end.usage is not None
    assert end.usage.prompt_tokens > 0
    assert end.usage.completion_tokens > 0
    assert fake_llm_server.requests == []


# --- What the person and staff are told ------------------------------------------------------


async def test_a_rejected_request_says_the_upstreams_reason_and_logs_it(
    fake_llm: FakeLLM, caplog: Any
) -> None:
    fake_llm.script(
        Reply.error_reply(400, "Invalid value for 'temperature': must be <= 2.", code="invalid_value")
    )

    with caplog.at_level("WARNING", logger="conversations.llm"):
        _, error = await collect_until_error()

    assert error.user_message == (
        "The model service rejected the request: Invalid value for 'temperature': must be <= 2."
    )
    assert "model call failed: HTTP 400: Invalid value for 'temperature'" in caplog.text


async def test_an_unknown_model_is_named(fake_llm: FakeLLM) -> None:
    fake_llm.script(Reply.error_reply(404, "The model `gpt-9` does not exist", code="model_not_found"))

    events = llm.stream_chat([{"role": "user", "content": "hi"}], model="gpt-9")
    with pytest.raises(UpstreamBadRequest) as raised:
        async for _event in events:
            pass

    assert "“gpt-9”" in raised.value.user_message


async def test_a_key_quoted_back_by_the_upstream_reaches_neither_page_nor_log(
    fake_llm: FakeLLM, caplog: Any
) -> None:
    fake_llm.script(Reply.error_reply(400, f"Key {API_KEY} may not use this model"))

    with caplog.at_level("WARNING", logger="conversations.llm"):
        _, error = await collect_until_error()

    assert API_KEY not in error.user_message and API_KEY not in caplog.text
    assert "may not use this model" in error.user_message


# --- Fallback models ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "down",
    [
        Reply.error_reply(503, "overloaded"),
        Reply.error_reply(404, "The model `fake-model` does not exist", code="model_not_found"),
        Reply.error_reply(429, "Slow down", headers={"Retry-After": "0"}),
    ],
    ids=["503", "unknown-model", "rate-limited"],
)
async def test_a_model_failing_before_its_first_token_hands_over_to_the_fallback(
    fake_llm: FakeLLM, settings: Any, down: Reply
) -> None:
    settings.OPENAI_FALLBACK_MODELS = ["backup-model", "third-model"]
    fake_llm.failing_models["fake-model"] = down
    fake_llm.script(Reply(chunks=["From", " backup."], model="backup-model"))

    events = await collect()

    assert "".join(texts(events)) == "From backup."
    assert cast(StreamEnd, events[-1]).model == "backup-model"  # the model that really answered
    assert [r.body["model"] for r in fake_llm.streamed_requests][-1] == "backup-model"


async def test_no_fallback_once_a_token_was_shown(fake_llm: FakeLLM, settings: Any) -> None:
    settings.OPENAI_FALLBACK_MODELS = ["backup-model"]
    fake_llm.script(Reply(chunks=["Half", " an", " answer"], cut_after=1))

    shown, error = await collect_until_error()

    assert shown and isinstance(error, llm.IncompleteStream)
    assert [r.body["model"] for r in fake_llm.streamed_requests] == ["fake-model"]


async def test_no_fallback_for_a_request_every_model_would_refuse(fake_llm: FakeLLM, settings: Any) -> None:
    settings.OPENAI_FALLBACK_MODELS = ["backup-model"]
    fake_llm.script(Reply.error_reply(400, "Invalid value for temperature"))

    _, error = await collect_until_error()

    assert isinstance(error, UpstreamBadRequest)
    assert len(fake_llm.streamed_requests) == 1


async def test_when_every_model_fails_the_last_error_is_shown(fake_llm: FakeLLM, settings: Any) -> None:
    settings.OPENAI_FALLBACK_MODELS = ["backup-model"]
    fake_llm.failing_models.update(
        {"fake-model": Reply.error_reply(503, "down"), "backup-model": Reply.error_reply(503, "down too")}
    )

    _, error = await collect_until_error()

    assert isinstance(error, llm.UpstreamUnavailable)
    assert [r.body["model"] for r in fake_llm.streamed_requests] == ["fake-model", "backup-model"]


# --- Tool calls (function calling) ---------------------------------------------------------------


async def test_streamed_tool_calls_are_assembled_at_the_end(fake_llm: FakeLLM) -> None:
    from conversations.tools import REGISTRY, openai_tools

    offered = openai_tools([REGISTRY["current_time"], REGISTRY["calculator"]])
    fake_llm.script(
        Reply(
            chunks=["Let me check."],
            finish_reason="tool_calls",
            tool_calls=[
                {"id": "call_a", "name": "current_time", "arguments": '{"timezone": "Asia/Tokyo"}'},
                {"id": "call_b", "name": "calculator", "arguments": '{"expression": "2 ** 10 + 0.5"}'},
            ],
        )
    )

    events = await collect(tools=offered)

    assert texts(events) == ["Let me check."]
    end = cast(StreamEnd, events[-1])
    assert end.finish_reason == "tool_calls"
    assert end.tool_calls == (
        llm.ToolCall("call_a", "current_time", '{"timezone": "Asia/Tokyo"}'),
        llm.ToolCall("call_b", "calculator", '{"expression": "2 ** 10 + 0.5"}'),
    )
    assert fake_llm.streamed_requests[0].body["tools"] == offered


async def test_no_tools_parameter_unless_tools_are_offered(fake_llm: FakeLLM) -> None:
    events = await collect()

    assert cast(StreamEnd, events[-1]).tool_calls == ()
    assert "tools" not in fake_llm.streamed_requests[0].body


# --- The bytes of a stream, however they arrive ------------------------------------


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(event).encode() + b"\r\n\r\n" for event in events)


def _content(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "model": "raw-model",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


class _RawServer:
    """An HTTP server that sends a stream's body as given pieces, each its
    own write and flushed apart (a chunked body, `gzip` when asked)."""

    def __init__(self, pieces: list[bytes], *, gzipped: bool = False) -> None:
        self.pieces = pieces
        self.gzipped = gzipped
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        pieces = [gzip.compress(b"".join(self.pieces))] if self.gzipped else self.pieces
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            + (b"content-encoding: gzip\r\n" if self.gzipped else b"")
            + b"connection: close\r\n\r\n"
        )
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)  # its own read on the other side
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()


async def test_lines_split_anywhere_crlf_comments_and_a_last_line_without_newline(settings: Any) -> None:
    body = (
        b": a comment first\r\n\r\n"
        + _sse(_content("Hel"), _content("lo"), _content(" wor"))
        + b"event: ignored\r\n"
        + b"data: "
        + json.dumps(_content("ld", "stop")).encode()  # the last line: no newline, no [DONE]
    )
    # Cut the body in pieces that split lines, a UTF-8 character and "data:".
    cuts = [3, 20, 21, 60, 61, 62, 130, len(body) - 5]
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    async with _RawServer(pieces) as url:
        settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY, settings.OPENAI_MAX_RETRIES = url, "k", 0
        events = await collect()

    assert texts(events) == ["Hel", "lo", " wor", "ld"]
    assert events[-1] == StreamEnd(finish_reason="stop", usage=None, model="raw-model")


async def test_a_gzipped_stream_is_read_through_its_decoder(settings: Any) -> None:
    body = _sse(_content("é"), _content("t"), _content("é", "stop")) + b"data: [DONE]\n\n"
    async with _RawServer([body], gzipped=True) as url:
        settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY, settings.OPENAI_MAX_RETRIES = url, "k", 0
        events = await collect()

    assert texts(events) == ["é", "t", "é"]
    assert cast(StreamEnd, events[-1]).finish_reason == "stop"


async def test_the_kept_urls_are_those_the_sdk_and_httpx_would_build(fake_llm: FakeLLM) -> None:
    import openai

    from conversations.llm.client import client

    sdk = client()
    for path in ("/chat/completions", "chat/completions", "/models?limit=2", "https://elsewhere.test/v1/x"):
        assert sdk._prepare_url(path) == openai.AsyncOpenAI._prepare_url(sdk, path)
        built = sdk._client.build_request("POST", str(sdk._prepare_url(path)), content=b"{}")
        assert built.url == httpx2.Client().build_request("POST", str(sdk._prepare_url(path))).url
    sdk.base_url = "http://127.0.0.1:9/other/"  # a client whose base URL is changed builds the new one
    assert str(sdk._prepare_url("/chat/completions")) == "http://127.0.0.1:9/other/chat/completions"
