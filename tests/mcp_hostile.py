"""A hostile MCP server for tests, standard library only: its `flood` tool
answers with as many bytes as asked (a stdio line with its id first or
last, or a JSON body with or without its length declared, or gzipped),
its `echo` tool answers as any server would.

    python tests/mcp_hostile.py stdio
    python tests/mcp_hostile.py http PORT
"""

from __future__ import annotations

import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOOLS = [
    {
        "name": "flood",
        "description": "Answers with `size` bytes.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "size": {"type": "integer"},
                "declare": {"type": "boolean"},
                "last": {"type": "boolean"},
                "gzip": {"type": "boolean"},
            },
            "required": ["size"],
        },
    },
    {
        "name": "echo",
        "description": "Says the message back.",
        "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}},
    },
]


def answer(message: dict[str, Any]) -> dict[str, Any] | None:
    """The response to one message (None for a notification)."""
    if "id" not in message:
        return None
    method = message.get("method")
    params = message.get("params") or {}
    if method == "initialize":
        result: dict[str, Any] = {
            "protocolVersion": params.get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "hostile", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and params.get("name") == "flood":
        result = {"content": [{"type": "text", "text": "x" * int(params["arguments"]["size"])}]}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": f"echo: {params['arguments'].get('message', '')}"}]}
    else:
        result = {}
    if (params.get("arguments") or {}).get("last"):  # as the TypeScript SDK writes it: the id last
        return {"result": result, "jsonrpc": "2.0", "id": message["id"]}
    return {"jsonrpc": "2.0", "id": message["id"], "result": result}


def stdio() -> None:
    for line in sys.stdin:
        response = answer(json.loads(line))
        if response is not None:
            sys.stdout.write(json.dumps(response) + "\n")
            sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        message = json.loads(self.rfile.read(int(self.headers["content-length"])))
        response = answer(message)
        if response is None:
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = json.dumps(response).encode()
        arguments = (message.get("params") or {}).get("arguments") or {}
        declare = arguments.get("declare", True)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        if arguments.get("gzip"):  # whatever the client asked for
            body = gzip.compress(body)
            self.send_header("content-encoding", "gzip")
        if declare:
            self.send_header("content-length", str(len(body)))
        else:
            self.close_connection = True  # the body ends with the connection
        self.end_headers()
        for start in range(0, len(body), 65536):
            try:
                self.wfile.write(body[start : start + 65536])
            except OSError:
                return  # the client stopped reading

    def do_GET(self) -> None:  # no stream of the server's own
        self.send_response(405)
        self.send_header("content-length", "0")
        self.end_headers()

    do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        stdio()
    else:
        ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
