"""The websocket contract, through the real ASGI stack (origin check, session
auth, router) with channels' WebsocketCommunicator and the fake model."""

from __future__ import annotations

import asyncio
import socket
import uuid
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from conversations import generation
from conversations.models import Conversation, Message, ModelPrice, SystemPrompt, TokenUsage
from tests.conftest import connect, dead_pid
from tests.fake_llm import Reply

pytestmark = pytest.mark.django_db(transaction=True)


def send_frame(content: str = "Hello?", conversation: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "message.send",
        "conversation": str(conversation) if conversation else None,
        "content": content,
        "client_id": str(uuid.uuid4()),
        **extra,
    }


async def frames_until(
    ws: WebsocketCommunicator, frame_type: str, timeout: float = 10
) -> list[dict[str, Any]]:
    """Every frame up to and including the first of `frame_type`."""
    frames = []
    while True:
        frame = await ws.receive_json_from(timeout=timeout)
        frames.append(frame)
        if frame["type"] == frame_type:
            return frames


def of_type(frames: list[dict[str, Any]], frame_type: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == frame_type]


async def ask(
    ws: WebsocketCommunicator, content: str = "Hello?", conversation: Any = None, **extra: Any
) -> list[dict[str, Any]]:
    """Send, return the frames up to `generation.finished`; let the answer's
    task end, and take the title it may then push (`conversation.updated`)."""
    await ws.send_json_to(send_frame(content, conversation, **extra))
    frames = await frames_until(ws, "generation.finished")
    await generation.wait_all()
    while not await ws.receive_nothing(timeout=0.05):
        assert (await ws.receive_json_from())["type"] == "conversation.updated"
    return frames


# --- Connecting ---------------------------------------------------------------------


async def test_anonymous_socket_is_accepted_then_closed_4401(db: None) -> None:
    ws = await connect(None)
    assert await ws.receive_output(timeout=2) == {"type": "websocket.close", "code": 4401}
    await ws.disconnect()


async def test_foreign_origin_is_refused(alice: Any) -> None:
    with pytest.raises(AssertionError, match="refused"):
        await connect(alice, origin="http://evil.example")


async def test_missing_origin_is_refused(alice: Any) -> None:
    with pytest.raises(AssertionError, match="refused"):
        await connect(alice, origin=None)


# --- One answer, every frame ------------------------------------------------------------


