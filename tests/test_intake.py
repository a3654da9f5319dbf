"""Sends accepted together (a burst): each gets exactly the outcome it
would get alone, the rows are those of single turns, and the rate limit
counts a burst as it counts sends one by one."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts import limits
from accounts.models import Quota
from conversations import generation
from conversations.generation.titles import title_from
from conversations.generation.turns import Send, accept_messages
from conversations.models import Conversation, Message, SystemPrompt
from conversations.prompts import save_prompt
from tests.factories import make_conversation, make_turn, make_user

pytestmark = pytest.mark.django_db


def send(user: Any, content: str = "Hello", **fields: Any) -> Send:
    return Send(user=user, conversation_id=None, content=content, client_id=uuid.uuid4(), **fields)


def test_new_conversations_of_a_burst_are_stored_as_single_turns_are(settings: Any) -> None:
    settings.CHAT_RATE_LIMIT = "100/h"
    prompt = SystemPrompt(name="Default", text="Be brief.", is_default=True)
    save_prompt(prompt)
    users = [make_user(f"burst{i}") for i in range(30)]
    sends = [send(user, f"Question {i} " + "word " * 30) for i, user in enumerate(users)]

    with CaptureQueriesContext(connection) as queries:
        outcomes = accept_messages(sends)

    assert all(isinstance(outcome, generation.Accepted) for outcome in outcomes)
    # However many sends: the resent check, the limits, the prompt and its
    # version, one INSERT of conversations and one of messages (and the
    # savepoint of the transaction, inside the test's).
    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    assert statements.count("SELECT") == 4
    assert statements.count("INSERT") == 2
    alone = generation.accept_message(
        user=users[0], conversation_id=None, content="Alone " + "word " * 30, client_id=uuid.uuid4()
    )
    for outcome, item in zip(outcomes, sends, strict=True):
        conversation = Conversation.objects.get(pk=outcome.conversation.pk)
        assert conversation.owner_id == item.user.pk
        assert conversation.title == title_from(item.content)
        assert conversation.prompt_id == prompt.pk
        assert conversation.prompt_version_id == alone.conversation.prompt_version_id
        assert conversation.prompt_text == "Be brief."
        question, answer = Message.objects.filter(conversation=conversation).order_by("created_at")
        assert (question.role, question.content, question.client_id) == ("user", item.content, item.client_id)
        assert (answer.role, answer.status, answer.worker) == ("assistant", "streaming", alone.answer.worker)
        assert answer.accounting == {
            "prompt_tokens": answer.accounting["prompt_tokens"],
            "limited": False,
            "holds": [],
        }
        assert question.created_at < answer.created_at
        assert outcome.messages == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": item.content},
        ]
        assert (outcome.conversation_created, outcome.first_turn, outcome.question_created) == (
            True,
            True,
            True,
        )


def test_each_send_of_a_mixed_burst_gets_what_it_would_get_alone(settings: Any) -> None:
    settings.CHAT_RATE_LIMIT = "2/h"
    alice, bob, carol, dave = (make_user(name) for name in ("alice", "bob", "carol", "dave"))
    Quota.objects.create(user=carol, tokens_per_day=1)  # too little for any answer
    chat = make_conversation(alice, title="Ongoing")
    make_turn(chat, "Earlier question", "Earlier answer")
    earlier = generation.accept_message(
        user=bob, conversation_id=None, content="First", client_id=uuid.uuid4()
    )
    Message.objects.filter(pk=earlier.answer.pk).update(status="complete")
    twice = uuid.uuid4()
    sends = [
        send(alice, "New one"),  # 0: accepted (alice's 1st)
        Send(user=alice, conversation_id=chat.pk, content="Go on", client_id=uuid.uuid4()),  # 1: (2nd)
        send(alice, "Third"),  # 2: over alice's 2 an hour
        Send(
            user=bob, conversation_id=None, content="First", client_id=earlier.question.client_id
        ),  # 3: resent
        send(dave, "Which model?", model="no-such-model"),  # 4: not a model users may pick
        send(bob, "Unknown prompt", prompt_id=uuid.uuid4()),  # 5: not found
        send(carol, "Over budget"),  # 6: over quota
        Send(user=bob, conversation_id=None, content="Twice", client_id=twice),  # 7: bob's 2nd
        Send(user=bob, conversation_id=None, content="Twice", client_id=twice),  # 8: the same frame again
        Send(user=bob, conversation_id=chat.pk, content="Not mine", client_id=uuid.uuid4()),  # 9: not found
    ]
    before = Message.objects.count()

    outcomes = accept_messages(sends)

    kinds = [type(outcome).__name__ for outcome in outcomes]
    assert kinds == [
        "Accepted", "Accepted", "RateLimited", "Resent", "Refused",
        "NotFound", "OverQuota", "Accepted", "Resent", "NotFound",
    ]  # fmt: skip
    assert outcomes[3].message.pk == earlier.question.pk
    assert outcomes[8].message.client_id == twice
    assert outcomes[1].messages[-3:] == [
        {"role": "user", "content": "Earlier question"},
        {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": "Go on"},
    ]
    # Three turns stored, two rows each; nothing of the refused ones.
    assert Message.objects.count() == before + 6
    assert not Message.objects.filter(
        content__in=["Third", "Which model?", "Unknown prompt", "Over budget", "Not mine"]
    ).exists()
    assert 0 < outcomes[2].retry_after <= 3600


def test_the_rate_limit_refuses_inside_a_burst_and_stores_nothing_for_it(settings: Any) -> None:
    settings.CHAT_RATE_LIMIT = "3/h"
    alice = make_user("alice")
    conversations = Conversation.objects.count()

    outcomes = accept_messages([send(alice, f"Question {i}") for i in range(5)])

    kinds = [type(outcome).__name__ for outcome in outcomes]
    assert kinds == ["Accepted"] * 3 + ["RateLimited"] * 2
    assert Conversation.objects.count() == conversations + 3
    assert Message.objects.filter(content__startswith="Question").count() == 3
    # The next one alone is refused too: the burst counted all five.
    with pytest.raises(generation.RateLimited):
        generation.accept_message(user=alice, conversation_id=None, content="Later", client_id=uuid.uuid4())


def test_take_sends_counts_each_user_in_order(settings: Any) -> None:
    settings.CHAT_RATE_LIMIT = "2/h"
    alice, bob = make_user("alice"), make_user("bob")

    assert limits.take_sends([alice, bob, alice]) == [None, None, None]
    waits = limits.take_sends([bob, alice, bob])

    assert waits[0] is None
    assert waits[1] is not None and 0 < waits[1] <= 3600
    assert waits[2] is not None
    assert limits.take_send(alice) is not None  # remembered: no cache round trip


@pytest.mark.parametrize("rate, parsed", [("20/m", (20, 60)), ("100/h", (100, 3600)), ("30/10m", (30, 600))])
def test_rates_are_read_as_people_write_them(rate: str, parsed: tuple[int, int]) -> None:
    assert limits.parse_rate(rate) == parsed


def test_a_rate_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError, match="Not a rate"):
        limits.parse_rate("twenty a minute")


@pytest.mark.django_db(transaction=True)
async def test_sends_arriving_together_share_one_database_call(settings: Any, monkeypatch: Any) -> None:
    settings.CHAT_RATE_LIMIT = "100/h"
    users = [await sync_to_async(make_user)(f"together{i}") for i in range(20)]
    calls = []
    original = generation.intake.accept_messages

    def counting(sends: list[Send]) -> Any:
        calls.append(len(sends))
        return original(sends)

    monkeypatch.setattr(generation.intake, "accept_messages", counting)
    accepted = await asyncio.gather(
        *(
            generation.accept_send(user=user, conversation_id=None, content="Hi", client_id=uuid.uuid4())
            for user in users
        )
    )

    assert sorted(a.conversation.owner_id for a in accepted) == sorted(u.pk for u in users)
    assert sum(calls) == 20
    assert len(calls) <= 2  # the first alone, the rest together
