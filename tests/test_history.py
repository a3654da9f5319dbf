"""What is sent upstream: conversations.history.fit_history and plan_history."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from conversations.history import fit_history, message_tokens, plan_history
from conversations.models import Conversation, Message, SystemPrompt


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# 40 characters: 10 tokens of text + 4 of framing = 14 tokens each.
U1, A1, U2, A2, U3 = (f"{name}-".ljust(40, "x") for name in ("u1", "a1", "u2", "a2", "u3"))
TURN = message_tokens(U1)
TURNS = [user(U1), assistant(A1), user(U2), assistant(A2), user(U3)]


# --- fit_history --------------------------------------------------------------------


def test_every_turn_is_kept_in_order_when_all_fit() -> None:
    result = fit_history("Be brief.", TURNS, budget=10_000)

    assert result == [{"role": "system", "content": "Be brief."}, *TURNS]


def test_system_prompt_comes_first_even_when_it_alone_exceeds_the_budget() -> None:
    prompt = "p" * 400

    result = fit_history(prompt, TURNS, budget=5)

    assert result[0] == {"role": "system", "content": prompt}
    assert result[1:] == [user(U3)]


def test_newest_user_message_is_kept_even_when_it_alone_exceeds_the_budget() -> None:
    huge = "h" * 10_000

    result = fit_history("", [user(U1), assistant(A1), user(huge)], budget=50)

    assert result == [user(huge)]


def test_older_turns_are_dropped_oldest_first_when_over_budget() -> None:
    result = fit_history("", TURNS, budget=3 * TURN)

    assert result == [user(U2), assistant(A2), user(U3)]


def test_the_system_prompt_counts_against_the_budget() -> None:
    prompt = "s" * 40  # costs one TURN

    result = fit_history(prompt, TURNS, budget=4 * TURN)

    assert result == [{"role": "system", "content": prompt}, user(U2), assistant(A2), user(U3)]


def test_an_assistant_turn_left_leading_by_the_budget_cut_is_dropped() -> None:
    # Four turns fit: a1 u2 a2 u3, but a1 would lead without its question.
    result = fit_history("", TURNS, budget=4 * TURN)

    assert result == [user(U2), assistant(A2), user(U3)]


def test_a_leading_orphan_assistant_message_is_dropped() -> None:
    result = fit_history("", [assistant("Hi, how can I help?"), user("Hello")], budget=10_000)

    assert result == [user("Hello")]


def test_no_system_entry_when_the_prompt_text_is_empty() -> None:
    result = fit_history("", TURNS, budget=10_000)

    assert all(m["role"] != "system" for m in result)
    assert result == TURNS


def test_no_turns_gives_only_the_system_prompt() -> None:
    assert fit_history("Sys", [], budget=100) == [{"role": "system", "content": "Sys"}]
    assert fit_history("", [], budget=100) == []


# --- plan_history (what is sent when no summary call is made) ------------------------


class Chat:
    """Messages with strictly increasing timestamps, so order never depends on clock resolution."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.start = timezone.now() - timedelta(hours=1)
        self.count = 0

    def add(self, role: str, content: str, status: str = Message.Status.COMPLETE) -> Message:
        message = Message.objects.create(
            conversation=self.conversation, role=role, content=content, status=status
        )
        self.count += 1
        Message.objects.filter(pk=message.pk).update(created_at=self.start + timedelta(seconds=self.count))
        message.refresh_from_db()
        return message


def chat(owner: Any, prompt_text: str = "", **extra: Any) -> Chat:
    return Chat(Conversation.objects.create(owner=owner, prompt_text=prompt_text, **extra))


def contents(messages: list[dict[str, str]]) -> list[str]:
    return [m["content"] for m in messages]


@pytest.mark.django_db
def test_the_history_uses_only_this_conversations_messages(alice: Any, bob: Any) -> None:
    mine = chat(alice, "Prompt of alice's first chat")
    other = chat(alice, "Prompt of alice's second chat")
    foreign = chat(bob, "Prompt of bob's chat")
    mine.add("user", "alice asks one")
    other.add("user", "alice other chat question")
    foreign.add("user", "bob's private question")
    mine.add("assistant", "answer one")
    other.add("assistant", "alice other chat answer")
    foreign.add("assistant", "bob's private answer")
    question = mine.add("user", "alice asks two")

    result = plan_history(mine.conversation, upto=question).messages

    assert result == [
        {"role": "system", "content": "Prompt of alice's first chat"},
        user("alice asks one"),
        assistant("answer one"),
        user("alice asks two"),
    ]
    text = " ".join(contents(result))
    assert "other chat" not in text
    assert "second chat" not in text
    assert "bob" not in text


@pytest.mark.django_db
def test_the_history_excludes_the_answer_being_streamed(alice: Any) -> None:
    conversation = chat(alice)
    conversation.add("user", "first question")
    conversation.add("assistant", "half an answer so f", status=Message.Status.STREAMING)
    question = conversation.add("user", "second question")

    result = plan_history(conversation.conversation, upto=question).messages

    assert result == [user("first question"), user("second question")]


@pytest.mark.django_db
def test_the_history_excludes_the_new_streaming_answer_after_the_question(alice: Any) -> None:
    conversation = chat(alice)
    question = conversation.add("user", "the question")
    conversation.add("assistant", "", status=Message.Status.STREAMING)

    assert plan_history(conversation.conversation, upto=question).messages == [user("the question")]


@pytest.mark.django_db
def test_the_history_excludes_empty_failed_answers(alice: Any) -> None:
    conversation = chat(alice)
    conversation.add("user", "first question")
    conversation.add("assistant", "", status=Message.Status.FAILED)
    question = conversation.add("user", "asked again")

    result = plan_history(conversation.conversation, upto=question).messages

    assert result == [user("first question"), user("asked again")]


@pytest.mark.django_db
def test_the_history_ignores_messages_after_the_question(alice: Any) -> None:
    conversation = chat(alice)
    question = conversation.add("user", "earlier question")
    conversation.add("assistant", "later answer")
    conversation.add("user", "later question")

    assert plan_history(conversation.conversation, upto=question).messages == [user("earlier question")]


@pytest.mark.django_db
def test_the_history_uses_the_prompt_snapshot_not_the_edited_prompt(alice: Any) -> None:
    prompt = SystemPrompt.objects.create(name="Pirate", text="Talk like a pirate.")
    conversation = chat(alice, prompt.text, prompt=prompt)
    question = conversation.add("user", "Hello")
    prompt.text = "Talk like a lawyer."
    prompt.save()

    result = plan_history(conversation.conversation, upto=question).messages

    assert result[0] == {"role": "system", "content": "Talk like a pirate."}
    assert "lawyer" not in " ".join(contents(result))


@pytest.mark.django_db
def test_the_history_has_no_system_entry_for_a_conversation_without_prompt(alice: Any) -> None:
    conversation = chat(alice, "")
    question = conversation.add("user", "Hello")

    assert plan_history(conversation.conversation, upto=question).messages == [user("Hello")]


@pytest.mark.django_db
def test_the_history_fits_the_configured_context_budget(alice: Any, settings: Any) -> None:
    settings.CHAT_CONTEXT_TOKENS = 3 * TURN
    settings.CHAT_SUMMARY_TOKENS = 0  # dropped, not summarised (tests/test_summaries.py)
    conversation = chat(alice)
    for role, text in zip(["user", "assistant", "user", "assistant"], [U1, A1, U2, A2], strict=True):
        conversation.add(role, text)
    question = conversation.add("user", U3)

    result = plan_history(conversation.conversation, upto=question).messages

    assert result == [user(U2), assistant(A2), user(U3)]
