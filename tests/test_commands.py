"""The staff commands, called as `manage.py` would: `prune_history`,
`spend_report` and the terminal client `chat`."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import Quota
from conversations import prompts
from conversations.models import Conversation, Message, SystemPrompt, TokenUsage
from tests.fake_llm import FakeLLM, Reply

# --- prune_history ----------------------------------------------------------------------


def old_conversation(owner: Any, *, days: int, pinned: bool = False, messages: int = 2) -> Conversation:
    conversation = Conversation.objects.create(owner=owner, title=f"{days} days old", pinned=pinned)
    when = timezone.now() - timedelta(days=days)
    for i in range(messages):
        role = "user" if i % 2 == 0 else "assistant"
        message = Message.objects.create(conversation=conversation, role=role, content=f"turn {i}")
        Message.objects.filter(pk=message.pk).update(created_at=when, updated_at=when)
        if role == "assistant":
            TokenUsage.objects.create(
                user=owner, conversation=conversation, message=message, model="m", prompt_tokens=7,
                completion_tokens=3, cost=Decimal("0.25"),
            )  # fmt: skip
    Conversation.objects.filter(pk=conversation.pk).update(updated_at=when, created_at=when)
    return conversation


def prune(*args: str) -> str:
    out = StringIO()
    call_command("prune_history", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_prune_deletes_old_conversations_keeps_pinned_recent_and_the_ledger(alice: Any, bob: Any) -> None:
    old = old_conversation(alice, days=100, messages=4)
    pinned = old_conversation(alice, days=200, pinned=True)
    recent = old_conversation(bob, days=10)

    output = prune("--older-than", "90d")

    assert not Conversation.objects.filter(pk=old.pk).exists()
    assert not Message.objects.filter(conversation_id=old.pk).exists()
    assert set(Conversation.objects.values_list("pk", flat=True)) == {pinned.pk, recent.pk}
    assert Message.objects.count() == 4
    assert "Deleted 1 conversation(s) and 4 message(s) older than 90d" in output
    assert "kept 1 pinned conversation(s)" in output
    assert "2 usage row(s) kept" in output
    # The ledger: every row and every amount still there.
    assert TokenUsage.objects.count() == 4
    assert sum(row.cost for row in TokenUsage.objects.all()) == Decimal("1.00")
    orphaned = TokenUsage.objects.filter(conversation=None)
    assert orphaned.count() == 2 and set(orphaned.values_list("message", flat=True)) == {None}
    assert set(orphaned.values_list("user", flat=True)) == {alice.pk}


@pytest.mark.django_db
def test_prune_dry_run_changes_nothing(alice: Any) -> None:
    old_conversation(alice, days=100, messages=3)
    old_conversation(alice, days=100, pinned=True)
    before = (
        Conversation.objects.count(),
        Message.objects.count(),
        TokenUsage.objects.filter(conversation=None).count(),
    )

    output = prune("--older-than", "12w", "--dry-run")

    assert "Dry run: would delete 1 conversation(s) and 3 message(s) older than 12w" in output
    assert "would keep 1 pinned conversation(s). Nothing was deleted." in output
    after = (
        Conversation.objects.count(),
        Message.objects.count(),
        TokenUsage.objects.filter(conversation=None).count(),
    )
    assert after == before


@pytest.mark.django_db
def test_prune_one_user_only(alice: Any, bob: Any) -> None:
    old_conversation(alice, days=100)
    bobs = old_conversation(bob, days=100)
    output = prune("--older-than", "90d", "--user", "alice")
    assert list(Conversation.objects.values_list("pk", flat=True)) == [bobs.pk]
    assert "of alice" in output
    with pytest.raises(CommandError, match="No such user: nobody"):
        prune("--older-than", "90d", "--user", "nobody")


@pytest.mark.django_db
def test_prune_messages_keeps_a_live_conversations_recent_turns(alice: Any) -> None:
    conversation = old_conversation(alice, days=100, messages=2)
    fresh = Message.objects.create(conversation=conversation, role="user", content="back again")
    # Its summary covers the old turns, up to a message that goes now.
    conversation.summary = "They talked about the weather."
    conversation.summary_through = Message.objects.filter(conversation=conversation).order_by("created_at")[0]
    conversation.save(update_fields=["updated_at", "summary", "summary_through"])  # as a new question does
    old_empty = old_conversation(alice, days=95)

    output = prune("--older-than", "90d", "--what", "messages")

    assert list(Message.objects.values_list("pk", flat=True)) == [fresh.pk]
    conversation.refresh_from_db()
    assert conversation.summary_through is None and conversation.summary  # no dangling pointer
    assert not Conversation.objects.filter(pk=old_empty.pk).exists()
    assert "Deleted 1 conversation(s) and 4 message(s)" in output
    assert TokenUsage.objects.count() == 2 and not TokenUsage.objects.exclude(message=None).exists()


@pytest.mark.django_db
def test_prune_works_in_batches_with_a_bounded_number_of_queries(alice: Any) -> None:
    for _ in range(30):
        old_conversation(alice, days=100, messages=4)
    with CaptureQueriesContext(connection) as queries:
        output = prune("--older-than", "90d", "--what", "messages", "--batch-size", "400")
    assert "Deleted 30 conversation(s) and 120 message(s)" in output
    assert not Message.objects.exists() and not Conversation.objects.exists()
    assert len(queries) < 40  # a few per batch of 20 conversations, never per row


@pytest.mark.django_db
def test_prune_refuses_a_bad_age() -> None:
    with pytest.raises(CommandError, match="positive age like 90d"):
        prune("--older-than", "soon")
    with pytest.raises(CommandError):
        prune("--older-than", "0d")


# --- spend_report --------------------------------------------------------------------------


@pytest.fixture
def ledger(alice: Any, bob: Any) -> None:
    def row(
        user: Any, model: str, prompt: int, completion: int, cost: str, days_ago: int = 0, **kw: Any
    ) -> None:
        usage = TokenUsage.objects.create(
            user=user,
            model=model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost=Decimal(cost),
            **kw,
        )
        TokenUsage.objects.filter(pk=usage.pk).update(created_at=timezone.now() - timedelta(days=days_ago))

    row(alice, "small", 100, 20, "0.1")
    row(alice, "big", 1000, 200, "2", days_ago=1, estimated=True)
    row(bob, "big", 10, 2, "0.5", days_ago=2)
    row(bob, "big", 10, 2, "7", days_ago=100)  # outside the default 30 days


def report(*args: str) -> str:
    out = StringIO()
    call_command("spend_report", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_spend_report_table_by_user(ledger: None) -> None:
    output = report()
    lines = output.splitlines()
    assert lines[0].startswith("Spend by user from")
    assert lines[1].split() == [
        "user",
        "calls",
        "prompt",
        "completion",
        "cached",
        "tokens",
        "cost",
        "estimated",
    ]
    assert lines[3].split() == ["alice", "2", "1100", "220", "0", "1320", "2.100000", "1"]
    assert lines[4].split() == ["bob", "1", "10", "2", "0", "12", "0.500000", "0"]
    assert lines[6].split() == ["total", "3", "1110", "222", "0", "1332", "2.600000", "1"]
    assert "1 call(s) had no usage from the model" in output


@pytest.mark.django_db
def test_spend_report_csv_by_model(ledger: None) -> None:
    output = report("--by", "model", "--format", "csv")
    assert output.splitlines() == [
        "model,calls,prompt_tokens,completion_tokens,cached_tokens,total_tokens,cost,estimated",
        "big,2,1010,202,0,1212,2.500000,1",
        "small,1,100,20,0,120,0.100000,0",
    ]


@pytest.mark.django_db
def test_spend_report_json_by_day_for_one_user_over_a_range(ledger: None) -> None:
    today = timezone.localdate()
    since = str(today - timedelta(days=200))
    output = json.loads(report("--by", "day", "--user", "bob", "--since", since, "--format", "json"))
    assert output["by"] == "day"
    assert [row["key"] for row in output["rows"]] == [
        str(today - timedelta(days=100)),
        str(today - timedelta(days=2)),
    ]
    assert output["total"]["cost"] == "7.500000" and output["total"]["calls"] == 2


@pytest.mark.django_db
def test_spend_report_by_month_and_bad_ranges(ledger: None) -> None:
    output = json.loads(report("--by", "month", "--days", "365", "--format", "json"))
    assert sum(Decimal(row["cost"]) for row in output["rows"]) == Decimal("9.6")
    assert all(len(row["key"]) == 7 for row in output["rows"])  # YYYY-MM
    with pytest.raises(CommandError, match="starts"):
        report("--since", "2026-02-01", "--until", "2026-01-01")
    with pytest.raises(CommandError, match="Dates look like"):
        report("--since", "yesterday")


# --- chat -----------------------------------------------------------------------------------


@pytest.fixture
def fake_llm_no_titles(fake_llm: FakeLLM, settings: Any) -> FakeLLM:
    """The fake model answering only the answers: a title call would take
    the next scripted reply."""
    settings.CHAT_AUTO_TITLE = False
    return fake_llm


def chat(*args: str, stdin: Any) -> str:
    out = StringIO()
    call_command("chat", *args, stdin=stdin, stdout=out)
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_chat_streams_answers_and_new_starts_another_conversation(
    alice: Any, fake_llm_no_titles: FakeLLM
) -> None:
    fake_llm = fake_llm_no_titles
    fake_llm.script(
        Reply(chunks=["Bonjour", " Alice", "!"], delay=0.02),
        Reply(chunks=["Second", " answer."]),
    )
    output = chat("--user", "alice", stdin=StringIO("hello there\n/new\nanother topic\n/quit\n"))

    assert "assistant> Bonjour Alice!\n" in output
    assert "[fake-model · 11 in · 5 out · $0.00]" in output  # each answer's usage, money as everywhere
    assert "New conversation: your next message starts it." in output
    assert "assistant> Second answer.\n" in output
    assert output.rstrip().endswith("Bye.")
    conversations = list(Conversation.objects.filter(owner=alice).order_by("created_at"))
    assert len(conversations) == 2
    first, second = (
        [(m.role, m.content, m.status) for m in c.messages.order_by("created_at")] for c in conversations
    )
    assert first == [("user", "hello there", "complete"), ("assistant", "Bonjour Alice!", "complete")]
    assert second == [("user", "another topic", "complete"), ("assistant", "Second answer.", "complete")]
    assert TokenUsage.objects.filter(user=alice, kind="answer", estimated=False).count() == 2


@pytest.mark.django_db(transaction=True)
def test_chat_continues_a_browser_conversation_and_uses_a_named_prompt(
    alice: Any, fake_llm_no_titles: FakeLLM
) -> None:
    fake_llm = fake_llm_no_titles
    earlier = Conversation.objects.create(owner=alice, title="From the browser")
    Message.objects.create(conversation=earlier, role="user", content="first question")
    Message.objects.create(conversation=earlier, role="assistant", content="first answer")
    output = chat("--user", "alice", "--conversation", str(earlier.pk), stdin=StringIO("follow-up\n"))

    assert "Continuing “From the browser”" in output
    assert earlier.messages.count() == 4
    sent = fake_llm.requests[-1].body["messages"]
    assert [m["content"] for m in sent] == ["first question", "first answer", "follow-up"]

    pirate = SystemPrompt(name="Pirate", text="Talk like a pirate.")
    prompts.save_prompt(pirate)
    chat("--user", "alice", "--prompt", "Pirate", stdin=StringIO("ahoy\n/quit\n"))
    newest = Conversation.objects.filter(owner=alice).order_by("-created_at").first()
    assert newest is not None
    assert newest.prompt == pirate and newest.prompt_text == "Talk like a pirate."
    assert fake_llm.requests[-1].body["messages"][0] == {"role": "system", "content": "Talk like a pirate."}


@pytest.mark.django_db(transaction=True)
def test_chat_says_when_the_quota_is_used_up(alice: Any, fake_llm_no_titles: FakeLLM) -> None:
    Quota.objects.create(user=alice, answers_per_minute=1)
    output = chat("--user", "alice", stdin=StringIO("one\ntwo\n/quit\n"))
    assert "assistant> Hello from the fake model.\n" in output
    assert "Too many answers this minute; try again in" in output and "(quota_exceeded)" in output
    assert Message.objects.filter(conversation__owner=alice, role="assistant").count() == 1


@pytest.mark.django_db(transaction=True)
def test_chat_refuses_other_users_conversations_and_unknown_names(alice: Any, bob: Any) -> None:
    bobs = Conversation.objects.create(owner=bob)
    with pytest.raises(CommandError, match="No such conversation"):
        chat("--user", "alice", "--conversation", str(bobs.pk), stdin=StringIO(""))
    with pytest.raises(CommandError, match="No such user"):
        chat("--user", "nobody", stdin=StringIO(""))
    with pytest.raises(CommandError, match="No system prompt named"):
        chat("--user", "alice", "--prompt", "Missing", stdin=StringIO(""))


@pytest.mark.django_db(transaction=True)
def test_ctrl_c_stops_the_answer_and_the_ledger_gets_an_estimate(
    alice: Any, fake_llm_no_titles: FakeLLM
) -> None:
    fake_llm = fake_llm_no_titles
    """Ctrl+C while an answer streams stops it (text so far kept, an estimated
    usage row written); Ctrl+C at the prompt then quits."""
    fake_llm.script(Reply(chunks=["word "] * 200, delay=0.02, usage=(50, 200)))
    read_end, write_end = os.pipe()
    stdin = os.fdopen(read_end, "r")
    out = StringIO()

    def press_ctrl_c() -> None:
        fake_llm.wait_for(lambda: "word word word" in out.getvalue())
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 20
        while (
            not re.search(r"\[stopped\]\n(\[.*\]\n)?you> $", out.getvalue()) and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    os.write(write_end, b"tell me a long story\n")
    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    try:
        call_command("chat", "--user", "alice", stdin=stdin, stdout=out)
    finally:
        os.close(write_end)
        presser.join(5)

    output = out.getvalue()
    assert "^C — stopping the answer" in output and "[stopped]" in output
    # Nothing of the answer is printed after "stopping"; then what it cost.
    assert output.split("stopping the answer…")[1].split("[stopped]")[0].strip() == ""
    assert re.search(r"\[stopped\]\n\[fake-model · \d+ in · \d+ out · \$0\.00\]\n", output)
    assert output.rstrip().endswith("Bye.")
    answer = Message.objects.get(role="assistant")
    assert answer.status == "stopped"
    assert answer.content.startswith("word word word") and len(answer.content) < len("word ") * 200
    usage = TokenUsage.objects.get(message=answer)
    assert usage.estimated  # the stream was cut before its usage chunk
    assert usage.completion_tokens > 0 and usage.completion_tokens < 200
    fake_llm.wait_for(lambda: fake_llm.disconnects == 1)  # the stop really closed the upstream stream


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("prune_history", ["--older-than", "--dry-run", "--user", "--what", "Pinned conversations"]),
        ("spend_report", ["--by", "--since", "--until", "--format", "{table,csv,json}"]),
        ("chat", ["--user", "--conversation", "--prompt", "/new", "/clear", "/quit", "Ctrl+C"]),
    ],
)
def test_every_command_explains_itself(name: str, expected: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        call_command(name, "--help")
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in expected:
        assert word in text
