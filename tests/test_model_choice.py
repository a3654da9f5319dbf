"""Model choice: staff list the models users may pick (the admin), a new chat
picks one (the socket, the terminal client), the conversation keeps and
shows it, and every answer goes to it."""

from __future__ import annotations

from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError
from django.urls import reverse

from conversations.models import ChatModel, Conversation, Message, ModelPrice, SystemPrompt
from tests.conftest import connect
from tests.fake_llm import Reply
from tests.test_admin import client_for, root  # noqa: F401 (a fixture)
from tests.test_commands import chat
from tests.test_consumer import ask, send_frame

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def catalogue(db: None) -> list[ChatModel]:
    return [
        ChatModel.objects.create(name="fake-fast", label="Fast", position=1),
        ChatModel.objects.create(name="fake-deep", label="Deep thinker", position=2),
        ChatModel.objects.create(name="fake-retired", enabled=False, position=3),
    ]


async def test_a_new_chat_uses_the_model_it_picked_for_every_answer(
    alice: Any, fake_llm: Any, catalogue: Any
) -> None:
    fake_llm.script(Reply(chunks=["One."], model="fake-deep"), Reply(chunks=["Two."], model="fake-deep"))
    ws = await connect(alice)
    first = await ask(ws, "hi", model="fake-deep")
    conversation_id = first[0]["conversation"]["id"]
    later = await ask(ws, "and again", conversation_id, model="fake-fast")  # ignored: not a new chat
    await ws.disconnect()

    assert first[0]["conversation"]["model"] == "fake-deep"
    assert [r.body["model"] for r in fake_llm.streamed_requests] == ["fake-deep", "fake-deep"]
    assert first[-1]["model"] == later[-1]["model"] == "fake-deep"
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.model == "fake-deep"
    # The title is asked of the same model.
    assert {r.body["model"] for r in fake_llm.completion_requests} == {"fake-deep"}


async def test_without_a_pick_the_prompt_or_site_model_answers(
    alice: Any, fake_llm: Any, catalogue: Any
) -> None:
    await SystemPrompt.objects.acreate(name="Coder", text="Code.", model="fake-coder", is_default=True)
    ws = await connect(alice)
    frames = await ask(ws, "hi")
    await ws.disconnect()

    assert fake_llm.streamed_requests[-1].body["model"] == "fake-coder"
    assert frames[0]["conversation"]["model"] == "fake-coder"


@pytest.mark.parametrize("model", ["fake-retired", "gpt-unknown", 42])
async def test_a_model_users_may_not_pick_is_refused_and_nothing_is_stored(
    alice: Any, fake_llm: Any, catalogue: Any, model: Any
) -> None:
    ws = await connect(alice)
    await ws.send_json_to(send_frame("hi", model=model))
    error = await ws.receive_json_from(timeout=5)
    await ws.disconnect()

    assert error["type"] == "error" and error["code"] == "invalid_request"
    assert (
        ("not available" in error["message"]) if isinstance(model, str) else ("`model`" in error["message"])
    )
    assert not await Message.objects.aexists()
    assert fake_llm.requests == []


def test_the_terminal_client_picks_a_model(alice: Any, fake_llm: Any, catalogue: Any, settings: Any) -> None:
    settings.CHAT_AUTO_TITLE = False
    fake_llm.script(Reply(chunks=["Quick."], model="fake-fast"))
    output = chat("--user", "alice", "--model", "fake-fast", stdin=StringIO("hello\n/quit\n"))

    assert "model fake-fast" in output and "assistant> Quick." in output
    assert fake_llm.streamed_requests[-1].body["model"] == "fake-fast"
    with pytest.raises(CommandError, match=r"No model named 'fake-retired'.*fake-fast, fake-deep"):
        chat("--user", "alice", "--model", "fake-retired", stdin=StringIO(""))


def test_the_page_offers_the_enabled_models_and_shows_the_chats_model(
    alice: Any, fake_llm: Any, catalogue: Any
) -> None:
    client = client_for(alice)
    page = client.get(reverse("chat:new")).content.decode()
    assert '<option value="" selected>Default (fake-model)</option>' in page
    assert '<option value="fake-fast">Fast</option>' in page
    assert '<option value="fake-deep">Deep thinker</option>' in page
    assert "fake-retired" not in page

    conversation = Conversation.objects.create(owner=alice, model="fake-deep")
    page = client.get(
        reverse("chat:conversation", kwargs={"conversation_id": conversation.pk})
    ).content.decode()
    assert 'id="model-select"' not in page
    assert '<span id="model-chip-name">Deep thinker</span>' in page


def test_no_catalogue_no_choice(alice: Any, fake_llm: Any) -> None:
    page = client_for(alice).get(reverse("chat:new")).content.decode()
    assert 'id="model-select"' not in page


def test_staff_keep_the_list_with_a_link_to_each_price(root: Any, catalogue: Any) -> None:  # noqa: F811
    price = ModelPrice.objects.create(
        model="fake-fast", input_per_million=Decimal("0.15"), output_per_million=Decimal("0.6")
    )
    page = client_for(root).get(reverse("admin:conversations_chatmodel_changelist")).content.decode()

    assert reverse("admin:conversations_modelprice_change", args=[price.pk]) in page
    assert "0.15 / 0.6" in page
    assert page.count("No price set: calls cost 0") == 2
    assert reverse("admin:conversations_modelprice_add") + "?model=fake-deep" in page