async def test_new_conversation_streams_an_answer_with_every_frame(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(Reply(chunks=["Hel", "lo", " there"], delay=0.01, usage=(21, 3)))
    ws = await connect(alice)
    frame = send_frame("Say hello")
    await ws.send_json_to(frame)
    frames = await frames_until(ws, "generation.finished")
    await generation.wait_all()
    await ws.disconnect()

    types = [f["type"] for f in frames]
    assert types[:3] == ["conversation.created", "message.created", "generation.started"]
    assert types[-1] == "generation.finished"
    created = frames[0]["conversation"]
    assert created["title"] == "Say hello"
    conversation = await Conversation.objects.aget(pk=created["id"])
    assert conversation.owner_id == alice.id

    user_message = frames[1]
    assert user_message["client_id"] == frame["client_id"]
    assert user_message["message"]["role"] == "user"
    assert user_message["message"]["content"] == "Say hello"

    deltas = of_type(frames, "generation.delta")
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    finished = frames[-1]
    assert "".join(d["text"] for d in deltas) == finished["content"] == "Hello there"
    assert finished["status"] == "complete"
    assert finished["finish_reason"] == "stop"
    assert finished["html"] == "<p>Hello there</p>\n"
    assert finished["usage"] == {"prompt_tokens": 21, "completion_tokens": 3, "cost": "0.000000"}

    answer = await Message.objects.aget(pk=finished["message"])
    assert (answer.content, answer.status, answer.finish_reason) == ("Hello there", "complete", "stop")
    assert answer.model == "fake-model"
    assert answer.worker == ""
    usage = await TokenUsage.objects.aget(message=answer)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (21, 3, False)


async def test_follow_up_sends_history_and_system_prompt_upstream(alice: Any, fake_llm: Any) -> None:
    await SystemPrompt.objects.acreate(name="Pirate", text="Talk like a pirate.", is_default=True)
    fake_llm.script(Reply(chunks=["Arr"]), Reply(chunks=["Aye"]))
    ws = await connect(alice)
    first = await ask(ws, "First question")
    conversation = first[0]["conversation"]["id"]
    second = await ask(ws, "Second question", conversation)
    await ws.disconnect()

    assert of_type(second, "conversation.created") == []
    assert second[-1]["content"] == "Aye"
    sent = fake_llm.streamed_requests[-1].body["messages"]
    assert sent == [
        {"role": "system", "content": "Talk like a pirate."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "Arr"},
        {"role": "user", "content": "Second question"},
    ]


async def test_cost_comes_from_model_price(alice: Any, fake_llm: Any) -> None:
    await ModelPrice.objects.acreate(
        model="fake-model", input_per_million=Decimal("2.50"), output_per_million=Decimal("10")
    )
    fake_llm.script(Reply(usage=(1000, 200)))
    ws = await connect(alice)
    frames = await ask(ws)
    await ws.disconnect()
    # 1000 * 2.50 / 1M + 200 * 10 / 1M = 0.0025 + 0.002
    assert frames[-1]["usage"]["cost"] == "0.004500"
    usage = await TokenUsage.objects.aget(kind="answer")
    assert usage.cost == Decimal("0.0045")


async def test_length_finish_gives_truncated(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(Reply(chunks=["cut ", "short"], finish_reason="length"))
    ws = await connect(alice)
    frames = await ask(ws)
    await ws.disconnect()
    assert (frames[-1]["status"], frames[-1]["finish_reason"]) == ("truncated", "length")
    assert (await Message.objects.aget(pk=frames[-1]["message"])).status == "truncated"


# --- Failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply.error_reply(401, "bad key"), "upstream_error"),
        (Reply.error_reply(429, "slow down", headers={"Retry-After": "7"}), "upstream_unavailable"),
        (Reply.error_reply(500, "boom"), "upstream_unavailable"),
        (Reply(chunks=["partial ", "answer ", "lost"], cut_after=2), "upstream_error"),
        (Reply(chunks=["no ", "ending"], finish_reason=None), "upstream_error"),
    ],
    ids=["401", "429", "500", "cut", "no-finish-reason"],
)
async def test_upstream_failure_gives_error_then_failed_and_keeps_the_question(
    alice: Any, fake_llm: Any, reply: Reply, code: str
) -> None:
    fake_llm.script(reply)
    ws = await connect(alice)
    frames = await ask(ws, "Will this work?")
    await ws.disconnect()

    errors = of_type(frames, "error")
    assert len(errors) == 1
    assert errors[0]["code"] == code
    assert errors[0]["message"]
    assert frames.index(errors[0]) < len(frames) - 1  # the error comes before finished
    finished = frames[-1]
    assert finished["status"] == "failed"
    deltas = of_type(frames, "generation.delta")
    assert "".join(d["text"] for d in deltas) == finished["content"]
    question = await Message.objects.aget(role="user")
    assert question.content == "Will this work?"
    answer = await Message.objects.aget(pk=finished["message"])
    assert answer.status == "failed"
    assert answer.content == finished["content"]
    if code == "upstream_unavailable" and reply.status == 429:
        assert errors[0]["retry_after"] == 7


async def test_refused_request_costs_nothing_but_a_cut_stream_is_estimated(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(Reply.error_reply(401), Reply(chunks=["some ", "text ", "here"], cut_after=2))
    ws = await connect(alice)
    first = await ask(ws)
    await ask(ws, "again", first[0]["conversation"]["id"])
    await ws.disconnect()
    rows = [row async for row in TokenUsage.objects.filter(kind="answer")]
    assert len(rows) == 1
    assert rows[0].estimated is True
    assert rows[0].completion_tokens > 0


# --- Bad input: a clear error, nothing lost, the socket still usable --------------------


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        '{"no": "type"}',
        '{"type": "nonsense"}',
        '{"type": "message.send", "content": "hi", "client_id": "not-a-uuid"}',
        '{"type": "message.send", "content": 42, "client_id": "6f1c7c4e-2f7e-4a57-9d2e-1f1e1f1e1f1e"}',
        '{"type": "message.send", "content": "   ", "client_id": "6f1c7c4e-2f7e-4a57-9d2e-1f1e1f1e1f1e"}',
        '{"type": "conversation.join", "conversation": "nope"}',
        '{"type": "generation.stop"}',
    ],
)
async def test_malformed_frames_give_invalid_request_and_the_socket_stays_usable(
    alice: Any, fake_llm: Any, raw: str
) -> None:
    ws = await connect(alice)
    await ws.send_to(text_data=raw)
    error = await ws.receive_json_from(timeout=5)
    assert error["type"] == "error"
    assert error["code"] == "invalid_request"
    assert error["message"]
    frames = await ask(ws)
    assert frames[-1]["status"] == "complete"
    await ws.disconnect()
    assert await Message.objects.filter(role="user").acount() == 1


