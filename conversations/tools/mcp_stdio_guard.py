"""Between a stdio MCP server and the worker: the server's messages passed on
line by line, none longer than a limit. The `mcp` SDK reads a stdio server's
line whole, however long, so a server that writes a line of gigabytes would
take the worker's memory (every answer of that worker, not only the ones
using the server). Here a longer line is read past, never kept: a response
becomes a JSON-RPC error for the same request id (the call fails at once,
the session goes on), anything else is dropped with a line on stderr.
Should the guard fail, it ends the server with it.

Run by path with the standard library only (no Django: it starts in tens
of milliseconds), as the server's parent in its process group (the SDK ends
the whole group):

    python -I -S mcp_stdio_guard.py LIMIT -- COMMAND [ARG ...]

(`-I -S`: the server's environment, PYTHONPATH included, is never the guard's.)

The server reads the guard's stdin itself (inherited, never copied) and
writes its stderr where the guard's goes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

_ID = rb'(-?[1-9]\d{0,17}|0|"(?:[^"\\]|\\.){0,200}")'
# Where a response's id is: first, after "jsonrpc" (Python's SDK) ...
_ID_FIRST = re.compile(
    rb'\s*\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*' + _ID + rb'\s*,\s*"(?:result|error)"'
)
# ... or last, after its result (the TypeScript SDK's `{result, jsonrpc, id}`).
_RESULT_FIRST = re.compile(rb'\s*\{\s*"(?:result|error)"\s*:')
_ID_LAST = re.compile(rb',\s*"id"\s*:\s*' + _ID + rb"\s*\}\s*$")
_HEAD = 4096  # bytes of a long line kept to tell what it is
_TAIL = 512  # and of its end, to find an id written last
CHUNK = 65536


def refusal(head: bytes, tail: bytes, size: int, limit: int) -> bytes:
    """What the worker reads instead of a line over the limit: an error for
    the request it answers, or nothing (a request or notification of the
    server's own, or a line whose id is not found where a response has it)."""
    found = _ID_FIRST.match(head) or (_ID_LAST.search(tail) if _RESULT_FIRST.match(head) else None)
    if found is None:
        return b""
    try:
        request_id = json.loads(found.group(1))
    except ValueError:
        return b""
    message = {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {
            "code": -32603,
            "message": f"the server's answer had {size:,} bytes, more than {limit:,}: not read",
        },
    }
    return json.dumps(message).encode() + b"\n"


def relay(source: int, sink: int, limit: int) -> None:
    """Lines from `source` to `sink` until the end of `source`; a line of
    more than `limit` bytes (its newline not counted) is replaced."""
    line = bytearray()
    long_head: bytes | None = None  # set while a long line is read past
    long_tail = b""
    long_size = 0
    while chunk := os.read(source, CHUNK):
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if long_head is not None:
                long_size += len(piece)
                long_tail = (long_tail + piece)[-_TAIL:]
            elif len(line) + len(piece) > limit:
                whole = bytes(line) + piece
                long_head, long_tail, long_size = whole[:_HEAD], whole[-_TAIL:], len(whole)
                line.clear()
            else:
                line += piece
            if end < 0:
                break
            if long_head is not None:
                out = refusal(long_head, long_tail.rstrip(b"\r"), long_size, limit)
                print(f"MCP server: a line of {long_size:,} bytes was not passed on", file=sys.stderr)
                long_head, long_tail = None, b""
            else:
                out = bytes(line) + b"\n"
                line.clear()
            _write(sink, out)
            start = end + 1
    if line and long_head is None:
        _write(sink, bytes(line))


def _write(sink: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(sink, view) :]


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: mcp_stdio_guard.py LIMIT -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    limit = int(argv[1])
    try:
        server = subprocess.Popen(argv[3:], stdout=subprocess.PIPE)  # stdin and stderr: the guard's
    except OSError as exc:
        print(f"MCP server {argv[3]!r} cannot be started: {exc}", file=sys.stderr)
        return 127
    assert server.stdout is not None
    try:
        relay(server.stdout.fileno(), sys.stdout.fileno(), limit)
    except BaseException:  # the worker went away (a broken pipe), or the guard failed
        server.kill()  # never a server left writing to nobody
    return server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
