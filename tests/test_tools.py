"""The tool registry: each built-in tool, the checks on the model's untrusted
arguments, failures and timeouts as results, and which tools are offered."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conversations import tools
from conversations.models import Conversation
from conversations.tools import REGISTRY, Tool, ToolContext, ToolResult, call, offered, openai_tools
from conversations.tools.calculator import calculate
from tests.factories import make_conversation, make_message, make_turn

CONTEXT = ToolContext(user_id=1)


async def run(name: str, **arguments: Any) -> ToolResult:
    return await call(name, json.dumps(arguments), CONTEXT)


# --- current_time -------------------------------------------------------------------


async def test_current_time_tells_the_date_time_weekday_and_offset_there() -> None:
    result = await run("current_time", timezone="Asia/Tokyo")

    assert result.ok, result.content
    assert result.summary == "current_time (Asia/Tokyo)"
    stamp = datetime.fromisoformat(result.content.rsplit("ISO 8601: ", 1)[1])
    assert stamp.utcoffset() == timedelta(hours=9)  # Japan keeps no summer time
    assert abs(stamp - datetime.now(UTC)) < timedelta(seconds=5)
    assert f"{stamp:%A}, {stamp:%Y-%m-%d}, {stamp:%H:%M:%S}" in result.content
    assert "UTC+09:00" in result.content


async def test_current_time_forgives_the_case_of_a_zone_name() -> None:
    result = await run("current_time", timezone="europe/paris")

    assert result.ok
    assert "In Europe/Paris it is" in result.content


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "Asia"])
async def test_current_time_names_an_unknown_zone(zone: str) -> None:
    result = await run("current_time", timezone=zone)

    assert not result.ok
    assert result.content.startswith(f"error: unknown time zone {zone!r}")


# --- calculator ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", "7"),
        ("(1.5 + 2) * 3 ** 2", "31.5"),
        ("0.1 + 0.2", "0.3"),
        ("10 / 4", "2.5"),
        ("-3 ** 2", "-9"),
        ("2 ** -1", "0.5"),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("1 / 3", "0.333333333333333333333333333333"),
        ("2 ** 0.5 * 2 ** 0.5", "2"),
        ("1e3 + 1_000", "2000"),
        ("7.50 * 2", "15"),
    ],
)
async def test_calculator_does_arithmetic_as_a_person_expects(expression: str, expected: str) -> None:
    result = await run("calculator", expression=expression)

    assert result == ToolResult(ok=True, content=expected, summary=f"calculator ({expression})")


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("x + 1", "names are not allowed"),
        ("abs(-1)", "function calls are not allowed"),
        ("(1).real", "attribute access is not allowed"),
        ("'1' + '1'", "text is not allowed"),
        ("__import__('os').system('true')", "not allowed"),
        ("(lambda: 1)()", "not allowed"),
        ("lambda: 1", "lambdas are not allowed"),
        ("1 < 2", "comparisons are not allowed"),
        ("2 ^ 3", "the operator ^ (for powers use **) is not allowed"),
        ("7 % 2", "the operator % is not allowed"),
        ("True + 1", "True is not allowed"),
        ("1j * 1j", "1j is not allowed"),
        ("[1][0]", "indexing is not allowed"),
        ("import os", "not a valid arithmetic expression"),
        ("1; 2", "not a valid arithmetic expression"),
        ("9 ** 9 ** 9", "the exponent is too large"),
        ("2 ** 100000", "the exponent is too large"),
        ("(10 ** 1000) ** 1001", "the exponent is too large"),
        ("(2 ** 1000) ** 1000", "the result is too large"),
        ("1 / 0", "division by zero"),
        ("0 / 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("(-8) ** (1 / 3)", "the result is not a real number"),
    ],
)
async def test_calculator_refuses_what_is_not_arithmetic(expression: str, reason: str) -> None:
    result = await run("calculator", expression=expression)

    assert not result.ok
    assert result.content.startswith("error: ")
    assert reason in result.content


async def test_calculator_refuses_a_too_long_expression_before_parsing_it() -> None:
    result = await run("calculator", expression="1+" * 150 + "1")

    assert not result.ok
    assert "'expression' is too long: 301 characters, at most 200" in result.content


def test_calculator_refuses_a_huge_expression_even_called_directly() -> None:
    with pytest.raises(tools.ToolError, match="too long"):
        calculate("(" * 10_000 + "1" + ")" * 10_000)
    with pytest.raises(tools.ToolError, match="too complex"):
        calculate("-" * 199 + "1")


# --- search_conversations -------------------------------------------------------------


@pytest.fixture
def two_users_chats(alice: Any, bob: Any) -> dict[str, Any]:
    trip = make_conversation(alice, title="Trip to Kyoto")
    make_turn(trip, "Remember the codeword: pineapple-42, please.", "Noted: pineapple-42.")
    recipe = make_conversation(alice, title="Pineapple cake")
    make_turn(recipe, "How long to bake?", "About 40 minutes.")
    make_conversation(alice, title="Unrelated")
    secret = make_conversation(bob, title="Bob's pineapple notes")
    make_message(secret, "user", "Bob's private pineapple-42 diary")
    return {"alice": alice, "bob": bob, "trip": trip, "recipe": recipe, "secret": secret}


@pytest.mark.django_db(transaction=True)
async def test_search_conversations_finds_the_users_titles_and_messages(
    two_users_chats: dict[str, Any],
) -> None:
    context = ToolContext(user_id=two_users_chats["alice"].pk)

    result = await call("search_conversations", json.dumps({"query": "PINEAPPLE"}), context)

    assert result.ok, result.content
    assert result.summary == "search_conversations (PINEAPPLE)"
    assert '"Pineapple cake" (last active ' in result.content
    assert '"Trip to Kyoto" (last active ' in result.content
    assert "codeword: pineapple-42" in result.content  # the snippet around the match
    assert "Unrelated" not in result.content
    assert "Bob" not in result.content


@pytest.mark.django_db(transaction=True)
async def test_search_conversations_never_returns_another_users_text(
    two_users_chats: dict[str, Any],
) -> None:
    as_alice = ToolContext(user_id=two_users_chats["alice"].pk)
    as_bob = ToolContext(user_id=two_users_chats["bob"].pk)

    for_alice = await call("search_conversations", json.dumps({"query": "diary"}), as_alice)
    for_bob = await call("search_conversations", json.dumps({"query": "Kyoto"}), as_bob)
    bobs_own = await call("search_conversations", json.dumps({"query": "pineapple-42"}), as_bob)

    assert for_alice.ok and "No earlier conversation" in for_alice.content
    assert "diary" in for_alice.content and "Bob" not in for_alice.content
    assert for_bob.ok and "No earlier conversation" in for_bob.content
    assert "Bob's private pineapple-42 diary" in bobs_own.content
    assert "codeword" not in bobs_own.content and "Kyoto" not in bobs_own.content


@pytest.mark.django_db(transaction=True)
async def test_search_conversations_leaves_out_the_conversation_asking(
    two_users_chats: dict[str, Any],
) -> None:
    recipe = two_users_chats["recipe"]
    context = ToolContext(user_id=two_users_chats["alice"].pk, conversation_id=str(recipe.pk))

    result = await call("search_conversations", json.dumps({"query": "pineapple"}), context)

    assert "Trip to Kyoto" in result.content
    assert "Pineapple cake" not in result.content


@pytest.mark.django_db(transaction=True)
async def test_search_conversations_refuses_a_blank_query(two_users_chats: dict[str, Any]) -> None:
    context = ToolContext(user_id=two_users_chats["alice"].pk)

    result = await call("search_conversations", json.dumps({"query": "   "}), context)

    # The sidebar reads a blank query as "everything": never list every conversation.
    assert result == ToolResult(ok=False, content="error: the query is empty", summary="search_conversations")


@pytest.fixture
def eight_budgets(alice: Any) -> Any:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    for number in range(8):
        budget = make_conversation(alice, title=f"Budget {number}")
        # Distinct times: the sidebar's order among equal ones is by random uuid.
        Conversation.objects.filter(pk=budget.pk).update(updated_at=start + timedelta(days=number))
    return alice


@pytest.mark.django_db(transaction=True)
async def test_search_conversations_shows_the_five_most_recent_and_says_there_are_more(
    eight_budgets: Any,
) -> None:
    alice = eight_budgets

    result = await call("search_conversations", json.dumps({"query": "budget"}), ToolContext(alice.pk))

    assert [f'"Budget {n}"' in result.content for n in range(8)] == [False] * 3 + [True] * 5
    assert "only the 5 most recent are shown" in result.content


# --- the model's arguments are untrusted ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arguments", "reason"),
    [
        ("weather", "{}", "unknown tool 'weather' (the tools are: current_time, calculator, "),
        ("calculator", '{"expression": "1+1"', "the arguments are not valid JSON"),
        ("calculator", "[1, 2]", "invalid arguments: the arguments must be an object, not an array"),
        ("calculator", '"1+1"', "the arguments must be an object, not a string"),
        ("calculator", "null", "the arguments must be an object, not null"),
        ("calculator", "{}", "invalid arguments: the arguments: missing required 'expression'"),
        ("calculator", "", "missing required 'expression'"),
        (
            "calculator",
            '{"expression": "1", "precision": 3}',
            "unexpected 'precision' (allowed: 'expression')",
        ),
        ("calculator", '{"expression": 12}', "'expression' must be a string, not a number"),
        ("current_time", '{"timezone": true}', "'timezone' must be a string, not a boolean"),
        ("current_time", '{"timezone": ""}', "'timezone' is too short: 0 characters, at least 1"),
        ("calculator", "[" * 100_000, "the arguments are too long"),
        ("calculator", "[" * 5000 + "]" * 5000, "not valid JSON"),
    ],
)
async def test_bad_calls_become_error_results(name: str, arguments: str, reason: str) -> None:
    result = await call(name, arguments, CONTEXT)

    assert not result.ok
    assert result.content.startswith("error: ")
    assert reason in result.content, result.content


async def test_a_tool_not_offered_is_refused() -> None:
    result = await call("calculator", '{"expression": "1+1"}', CONTEXT, tools=offered("current_time"))

    assert result == ToolResult(
        ok=False,
        content="error: unknown tool 'calculator' (the tools are: current_time)",
        summary="calculator",
    )


def test_the_validator_checks_numbers_integers_enums_and_ranges() -> None:
    from conversations.tools.schema import problem

    count = {"type": "integer", "minimum": 1, "maximum": 10}
    assert problem(count, 3) is None
    assert problem(count, 3.0) is None  # JSON has no separate integers
    assert problem(count, 3.5) == "the arguments must be an integer, not a number"
    assert problem(count, 0) == "the arguments must be at least 1"
    assert problem(count, 11) == "the arguments must be at most 10"
    assert problem(count, True) == "the arguments must be an integer, not a boolean"
    assert problem({"type": "number"}, float("nan")) == "the arguments must be a finite number"
    assert problem({"type": "string", "enum": ["c", "f"]}, "k") == "the arguments must be one of 'c', 'f'"
    assert problem({"type": "boolean"}, 1) == "the arguments must be a boolean, not a number"


def test_a_tool_declaring_what_the_validator_does_not_enforce_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported schema keywords \\['pattern'\\]"):
        Tool(
            name="lookup",
            description="",
            parameters={"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}},
            function=lambda context, arguments: "",
        )
    with pytest.raises(ValueError, match="Bad tool name"):
        Tool(name="Look-up", description="", parameters={"type": "object"}, function=lambda c, a: "")


# --- failures and timeouts ------------------------------------------------------------------


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Registers a tool for one test (removed after it)."""

    def register(function: Any, **fields: Any) -> Tool:
        tool = Tool(
            name="test_tool",
            description="A tool of the tests.",
            parameters={"type": "object", "properties": {}, "additionalProperties": False},
            function=function,
            **fields,
        )
        monkeypatch.setitem(REGISTRY, tool.name, tool)
        return tool

    return register


