"""Database work done together (a burst): sends accepted together, answers'
ends and titles saved together. Each gets exactly the outcome it would get
alone, the rows are those of single turns, and the rate limit counts a
burst as it counts sends one by one."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import uuid
from decimal import Decimal
from typing import Any, cast

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models.functions import Now
from django.test.utils import CaptureQueriesContext

from accounts import limits
from accounts.models import Quota, QuotaCounter
from conversations import generation, llm, refusals
from conversations.batches import Batches
from conversations.database import insert_each
from conversations.generation.ledger import AnswerEnd, Saved, save_answers
from conversations.generation.titles import NewTitle, save_titles, title_from
from conversations.generation.turns import Send, accept_messages
from conversations.models import Conversation, Message, ModelPrice, SystemPrompt, TokenUsage
from conversations.prompts import save_prompt
from tests.factories import make_conversation, make_turn, make_user

pytestmark = pytest.mark.django_db


def kind_of(outcome: Any) -> str:
    """A refusal's code, else the outcome's type."""
    return outcome.code if isinstance(outcome, refusals.Refusal) else type(outcome).__name__


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
    # (A statement run once per row is logged as "N times: INSERT ...".)
    sqls = [q["sql"].split(" times: ", 1)[-1] for q in queries.captured_queries]
    statements = [sql.split()[0] for sql in sqls]
    assert statements.count("SELECT") == 4
    inserted = [sql.split()[2] for sql in sqls if sql.startswith("INSERT")]
    assert set(inserted) == {'"conversations_conversation"', '"conversations_message"'}
    # One statement each, however many rows (the driver runs it per row).
    assert len(inserted) == 2
    alone = generation.accept_message(
        user=users[0], conversation_id=None, content="Alone " + "word " * 30, client_id=uuid.uuid4()
    )
    for outcome, item in zip(cast(list[generation.Accepted], outcomes), sends, strict=True):
        conversation = Conversation.objects.get(pk=outcome.conversation.pk)
        assert conversation.owner_id == item.user.pk
        assert conversation.title == title_from(item.content)
        assert conversation.prompt_id == prompt.pk
        assert conversation.prompt_version_id == alone.conversation.prompt_version_id
        assert conversation.prompt_text == "Be brief."
        question, answer = Message.objects.filter(conversation=conversation).order_by("created_at")
        assert (question.role, question.content, question.client_id) == ("user", item.content, item.client_id)
        assert (answer.role, answer.status, answer.worker) == ("assistant", "streaming", alone.answer.worker)
        assert answer.accounting is not None
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
    assert earlier.question.client_id is not None
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

    kinds = [kind_of(outcome) for outcome in outcomes]
    assert kinds == [
        "Accepted", "Accepted", "rate_limited", "resent", "invalid_request",
        "not_found", "quota_exceeded", "Accepted", "resent", "not_found",
    ]  # fmt: skip
    assert cast(refusals.Refusal, outcomes[3]).sent.pk == earlier.question.pk
    assert cast(refusals.Refusal, outcomes[8]).sent.client_id == twice
    assert cast(generation.Accepted, outcomes[1]).messages[-3:] == [
        {"role": "user", "content": "Earlier question"},
        {"role": "assistant", "content": "Earlier answer"},
        {"role": "user", "content": "Go on"},
    ]
    # Three turns stored, two rows each; nothing of the refused ones.
    assert Message.objects.count() == before + 6
    assert not Message.objects.filter(
        content__in=["Third", "Which model?", "Unknown prompt", "Over budget", "Not mine"]
    ).exists()
    retry_after = cast(refusals.Refusal, outcomes[2]).retry_after
    assert retry_after is not None
    assert 0 < retry_after <= 3600


def test_the_rate_limit_refuses_inside_a_burst_and_stores_nothing_for_it(settings: Any) -> None:
    settings.CHAT_RATE_LIMIT = "3/h"
    alice = make_user("alice")
    conversations = Conversation.objects.count()

    outcomes = accept_messages([send(alice, f"Question {i}") for i in range(5)])

    kinds = [kind_of(outcome) for outcome in outcomes]
    assert kinds == ["Accepted"] * 3 + ["rate_limited"] * 2
    assert Conversation.objects.count() == conversations + 3
    assert Message.objects.filter(content__startswith="Question").count() == 3
    # The next one alone is refused too: the burst counted all five.
    with pytest.raises(refusals.Refusal, match="Too many messages"):
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
    original = generation.runner.accept_messages

    def counting(sends: list[Send]) -> Any:
        calls.append(len(sends))
        return original(sends)

    monkeypatch.setattr(generation.runner, "accept_messages", counting)
    accepted = await asyncio.gather(
        *(
            generation.accept_send(user=user, conversation_id=None, content="Hi", client_id=uuid.uuid4())
            for user in users
        )
    )

    assert sorted(a.conversation.owner_id for a in accepted) == sorted(u.pk for u in users)
    assert sum(calls) == 20
    assert len(calls) <= 2  # the first alone, the rest together


def _ended(accepted: Any, content: str, **fields: Any) -> AnswerEnd:
    end = {
        "answer": accepted.answer,
        "owner_id": accepted.conversation.owner_id,
        "content": content,
        "status": "complete",
        "finish_reason": "stop",
        "model": "fake-model",
        "usage": llm.Usage(prompt_tokens=12, completion_tokens=5),
        "messages": accepted.messages,
        "called": True,
        "reservation": accepted.reservation,
        "first_of_chat": True,
        "tool_rounds": [],
        "error": "",
        **fields,
    }
    return AnswerEnd(**end)


def test_answers_ending_together_are_saved_as_each_alone(settings: Any) -> None:
    settings.CHAT_RATE_LIMIT = "100/h"
    ModelPrice.objects.create(
        model="fake-model", input_per_million=Decimal("1000"), output_per_million=Decimal("2000")
    )
    users = [make_user(f"ender{i}") for i in range(4)]
    Quota.objects.create(user=users[3], tokens_per_day=100_000)
    turns = [
        generation.accept_message(user=u, conversation_id=None, content="Q", client_id=uuid.uuid4())
        for u in users
    ]
    ends = [
        _ended(turns[0], "**First** answer"),
        _ended(turns[1], "Second answer", usage=None),  # estimated
        _ended(turns[2], "Cut short", status="truncated", finish_reason="length"),
        _ended(turns[3], "Limited user's answer"),  # settles a reservation: alone
    ]

    results = save_answers(ends)

    assert [type(r).__name__ for r in results] == ["Saved"] * 4
    (usage0, html0, title0), (usage1, _h, title1), (_u, _h2, title2), (usage3, _h3, title3) = cast(
        list[Saved], results
    )
    assert usage0 == {"prompt_tokens": 12, "completion_tokens": 5, "cost": "0.022000"}
    assert "<strong>First</strong>" in html0
    assert (title0, title1, title2, title3) == (True, True, True, True)
    for end in ends:
        answer = Message.objects.get(pk=end.answer.pk)
        assert (answer.content, answer.status, answer.finish_reason) == (
            end.content,
            end.status,
            end.finish_reason,
        )
        assert (answer.worker, answer.accounting, answer.tool_rounds) == ("", None, None)
        row = TokenUsage.objects.get(message_id=answer.pk)
        assert (row.kind, row.user_id, row.conversation_id) == (
            "answer",
            end.owner_id,
            answer.conversation_id,
        )
    assert TokenUsage.objects.get(message_id=ends[1].answer.pk).estimated
    assert usage1["completion_tokens"] == llm.estimate_tokens("Second answer")
    assert usage3["prompt_tokens"] == 12
    assert QuotaCounter.objects.get(user=users[3], window="day").tokens_reserved == 0

    # The same ends again (a retry after a lost reply): nothing stored twice.
    again = save_answers(ends)
    assert [type(r).__name__ for r in again] == ["Saved"] * 4
    assert TokenUsage.objects.filter(kind="answer").count() == 4


def test_titles_made_together_keep_a_rename_made_meanwhile(settings: Any) -> None:
    settings.CHAT_RATE_LIMIT = "100/h"
    users = [make_user(f"titled{i}") for i in range(3)]
    turns = [
        generation.accept_message(user=u, conversation_id=None, content="Q", client_id=uuid.uuid4())
        for u in users
    ]
    Conversation.objects.filter(pk=turns[1].conversation.pk).update(title="Renamed by me")
    completion = llm.Completion('{"title": "T"}', llm.Usage(30, 4), "fake-model")

    saved = save_titles(
        [NewTitle(turn.conversation, f"Title {i}", completion, False) for i, turn in enumerate(turns)]
    )

    assert saved == [True, False, True]
    titles = [Conversation.objects.get(pk=turn.conversation.pk).title for turn in turns]
    assert titles == ["Title 0", "Renamed by me", "Title 2"]
    assert TokenUsage.objects.filter(kind="title").count() == 3


async def test_a_cancelled_batch_leaves_nobody_waiting_and_later_calls_go_alone() -> None:
    release = threading.Event()

    def double(items: list[int]) -> list[int | Exception]:
        release.wait(10)
        return [item * 2 for item in items]

    batches: Batches[int, int] = Batches(double)
    first = asyncio.ensure_future(batches.submit(1))
    await asyncio.sleep(0)  # its batch is in the database
    second = asyncio.ensure_future(batches.submit(2))  # waits for the next batch
    await asyncio.sleep(0)
    assert batches._task is not None
    batches._task.cancel()  # the event loop is going down
    late = asyncio.ensure_future(batches.submit(3))  # an answer's last save, meanwhile
    release.set()

    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert await late == 6


async def test_the_next_batch_goes_to_the_database_while_the_last_ones_callers_are_woken() -> None:
    in_database = threading.Event()
    release = threading.Event()
    second_started = threading.Event()

    def echo(items: list[int]) -> list[int | Exception]:
        if items == [0]:
            in_database.set()
            release.wait(10)
        if items == [2]:
            second_started.set()
        return list(items)

    heard: list[bool] = []
    handed_over = asyncio.Event()

    async def abandoned(_item: int, _result: int) -> None:
        # Waking the first batch's callers (here: handing over an answer
        # nobody waits for) waits until the next batch is in the database.
        heard.append(await asyncio.to_thread(second_started.wait, 3))
        handed_over.set()

    batches: Batches[int, int] = Batches(echo, abandoned)
    first = asyncio.ensure_future(batches.submit(0))
    await asyncio.to_thread(in_database.wait, 5)
    first.cancel()  # its caller went away: the result goes to `abandoned`
    second = asyncio.ensure_future(batches.submit(2))  # waits for the next batch
    await asyncio.sleep(0)
    release.set()

    assert await second == 2
    await asyncio.wait_for(handed_over.wait(), 5)
    assert heard == [True]


async def test_a_batch_runs_in_a_context_of_its_own_not_its_first_callers() -> None:
    # The request that starts a batch may end before the batch does: its
    # context (under Django, the thread its database work must use, which
    # ends with its response) must not be the batch's. Under a burst of API
    # sends, every later batch failed with "CurrentThreadExecutor already quit".
    request_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)

    def seen(items: list[int]) -> list[str | Exception | None]:
        return [request_context.get() for _ in items]

    batches: Batches[int, str | None] = Batches(seen)

    async def a_request() -> str | None:
        request_context.set("the first request's")
        return await batches.submit(1)

    assert await asyncio.create_task(a_request()) is None


def test_insert_each_writes_the_rows_bulk_create_would() -> None:
    owner = make_user("rows")
    pair = []
    for write in ("bulk_create", "insert_each"):
        conversation = Conversation(owner=owner, title="T", model="m")
        messages = [
            Message(conversation=conversation, role=Message.Role.USER, content="é ✓", client_id=uuid.uuid4()),
            Message(conversation=conversation, role=Message.Role.ASSISTANT, status=Message.Status.STREAMING),
        ]
        if write == "bulk_create":
            Conversation.objects.bulk_create([conversation])
            Message.objects.bulk_create(messages)
        else:
            insert_each(Conversation, [conversation])
            insert_each(Message, messages)
        assert not conversation._state.adding and all(not m._state.adding for m in messages)
        pair.append((conversation, messages))

    def stored(obj: Any) -> dict[str, Any]:
        skip = {"id", "conversation_id", "client_id", "version_group", "created_at", "updated_at"}
        row = type(obj).objects.filter(pk=obj.pk).values().get()
        return {name: value for name, value in row.items() if name not in skip}

    (c1, m1), (c2, m2) = pair
    assert stored(c1) == stored(c2)
    assert [stored(m) for m in m1] == [stored(m) for m in m2]
    question, answer = (Message.objects.get(pk=m.pk) for m in m2)
    assert question.conversation_id == c2.pk and question.client_id == m2[0].client_id
    assert question.created_at <= answer.created_at  # stamped in order
    assert Conversation.objects.get(pk=c2.pk).created_at is not None


def test_insert_each_refuses_what_it_cannot_write_as_given() -> None:
    with pytest.raises(TypeError, match="made by the database"):
        insert_each(TokenUsage, [TokenUsage()])
    conversation = Conversation(owner=make_user("expr"), title=Now())
    with pytest.raises(TypeError, match="expression"):
        insert_each(Conversation, [conversation])
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