async def test_too_long_message_is_refused_with_its_client_id(
    alice: Any, fake_llm: Any, settings: Any
) -> None:
    settings.CHAT_MAX_MESSAGE_CHARS = 100
    ws = await connect(alice)
    frame = send_frame("x" * 101)
    await ws.send_json_to(frame)
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (error["code"], error["client_id"]) == ("invalid_request", frame["client_id"])
    assert "too long" in error["message"]
    assert await Message.objects.acount() == 0


async def test_someone_elses_conversation_is_not_found_for_every_frame(
    alice: Any, bob: Any, fake_llm: Any
) -> None:
    theirs = await Conversation.objects.acreate(owner=alice, title="secret")
    ws = await connect(bob)
    for frame in (
        send_frame("let me in", theirs.id),
        {"type": "conversation.join", "conversation": str(theirs.id)},
        {"type": "generation.stop", "conversation": str(theirs.id)},
        {"type": "conversation.join", "conversation": str(uuid.uuid4())},
    ):
        await ws.send_json_to(frame)
        error = await ws.receive_json_from(timeout=5)
        assert (error["type"], error["code"]) == ("error", "not_found")
        assert "secret" not in str(error)
    await ws.disconnect()
    assert await Message.objects.acount() == 0


async def test_same_client_id_twice_makes_one_message_and_one_answer(alice: Any, fake_llm: Any) -> None:
    ws = await connect(alice)
    frame = send_frame("only once")
    await ws.send_json_to(frame)
    first = await frames_until(ws, "generation.finished")
    await generation.wait_all()
    assert (await ws.receive_json_from())["type"] == "conversation.updated"  # its title
    await ws.send_json_to(frame)  # e.g. resent after a reconnect
    repeat = await ws.receive_json_from(timeout=5)
    assert repeat["type"] == "message.created"
    assert repeat["client_id"] == frame["client_id"]
    assert repeat["message"]["id"] == first[1]["message"]["id"]
    assert await ws.receive_nothing(timeout=0.3)
    await ws.disconnect()
    assert await Message.objects.acount() == 2
    assert len(fake_llm.streamed_requests) == 1


