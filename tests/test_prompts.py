"""System prompts: every change is a version, exactly one default, and a
conversation can be traced to the prompt text that produced it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import IntegrityError, transaction

from conversations import generation, prompts
from conversations.models import Conversation, SystemPrompt, SystemPromptVersion

pytestmark = pytest.mark.django_db


def new_prompt(name: str = "Helpful", text: str = "Be helpful.", **fields: Any) -> SystemPrompt:
    prompt = SystemPrompt(name=name, text=text, **fields)
    prompts.save_prompt(prompt)
    return prompt


def version_of(conversation: Conversation) -> SystemPromptVersion:
    assert conversation.prompt_version is not None
    return conversation.prompt_version


def test_first_save_makes_v1_and_the_first_prompt_is_the_default(alice: Any) -> None:
    prompt = SystemPrompt(name="Helpful", text="Be helpful.", model="m-1", temperature=0.2, max_tokens=300)
    version = prompts.save_prompt(prompt, by=alice)

    assert (version.number, version.text, version.model) == (1, "Be helpful.", "m-1")
    assert (version.temperature, version.max_tokens, version.created_by) == (0.2, 300, alice)
    assert SystemPrompt.objects.get(pk=prompt.pk).is_default


def test_every_change_of_text_or_settings_is_a_new_version_and_old_text_is_kept(alice: Any) -> None:
    prompt = new_prompt(text="First text.")
    prompt.text = "Second text."
    assert prompts.save_prompt(prompt, by=alice).number == 2
    prompt.temperature = 0.9
    assert prompts.save_prompt(prompt, by=alice).number == 3
    prompt.max_tokens = 99
    assert prompts.save_prompt(prompt, by=alice).number == 4
    prompt.model = "other-model"
    assert prompts.save_prompt(prompt, by=alice).number == 5

    texts = list(prompt.versions.order_by("number").values_list("text", flat=True))
    assert texts == ["First text.", "Second text.", "Second text.", "Second text.", "Second text."]


def test_a_save_that_changes_nothing_the_model_sees_is_not_a_version() -> None:
    prompt = new_prompt()
    prompt.name = "Renamed"
    version = prompts.save_prompt(prompt)
    assert version.number == 1
    assert prompt.versions.count() == 1


def test_saving_a_default_clears_the_other_default_in_one_go() -> None:
    first = new_prompt("First")
    second = SystemPrompt(name="Second", text="x", is_default=True)
    prompts.save_prompt(second)

    assert list(SystemPrompt.objects.filter(is_default=True)) == [second]
    assert not SystemPrompt.objects.get(pk=first.pk).is_default


def test_the_database_refuses_two_defaults() -> None:
    new_prompt("First")
    with pytest.raises(IntegrityError), transaction.atomic():
        SystemPrompt.objects.create(name="Second", text="x", is_default=True)


def test_version_for_new_conversation_is_the_latest() -> None:
    prompt = new_prompt(text="v1 text")
    prompt.text = "v2 text"
    prompts.save_prompt(prompt)
    version = prompts.version_for_new_conversation(prompt)
    assert (version.number, version.text) == (2, "v2 text")


def test_version_for_new_conversation_makes_v1_for_a_prompt_without_versions() -> None:
    prompt = SystemPrompt.objects.create(name="Raw", text="Made in a shell.", temperature=0.5)
    version = prompts.version_for_new_conversation(prompt)
    assert (version.number, version.text, version.temperature) == (1, "Made in a shell.", 0.5)
    assert prompts.version_for_new_conversation(prompt) == version  # not another one


def test_a_prompt_changed_outside_save_prompt_gets_a_version_of_its_real_text() -> None:
    prompt = new_prompt(text="saved")
    SystemPrompt.objects.filter(pk=prompt.pk).update(text="edited in a shell")
    prompt.refresh_from_db()
    version = prompts.version_for_new_conversation(prompt)
    assert (version.number, version.text) == (2, "edited in a shell")


def test_a_conversation_keeps_pointing_at_the_version_it_used(alice: Any) -> None:
    prompt = new_prompt(text="Answer in French.")
    version = prompts.version_for_new_conversation(prompt)
    conversation = Conversation.objects.create(
        owner=alice, prompt=prompt, prompt_version=version, prompt_text=version.text
    )
    prompt.text = "Answer in German."
    prompts.save_prompt(prompt)

    conversation.refresh_from_db()
    assert conversation.prompt_version is not None
    assert conversation.prompt_version.number == 1
    assert conversation.prompt_version.text == "Answer in French."
    assert SystemPromptVersion.objects.filter(prompt=prompt).count() == 2


def test_make_default_moves_the_flag() -> None:
    first = new_prompt("First")
    second = new_prompt("Second")
    prompts.make_default(second)
    assert list(SystemPrompt.objects.filter(is_default=True).values_list("name", flat=True)) == ["Second"]
    first.refresh_from_db()
    assert not first.is_default


def test_conversations_started_through_generation_record_the_version_they_used(alice: Any) -> None:
    prompt = new_prompt(text="Answer in French.")
    first = generation.accept_message(user=alice, conversation_id=None, content="hi", client_id=uuid.uuid4())
    prompt.text = "Answer in German."
    prompts.save_prompt(prompt)
    second = generation.accept_message(user=alice, conversation_id=None, content="hi", client_id=uuid.uuid4())

    traced = [
        Conversation.objects.select_related("prompt_version").get(pk=accepted.conversation.pk)
        for accepted in (first, second)
    ]
    assert [(version_of(c).number, version_of(c).text) for c in traced] == [
        (1, "Answer in French."),
        (2, "Answer in German."),
    ]
    assert [c.prompt_text for c in traced] == ["Answer in French.", "Answer in German."]


# --- A fresh install's default prompt (a data migration) ---------------------------


MIGRATION_CHECK = """
import json
from conversations.models import SystemPrompt
print(json.dumps([
    [p.name, p.is_default, p.text, [v.number for v in p.versions.all()]] for p in SystemPrompt.objects.all()
]))
"""


def _manage(db_path: Any, *args: str) -> str:
    import os
    import subprocess
    import sys

    from django.conf import settings

    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(DATABASE_URL=f"sqlite:///{db_path}", DJANGO_SETTINGS_MODULE="chatsite.settings")
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_fresh_install_gets_one_default_prompt_with_its_first_version(tmp_path: Any) -> None:
    import json

    db = tmp_path / "fresh.sqlite3"
    _manage(db, "migrate", "--no-input", "-v", "0")
    [[name, is_default, text, versions]] = json.loads(
        _manage(db, "shell", "-c", MIGRATION_CHECK).strip().splitlines()[-1]
    )
    assert (name, is_default, versions) == ("Assistant", True, [1])
    for words in ("concise", "unsure", "Markdown"):
        assert words in text


def test_an_install_that_has_prompts_gets_none_on_upgrade(tmp_path: Any) -> None:
    import json

    db = tmp_path / "upgrade.sqlite3"
    _manage(db, "migrate", "conversations", "0005", "--no-input", "-v", "0")
    import sqlite3
    import uuid as uuid_module

    # The prompt as that install has it (the schema of 0005: no later columns).
    with sqlite3.connect(db) as raw:
        raw.execute(
            "INSERT INTO conversations_systemprompt"
            " (id, name, text, is_default, model, created_at, updated_at)"
            " VALUES (?, 'Ours', 'Be brief.', 1, '', '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
            [uuid_module.uuid4().hex],
        )
    _manage(db, "migrate", "--no-input", "-v", "0")
    prompts_now = json.loads(_manage(db, "shell", "-c", MIGRATION_CHECK).strip().splitlines()[-1])
    assert [p[:3] for p in prompts_now] == [["Ours", True, "Be brief."]]