async def test_a_tool_that_raises_is_an_error_result_without_the_traceback(
    registered: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(context: ToolContext, arguments: dict[str, Any]) -> str:
        raise KeyError("secret-internal-detail")

    registered(broken)

    with caplog.at_level(logging.ERROR, logger="conversations.tools"):
        result = await call("test_tool", "{}", CONTEXT)

    assert result == ToolResult(ok=False, content="error: the tool failed: KeyError", summary="test_tool")
    assert "secret-internal-detail" in caplog.text and "Traceback" in caplog.text  # for staff only


async def test_a_tool_that_takes_too_long_is_an_error_result(registered: Any) -> None:
    released = threading.Event()
    registered(lambda context, arguments: str(released.wait(30)), timeout=0.05)

    try:
        result = await call("test_tool", "{}", CONTEXT)
    finally:
        released.set()  # the abandoned thread ends, and the loop can close

    assert result == ToolResult(
        ok=False, content="error: the tool took longer than 0.05 s", summary="test_tool"
    )


@pytest.mark.django_db(transaction=True)
async def test_a_database_tool_runs_where_database_work_runs(registered: Any, alice: Any) -> None:
    from django.contrib.auth import get_user_model

    registered(
        lambda context, arguments: get_user_model().objects.get(pk=context.user_id).username,
        uses_database=True,
    )

    result = await call("test_tool", "{}", ToolContext(user_id=alice.pk))

    assert result == ToolResult(ok=True, content="alice", summary="test_tool")


async def test_a_long_result_is_cut_and_says_so(registered: Any) -> None:
    registered(lambda context, arguments: "x" * 10_000)

    result = await call("test_tool", "{}", CONTEXT)

    assert result.ok
    assert result.content == "x" * 4000 + "\n[cut: the result had 10000 characters]"


# --- which tools are offered -------------------------------------------------------------------


def test_every_built_in_tool_is_offered_when_chat_tools_is_unset(settings: Any) -> None:
    settings.CHAT_TOOLS = None

    assert [tool.name for tool in offered()] == ["current_time", "calculator", "search_conversations"]


def test_no_tool_is_offered_when_chat_tools_is_empty(settings: Any) -> None:
    settings.CHAT_TOOLS = ""

    assert offered() == []
    assert offered(" ") == []


def test_unknown_names_are_left_out_with_a_warning(settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    settings.CHAT_TOOLS = "current_time"

    with caplog.at_level(logging.WARNING, logger="conversations.tools"):
        chosen = offered("calculator, unknown,calculator")

    assert [tool.name for tool in chosen] == ["calculator"]
    assert "Unknown tool 'unknown'" in caplog.text
    assert [tool.name for tool in offered()] == ["current_time"]


@pytest.mark.parametrize(("value", "expected"), [("", "''"), ("calculator", "'calculator'")])
def test_chat_tools_is_read_as_set_in_the_environment(value: str, expected: str) -> None:
    # django-environ turns "" into None for a None default: "" must stay "none".
    probe = "import chatsite.settings as s; print(repr(s.CHAT_TOOLS))"
    env = {**os.environ, "CHAT_TOOLS": value}
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert shown.stdout.strip() == expected


def test_openai_tools_is_the_chat_completions_shape() -> None:
    shaped = openai_tools(offered("calculator"))

    assert shaped == [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": REGISTRY["calculator"].description,
                "parameters": {
                    "type": "object",
                    "properties": {
                        "expression": {
                            "type": "string",
                            "description": "The arithmetic expression, e.g. (1.5 + 2) * 3 ** 2",
                            "minLength": 1,
                            "maxLength": 200,
                        }
                    },
                    "required": ["expression"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    shaped[0]["function"]["parameters"]["required"].clear()
    assert REGISTRY["calculator"].parameters["required"] == ["expression"]  # a copy
    json.dumps(openai_tools(offered()))  # every tool's declaration is plain JSON
