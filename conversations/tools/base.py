"""What a tool is: its declaration, the context it runs in, and its result.

Kept apart from the registry (`__init__`) so that each tool's module can
import these without importing every other tool."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import schema

NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
EXTERNAL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # what the Chat Completions API takes


class ToolError(Exception):
    """Raised by a tool for a result the model should read as an error
    ("unknown time zone 'Mars/Base'"): the message goes to the model as is.
    Any other exception is a bug; the model only learns its type."""


@dataclass(frozen=True)
class ToolContext:
    """Who asks: a tool that reads data reads only this user's."""

    user_id: int
    conversation_id: str | None = None


@dataclass(frozen=True)
class Tool:
    name: str  # ^[a-z][a-z0-9_]{0,63}$ (an MCP server's: `EXTERNAL_NAME`)
    description: str  # for the model
    parameters: dict[str, Any]  # JSON schema of the arguments, in the subset `schema` enforces
    function: Callable[[ToolContext, dict[str, Any]], str] | None = None  # sync; the result text
    timeout: float = 5.0  # seconds
    uses_database: bool = False
    # An MCP server's tool (tools/mcp.py): async, its schema any JSON Schema (checked
    # with `jsonschema` before the call), its result cut at `max_result_chars`.
    run: Callable[[ToolContext, dict[str, Any]], Awaitable[str]] | None = None
    external: bool = False
    max_result_chars: int = 4000

    def __post_init__(self) -> None:
        if not (EXTERNAL_NAME if self.external else NAME).match(self.name):
            pattern = (EXTERNAL_NAME if self.external else NAME).pattern
            raise ValueError(f"Bad tool name {self.name!r}: it must match {pattern}")
        if self.parameters.get("type") != "object":
            raise ValueError(f"Tool {self.name}: parameters must be a schema of type object")
        if (self.function is None) == (self.run is None):
            raise ValueError(f"Tool {self.name}: give `function` (sync) or `run` (async)")
        if self.external:
            schema.check_json_schema(self.parameters, self.name)
        else:
            # A keyword the validator does not enforce would be a promise it breaks.
            schema.check_supported(self.parameters)
        if self.timeout <= 0:
            raise ValueError(f"Tool {self.name}: timeout must be positive")


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    content: str  # the `tool` message's content for the model; an error is "error: ..."
    summary: str  # short human label for the page, e.g. "current_time (Asia/Tokyo)"
