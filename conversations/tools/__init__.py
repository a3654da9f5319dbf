"""The tools the model may call: the registry, which tools are offered, and
running one call of the model's safely.

To add a tool: write one module here that defines
`TOOL = Tool(name=..., description=..., parameters=..., function=...)`
(`function(context, arguments) -> str` is sync and gets arguments already
checked against `parameters`; it raises `ToolError("...")` for an error the
model should read; set `uses_database=True` if it uses the ORM, and read only
`context.user_id`'s data), then list it in `REGISTRY` below. It is offered to
the model at once unless `CHAT_TOOLS` names the tools to offer.

The life of an answer (`generation`) does: `openai_tools(offered(...))` in the
request, then `await call(name, arguments_json, context)` for each tool call
the model streams, and sends `ToolResult.content` back as the `tool` message.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Iterable
from typing import Any

from django.conf import settings

from ..database import in_database
from . import calculator, current_time, schema, search_conversations
from .base import Tool, ToolContext, ToolError, ToolResult

__all__ = ["REGISTRY", "Tool", "ToolContext", "ToolError", "ToolResult", "call", "offered", "openai_tools"]

log = logging.getLogger(__name__)

REGISTRY: dict[str, Tool] = {
    tool.name: tool for tool in (current_time.TOOL, calculator.TOOL, search_conversations.TOOL)
}

MAX_RESULT_CHARS = 4000  # of what goes back to the model
MAX_ARGUMENTS_CHARS = 20_000  # of the model's arguments, before parsing them
SUMMARY_ARGUMENT_CHARS = 40


def offered(setting: str | None = None) -> list[Tool]:
    """The tools to offer the model. `setting`: comma-separated names (a
    prompt's own choice); None = `settings.CHAT_TOOLS`, where None (unset)
    means every registered tool and "" none. Unknown names are logged and
    left out."""
    if setting is None:
        setting = settings.CHAT_TOOLS
        if setting is None:
            return list(REGISTRY.values())
    if setting.strip().lower() == "none":
        return []
    tools: list[Tool] = []
    for name in (part.strip() for part in setting.split(",")):
        if not name or any(tool.name == name for tool in tools):
            continue
        if name in REGISTRY:
            tools.append(REGISTRY[name])
        else:
            log.warning("Unknown tool %r in the tools setting %r: left out", name, setting)
    return tools


def none_wanted(setting: str | None) -> bool:
    """A prompt's (or CHAT_TOOLS') "none": no tool at all, an MCP server's neither."""
    if setting is None:
        setting = settings.CHAT_TOOLS
    return setting is not None and setting.strip().lower() in ("none", "")


def openai_tools(tools: Iterable[Tool]) -> list[dict[str, Any]]:
    """`tools` as the Chat Completions API's `tools` parameter."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": json.loads(json.dumps(tool.parameters)),  # a copy nobody can change ours by
            },
        }
        for tool in tools
    ]


async def call(
    name: str, arguments: str, context: ToolContext, *, tools: Iterable[Tool] | None = None
) -> ToolResult:
    """Run one tool call of the model's. Never raises (but for cancellation,
    so that stopping an answer stops its tool round): an unknown tool, bad
    arguments, a failure or a timeout is a ToolResult(ok=False) whose content
    tells the model what went wrong. `tools`: those offered to the model (a
    call to any other is refused); None = every registered tool."""
    available = {tool.name: tool for tool in tools} if tools is not None else REGISTRY
    tool = available.get(name) if isinstance(name, str) else None
    if tool is None:
        known = ", ".join(available) or "none"
        return _error(f"unknown tool {_shortened(str(name), 64)!r} (the tools are: {known})", str(name))
    try:
        if tool.external:
            # A server's schema is untrusted (a slow pattern): checked off the loop, in its time.
            parsed = await asyncio.wait_for(
                asyncio.to_thread(_parsed_arguments, tool, arguments), tool.timeout
            )
        else:
            parsed = _parsed_arguments(tool, arguments)
    except TimeoutError:
        return _error(f"checking the arguments took longer than {tool.timeout:g} s", tool.name)
    except Exception as exc:  # a schema that cannot be used (a $ref nowhere): the model is told
        log.warning("Tool %s: its schema could not check the arguments: %r", tool.name, exc)
        return _error("the tool's schema could not check the arguments", tool.name)
    if isinstance(parsed, str):
        return _error(parsed, _summary(tool.name, None))
    summary = _summary(tool.name, parsed)
    try:
        content = await asyncio.wait_for(_run(tool, context, parsed), tool.timeout)
    except ToolError as exc:
        return _error(str(exc), summary)
    except TimeoutError:
        log.warning("Tool %s took longer than %g s (user %s)", tool.name, tool.timeout, context.user_id)
        return _error(f"the tool took longer than {tool.timeout:g} s", summary)
    except Exception as exc:
        log.exception("Tool %s failed (user %s)", tool.name, context.user_id)
        return _error(f"the tool failed: {type(exc).__name__}", summary)
    return ToolResult(ok=True, content=_capped(str(content), tool.max_result_chars), summary=summary)


def _parsed_arguments(tool: Tool, arguments: str) -> dict[str, Any] | str:
    """The model's arguments as an object that fits the tool's schema, or what is wrong."""
    if not isinstance(arguments, str):
        return "the arguments must be a JSON object in a string"
    if len(arguments) > MAX_ARGUMENTS_CHARS:
        return f"the arguments are too long ({len(arguments)} characters)"
    try:
        # No arguments at all: some servers send "" for {}.
        parsed = json.loads(arguments) if arguments.strip() else {}
    except (ValueError, RecursionError) as exc:
        return f"the arguments are not valid JSON ({_shortened(str(exc), 100)})"
    if tool.external:
        problem = schema.json_schema_problem(tool.parameters, parsed)
    else:
        problem = schema.problem(tool.parameters, parsed)
    return f"invalid arguments: {problem}" if problem else parsed


async def _run(tool: Tool, context: ToolContext, arguments: dict[str, Any]) -> str:
    if tool.run is not None:  # an MCP server's: on the loop, cancelled by a stop or its timeout
        return await tool.run(context, arguments)
    # On a worker thread: a tool must never block the event loop that streams
    # every other answer. A timed-out thread is abandoned, not stopped.
    assert tool.function is not None
    function = functools.partial(tool.function, context, arguments)
    if tool.uses_database:
        return await in_database(function)()
    return await asyncio.to_thread(function)


def _error(reason: str, summary: str) -> ToolResult:
    return ToolResult(ok=False, content=_capped(f"error: {reason}"), summary=summary)


def _summary(name: str, arguments: dict[str, Any] | None) -> str:
    """ "current_time (Asia/Tokyo)": the tool and its first argument, short."""
    first = next(iter(arguments.values()), "") if arguments else ""
    shown = " ".join(str(first).split())
    if not shown:
        return _shortened(name, 64)
    return f"{name} ({_shortened(shown, SUMMARY_ARGUMENT_CHARS)})"


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _capped(content: str, limit: int = MAX_RESULT_CHARS) -> str:
    if len(content) <= limit:
        return content
    return content[:limit] + f"\n[cut: the result had {len(content)} characters]"
