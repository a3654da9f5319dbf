"""Reading an API request's JSON: every bad input becomes a 400 that names
the field, never an exception."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest

from chatsite import bodylimit
from conversations import attachments, inputs, tools

from .errors import ApiError, bad_request

MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_MESSAGES = 2000
ROLES = {"system", "developer", "user", "assistant", "tool"}
RESPONSE_FORMATS = {"text", "json_object", "json_schema"}


def body_of(request: HttpRequest, *, inline_files: bool = False) -> dict[str, Any]:
    """The request's JSON object: 413 past MAX_BODY_BYTES (also when Django
    refuses to read it: DATA_UPLOAD_MAX_MEMORY_SIZE), or with `inline_files`
    (a chat completion's files in base64) past what the site's body limit
    lets through for them; 400 for anything that is not JSON, nested too
    deeply or holds a string that is not text."""
    most = bodylimit.limit_for(request.path) if inline_files else MAX_BODY_BYTES
    too_large = ApiError(413, f"The request body is larger than {most // (1024 * 1024)} MB.", "too_large")
    try:
        # Read from the stream: Django's `body` refuses what passes
        # DATA_UPLOAD_MAX_MEMORY_SIZE, which is right for every other body.
        raw = request.read(most + 1) if inline_files else request.body
    except RequestDataTooBig:
        raise too_large from None
    if len(raw) > most:
        raise too_large
    try:
        body = inputs.load_json(raw or b"{}")
    except inputs.BadInput as exc:
        raise bad_request(str(exc)) from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    if inline_files and len(raw) - _inline_bytes(body) > MAX_BODY_BYTES:
        # Only files may take the larger room: the rest is held to the usual limit.
        raise ApiError(
            413,
            f"The request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB besides its files.",
            "too_large",
        )
    return body


def _inline_bytes(body: dict[str, Any]) -> int:
    """How much of a chat completion's body is files sent inline (data: URLs of content parts)."""
    total = 0
    for message in body.get("messages") or () if isinstance(body.get("messages"), list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict):
                continue
            holder = part.get("image_url") if part.get("type") == "image_url" else part.get("file")
            if isinstance(holder, dict):
                value = holder.get("url") if part.get("type") == "image_url" else holder.get("file_data")
                if isinstance(value, str) and value.startswith("data:"):
                    total += len(value)
    return total


def text_of(content: object, where: str) -> str | None:
    """A message's content: a string, or a list of text parts (joined)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(f"`{where}.content`: only text parts are supported.", where)
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"`{where}.content` must be a string or a list of text parts.", where)


IMAGE_DETAILS = {"auto", "low", "high"}
MAX_PARTS = 100  # of one message


def user_content_of(content: object, where: str) -> str | list[dict[str, Any]] | None:
    """A user message's content: a string, or content parts as Chat
    Completions takes them: `text`, `image_url` (a `data:` URL; an http(s)
    address only where staff allow it: CHAT_REMOTE_IMAGES) and `file`
    (`file_id` of an uploaded file, or `file_data`, a `data:` URL, with a
    `filename`). Only text parts: their text, joined. The files are read
    later (`attachments.read_parts`)."""
    if not isinstance(content, list) or all(
        isinstance(part, dict) and part.get("type") == "text" for part in content
    ):
        return text_of(content, where)
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad_request(f"`{at}.image_url.url` must be a string.", at)
            if url.startswith(("http://", "https://")):
                if not settings.CHAT_REMOTE_IMAGES:
                    raise bad_request(
                        f"`{at}`: send the image itself, as a data: URL (base64); this server does not "
                        "take images by address.",
                        at,
                    )
            elif not url.startswith("data:"):
                raise bad_request(f"`{at}.image_url.url` must be a data: URL.", at)
            detail = image.get("detail") if isinstance(image, dict) else None
            known = isinstance(detail, str) and detail in IMAGE_DETAILS
            parts.append(
                {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if known else {})}}
            )
        elif kind == "file" and isinstance(part.get("file"), dict):
            file = part["file"]
            if isinstance(file.get("file_id"), str):
                parts.append({"type": "file", "file": {"file_id": file["file_id"]}})
            elif isinstance(file.get("file_data"), str) and file["file_data"].startswith("data:"):
                name = file.get("filename")
                parts.append(
                    {
                        "type": "file",
                        "file": {
                            "file_data": file["file_data"],
                            "filename": name if isinstance(name, str) else "",
                        },
                    }
                )
            else:
                raise bad_request(f"`{at}.file` needs a `file_id`, or `file_data` (a data: URL).", at)
        else:
            raise bad_request(f"`{at}`: a part is `text`, `image_url` or `file`.", at)
    if len(parts) > MAX_PARTS:
        raise bad_request(f"`{where}.content`: at most {MAX_PARTS} parts.", where)
    return parts


def files_in(messages: list[dict[str, Any]]) -> int:
    """How many files and images a request's messages carry."""
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part["type"] in ("file", "image_url")
    )


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("`messages` must be a non-empty list.", "messages")
    if len(raw) > MAX_MESSAGES:
        raise bad_request(f"At most {MAX_MESSAGES} messages.", "messages")
    messages = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict) or item.get("role") not in ROLES:
            raise bad_request(f"`{where}.role` must be one of {', '.join(sorted(ROLES))}.", where)
        role = "system" if item["role"] == "developer" else item["role"]
        content = item.get("content")
        message: dict[str, Any] = {
            "role": role,
            "content": user_content_of(content, where) if role == "user" else text_of(content, where),
        }
        if role == "assistant" and item.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(item["tool_calls"], where)
        elif message["content"] is None:
            raise bad_request(f"`{where}.content` is missing.", where)
        if role == "tool":
            if not isinstance(item.get("tool_call_id"), str):
                raise bad_request(f"`{where}.tool_call_id` is missing.", where)
            message["tool_call_id"] = item["tool_call_id"]
        messages.append(message)
    limit = settings.CHAT_FILE_MAX_PER_MESSAGE
    if files_in(messages) > limit:
        # Each is read (an image whole, as base64) and sent on: one request carries few.
        raise bad_request(f"At most {limit} files and images in one request.", "messages")
    return messages


