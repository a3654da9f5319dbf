"""Regenerate, edit, continue and titles: new versions never delete old ones."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from conversations import generation
from conversations.models import Conversation, Message, TokenUsage
from tests.conftest import connect
from tests.fake_llm import Reply
from tests.test_consumer import ask, frames_until, of_type

pytestmark = pytest.mark.django_db(transaction=True)


async def first_turn(ws: Any, fake_llm: Any, answer: list[str], **reply: Any) -> list[dict[str, Any]]:
    fake_llm.script(Reply(chunks=answer, **reply))
    return await ask(ws, "What is two plus two?")


async def frame_to(ws: Any, frame: dict[str, Any]) -> list[dict[str, Any]]:
    await ws.send_json_to(frame)
    frames = await frames_until(ws, "generation.finished")
    await generation.wait_all()
    return frames


async def active(conversation_id: str) -> list[tuple[str, str]]:
    rows = Message.objects.filter(conversation_id=conversation_id, is_active=True).order_by("created_at")
    return [(m.role, m.content) async for m in rows]


async def test_regenerate_makes_a_second_version_and_keeps_the_first(alice: Any, fake_llm: Any) -> None:
    ws = await connect(alice)
    first = await first_turn(ws, fake_llm, ["Five."])
    conversation = first[0]["conversation"]["id"]
    old_answer = first[-1]["message"]
    fake_llm.script(Reply(chunks=["Four."]))
    frames = await frame_to(ws, {"type": "message.regenerate", "conversation": conversation})
    await ws.disconnect()

    started = of_type(frames, "generation.started")[0]
    assert started["replaces"] == old_answer
    assert of_type(frames, "message.created") == []  # no new question
    assert frames[-1]["content"] == "Four."
    assert await active(conversation) == [("user", "What is two plus two?"), ("assistant", "Four.")]
    old = await Message.objects.aget(pk=old_answer)
    new = await Message.objects.aget(pk=frames[-1]["message"])
    assert (old.is_active, old.content) == (False, "Five.")
    assert new.version_group == old.version_group == uuid.UUID(started["version_group"])
    # The model saw the question again, not the replaced answer.
    assert fake_llm.streamed_requests[-1].body["messages"] == [
        {"role": "user", "content": "What is two plus two?"}
    ]


async def test_retry_of_a_failed_answer_is_a_regenerate(alice: Any, fake_llm: Any) -> None:
    ws = await connect(alice)
    first = await first_turn(ws, fake_llm, ["x"], status=500)
    assert first[-1]["status"] == "failed"
    frames = await frame_to(
        ws, {"type": "message.regenerate", "conversation": first[0]["conversation"]["id"]}
    )
    await ws.disconnect()
    assert frames[-1]["status"] == "complete"


async def test_edit_replaces_the_last_question_and_its_answer(alice: Any, fake_llm: Any) -> None:
    ws = await connect(alice)
    first = await first_turn(ws, fake_llm, ["Five."])
    conversation = first[0]["conversation"]["id"]
    old_question = of_type(first, "message.created")[0]["message"]
    fake_llm.script(Reply(chunks=["Six."]))
    frame = {
        "type": "message.edit",
        "conversation": conversation,
        "message": old_question["id"],
        "content": "What is three plus three?",
        "client_id": str(uuid.uuid4()),
    }
    frames = await frame_to(ws, frame)

    created = of_type(frames, "message.created")[0]
    assert created["client_id"] == frame["client_id"]
    assert created["replaces"] == old_question["id"]
    assert created["message"]["version_group"] == old_question["version_group"]
    assert of_type(frames, "generation.started")[0]["replaces"] == first[-1]["message"]
    assert await active(conversation) == [("user", "What is three plus three?"), ("assistant", "Six.")]
    assert await Message.objects.filter(conversation_id=conversation).acount() == 4  # nothing deleted

    # The same edit frame again creates nothing.
    await ws.send_json_to(frame)
    assert (await ws.receive_json_from())["type"] == "message.created"
    assert await Message.objects.filter(conversation_id=conversation).acount() == 4
    await ws.disconnect()


async def test_only_the_last_question_can_be_edited(alice: Any, fake_llm: Any) -> None:
    ws = await connect(alice)
    first = await first_turn(ws, fake_llm, ["Five."])
    conversation = first[0]["conversation"]["id"]
    old_question = of_type(first, "message.created")[0]["message"]["id"]
    await ask(ws, "And three plus three?", conversation)
    await ws.send_json_to(
        {
            "type": "message.edit",
            "conversation": conversation,
            "message": old_question,
            "content": "changed",
            "client_id": str(uuid.uuid4()),
        }
    )
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (error["type"], error["code"]) == ("error", "invalid_request")
    assert "last question" in error["message"]


async def test_continue_goes_on_after_a_truncated_answer(alice: Any, fake_llm: Any) -> None:
    ws = await connect(alice)
    first = await first_turn(ws, fake_llm, ["The answer is"], finish_reason="length")
    assert first[-1]["status"] == "truncated"
    conversation = first[0]["conversation"]["id"]
    fake_llm.script(Reply(chunks=[" four."]))
    frames = await frame_to(ws, {"type": "message.continue", "conversation": conversation})
    await ws.disconnect()

    assert of_type(frames, "generation.started")[0]["continues"] == first[-1]["message"]
    assert frames[-1]["content"] == " four."
    sent = fake_llm.streamed_requests[-1].body["messages"]
    assert sent[-2] == {"role": "assistant", "content": "The answer is"}
    assert sent[-1]["role"] == "user"
    assert sent[-1]["content"] == generation.CONTINUE_INSTRUCTION
    assert await active(conversation) == [
        ("user", "What is two plus two?"),
        ("assistant", "The answer is"),
        ("assistant", " four."),
    ]


@pytest.mark.parametrize("frame_type", ["message.regenerate", "message.continue"])
async def test_nothing_to_regenerate_or_continue_is_invalid_request(
    alice: Any, fake_llm: Any, frame_type: str
) -> None:
    conversation = await Conversation.objects.acreate(owner=alice)
    ws = await connect(alice)
    await ws.send_json_to({"type": frame_type, "conversation": str(conversation.id)})
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (error["code"], error["conversation"]) == ("invalid_request", str(conversation.id))


async def test_regenerate_while_streaming_is_busy(alice: Any, fake_llm: Any) -> None:
    ws = await connect(alice)
    fake_llm.script(Reply(chunks=["slow "] * 20, delay=0.03))
    await ws.send_json_to(
        {"type": "message.send", "conversation": None, "content": "hi", "client_id": str(uuid.uuid4())}
    )
    started = await frames_until(ws, "generation.started")
    await ws.send_json_to({"type": "message.regenerate", "conversation": started[0]["conversation"]["id"]})
    frames = await frames_until(ws, "error")
    await frames_until(ws, "generation.finished")
    await generation.wait_all()
    await ws.disconnect()
    assert frames[-1]["code"] == "busy"


async def test_other_users_cannot_regenerate_edit_or_continue(alice: Any, bob: Any, fake_llm: Any) -> None:
    ws = await connect(alice)
    first = await first_turn(ws, fake_llm, ["Five."])
    await ws.disconnect()
    conversation = first[0]["conversation"]["id"]
    question = of_type(first, "message.created")[0]["message"]["id"]
    stranger = await connect(bob)
    for frame in (
        {"type": "message.regenerate", "conversation": conversation},
        {"type": "message.continue", "conversation": conversation},
        {
            "type": "message.edit",
            "conversation": conversation,
            "message": question,
            "content": "mine now",
            "client_id": str(uuid.uuid4()),
        },
    ):
        await stranger.send_json_to(frame)
        assert (await stranger.receive_json_from(timeout=5))["code"] == "not_found"
    await stranger.disconnect()
    assert await Message.objects.filter(conversation_id=conversation).acount() == 2


async def test_first_answer_gets_a_model_made_title_accounted_in_the_ledger(
    alice: Any, fake_llm: Any
) -> None:
    fake_llm.script_completion(Reply(chunks=['"Adding small numbers."'], usage=(55, 4)))
    ws = await connect(alice)
    await ws.send_json_to(
        {"type": "message.send", "conversation": None, "content": "2+2?", "client_id": str(uuid.uuid4())}
    )
    frames = await frames_until(ws, "generation.finished")
    updated = await ws.receive_json_from(timeout=5)
    await generation.wait_all()
    conversation_id = frames[0]["conversation"]["id"]
    assert updated == {
        "type": "conversation.updated",
        "conversation": {"id": conversation_id, "title": "Adding small numbers"},
    }
    assert (await Conversation.objects.aget(pk=conversation_id)).title == "Adding small numbers"
    title_call = fake_llm.completion_requests[0].body
    assert title_call["messages"][1] == {"role": "user", "content": "2+2?"}
    usage = await TokenUsage.objects.aget(kind="title")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.conversation_id) == (
        55,
        4,
        uuid.UUID(conversation_id),
    )

    # A second answer makes no second title.
    await ask(ws, "and 3+3?", conversation_id)
    await ws.disconnect()
    assert len(fake_llm.completion_requests) == 1


async def test_a_failed_title_call_leaves_the_provisional_title(alice: Any, fake_llm: Any) -> None:
    fake_llm.script_completion(Reply.error_reply(500))
    ws = await connect(alice)
    frames = await ask(ws, "Tell me about owls")
    await ws.disconnect()
    conversation = await Conversation.objects.aget(pk=frames[0]["conversation"]["id"])
    assert conversation.title == "Tell me about owls"
    assert not await TokenUsage.objects.filter(kind="title").aexists()


async def test_demo_model_titles_from_the_question(alice: Any, demo_mode: None, monkeypatch: Any) -> None:
    from conversations import llm

    monkeypatch.setattr(llm.demo, "DEMO_DELAY", 0)
    ws = await connect(alice)
    frames = await ask(ws, "how do owls see at night in the dark forest?")
    await ws.disconnect()
    conversation = await Conversation.objects.aget(pk=frames[0]["conversation"]["id"])
    assert conversation.title == "How do owls see at night…"
    assert frames[-1]["model"] == "demo"


async def test_titles_are_asked_as_json_and_never_keep_markdown(alice: Any, fake_llm: Any) -> None:
    fake_llm.script_completion(Reply(chunks=['{"title": "## **Owls** at [night](https://x.example)."}']))
    ws = await connect(alice)
    frames = await ask(ws, "Tell me about owls")
    await ws.disconnect()
    await generation.wait_all()
    conversation = await Conversation.objects.aget(pk=frames[0]["conversation"]["id"])
    assert conversation.title == "Owls at night"
    assert fake_llm.completion_requests[0].body["response_format"] == {"type": "json_object"}


async def test_a_server_without_json_output_is_asked_in_plain_text(alice: Any, fake_llm: Any) -> None:
    from conversations import llm

    llm.forget_refusals()
    fake_llm.script_completion(
        Reply.error_reply(400, "response_format is not supported", code="invalid_request_error"),
        Reply(chunks=["# Plain *owl* title"], usage=(20, 4)),
        Reply(chunks=["Second title"], usage=(20, 2)),
    )
    ws = await connect(alice)
    first = await ask(ws, "Tell me about owls")
    second = await ask(ws, "And about bats")
    await ws.disconnect()
    await generation.wait_all()
    titles = [
        (await Conversation.objects.aget(pk=frames[0]["conversation"]["id"])).title
        for frames in (first, second)
    ]
    assert titles == ["Plain owl title", "Second title"]
    asked = [r.body.get("response_format") for r in fake_llm.completion_requests]
    assert asked == [{"type": "json_object"}, None, None]  # refused once, then remembered
    # The refused request cost nothing: one ledger row per title that was made.
    assert await TokenUsage.objects.filter(kind="title").acount() == 2


async def test_the_answer_names_the_fallback_model_that_answered(
    alice: Any, fake_llm: Any, settings: Any
) -> None:
    settings.OPENAI_FALLBACK_MODELS = ["backup-model"]
    fake_llm.failing_models["fake-model"] = Reply.error_reply(503, "overloaded")
    fake_llm.script(Reply(chunks=["Backup", " here."], model="backup-model", usage=(9, 2)))
    ws = await connect(alice)
    frames = await ask(ws, "Anyone there?")
    await ws.disconnect()
    await generation.wait_all()
    finished = frames[-1]
    assert (finished["status"], finished["content"], finished["model"]) == (
        "complete",
        "Backup here.",
        "backup-model",
    )
    assert not any(f["type"] == "error" for f in frames)  # the first model's failure is not the user's
    answer = await Message.objects.aget(pk=finished["message"])
    assert answer.model == "backup-model"
    usage = await TokenUsage.objects.aget(kind="answer")
    assert (usage.model, usage.prompt_tokens, usage.completion_tokens) == ("backup-model", 9, 2)
