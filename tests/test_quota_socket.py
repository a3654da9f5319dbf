"""Budgets at the socket: an answer the quota cannot cover is refused with
`quota_exceeded` and when to retry; an answer that ran is settled."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from accounts.models import Quota, QuotaCounter
from conversations import generation
from conversations.models import Message, TokenUsage
from tests.conftest import connect
from tests.fake_llm import Reply
from tests.test_consumer import ask

pytestmark = pytest.mark.django_db(transaction=True)


def send(content: str = "hi", conversation: Any = None) -> dict[str, Any]:
    return {
        "type": "message.send",
        "conversation": conversation,
        "content": content,
        "client_id": str(uuid.uuid4()),
    }


async def test_a_budget_too_small_for_an_answer_refuses_it_and_stores_nothing(
    alice: Any, fake_llm: Any, settings: Any
) -> None:
    settings.OPENAI_MAX_TOKENS = 500
    await Quota.objects.acreate(user=alice, tokens_per_day=400)
    ws = await connect(alice)
    frame = send()
    await ws.send_json_to(frame)
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (error["type"], error["code"], error["client_id"]) == (
        "error",
        "quota_exceeded",
        frame["client_id"],
    )
    assert 0 < error["retry_after"] <= 24 * 3600
    assert "resets" in error["message"]
    assert await Message.objects.acount() == 0
    assert fake_llm.requests == []


async def test_answers_per_minute(alice: Any, fake_llm: Any) -> None:
    await Quota.objects.acreate(user=alice, answers_per_minute=1)
    ws = await connect(alice)
    first = await ask(ws)
    await ws.send_json_to(send("again", first[0]["conversation"]["id"]))
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert error["code"] == "quota_exceeded"
    assert 0 < error["retry_after"] <= 60


async def test_an_answer_settles_what_it_really_used(alice: Any, fake_llm: Any, settings: Any) -> None:
    settings.CHAT_AUTO_TITLE = False
    await Quota.objects.acreate(user=alice, tokens_per_day=100_000)
    fake_llm.script(Reply(usage=(120, 30)))
    ws = await connect(alice)
    await ask(ws)
    await ws.disconnect()
    await generation.wait_all()
    day = await QuotaCounter.objects.aget(user=alice, window=QuotaCounter.Window.DAY)
    assert (day.tokens_used, day.tokens_reserved) == (150, 0)
    assert await TokenUsage.objects.acount() == 1


async def test_a_stopped_answer_settles_its_estimate(alice: Any, fake_llm: Any, settings: Any) -> None:
    from tests.test_consumer import frames_until

    settings.CHAT_AUTO_TITLE = False
    await Quota.objects.acreate(user=alice, tokens_per_day=100_000)
    fake_llm.script(Reply(chunks=["word "] * 300, delay=0.02))
    ws = await connect(alice)
    await ws.send_json_to(send("talk"))
    frames = await frames_until(ws, "generation.delta")
    await ws.send_json_to({"type": "generation.stop", "conversation": frames[0]["conversation"]["id"]})
    await frames_until(ws, "generation.finished")
    await generation.wait_all()
    await ws.disconnect()
    usage = await TokenUsage.objects.aget()
    day = await QuotaCounter.objects.aget(user=alice, window=QuotaCounter.Window.DAY)
    assert usage.estimated
    assert (day.tokens_used, day.tokens_reserved) == (usage.prompt_tokens + usage.completion_tokens, 0)