def _tool_calls(raw: object, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise bad_request(f"`{where}.tool_calls` must be a list.", where)
    calls = []
    for call in raw:
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(call.get("id"), str)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise bad_request(
                f"`{where}.tool_calls`: each needs `id` and `function` {{`name`, `arguments`}}.", where
            )
        calls.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return calls


def number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad_request(f"`{name}` must be a number from {low:g} to {high:g}.", name)
    return float(value)


def max_tokens_of(body: dict[str, Any]) -> int | None:
    """The longest answer asked for: at most OPENAI_MAX_TOKENS, this
    server's ceiling (the budget reserves that much before the answer)."""
    ceiling = settings.OPENAI_MAX_TOKENS
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_request(f"`{name}` must be a positive integer.", name)
        if value > ceiling:
            raise bad_request(f"`{name}` is {value}; this server allows at most {ceiling}.", name)
        return value
    return None


def response_format_of(body: dict[str, Any]) -> dict[str, Any] | None:
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise bad_request(
            "`response_format.type` must be text, json_object or json_schema.", "response_format"
        )
    return None if value["type"] == "text" else value


def tools_of(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[tools.Tool]]:
    """The client's own tools (passed on to the model) and the built-in
    tools the request names (run here: named without parameters, or with
    the name of a built-in tool). An MCP server's tool (`<server>__<tool>`,
    without parameters) is the client's here; `mcp_named` picks it out."""
    raw = body.get("tools")
    if raw is None:
        return [], []
    if not isinstance(raw, list) or len(raw) > 128:
        raise bad_request("`tools` must be a list (at most 128).", "tools")
    client, builtin = [], []
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise bad_request(f'`tools[{i}]` must be {{"type": "function", "function": {{...}}}}.', "tools")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(f"`tools[{i}].function.name` is missing.", "tools")
        if name in tools.REGISTRY and "parameters" not in function:
            builtin.append(tools.REGISTRY[name])
        else:
            client.append(tool)
    return client, builtin


def flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad_request(f"`{name}` must be true or false.", name)
    return value


def optional_string(body: dict[str, Any], name: str, limit: int = 100) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise bad_request(f"`{name}` must be a string of at most {limit} characters.", name)
    return value


def optional_uuid(body: dict[str, Any], name: str) -> uuid.UUID | None:
    value = body.get(name)
    if value is None:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise bad_request(f"`{name}` must be a UUID.", name) from None


def attachments_of(body: dict[str, Any]) -> list[uuid.UUID]:
    """A send's files: `attachments`, a list of file ids (optional)."""
    ids = attachments.parse_ids(body.get("attachments"))
    if isinstance(ids, str):
        raise bad_request(ids, "attachments")
    return ids


def content_of(body: dict[str, Any], *, files: bool = False) -> str:
    """A send's text: non-empty, unless `files` go with it."""
    content = body.get("content", "" if files else None)
    if not isinstance(content, str) or not (content.strip() or files):
        raise bad_request("`content` must be a non-empty string.", "content")
    limit = settings.CHAT_MAX_MESSAGE_CHARS
    if len(content) > limit:
        raise bad_request(f"The message is too long ({len(content)} > {limit} characters).", "content")
    return content


def mcp_named(client_tools: list[dict[str, Any]]) -> list[str]:
    """The names, among the client's tools, of MCP servers' tools to run here:
    `<server>__<tool>` without parameters (the same rule as built-in tools)."""
    return [
        t["function"]["name"]
        for t in client_tools
        if "parameters" not in t["function"] and "__" in str(t["function"]["name"])
    ]
