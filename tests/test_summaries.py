"""Memory of long chats: the turns that no longer fit CHAT_CONTEXT_TOKENS are
folded into the conversation's summary by a non-streamed model call (its own
ledger row, kind `summary`), refreshed incrementally, and sent upstream as a
system message in their place; a failed summary call falls back to dropping
them."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from conversations.history import SUMMARY_HEADING, message_tokens, plan_history
from conversations.models import Conversation, Message, TokenUsage
from tests.conftest import connect
from tests.fake_llm import Reply
from tests.test_consumer import ask, of_type
from tests.test_history import Chat, chat

CODEWORD = "PAPAYA-42"
FILLER = " ".join(f"word{i}" for i in range(40))  # about 80 tokens


def mechanical_summary(body: dict[str, Any]) -> str:
    """A summariser that reads what it was sent: the summary so far, then one
    line per user turn of the new part (as a model asked to keep facts would)."""
    request = body["messages"][-1]["content"]
    so_far, new = request.split("\n\nNew part of the conversation:\n", 1)
    so_far = so_far.removeprefix("Summary so far:\n")
    lines = [] if so_far.startswith("(none yet") else so_far.splitlines()
    lines += [line[:60] for line in new.split("\n\n") if line.startswith("User: ")]
    return "\n".join(lines)


def summaries_made(fake_llm: Any) -> list[str]:
    return [r.body["messages"][-1]["content"] for r in fake_llm.completion_requests]


# --- What is planned --------------------------------------------------------------------


def add_turns(conversation: Chat, count: int, start: int = 0) -> list[Message]:
    made = []
    for i in range(start, start + count):
        made.append(conversation.add("user", f"question {i}: {FILLER}"))
        made.append(conversation.add("assistant", f"answer {i}: {FILLER}"))
    return made


@pytest.mark.django_db
def test_older_turns_that_overflow_are_pending_for_the_summary(alice: Any, settings: Any) -> None:
    settings.CHAT_SUMMARY_TOKENS = 50
    budget = 6 * message_tokens(f"question 0: {FILLER}")  # about six messages
    conversation = chat(alice, "Be brief.")
    made = add_turns(conversation, 5)
    question = conversation.add("user", "the newest question")

    history = plan_history(conversation.conversation, upto=question, budget=budget)

    # The newest turns that fit with room for the summary, from a question on.
    assert history.after[0]["role"] == "user" and history.after[-1]["content"] == "the newest question"
    kept = len(history.after)
    assert 1 < kept < 11
    # The older messages are pending, oldest first, as many as one summary
    # call can read (the rest wait for the next answer); `through` is the
    # newest of them.
    pending = len(history.pending)
    assert 1 <= pending <= 11 - kept
    assert [m["content"] for m in history.pending] == [m.content for m in made[:pending]]
    assert history.through == made[pending - 1].pk
    # Until a summary exists, nothing stands in for them.
    assert history.messages == [{"role": "system", "content": "Be brief."}, *history.after]
    assert history.with_summary("S")[1] == {"role": "system", "content": f"{SUMMARY_HEADING}\nS"}


@pytest.mark.django_db
def test_a_stored_summary_covers_its_turns_and_only_newer_ones_are_pending(alice: Any, settings: Any) -> None:
    settings.CHAT_SUMMARY_TOKENS = 50
    budget = 6 * message_tokens(f"question 0: {FILLER}")
    conversation = chat(alice)
    made = add_turns(conversation, 6)
    Conversation.objects.filter(pk=conversation.conversation.pk).update(
        summary="The user said: question 0 and 1", summary_through=made[3]
    )
    conversation.conversation.refresh_from_db()
    question = conversation.add("user", "the newest question")

    history = plan_history(conversation.conversation, upto=question, budget=budget)

    assert history.summary == "The user said: question 0 and 1"
    assert history.messages[0]["content"].endswith("The user said: question 0 and 1")
    assert history.pending[0]["content"].startswith("question 2:")
    assert all(not m["content"].startswith(("question 0", "answer 1")) for m in history.pending)


@pytest.mark.django_db
def test_a_chat_that_fits_needs_no_summary(alice: Any, settings: Any) -> None:
    conversation = chat(alice)
    add_turns(conversation, 3)
    question = conversation.add("user", "the newest question")

    history = plan_history(conversation.conversation, upto=question)

    assert history.pending == [] and len(history.after) == 7


@pytest.mark.django_db
def test_summaries_can_be_turned_off(alice: Any, settings: Any) -> None:
    settings.CHAT_SUMMARY_TOKENS = 0
    conversation = chat(alice)
    add_turns(conversation, 5)
    question = conversation.add("user", "the newest question")

    history = plan_history(conversation.conversation, upto=question, budget=300)

    assert history.pending == [] and history.messages == history.after


# --- In the life of an answer -------------------------------------------------------------


@pytest.fixture
def long_chat(fake_llm: Any, settings: Any) -> Any:
    settings.CHAT_CONTEXT_TOKENS = 400
    settings.CHAT_SUMMARY_TOKENS = 60
    settings.CHAT_AUTO_TITLE = False
    fake_llm.completion_default = Reply(respond=mechanical_summary, usage=(120, 25))
    fake_llm.default = Reply(chunks=["Noted: ", FILLER[:100]], usage=(300, 30))
    return fake_llm


@pytest.mark.django_db(transaction=True)
async def test_a_codeword_from_the_first_turn_still_reaches_the_model(alice: Any, long_chat: Any) -> None:
    ws = await connect(alice)
    first = await ask(ws, f"Remember the codeword {CODEWORD}. {FILLER}")
    conversation_id = first[0]["conversation"]["id"]
    summary_frames = []
    for i in range(6):
        frames = await ask(ws, f"Turn {i}: {FILLER}", conversation_id)
        summary_frames += of_type(frames, "conversation.summary")
        assert frames[-1]["status"] == "complete"
    await ws.disconnect()

    made = summaries_made(long_chat)
    assert len(made) >= 2, "the summary is refreshed as the chat grows"
    # The first summary call read the first turn; later calls get the summary
    # so far and only the turns that overflowed since (incremental).
    assert CODEWORD in made[0].split("New part of the conversation:")[1]
    for later in made[1:]:
        so_far, new = later.split("New part of the conversation:")
        assert CODEWORD in so_far and CODEWORD not in new
        assert "Turn 5" not in new  # the newest turns are sent as they are
    # The last answer: the first turn itself is gone, its codeword is in the summary.
    sent = long_chat.streamed_requests[-1].body["messages"]
    assert not any(m["role"] == "user" and CODEWORD in m["content"] for m in sent)
    [summary] = [m for m in sent if m["role"] == "system" and m["content"].startswith(SUMMARY_HEADING)]
    assert CODEWORD in summary["content"]
    assert sent[-1]["content"].startswith("Turn 5:")
    # What is stored, and what the followers were told.
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert CODEWORD in conversation.summary
    assert summary_frames[-1]["through"] == str(conversation.summary_through_id)
    assert summary_frames[-1]["summary"] == conversation.summary
    # Each summary call is in the ledger, as its own kind.
    rows = [r async for r in TokenUsage.objects.filter(kind="summary")]
    assert len(rows) == len(made)
    assert all((r.prompt_tokens, r.completion_tokens, r.model) == (120, 25, "fake-model") for r in rows)
    assert all(str(r.conversation_id) == conversation_id for r in rows)


@pytest.mark.django_db(transaction=True)
async def test_a_failed_summary_falls_back_to_dropping_the_oldest_turns(
    alice: Any, long_chat: Any, caplog: Any
) -> None:
    long_chat.completion_default = Reply.error_reply(500, "summariser down")
    ws = await connect(alice)
    first = await ask(ws, f"Remember the codeword {CODEWORD}. {FILLER}")
    conversation_id = first[0]["conversation"]["id"]
    with caplog.at_level(logging.WARNING, logger="conversations.generation.summaries"):
        for i in range(4):
            frames = await ask(ws, f"Turn {i}: {FILLER}", conversation_id)
            assert frames[-1]["status"] == "complete"
            assert not of_type(frames, "conversation.summary")
    await ws.disconnect()

    sent = long_chat.streamed_requests[-1].body["messages"]
    assert not any(CODEWORD in (m["content"] or "") for m in sent)
    assert not any(m["role"] == "system" and SUMMARY_HEADING in m["content"] for m in sent)
    assert any(
        re.search(r"summary of conversation .* failed .* dropped instead", r.message) for r in caplog.records
    )
    assert not await TokenUsage.objects.filter(kind="summary").aexists()
    assert (await Conversation.objects.aget(pk=conversation_id)).summary == ""


@pytest.mark.django_db(transaction=True)
async def test_a_stop_during_the_summary_call_stops_the_answer(alice: Any, long_chat: Any) -> None:
    from tests.test_consumer import frames_until, send_frame

    ws = await connect(alice)
    first = await ask(ws, f"Remember the codeword {CODEWORD}. {FILLER * 5}")
    conversation_id = first[0]["conversation"]["id"]
    long_chat.completion_default = Reply(respond=mechanical_summary, hang_after=0)
    await ws.send_json_to(send_frame(f"Turn 0: {FILLER}", conversation_id))
    await frames_until(ws, "generation.started")
    for _ in range(500):  # the summary call is under way
        if long_chat.completion_requests:
            break
        await asyncio.sleep(0.01)
    assert long_chat.completion_requests
    await ws.send_json_to({"type": "generation.stop", "conversation": conversation_id})
    frames = await frames_until(ws, "generation.finished", timeout=5)
    long_chat.release_hangs()
    await ws.disconnect()

    assert frames[-1]["status"] == "stopped" and frames[-1]["content"] == ""
    assert (await Conversation.objects.aget(pk=conversation_id)).summary == ""
