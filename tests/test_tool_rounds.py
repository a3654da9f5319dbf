"""Tool rounds in the life of an answer: the model streams tool calls, the
answer runs them, sends the results back in the shape the Chat Completions
API wants and streams the model's next turn into the same answer; every
model call has its own ledger row."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from conversations import generation, tools
from conversations.models import Message, TokenUsage
from tests.conftest import connect
from tests.fake_llm import Reply
from tests.test_consumer import ask, frames_until, of_type, send_frame

pytestmark = pytest.mark.django_db(transaction=True)

CALLS = [
    {"id": "call_time", "name": "current_time", "arguments": '{"timezone": "Asia/Tokyo"}'},
    {"id": "call_calc", "name": "calculator", "arguments": '{"expression": "2 ** 10"}'},
]


async def test_a_tool_round_trip(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(
        Reply(chunks=["Checking. "], finish_reason="tool_calls", tool_calls=CALLS, usage=(50, 20)),
        Reply(chunks=["It is late in Tokyo; ", "2**10 is 1024."], usage=(90, 12)),
    )
    ws = await connect(alice)
    frames = await ask(ws, "What time is it in Tokyo, and what is 2**10?")
    await ws.disconnect()

    # The page saw the tools run, then the rest of the answer.
    chips = of_type(frames, "generation.tool")
    assert [(c["name"], c["summary"], c["ok"]) for c in chips] == [
        ("current_time", "current_time (Asia/Tokyo)", True),
        ("calculator", "calculator (2 ** 10)", True),
    ]
    assert chips[1]["result"] == "1024"
    finished = frames[-1]
    assert finished["content"] == "Checking. It is late in Tokyo; 2**10 is 1024."
    assert "".join(f["text"] for f in of_type(frames, "generation.delta")) == finished["content"]

    # The second request carries the assistant's tool calls, then one `tool`
    # message per call with its id, exactly as the API wants them.
    first, second = fake_llm.streamed_requests[-2:]
    assert [t["function"]["name"] for t in first.body["tools"]] == [
        "current_time",
        "calculator",
        "search_conversations",
    ]
    tail = second.body["messages"][-3:]
    assert tail[0]["role"] == "assistant" and tail[0]["content"] == "Checking. "
    assert [(c["id"], c["type"], c["function"]["name"]) for c in tail[0]["tool_calls"]] == [
        ("call_time", "function", "current_time"),
        ("call_calc", "function", "calculator"),
    ]
    assert (
        tail[1]["role"] == "tool"
        and tail[1]["tool_call_id"] == "call_time"
        and "Asia/Tokyo" in tail[1]["content"]
    )
    assert tail[2] == {"role": "tool", "tool_call_id": "call_calc", "content": "1024"}

    # Each model call has its own ledger row; the frame's usage is their sum.
    rows = [r async for r in TokenUsage.objects.filter(kind="answer").order_by("created_at")]
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(50, 20), (90, 12)]
    assert finished["usage"]["prompt_tokens"] == 140 and finished["usage"]["completion_tokens"] == 32
    answer = await Message.objects.aget(pk=finished["message"])
    assert answer.tool_rounds is not None
    assert [c["name"] for c in answer.tool_rounds[0]["calls"]] == ["current_time", "calculator"]


async def test_a_later_turn_sends_the_tool_round_back(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(
        Reply(chunks=[], finish_reason="tool_calls", tool_calls=CALLS[1:]),
        Reply(chunks=["1024."]),
        Reply(chunks=["Yes."]),
    )
    ws = await connect(alice)
    first = await ask(ws, "2**10?")
    conversation = first[0]["conversation"]["id"]
    await ask(ws, "Sure?", conversation)
    await ws.disconnect()

    later = fake_llm.streamed_requests[-1].body["messages"]
    roles = [(m["role"], m.get("tool_call_id")) for m in later if m["role"] != "system"]
    assert roles == [
        ("user", None),
        ("assistant", None),
        ("tool", "call_calc"),
        ("assistant", None),
        ("user", None),
    ]
    assert later[-3]["content"] == "1024" and later[-2]["content"] == "1024."
    assert later[-4]["tool_calls"][0]["function"]["arguments"] == '{"expression": "2 ** 10"}'


async def test_bad_arguments_go_back_to_the_model_as_an_error(alice: Any, fake_llm: Any) -> None:
    bad = [{"id": "call_x", "name": "calculator", "arguments": '{"expression": "__import__(\'os\')"}'}]
    fake_llm.script(
        Reply(chunks=[], finish_reason="tool_calls", tool_calls=bad),
        Reply(chunks=["I cannot compute that."]),
    )
    ws = await connect(alice)
    frames = await ask(ws, "Run something")
    await ws.disconnect()

    [chip] = of_type(frames, "generation.tool")
    assert chip["ok"] is False and chip["result"].startswith("error:")
    sent = fake_llm.streamed_requests[-1].body["messages"][-1]
    assert sent["role"] == "tool" and sent["content"].startswith("error:")
    assert frames[-1]["status"] == "complete"


async def test_the_rounds_are_limited(alice: Any, fake_llm: Any, settings: Any) -> None:
    settings.CHAT_TOOL_ROUNDS = 2
    again = Reply(chunks=[], finish_reason="tool_calls", tool_calls=CALLS[1:])
    fake_llm.script(again, again, Reply(chunks=["Enough tools."]))
    ws = await connect(alice)
    frames = await ask(ws, "Loop")
    await ws.disconnect()

    assert len(of_type(frames, "generation.tool")) == 2
    requests = fake_llm.streamed_requests[-3:]
    assert ["tools" in r.body for r in requests] == [True, True, False]  # the last call must answer
    assert frames[-1]["content"] == "Enough tools."


async def test_no_tools_offered_when_chat_tools_is_empty(alice: Any, fake_llm: Any, settings: Any) -> None:
    settings.CHAT_TOOLS = ""
    ws = await connect(alice)
    await ask(ws, "Hello")
    await ws.disconnect()
    assert "tools" not in fake_llm.streamed_requests[-1].body


async def test_stop_during_a_tool_round(alice: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(_context: Any, _arguments: dict[str, Any]) -> str:
        started.set()
        release.wait(10)
        return "late"

    slow_tool = tools.Tool(
        name="slow", description="Slow.", parameters={"type": "object", "properties": {}}, function=slow
    )
    monkeypatch.setitem(tools.REGISTRY, "slow", slow_tool)
    fake_llm.script(
        Reply(
            chunks=["Wait. "],
            finish_reason="tool_calls",
            tool_calls=[{"id": "c1", "name": "slow", "arguments": "{}"}],
        )
    )
    ws = await connect(alice)
    await ws.send_json_to(send_frame("Do the slow thing"))
    frames = await frames_until(ws, "generation.delta")
    conversation = frames[0]["conversation"]["id"]
    await asyncio.to_thread(started.wait, 10)
    await ws.send_json_to({"type": "generation.stop", "conversation": conversation})
    frames += await frames_until(ws, "generation.finished")
    release.set()
    await generation.wait_all()
    await ws.disconnect()

    finished = frames[-1]
    assert (finished["status"], finished["content"]) == ("stopped", "Wait. ")
    assert len(fake_llm.streamed_requests) == 1  # no second call after the stop
    # The call that asked for the tool is accounted.
    assert await TokenUsage.objects.filter(kind="answer", message_id=finished["message"]).acount() == 2


async def test_a_round_is_stored_with_the_streaming_answer_at_once(alice: Any, fake_llm: Any) -> None:
    """A reload mid-answer shows the chips, and a dead worker's answer keeps them."""
    fake_llm.script(
        Reply(chunks=[], finish_reason="tool_calls", tool_calls=CALLS[1:]),
        Reply(chunks=["The answer ", "is 1024."], hang_after=1),
    )
    ws = await connect(alice)
    await ws.send_json_to(send_frame("2**10?"))
    frames = await frames_until(ws, "generation.delta")
    answer = await Message.objects.aget(pk=frames[-1]["message"])
    await ws.send_json_to({"type": "generation.stop", "conversation": frames[0]["conversation"]["id"]})
    frames += await frames_until(ws, "generation.finished")
    fake_llm.release_hangs()
    await generation.wait_all()
    await ws.disconnect()

    assert answer.status == "streaming"
    assert answer.tool_rounds is not None
    assert [r["content"] for r in answer.tool_rounds[0]["results"]] == ["1024"]
    stored = await Message.objects.aget(pk=answer.pk)
    assert stored.status == "stopped" and stored.tool_rounds == answer.tool_rounds


