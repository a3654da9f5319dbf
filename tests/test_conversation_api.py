"""The sidebar's JSON, rename, delete and export, with the test client."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from conversations.models import Conversation, Message, TokenUsage
from tests.conftest import connect
from tests.factories import logged_in_client, make_conversation, make_message

pytestmark = pytest.mark.django_db


client_for = logged_in_client


def many_conversations(owner: Any, count: int) -> list[Conversation]:
    now = timezone.now()
    conversations = Conversation.objects.bulk_create(
        Conversation(owner=owner, title=f"Chat {i:04d}") for i in range(count)
    )
    # Distinct, known times: chat 0 is the oldest.
    for i, conversation in enumerate(conversations):
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=now - timedelta(minutes=count - i))
    return conversations


def test_sidebar_pages_through_every_conversation_newest_first(alice: Any, bob: Any) -> None:
    many_conversations(alice, 120)
    many_conversations(bob, 3)
    client = client_for(alice)
    titles: list[str] = []
    cursor = None
    pages = 0
    while True:
        response = client.get("/conversations/", {"cursor": cursor} if cursor else {})
        assert response.status_code == 200
        body = response.json()
        titles += [c["title"] for c in body["conversations"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 3
    assert titles == [f"Chat {i:04d}" for i in range(119, -1, -1)]


def test_a_sidebar_page_costs_the_same_queries_deep_in_the_list(alice: Any) -> None:
    many_conversations(alice, 1000)
    client = client_for(alice)
    body = client.get("/conversations/").json()
    for _ in range(10):
        body = client.get("/conversations/", {"cursor": body["next"]}).json()
    with CaptureQueriesContext(connection) as queries:
        deep = client.get("/conversations/", {"cursor": body["next"]}).json()
    assert len(deep["conversations"]) == 50
    assert deep["conversations"][0]["title"] == "Chat 0449"
    assert len([q for q in queries if "conversations_conversation" in q["sql"]]) == 1


def test_bad_cursor_is_400(alice: Any) -> None:
    assert client_for(alice).get("/conversations/", {"cursor": "not-a-cursor"}).status_code == 400


def test_search_matches_titles_and_message_text_of_own_conversations_only(alice: Any, bob: Any) -> None:
    by_title = make_conversation(alice, title="Owl facts")
    by_text = make_conversation(alice, title="Birds")
    Message.objects.create(
        conversation=by_text, role="user", content="Tell me how an OWL sees at night, in some detail please."
    )
    make_conversation(alice, title="Cats")
    theirs = make_conversation(bob, title="Bob's owls")
    make_message(theirs, role="user", content="owl")

    found = client_for(alice).get("/conversations/", {"q": "owl"}).json()["conversations"]

    assert {c["id"] for c in found} == {str(by_title.pk), str(by_text.pk)}
    snippet = next(c["snippet"] for c in found if c["id"] == str(by_text.pk))
    assert "OWL sees at night" in snippet


def test_rename(alice: Any, bob: Any) -> None:
    conversation = make_conversation(alice, title="Old")
    url = f"/c/{conversation.pk}/rename"
    client = client_for(alice)

    response = client.post(url, json.dumps({"title": "  New   name "}), content_type="application/json")
    assert response.json() == {"conversation": {"id": str(conversation.pk), "title": "New name"}}
    assert Conversation.objects.get(pk=conversation.pk).title == "New name"

    assert client.post(url, {"title": "Form post works too"}).status_code == 200
    empty = client.post(url, json.dumps({"title": "  "}), content_type="application/json")
    assert (empty.status_code, empty.json()["error"]) == (400, "The title is empty.")
    assert (
        client.post(url, json.dumps({"title": "x" * 201}), content_type="application/json").status_code == 400
    )
    assert client.get(url).status_code == 405
    assert client_for(bob).post(url, {"title": "mine"}).status_code == 404
    assert Conversation.objects.get(pk=conversation.pk).title == "Form post works too"


def test_rename_and_delete_need_the_csrf_token(alice: Any) -> None:
    conversation = make_conversation(alice, title="Kept")
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post(f"/c/{conversation.pk}/rename", {"title": "x"}).status_code == 403
    assert client.post(f"/c/{conversation.pk}/delete").status_code == 403
    assert Conversation.objects.filter(pk=conversation.pk, title="Kept").exists()


def test_delete_removes_messages_and_keeps_the_ledger(alice: Any, bob: Any) -> None:
    conversation = make_conversation(alice, title="Gone soon")
    answer = make_message(conversation, role="assistant", content="hi")
    TokenUsage.objects.create(
        user=alice,
        conversation=conversation,
        message=answer,
        model="m",
        prompt_tokens=5,
        cost=Decimal("0.01"),
    )
    url = f"/c/{conversation.pk}/delete"
    assert client_for(bob).post(url).status_code == 404

    response = client_for(alice).post(url, HTTP_ACCEPT="application/json")

    assert response.json() == {"deleted": str(conversation.pk)}
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(pk=answer.pk).exists()
    usage = TokenUsage.objects.get()
    assert (usage.conversation_id, usage.message_id, usage.cost) == (None, None, Decimal("0.01"))


def test_delete_by_form_redirects_to_a_new_chat(alice: Any) -> None:
    conversation = make_conversation(alice)
    response = client_for(alice).post(f"/c/{conversation.pk}/delete")
    assert (response.status_code, response["Location"]) == (302, "/")


@pytest.mark.django_db(transaction=True)
async def test_rename_and_delete_reach_every_tab_of_the_user(alice: Any, bob: Any) -> None:
    conversation = await Conversation.objects.acreate(owner=alice, title="Before")
    tab = await connect(alice)
    stranger = await connect(bob)
    client = await sync_to_async(client_for)(alice)

    await sync_to_async(client.post)(f"/c/{conversation.pk}/rename", {"title": "After"})
    assert await tab.receive_json_from(timeout=5) == {
        "type": "conversation.updated",
        "conversation": {"id": str(conversation.pk), "title": "After"},
    }
    await sync_to_async(client.post)(f"/c/{conversation.pk}/delete")
    assert await tab.receive_json_from(timeout=5) == {
        "type": "conversation.deleted",
        "conversation": str(conversation.pk),
    }
    assert await stranger.receive_nothing(timeout=0.2)
    await tab.disconnect()
    await stranger.disconnect()


def test_export_markdown_and_json(alice: Any, bob: Any) -> None:
    conversation = make_conversation(alice, title="Adding", prompt_text="Be brief.")
    make_message(conversation, role="user", content="2+2?")
    old = Message.objects.create(
        conversation=conversation, role="assistant", content="5", model="m", is_active=False
    )
    new = Message.objects.create(
        conversation=conversation, role="assistant", content="4", model="m", version_group=old.version_group
    )
    TokenUsage.objects.create(user=alice, conversation=conversation, message=new, model="m", prompt_tokens=3)
    # A second call of the same answer (a tool round) adds up; a summary call made for it does not.
    TokenUsage.objects.create(
        user=alice, conversation=conversation, message=new, model="m", prompt_tokens=5, estimated=True
    )
    TokenUsage.objects.create(
        user=alice, conversation=conversation, message=new, model="m", prompt_tokens=100, kind="summary"
    )
    client = client_for(alice)

    markdown = client.get(f"/c/{conversation.pk}/export.md")
    assert markdown["Content-Disposition"] == 'attachment; filename="adding.md"'
    assert markdown.content.decode() == (
        "# Adding\n\n> System prompt: Be brief.\n\n**You:**\n\n2+2?\n\n**Assistant (m):**\n\n4\n"
    )

    exported = client.get(f"/c/{conversation.pk}/export.json")
    assert exported["Content-Disposition"] == 'attachment; filename="adding.json"'
    body = exported.json()
    assert body["title"] == "Adding"
    assert [(m["content"], m["is_active"]) for m in body["messages"]] == [
        ("2+2?", True),
        ("5", False),
        ("4", True),
    ]
    assert body["messages"][2]["usage"]["prompt_tokens"] == 8
    assert body["messages"][2]["usage"]["estimated"] is True
    assert client_for(bob).get(f"/c/{conversation.pk}/export.json").status_code == 404
    assert client.get(f"/c/{conversation.pk}/export.txt").status_code == 404


def test_page_gives_each_message_its_place_among_versions(alice: Any) -> None:
    conversation = make_conversation(alice)
    make_message(conversation, role="user", content="q")
    first = make_message(conversation, role="assistant", content="a1", is_active=False)
    Message.objects.create(
        conversation=conversation, role="assistant", content="a2", version_group=first.version_group
    )
    response = client_for(alice).get(f"/c/{conversation.pk}/")
    versions = [
        (m.content, m.is_active, m.version_index, m.version_count) for m in response.context["messages"]
    ]
    assert versions == [("q", True, 1, 1), ("a1", False, 1, 2), ("a2", True, 2, 2)]


@pytest.mark.django_db(transaction=True)
async def test_deleting_a_conversation_mid_answer_stops_it_and_keeps_its_spend(
    alice: Any, fake_llm: Any
) -> None:
    import asyncio
    import uuid

    from conversations import generation
    from tests.fake_llm import Reply
    from tests.test_consumer import frames_until

    fake_llm.script(Reply(chunks=["word "] * 200, delay=0.02))
    ws = await connect(alice)
    await ws.send_json_to(
        {"type": "message.send", "conversation": None, "content": "go", "client_id": str(uuid.uuid4())}
    )
    frames = await frames_until(ws, "generation.delta")
    conversation_id = frames[0]["conversation"]["id"]
    client = await sync_to_async(client_for)(alice)

    await sync_to_async(client.post)(f"/c/{conversation_id}/delete")
    await generation.wait_all()

    assert (await frames_until(ws, "conversation.deleted"))[-1]["conversation"] == conversation_id
    await ws.disconnect()
    usage = await TokenUsage.objects.aget()
    assert (usage.conversation_id, usage.message_id, usage.estimated) == (None, None, True)
    assert usage.completion_tokens > 0
    await asyncio.to_thread(fake_llm.wait_for, lambda: fake_llm.disconnects == 1)
