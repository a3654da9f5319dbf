"""A cheap OpenAI-compatible Chat Completions server for load benchmarks.

Raw asyncio streams and hand-written HTTP/1.1 (keep-alive, chunked SSE), one
process, one event loop: it must never be the bottleneck of a benchmark.

Streamed requests get `--tokens` content chunks (" w0", " w1", ...), the
first one `--delay` seconds after the request and each next one `--delay`
later (scheduled from the request's arrival, so a late wake-up does not push
every later chunk back), then a finish_reason "stop" chunk, a usage chunk
when `stream_options.include_usage` is set, and `data: [DONE]`.
Non-streamed requests (titles) get a small JSON completion at once.

    python bench/fake_upstream.py --port 0 --tokens 100 --delay 0.02

prints `listening http://127.0.0.1:PORT/v1` on stdout once it accepts
connections. `GET /stats` returns its counters as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid

STATS = {"streams_started": 0, "streams_completed": 0, "streams_aborted": 0, "completions": 0, "requests": 0}


def expected_text(tokens: int) -> str:
    """The content of every streamed answer: what the benchmark checks against."""
    return "".join(f" w{i}" for i in range(tokens))


class Upstream:
    def __init__(self, tokens: int, delay: float, model: str) -> None:
        self.tokens = tokens
        self.delay = delay
        self.model = model
        # Pre-encoded JSON string literals of the tokens: a chunk is one format call.
        self.token_json = [json.dumps(f" w{i}") for i in range(tokens)]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                STATS["requests"] += 1
                keep_alive = headers.get("connection", "").lower() != "close"
                if method == "GET" and path.endswith("/stats"):
                    self._json(writer, 200, STATS)
                elif method == "GET" and path.endswith("/models"):
                    self._json(
                        writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
                    )
                elif method == "POST" and path.endswith("/chat/completions"):
                    try:
                        payload = json.loads(body or b"{}")
                    except ValueError:
                        payload = None
                    if not isinstance(payload, dict):
                        self._json(
                            writer, 400, {"error": {"message": "bad json", "type": "invalid_request_error"}}
                        )
                    elif payload.get("stream"):
                        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
                        if not await self._stream(writer, payload.get("model") or self.model, include_usage):
                            return
                    else:
                        STATS["completions"] += 1
                        self._json(writer, 200, self._completion(payload.get("model") or self.model))
                else:
                    self._json(
                        writer, 404, {"error": {"message": "not found", "type": "invalid_request_error"}}
                    )
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, str, dict[str, str], bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # the client closed an idle keep-alive connection
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        return method, path, headers, body

    @staticmethod
    def _json(writer: asyncio.StreamWriter, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )

    def _completion(self, model: str) -> dict[str, object]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Bench title"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33},
        }

    async def _stream(self, writer: asyncio.StreamWriter, model: str, include_usage: bool) -> bool:
        """Write one SSE stream; False if the client went away."""
        start = time.monotonic()
        STATS["streams_started"] += 1
        head = json.dumps(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }
        )[:-1]  # without the closing brace: every chunk appends its choices
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        def event(rest: str) -> None:
            data = f"data: {head}, {rest}}}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            event(
                '"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, '
                '"finish_reason": null}]'
            )
            await writer.drain()
            for i, token in enumerate(self.token_json):
                wait = start + (i + 1) * self.delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                event(f'"choices": [{{"index": 0, "delta": {{"content": {token}}}, "finish_reason": null}}]')
                transport = writer.transport
                if transport.is_closing():
                    raise ConnectionResetError
                if transport.get_write_buffer_size() > 65536:
                    await writer.drain()
            event('"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]')
            if include_usage:
                usage = {
                    "prompt_tokens": 20,
                    "completion_tokens": self.tokens,
                    "total_tokens": 20 + self.tokens,
                    "prompt_tokens_details": {"cached_tokens": 0},
                }
                event(f'"choices": [], "usage": {json.dumps(usage)}')
            data = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            await writer.drain()
        except ConnectionError:
            STATS["streams_aborted"] += 1
            return False
        STATS["streams_completed"] += 1
        return True


async def serve(args: argparse.Namespace) -> None:
    upstream = Upstream(args.tokens, args.delay, args.model)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", args.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening http://127.0.0.1:{port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one; default 0)")
    parser.add_argument(
        "--tokens", type=int, default=100, help="content chunks per streamed answer (default 100)"
    )
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between chunks (default 0.02)")
    parser.add_argument(
        "--model", default="fake-model", help="model name in the replies (default fake-model)"
    )
    args = parser.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