async def test_a_server_without_function_calling_is_asked_without_tools(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(
        Reply.error_reply(400, "tools are not supported by this server", code="invalid_request_error"),
        Reply(chunks=["Plain answer."]),
        Reply(chunks=["Another."]),
    )
    ws = await connect(alice)
    first = await ask(ws, "Hello")
    second = await ask(ws, "Again", first[0]["conversation"]["id"])
    await ws.disconnect()

    assert (first[-1]["status"], first[-1]["content"]) == ("complete", "Plain answer.")
    assert second[-1]["content"] == "Another."
    assert ["tools" in r.body for r in fake_llm.streamed_requests] == [True, False, False]  # remembered
    assert not of_type(first, "error")


# --- Per system prompt: tools and fallback models ----------------------------------------------


async def _prompt(**fields: Any) -> Any:
    from asgiref.sync import sync_to_async

    from conversations import prompts
    from conversations.models import SystemPrompt

    def make() -> Any:
        prompt = SystemPrompt(name=f"P{len(fields)}-{sorted(fields)}", text="Be useful.", **fields)
        prompts.save_prompt(prompt)
        return prompt

    return await sync_to_async(make)()


@pytest.mark.parametrize(("setting", "offered"), [("calculator", ["calculator"]), ("none", None)])
async def test_a_prompt_chooses_its_tools(alice: Any, fake_llm: Any, setting: str, offered: Any) -> None:
    prompt = await _prompt(tools=setting)
    ws = await connect(alice)
    await ask(ws, "Hi", prompt=str(prompt.pk))
    await ws.disconnect()
    body = fake_llm.streamed_requests[-1].body
    assert [t["function"]["name"] for t in body["tools"]] == offered if offered else "tools" not in body


async def test_a_prompt_has_its_own_fallback_models(alice: Any, fake_llm: Any, settings: Any) -> None:
    settings.OPENAI_FALLBACK_MODELS = ["site-backup"]
    prompt = await _prompt(model="primary", fallback_models="prompt-backup")
    fake_llm.failing_models["primary"] = Reply.error_reply(503, "down")
    fake_llm.script(Reply(chunks=["Backup answers."], model="prompt-backup"))
    ws = await connect(alice)
    frames = await ask(ws, "Hi", prompt=str(prompt.pk))
    await ws.disconnect()
    assert frames[-1]["model"] == "prompt-backup"
    assert [r.body["model"] for r in fake_llm.streamed_requests] == ["primary", "prompt-backup"]


def test_the_admin_refuses_unknown_tools(db: None) -> None:
    from conversations.admin import SystemPromptForm

    base = {"name": "T", "text": "x", "is_default": True, "model": "", "fallback_models": ""}
    form = SystemPromptForm(data={**base, "tools": "calculator, teleport"})
    assert not form.is_valid() and "teleport" in str(form.errors["tools"])
    form = SystemPromptForm(data={**base, "tools": " calculator ,current_time"})
    assert form.is_valid(), form.errors
    assert form.cleaned_data["tools"] == "calculator, current_time"
