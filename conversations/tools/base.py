"""What a tool is: its declaration, the context it runs in, and its result.

Kept apart from the registry (`__init__`) so that each tool's module can
import these without importing every other tool."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import schema

NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


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
    name: str  # ^[a-z][a-z0-9_]{0,63}$
    description: str  # for the model
    parameters: dict[str, Any]  # JSON schema of the arguments, in the subset `schema` enforces
    function: Callable[[ToolContext, dict[str, Any]], str]  # sync; returns the result text for the model
    timeout: float = 5.0  # seconds
    uses_database: bool = False

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"Bad tool name {self.name!r}: it must match {NAME.pattern}")
        if self.parameters.get("type") != "object":
            raise ValueError(f"Tool {self.name}: parameters must be a schema of type object")
        # A keyword the validator does not enforce would be a promise it breaks.
        schema.check_supported(self.parameters)
        if self.timeout <= 0:
            raise ValueError(f"Tool {self.name}: timeout must be positive")


@dataclass(frozen=True)
class ToolResult:
    ok: bool
    content: str  # the `tool` message's content for the model; an error is "error: ..."
    summary: str  # short human label for the page, e.g. "current_time (Asia/Tokyo)"
