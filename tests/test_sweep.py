"""Answers left `streaming` by a dead process become `interrupted`."""

from __future__ import annotations

import socket
import uuid
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from conversations import generation, refusals
from conversations.models import Conversation, Message
from tests.conftest import connect, dead_pid

pytestmark = pytest.mark.django_db(transaction=True)


def save_one(**end: Any) -> Any:
    """One answer's end, saved as every end is (a batch of one)."""
    from conversations.generation.ledger import AnswerEnd, save_answers

    (saved,) = save_answers([AnswerEnd(**end)])
    if isinstance(saved, Exception):
        raise saved
    return saved


def streaming_answer(owner: Any, worker: str, age: float = 0) -> Message:
    conversation = Conversation.objects.create(owner=owner)
    answer = Message.objects.create(
        conversation=conversation, role="assistant", status="streaming", content="half an", worker=worker
    )
    if age:
        Message.objects.filter(pk=answer.pk).update(updated_at=timezone.now() - timedelta(seconds=age))
    return answer


def status_of(message: Message) -> str:
    return Message.objects.get(pk=message.pk).status


def test_sweep_marks_dead_and_stale_answers_and_spares_live_ones(alice: Any) -> None:
    host = socket.gethostname()
    dead = streaming_answer(alice, f"{host}:{dead_pid()}")
    stale_elsewhere = streaming_answer(alice, "other-machine:123", age=600)
    live_elsewhere = streaming_answer(alice, "other-machine:456")
    ours = streaming_answer(alice, generation.WORKER_ID)

    assert generation.sweep_interrupted(stale_after=120) == 2

    assert status_of(dead) == status_of(stale_elsewhere) == "interrupted"
    assert status_of(live_elsewhere) == status_of(ours) == "streaming"
    assert Message.objects.get(pk=dead.pk).content == "half an"  # the text so far is kept


def test_at_startup_this_process_own_answers_are_dead_too(alice: Any) -> None:
    ours = streaming_answer(alice, generation.WORKER_ID)
    assert generation.sweep_interrupted(at_startup=True) == 1
    assert status_of(ours) == "interrupted"


def test_sweep_streaming_command(alice: Any) -> None:
    stale = streaming_answer(alice, "other-machine:1", age=50)
    fresh = streaming_answer(alice, "other-machine:2", age=5)
    out = StringIO()
    call_command("sweep_streaming", "--stale-after", "30", stdout=out)
    assert out.getvalue().strip() == "Marked 1 stuck answer(s) as interrupted."
    assert (status_of(stale), status_of(fresh)) == ("interrupted", "streaming")


async def test_first_connection_of_a_process_sweeps(alice: Any) -> None:
    from asgiref.sync import sync_to_async

    from chatsite.asgi import application

    application._done = False  # as in a freshly started process
    ours = await sync_to_async(streaming_answer)(alice, generation.WORKER_ID)
    ws = await connect(alice)
    await ws.disconnect()
    assert await sync_to_async(status_of)(ours) == "interrupted"
    assert application._done


def test_an_interrupted_conversation_accepts_new_messages(alice: Any) -> None:
    answer = streaming_answer(alice, f"{socket.gethostname()}:{dead_pid()}")
    with pytest.raises(refusals.Refusal, match="still being written"):
        generation.accept_message(
            user=alice, conversation_id=answer.conversation_id, content="hi", client_id=uuid.uuid4()
        )
    generation.sweep_interrupted()
    accepted = generation.accept_message(
        user=alice, conversation_id=answer.conversation_id, content="hi", client_id=uuid.uuid4()
    )
    assert accepted.answer.status == "streaming"


# --- A dead worker's answer is settled: text, ledger, reservation, followers ------------


def _accepted_then_orphaned(user: Any) -> generation.Accepted:
    """An answer accepted (its quota reserved) whose worker then died with
    part of it checkpointed."""
    accepted = generation.accept_message(
        user=user, conversation_id=None, content="tell me a story", client_id=uuid.uuid4()
    )
    Message.objects.filter(pk=accepted.answer.pk).update(
        content="Once upon", worker=f"{socket.gethostname()}:{dead_pid()}"
    )
    return accepted


