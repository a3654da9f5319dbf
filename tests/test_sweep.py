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

from conversations import generation
from conversations.models import Conversation, Message
from tests.conftest import connect, dead_pid

pytestmark = pytest.mark.django_db(transaction=True)


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
    with pytest.raises(generation.Busy):
        generation.accept_message(
            user=alice, conversation_id=answer.conversation_id, content="hi", client_id=uuid.uuid4()
        )
    generation.sweep_interrupted()
    accepted = generation.accept_message(
        user=alice, conversation_id=answer.conversation_id, content="hi", client_id=uuid.uuid4()
    )
    assert accepted.answer.status == "streaming"
