"""Between a stdio MCP server and the worker: the server's messages passed on
line by line, none longer than a limit. The `mcp` SDK reads a stdio server's
line whole, however long, so a server that writes a line of gigabytes would
take the worker's memory (every answer of that worker, not only the ones
using the server). Here a longer line is read past, never kept: a response
becomes a JSON-RPC error for the same request id (the call fails at once,
the session goes on), anything else is dropped with a line on stderr.

Run by path with the standard library only (no Django: it starts in tens
of milliseconds), as the server's parent in its process group (the SDK ends
the whole group):

    python mcp_stdio_guard.py LIMIT -- COMMAND [ARG ...]

The server reads the guard's stdin itself (inherited, never copied) and
writes its stderr where the guard's goes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

# A message's id, looked for in the start of a long line (the SDKs write it first).
_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")')
_HEAD = 4096  # bytes of a long line kept to find its id
CHUNK = 65536


def refusal(head: bytes, size: int, limit: int) -> bytes:
    """What the worker reads instead of a line over the limit: an error for
    the request it answers, or nothing (a request or notification of the
    server's own, or no id found)."""
    found = _ID.search(head)
    if found is None or b'"method"' in head:
        return b""
    message = {
        "jsonrpc": "2.0",
        "id": json.loads(found.group(1)),
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
    long_size = 0
    while chunk := os.read(source, CHUNK):
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if long_head is not None:
                long_size += len(piece)
            elif len(line) + len(piece) > limit:
                long_head = bytes((line + piece)[:_HEAD])
                long_size = len(line) + len(piece)
                line.clear()
            else:
                line += piece
            if end < 0:
                break
            if long_head is not None:
                out = refusal(long_head, long_size, limit)
                print(f"MCP server: a line of {long_size:,} bytes was not passed on", file=sys.stderr)
                long_head = None
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
    except BrokenPipeError:  # the worker is gone: the server sees its stdin end
        pass
    return server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