async def test_second_send_while_streaming_is_busy(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(Reply(chunks=["slow"] * 10, delay=0.05))
    ws = await connect(alice)
    await ws.send_json_to(send_frame("first"))
    first = await frames_until(ws, "generation.started")
    conversation = first[0]["conversation"]["id"]
    frame = send_frame("second", conversation)
    await ws.send_json_to(frame)
    frames = await frames_until(ws, "error")
    error = frames[-1]
    assert (error["code"], error["client_id"]) == ("busy", frame["client_id"])
    await frames_until(ws, "generation.finished")
    await generation.wait_all()
    await ws.disconnect()
    assert await Message.objects.filter(role="user").acount() == 1


async def test_rate_limit_counts_accepted_sends_only(alice: Any, fake_llm: Any, settings: Any) -> None:
    # Fixed windows (django-ratelimit): an hour makes a roll-over mid-test unlikely.
    settings.CHAT_RATE_LIMIT = "2/h"
    ws = await connect(alice)
    await ws.send_to(text_data="garbage")  # rejected frames do not count
    await ws.receive_json_from(timeout=5)
    first = await ask(ws, "one")
    frame = send_frame("two", first[0]["conversation"]["id"])
    await ws.send_json_to(frame)
    await frames_until(ws, "generation.finished")
    await generation.wait_all()
    await ws.send_json_to(frame)  # a repeated client_id does not count either
    assert (await ws.receive_json_from(timeout=5))["type"] == "message.created"
    await ws.send_json_to(send_frame("three", first[0]["conversation"]["id"]))
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert error["code"] == "rate_limited"
    assert 0 < error["retry_after"] <= 3600
    assert await Message.objects.filter(role="user").acount() == 2


async def test_prompt_choice_for_a_new_conversation(alice: Any, fake_llm: Any) -> None:
    await SystemPrompt.objects.acreate(name="Default", text="Be brief.", is_default=True)
    poet = await SystemPrompt.objects.acreate(name="Poet", text="Answer in verse.")
    ws = await connect(alice)
    frames = await ask(ws, "hi", prompt=str(poet.id))
    await ws.send_json_to(send_frame("hi", prompt=str(uuid.uuid4())))
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    conversation = await Conversation.objects.select_related("prompt_version").aget(
        pk=frames[0]["conversation"]["id"]
    )
    assert (conversation.prompt_id, conversation.prompt_text) == (poet.id, "Answer in verse.")
    # The exact version is recorded: later edits of the prompt don't change it.
    assert conversation.prompt_version is not None
    assert (conversation.prompt_version.prompt_id, conversation.prompt_version.text) == (
        poet.id,
        "Answer in verse.",
    )
    assert fake_llm.streamed_requests[0].body["messages"][0] == {
        "role": "system",
        "content": "Answer in verse.",
    }
    assert error["code"] == "not_found"


# --- Stop, join, the answer outliving its socket ------------------------------------


async def test_stop_keeps_the_text_so_far_and_closes_the_upstream(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(Reply(chunks=[f"w{i} " for i in range(200)], delay=0.02))
    ws = await connect(alice)
    await ws.send_json_to(send_frame("talk a lot"))
    frames = await frames_until(ws, "generation.delta")
    conversation = frames[0]["conversation"]["id"]
    await ws.send_json_to({"type": "generation.stop", "conversation": conversation})
    frames += await frames_until(ws, "generation.finished")
    await generation.wait_all()
    await ws.disconnect()

    finished = frames[-1]
    assert finished["status"] == "stopped"
    text = "".join(d["text"] for d in of_type(frames, "generation.delta"))
    assert text == finished["content"]
    assert 0 < len(text) < len("".join(f"w{i} " for i in range(200)))
    answer = await Message.objects.aget(pk=finished["message"])
    assert (answer.status, answer.content) == ("stopped", text)
    await asyncio.to_thread(fake_llm.wait_for, lambda: fake_llm.disconnects == 1)
    assert fake_llm.completed == 0
    usage = await TokenUsage.objects.aget(message=answer)
    assert usage.estimated


async def test_stop_from_another_socket_of_the_owner(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(Reply(chunks=["tok "] * 200, delay=0.02))
    tab1 = await connect(alice)
    tab2 = await connect(alice)
    await tab1.send_json_to(send_frame("long one"))
    frames = await frames_until(tab1, "generation.delta")
    conversation = frames[0]["conversation"]["id"]
    await tab2.send_json_to({"type": "generation.stop", "conversation": conversation})
    frames += await frames_until(tab1, "generation.finished")
    await generation.wait_all()
    await tab1.disconnect()
    await tab2.disconnect()
    assert frames[-1]["status"] == "stopped"


async def test_join_mid_answer_gives_snapshot_then_only_newer_deltas(alice: Any, fake_llm: Any) -> None:
    chunks = [f"part{i} " for i in range(40)]
    fake_llm.script(Reply(chunks=chunks, delay=0.02))
    tab1 = await connect(alice)
    await tab1.send_json_to(send_frame("stream please"))
    started = await frames_until(tab1, "generation.delta")
    conversation = started[0]["conversation"]["id"]
    while started[-1].get("seq", 0) < 4:  # some text has streamed: the join comes mid-answer
        started.append(await tab1.receive_json_from(timeout=10))

    tab2 = await connect(alice)
    await tab2.send_json_to({"type": "conversation.join", "conversation": conversation, "after": 0})
    joined = await frames_until(tab2, "generation.finished")
    tab1_frames = started + await frames_until(tab1, "generation.finished")
    await generation.wait_all()
    await tab1.disconnect()
    await tab2.disconnect()

    snapshot = joined[0]
    assert snapshot["type"] == "generation.snapshot"
    assert snapshot["seq"] >= 1
    later = of_type(joined, "generation.delta")
    assert all(d["seq"] > snapshot["seq"] for d in later)
    assert [d["seq"] for d in later] == list(range(snapshot["seq"] + 1, snapshot["seq"] + 1 + len(later)))
    rebuilt = snapshot["content"] + "".join(d["text"] for d in later)
    assert rebuilt == joined[-1]["content"] == "".join(chunks)
    assert "".join(d["text"] for d in of_type(tab1_frames, "generation.delta")) == "".join(chunks)


async def test_join_when_nothing_streams_sends_nothing(alice: Any, fake_llm: Any) -> None:
    conversation = await Conversation.objects.acreate(owner=alice)
    ws = await connect(alice)
    await ws.send_json_to({"type": "conversation.join", "conversation": str(conversation.id)})
    assert await ws.receive_nothing(timeout=0.3)
    await ws.disconnect()


async def test_answer_continues_and_is_saved_after_the_socket_closes(alice: Any, fake_llm: Any) -> None:
    chunks = [f"c{i} " for i in range(30)]
    fake_llm.script(Reply(chunks=chunks, delay=0.01))
    ws = await connect(alice)
    await ws.send_json_to(send_frame("go on without me"))
    frames = await frames_until(ws, "generation.delta")
    await ws.disconnect()
    await generation.wait_all()
    answer = await Message.objects.aget(pk=frames[-1]["message"])
    assert (answer.status, answer.content) == ("complete", "".join(chunks))


async def test_conversation_created_reaches_every_tab_of_the_user(
    alice: Any, bob: Any, fake_llm: Any
) -> None:
    tab1 = await connect(alice)
    tab2 = await connect(alice)
    stranger = await connect(bob)
    await ask(tab1, "new one")
    created = await tab2.receive_json_from(timeout=5)
    assert created["type"] == "conversation.created"
    titled = await tab2.receive_json_from(timeout=5)
    assert titled == {
        "type": "conversation.updated",
        "conversation": {"id": created["conversation"]["id"], "title": "A fake title"},
    }
    assert await tab2.receive_nothing(timeout=0.2)  # not following it: no deltas
    assert await stranger.receive_nothing(timeout=0.2)
    for ws in (tab1, tab2, stranger):
        await ws.disconnect()


# --- Frames and writes per answer -----------------------------------------------------


async def test_fast_tokens_are_coalesced_and_checkpoints_are_rare(
    alice: Any, fake_llm: Any, settings: Any, monkeypatch: Any
) -> None:
    """500 tokens in about 1.5 s: far fewer frames than tokens, a handful of
    database writes, none per token."""
    from django.db.backends import utils

    writes: list[str] = []
    real_execute = utils.CursorWrapper.execute

    def counting_execute(self: Any, sql: str, params: Any = None) -> Any:
        if sql.lstrip().split(" ", 1)[0].upper() in {"INSERT", "UPDATE", "DELETE"}:
            writes.append(sql)
        return real_execute(self, sql, params)

    settings.CHAT_AUTO_TITLE = False  # the title is a model call of its own
    monkeypatch.setattr(utils.CursorWrapper, "execute", counting_execute)
    chunks = [f"t{i} " for i in range(500)]
    fake_llm.script(Reply(chunks=chunks, delay=0.003))
    ws = await connect(alice)
    await ws.send_json_to(send_frame("count"))
    frames = await frames_until(ws, "generation.finished")
    await generation.wait_all()
    await ws.disconnect()

    deltas = of_type(frames, "generation.delta")
    assert "".join(d["text"] for d in deltas) == "".join(chunks)
    assert len(deltas) < 100, f"{len(deltas)} frames for 500 tokens"
    answer_writes = [w for w in writes if "session" not in w and "auth_user" not in w]
    # accept: conversation, 2 messages, its updated_at; finish: message,
    # conversation, usage row, quota counters; plus about one checkpoint a second.
    assert len(answer_writes) <= 12, answer_writes


async def test_join_with_after_replays_the_end_of_an_answer_that_ended_meanwhile(
    alice: Any, fake_llm: Any
) -> None:
    fake_llm.script(Reply(chunks=["all ", "done"], usage=(9, 2)))
    tab1 = await connect(alice)
    frames = await ask(tab1, "quick one")
    await tab1.disconnect()

    tab2 = await connect(alice)  # e.g. the same tab after a reconnect
    await tab2.send_json_to(
        {"type": "conversation.join", "conversation": frames[0]["conversation"]["id"], "after": 1}
    )
    replay = await tab2.receive_json_from(timeout=5)
    await tab2.disconnect()
    # The live end also names its last delta's seq; the replay from the database cannot.
    assert replay == {key: value for key, value in frames[-1].items() if key != "seq"}
    assert replay["model"] == "fake-model"
    assert replay["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "cost": "0.000000"}


async def test_join_on_an_answer_whose_process_died_reports_it_interrupted(alice: Any) -> None:
    conversation = await Conversation.objects.acreate(owner=alice)
    worker = f"{socket.gethostname()}:{await sync_to_async(dead_pid)()}"
    orphan = await Message.objects.acreate(
        conversation=conversation, role="assistant", status="streaming", content="so far", worker=worker
    )
    ws = await connect(alice)
    await ws.send_json_to({"type": "conversation.join", "conversation": str(conversation.id)})
    finished = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    assert (finished["type"], finished["message"]) == ("generation.finished", str(orphan.id))
    assert (finished["status"], finished["content"]) == ("interrupted", "so far")


async def test_error_frame_names_its_answer(alice: Any, fake_llm: Any) -> None:
    fake_llm.script(Reply.error_reply(500))
    ws = await connect(alice)
    frames = await ask(ws)
    await ws.disconnect()
    error = of_type(frames, "error")[0]
    assert error["answer"] == frames[-1]["message"]
    assert error["conversation"] == frames[0]["conversation"]["id"]
    assert error["message"] != error["answer"]  # `message` is the text for a person
