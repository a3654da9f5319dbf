"""A real OpenAI-compatible Chat Completions server on 127.0.0.1, scripted per test.

The real `openai` SDK talks to it over HTTP through OPENAI_BASE_URL; nothing
patches the SDK. Each request takes the next scripted `Reply` (or the
default one): chunks and delays, the usage chunk, HTTP errors, a stream cut
in the middle, one that ends without a finish_reason, a hang.

    fake = FakeLLM().start()
    fake.script(Reply(chunks=["Hel", "lo"], usage=(10, 2)))
    ... fake.base_url ...
    fake.stop()
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # the default 5 refuses a burst of concurrent answers

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (a stopped answer, a killed worker) is part
        # of the tests, not an error worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@dataclass
class Reply:
    chunks: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " fake", " model."])
    delay: float = 0.0  # seconds before each chunk
    finish_reason: str | None = "stop"  # None: the stream ends without one
    usage: tuple[int, int] | None = (11, 5)  # (prompt, completion); None: no usage chunk
    cached_tokens: int = 0
    status: int = 200  # anything else: an error body instead of a stream
    error: dict[str, Any] | None = None  # the error object of an error reply
    headers: dict[str, str] = field(default_factory=dict)  # e.g. {"Retry-After": "7"}
    cut_after: int | None = None  # drop the connection after this many chunks
    hang_after: int | None = None  # stop sending (connection open) after this many chunks
    hold_end: bool = False  # after the chunks, wait for release_hangs() before finishing
    model: str = "fake-model"
    # Tool calls streamed after the chunks, as the OpenAI API does: each as
    # deltas of its id and name, then its arguments in pieces; then
    # finish_reason "tool_calls". Each: {"id", "name", "arguments"} (a string).
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    # Non-streamed replies: the text made from the request's body (a model
    # that reads what it was sent); `chunks` otherwise.
    respond: Callable[[dict[str, Any]], str] | None = None

    @classmethod
    def error_reply(cls, status: int, message: str = "error", code: str | None = None, **kw: Any) -> Reply:
        return cls(status=status, error={"message": message, "type": "error", "code": code}, **kw)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeLLM:
    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()  # for streamed requests (answers)
        self.default = Reply()
        # Non-streamed requests (titles, summaries) have their own script, so
        # that they never take a reply meant for an answer.
        self.completion_replies: deque[Reply] = deque()
        self.completion_default = Reply(chunks=["A", " fake", " title"], usage=(30, 3))
        self.requests: list[Received] = []
        # Every request for one of these models gets its reply (a model that is down).
        self.failing_models: dict[str, Reply] = {}
        self.disconnects = 0  # streams the client closed before their end
        self.completed = 0  # streams written to their end
        self.in_flight = 0  # requests being answered now
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- control ------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # bound to "127.0.0.1"
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release_hangs()
        self._server.shutdown()
        self._server.server_close()

    def release_hangs(self) -> None:
        """End every hanging reply now (its handler returns)."""
        self._release.set()
        self._release = threading.Event()

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    def script_completion(self, *replies: Reply) -> None:
        with self._lock:
            self.completion_replies.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self.replies.clear()
            self.completion_replies.clear()
            self.requests.clear()
            self.failing_models.clear()
            self.disconnects = self.completed = 0
            self.default = Reply()
            self.completion_default = Reply(chunks=["A", " fake", " title"], usage=(30, 3))

    @property
    def streamed_requests(self) -> list[Received]:
        return [r for r in self.requests if r.body.get("stream")]

    @property
    def completion_requests(self) -> list[Received]:
        return [r for r in self.requests if not r.body.get("stream")]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("fake LLM: condition not met in time")
            time.sleep(0.01)

    def _next(self, *, stream: bool) -> Reply:
        with self._lock:
            if not stream:
                return (
                    self.completion_replies.popleft() if self.completion_replies else self.completion_default
                )
            return self.replies.popleft() if self.replies else self.default

    # --- the HTTP side ----------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # /v1/models, for completeness
                self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self) -> None:
                with fake._lock:
                    fake.in_flight += 1
                try:
                    self._answer()
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.requests.append(Received(self.path, dict(self.headers), body))
                if not self.path.endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                    return
                failing = fake.failing_models.get(body.get("model", ""))
                reply = failing or fake._next(stream=bool(body.get("stream")))
                if reply.status != 200:
                    error = dict(reply.error or {"message": "error"})
                    # A server that quotes what it was sent back (some do, the key included).
                    error["message"] = str(error.get("message", "")).replace(
                        "{authorization}", self.headers.get("Authorization", "")
                    )
                    self._json(reply.status, {"error": error}, reply.headers)
                elif body.get("stream"):
                    self._stream(reply, body)
                else:
                    self._complete(reply, body)

            def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _complete(self, reply: Reply, body: dict[str, Any]) -> None:
                if reply.hang_after is not None:  # a reply that never comes (until released)
                    fake._release.wait(60)
                prompt, completion = reply.usage or (0, 0)
                text = reply.respond(body) if reply.respond else "".join(reply.chunks)
                self._json(
                    200,
                    {
                        "id": f"chatcmpl-{uuid.uuid4().hex}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": reply.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": reply.finish_reason or "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt,
                            "completion_tokens": completion,
                            "total_tokens": prompt + completion,
                        },
                    },
                )

            def _chunk(self, payload: bytes) -> None:
                self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                self.wfile.flush()

            def _event(self, reply: Reply, completion_id: str, choices: list[Any], usage: Any = None) -> None:
                event = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": reply.model,
                    "choices": choices,
                }
                if usage is not None:
                    event["usage"] = usage
                self._chunk(f"data: {json.dumps(event)}\n\n".encode())

            def _stream(self, reply: Reply, body: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                completion_id = f"chatcmpl-{uuid.uuid4().hex}"
                try:
                    self._event(
                        reply, completion_id, [{"index": 0, "delta": {"role": "assistant", "content": ""}}]
                    )
                    for i, text in enumerate(reply.chunks):
                        if reply.cut_after is not None and i >= reply.cut_after:
                            self._cut()
                            return
                        if reply.hang_after is not None and i >= reply.hang_after:
                            fake._release.wait(60)
                            return
                        if reply.delay:
                            time.sleep(reply.delay)
                        self._event(reply, completion_id, [{"index": 0, "delta": {"content": text}}])
                    for index, tool_call in enumerate(reply.tool_calls):
                        self._tool_call(reply, completion_id, index, tool_call)
                    if reply.hold_end:
                        fake._release.wait(60)
                    if reply.cut_after is not None:
                        self._cut()
                        return
                    if reply.finish_reason is not None:
                        self._event(
                            reply,
                            completion_id,
                            [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}],
                        )
                    include_usage = (body.get("stream_options") or {}).get("include_usage")
                    if reply.usage is not None and include_usage:
                        prompt, completion = reply.usage
                        self._event(
                            reply,
                            completion_id,
                            [],
                            {
                                "prompt_tokens": prompt,
                                "completion_tokens": completion,
                                "total_tokens": prompt + completion,
                                "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
                            },
                        )
                    self._chunk(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    with fake._lock:
                        fake.completed += 1
                except (BrokenPipeError, ConnectionResetError):
                    with fake._lock:
                        fake.disconnects += 1
                    self.close_connection = True

            def _tool_call(self, reply: Reply, completion_id: str, index: int, call: dict[str, str]) -> None:
                head = {"index": index, "id": call["id"], "type": "function"}
                head["function"] = {"name": call["name"], "arguments": ""}
                self._event(reply, completion_id, [{"index": 0, "delta": {"tool_calls": [head]}}])
                arguments = call["arguments"]
                for start in range(0, len(arguments), 7):  # in pieces, as models stream them
                    piece = {"index": index, "function": {"arguments": arguments[start : start + 7]}}
                    self._event(reply, completion_id, [{"index": 0, "delta": {"tool_calls": [piece]}}])

            def _cut(self) -> None:
                # Drop the connection mid-body: no terminating chunk, no [DONE].
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)

        return Handler