def test_a_dead_answer_gets_an_estimated_ledger_row_and_its_reservation_back(alice: Any) -> None:
    from accounts.models import Quota, QuotaCounter
    from conversations.models import TokenUsage

    Quota.objects.create(user=alice, tokens_per_day=100_000)
    accepted = _accepted_then_orphaned(alice)
    day = QuotaCounter.objects.get(user=alice, window="day")
    assert day.tokens_reserved > 0  # held while the answer ran

    # The answer's log (Redis, when configured) had more than the checkpoint.
    event = generation.recovery.settle_dead(accepted.answer.pk, shown="Once upon a time")

    answer = Message.objects.get(pk=accepted.answer.pk)
    assert (answer.status, answer.content, answer.worker, answer.accounting) == (
        "interrupted",
        "Once upon a time",
        "",
        None,
    )
    row = TokenUsage.objects.get(message=answer)
    assert row.estimated and row.kind == "answer"
    assert accepted.answer.accounting is not None
    assert row.prompt_tokens == accepted.answer.accounting["prompt_tokens"] > 0
    assert row.completion_tokens > 0
    day.refresh_from_db()
    assert day.tokens_reserved == 0
    assert day.tokens_used == row.prompt_tokens + row.completion_tokens
    assert event is not None and event["type"] == "generation.finished"
    assert (event["status"], event["content"]) == ("interrupted", "Once upon a time")
    assert event["usage"]["completion_tokens"] == row.completion_tokens
    # Settled once: a second worker finding it too does nothing.
    assert generation.recovery.settle_dead(accepted.answer.pk, shown="Once upon a time") is None
    assert TokenUsage.objects.filter(message=answer).count() == 1


def test_a_log_that_does_not_extend_the_checkpoint_is_not_taken(alice: Any) -> None:
    accepted = _accepted_then_orphaned(alice)
    generation.recovery.settle_dead(accepted.answer.pk, shown="Something else entirely")
    assert Message.objects.get(pk=accepted.answer.pk).content == "Once upon"


def test_a_dead_answer_with_no_text_costs_nothing_and_gives_the_hold_back(alice: Any) -> None:
    from accounts.models import Quota, QuotaCounter
    from conversations.models import TokenUsage

    Quota.objects.create(user=alice, tokens_per_day=100_000)
    accepted = _accepted_then_orphaned(alice)
    Message.objects.filter(pk=accepted.answer.pk).update(content="")
    generation.recovery.settle_dead(accepted.answer.pk)
    assert not TokenUsage.objects.filter(message_id=accepted.answer.pk).exists()
    day = QuotaCounter.objects.get(user=alice, window="day")
    assert (day.tokens_used, day.tokens_reserved) == (0, 0)


def test_an_answer_taken_for_dead_that_ends_after_all_keeps_its_real_end(alice: Any) -> None:
    """Its worker was cut off from the database long enough to be swept; when
    it gets through, its real end replaces the sweep's estimate, once."""
    from accounts.models import Quota, QuotaCounter
    from conversations import llm
    from conversations.models import TokenUsage

    Quota.objects.create(user=alice, tokens_per_day=100_000)
    accepted = _accepted_then_orphaned(alice)
    generation.recovery.settle_dead(accepted.answer.pk, shown="Once upon a time")

    save_one(
        answer=accepted.answer,
        owner_id=alice.pk,
        content="Once upon a time, the end.",
        status="complete",
        finish_reason="stop",
        model="fake-model",
        usage=llm.Usage(prompt_tokens=30, completion_tokens=7),
        messages=accepted.messages,
        called=True,
        reservation=accepted.reservation,
    )

    answer = Message.objects.get(pk=accepted.answer.pk)
    assert (answer.status, answer.content) == ("complete", "Once upon a time, the end.")
    row = TokenUsage.objects.get(message=answer)
    assert (row.prompt_tokens, row.completion_tokens, row.estimated) == (30, 7, False)
    day = QuotaCounter.objects.get(user=alice, window="day")
    assert (day.tokens_used, day.tokens_reserved) == (37, 0)


def test_an_end_saved_twice_is_accounted_once(alice: Any) -> None:
    """A retried save whose first try committed (the reply was lost with the
    connection) stores nothing more: one ledger row, the hold released once."""
    from accounts.models import Quota, QuotaCounter
    from conversations import llm
    from conversations.models import TokenUsage

    Quota.objects.create(user=alice, tokens_per_day=100_000)
    accepted = generation.accept_message(
        user=alice, conversation_id=None, content="hello", client_id=uuid.uuid4()
    )
    end = {
        "answer": accepted.answer,
        "owner_id": alice.pk,
        "content": "Hi there.",
        "status": "complete",
        "finish_reason": "stop",
        "model": "fake-model",
        "usage": llm.Usage(prompt_tokens=12, completion_tokens=3),
        "messages": accepted.messages,
        "called": True,
        "reservation": accepted.reservation,
    }
    first = save_one(**end)
    again = save_one(**end)

    assert first[0] == again[0]
    assert TokenUsage.objects.filter(message_id=accepted.answer.pk).count() == 1
    day = QuotaCounter.objects.get(user=alice, window="day")
    assert (day.tokens_used, day.tokens_reserved) == (15, 0)
