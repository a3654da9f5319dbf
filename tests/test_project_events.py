"""What the tabs hear of a project's changes (conversations/services.py):
the owner's topic only, once the transaction commits, a deleted project's
chats before the project, nothing for a change that rolled back or left
the name as it was."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction

from conversations import services
from conversations.models import Conversation, Project
from tests.factories import make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def told(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, dict[str, Any]]]:
    heard: list[tuple[int, dict[str, Any]]] = []
    monkeypatch.setattr(services, "_tell_user", lambda user_id, event: heard.append((user_id, event)))
    return heard


def test_made_renamed_and_deleted_with_its_chats_kept_or_deleted(
    told: list[tuple[int, dict[str, Any]]], django_capture_on_commit_callbacks: Any
) -> None:
    owner, other = make_user("events_owner"), make_user("events_other")
    Project.objects.create(owner=other, name="Not theirs")
    with django_capture_on_commit_callbacks(execute=True):
        project = services.project_create(owner, name="Plans")
    assert told == [
        (owner.pk, {"type": "project.created", "project": {"id": str(project.pk), "name": "Plans"}})
    ]

    told.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.project_update(project, instructions="Be brief.")  # the name stays: nothing to show
        services.project_update(project, name="Big plans")
    assert [event["type"] for _, event in told] == ["project.updated"]
    assert told[0][1]["project"]["name"] == "Big plans"

    kept = Conversation.objects.create(owner=owner, project=project, title="Kept")
    told.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.project_delete(project, with_chats=False)
    assert [(event["type"], event.get("conversation", {}).get("project", "-")) for _, event in told] == [
        ("conversation.updated", None),
        ("project.deleted", "-"),
    ]
    assert {user for user, _ in told} == {owner.pk}
    kept.refresh_from_db()
    assert kept.project_id is None

    doomed_project = services.project_create(owner, name="Doomed")
    doomed = Conversation.objects.create(owner=owner, project=doomed_project, title="Doomed chat")
    told.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert services.project_delete(doomed_project, with_chats=True) == 1
    assert [event["type"] for _, event in told] == ["conversation.deleted", "project.deleted"]
    assert told[0][1]["conversation"] == str(doomed.pk)


def test_a_change_that_rolls_back_is_never_told(
    told: list[tuple[int, dict[str, Any]]], django_capture_on_commit_callbacks: Any
) -> None:
    owner = make_user("events_rollback")
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError):
        with transaction.atomic():
            services.project_create(owner, name="Never")
            raise RuntimeError("rolled back")
    assert told == [] and not Project.objects.filter(owner=owner).exists()
