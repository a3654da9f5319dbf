"""ASGI middleware: a request body larger than the site takes is refused
with 413 before Django reads it (Django's ASGI handler spools every body to
memory or disk before any view or middleware sees it). Uploads may be as
large as CHAT_FILE_MAX_BYTES; any other body as a file sent inline in
base64 (a picture in a chat completion), plus room for the rest."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings

UPLOAD_PATHS = ("/api/v1/files", "/files/")
SLACK = 1024 * 1024  # the multipart envelope, the rest of a JSON body


def limit_for(path: str) -> int:
    most = int(settings.CHAT_FILE_MAX_BYTES)
    if path.startswith(UPLOAD_PATHS):
        return most + SLACK
    return most * 4 // 3 + SLACK


class BodyLimit:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = limit_for(scope.get("path", ""))
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    return await _too_large(scope, send, limit)
        received = 0
        over = False
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, over
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a body without Content-Length, or a lying one
                    over = True
                    return {"type": "http.disconnect"}  # Django stops reading, sends nothing
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, watched_send)
        if over and not started:
            await _too_large(scope, send, limit)


async def _too_large(scope: dict[str, Any], send: Any, limit: int) -> None:
    message = f"The request is too large: at most {limit // (1024 * 1024)} MB."
    if scope.get("path", "").startswith("/api/"):
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "too_large",
                }
            }
        ).encode()
        content_type = b"application/json"
    else:
        body = message.encode()
        content_type = b"text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
