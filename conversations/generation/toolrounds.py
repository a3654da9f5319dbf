"""Tool rounds: the one loop by which a model call that asks for tools gets
their results and is asked again, for a page's answer (runner.py) and an
API call (stateless.py) alike.

`Rounds` says what to offer the model on each call (the tools, while
CHAT_TOOL_ROUNDS rounds remain; then it must answer) and whether a call's
end is a round to run; `run_round` runs the calls of one round (each
checked against its tool's schema, each with the tool's own time limit)
and gives back the round: what the model said, its calls, their results,
ready to be sent upstream again (`messages_of`) and stored with an answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from .. import llm, tools
from ..history import with_tool_rounds
from ..models import ToolCallRecord, ToolResultRecord, ToolRound


@dataclass
class Rounds:
    """The tools a model call may use, and how many rounds are left.
    `passed_on`: tools offered but run by the client (the API's), never here."""

    offered: list[tools.Tool]
    passed_on: list[dict[str, Any]] = field(default_factory=list)
    # A call of a tool nobody offered: answered here with an error result
    # (an answer), or handed back to the client (the API).
    answer_unknown: bool = True
    limit: int = field(default_factory=lambda: settings.CHAT_TOOL_ROUNDS)
    done: int = 0
    _offer: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self._offer = [*self.passed_on, *tools.openai_tools(self.offered)] or None  # built once

    def offer(self) -> list[dict[str, Any]] | None:
        """The `tools` of the next call: all of them while rounds remain, then
        only the client's own (it must answer or hand them back)."""
        if self.done < self.limit:
            return self._offer
        return self.passed_on or None

    def is_round(self, end: llm.StreamEnd | None) -> bool:
        """Does this call's end ask for tools that are run here?"""
        if end is None or not end.tool_calls or self.done >= self.limit or self._offer is None:
            return False
        if self.answer_unknown:
            return True
        names = {tool.name for tool in self.offered}
        return all(call.name in names for call in end.tool_calls)


async def run_round(
    rounds: Rounds,
    end: llm.StreamEnd,
    text: str,
    context: tools.ToolContext,
    *,
    on_result: Callable[[llm.ToolCall, tools.ToolResult], None] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> ToolRound:
    """Run the calls of one round, in order; `on_result` sees each result as
    it comes (an answer's `generation.tool` frame). The round, as stored:
    {"text", "calls": [{"id", "name", "arguments"}], "results": [{"call_id",
    "name", "summary", "ok", "arguments", "content"}]}."""
    results: list[ToolResultRecord] = []
    for call in end.tool_calls:
        if stopping is not None and stopping():  # the answer was stopped: no more calls
            raise asyncio.CancelledError
        result = await tools.call(call.name, call.arguments, context, tools=rounds.offered)
        if on_result is not None:
            on_result(call, result)
        results.append(
            {"call_id": call.id, "name": call.name, "summary": result.summary, "ok": result.ok,
             "arguments": call.arguments, "content": result.content}
        )  # fmt: skip
    rounds.done += 1
    calls: list[ToolCallRecord] = [
        {"id": c.id, "name": c.name, "arguments": c.arguments} for c in end.tool_calls
    ]
    return {"text": text, "calls": calls, "results": results}


def messages_of(round_: ToolRound) -> list[llm.ChatMessage]:
    """A round as the next call sends it: the assistant's tool calls, then
    one `tool` message per result."""
    return with_tool_rounds("", [round_])


def spoken(text: str, end: llm.StreamEnd) -> str:
    """What a call that asked for tools produced (its estimate, when the
    server sent no usage): its text and its calls."""
    return text + "".join(call.name + call.arguments for call in end.tool_calls)
