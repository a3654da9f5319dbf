"""The staff side in the admin, through the test client: prompts, the ledger
and its totals, the spend report, conversation review, quotas."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import Quota
from conversations import prompts
from conversations.models import Conversation, Message, SystemPrompt, TokenUsage
from tests.factories import make_user

pytestmark = pytest.mark.django_db


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def staff_with(username: str, *codenames: str) -> Any:
    user = make_user(username, is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def root(db: None) -> Any:
    return make_user("root", is_staff=True, is_superuser=True)


def usage(user: Any, *, model: str = "m-1", prompt: int = 10, completion: int = 5, cost: str = "0.001",
          estimated: bool = False, days_ago: int = 0) -> TokenUsage:  # fmt: skip
    row = TokenUsage.objects.create(
        user=user, model=model, prompt_tokens=prompt, completion_tokens=completion,
        cost=Decimal(cost), estimated=estimated,
    )  # fmt: skip
    if days_ago:
        TokenUsage.objects.filter(pk=row.pk).update(created_at=timezone.now() - timedelta(days=days_ago))
    return row


# --- System prompts -------------------------------------------------------------------


def prompt_form(**fields: Any) -> dict[str, Any]:
    data = {
        "name": "Helpful", "text": "Be helpful.", "model": "", "temperature": "", "max_tokens": "",
        "versions-TOTAL_FORMS": "0", "versions-INITIAL_FORMS": "0",
        "versions-MIN_NUM_FORMS": "0", "versions-MAX_NUM_FORMS": "1000",
    }  # fmt: skip
    data.update(fields)
    return {key: value for key, value in data.items() if value is not None}


def test_prompt_list_searches_and_marks_the_default(root: Any) -> None:
    prompts.save_prompt(SystemPrompt(name="Pirate", text="Talk like a pirate."))
    prompts.save_prompt(SystemPrompt(name="Lawyer", text="Cite the statute."))
    client = client_for(root)

    page = client.get(reverse("admin:conversations_systemprompt_changelist"), {"q": "statute"})
    assert page.status_code == 200
    assert "Lawyer" in page.text and "Pirate" not in page.text

    page = client.get(reverse("admin:conversations_systemprompt_changelist"))
    pirate_row = next(line for line in page.text.split("<tr") if "Pirate" in line)
    assert 'alt="True"' in pirate_row  # the default, marked
    assert "v1" in pirate_row


def test_saving_in_the_admin_versions_each_change(root: Any) -> None:
    client = client_for(root)
    response = client.post(
        reverse("admin:conversations_systemprompt_add"),
        prompt_form(text="First.", temperature="0.3", max_tokens="500", model="m-2", is_default="on"),
    )
    assert response.status_code == 302, response.content
    prompt = SystemPrompt.objects.get(name="Helpful")
    url = reverse("admin:conversations_systemprompt_change", args=[prompt.pk])

    response = client.post(url, prompt_form(text="Second.", temperature="0.3", max_tokens="500",
                                            model="m-2", is_default="on"))  # fmt: skip
    assert response.status_code == 302

    versions = list(prompt.versions.order_by("number"))
    assert [(v.number, v.text, v.created_by) for v in versions] == [(1, "First.", root), (2, "Second.", root)]
    assert (versions[1].model, versions[1].temperature, versions[1].max_tokens) == ("m-2", 0.3, 500)
    page = client.get(url)
    assert "Versions (each save" in page.text and "First." in page.text  # history on the page


def test_the_default_cannot_be_unset_or_deleted_only_moved(root: Any) -> None:
    default = SystemPrompt(name="Default", text="x")
    prompts.save_prompt(default)
    client = client_for(root)
    url = reverse("admin:conversations_systemprompt_change", args=[default.pk])

    response = client.post(url, prompt_form(name="Default", text="x"))  # is_default unticked
    assert response.status_code == 200
    assert "One prompt is always the default" in response.text
    assert client.post(reverse("admin:conversations_systemprompt_delete", args=[default.pk]),
                       {"post": "yes"}).status_code == 403  # fmt: skip

    other = SystemPrompt(name="Other", text="y")
    prompts.save_prompt(other)
    moved = client.post(reverse("admin:conversations_systemprompt_change", args=[other.pk]),
                        prompt_form(name="Other", text="y", is_default="on"), follow=True)  # fmt: skip
    assert list(SystemPrompt.objects.filter(is_default=True).values_list("name", flat=True)) == ["Other"]
    # Said, not silent: the admin names the prompt that stopped being the default.
    assert "“Other” is now the default prompt for new chats, instead of “Default”." in moved.text


def test_preview_shows_the_edit_and_saves_nothing(root: Any) -> None:
    prompt = SystemPrompt(name="Helpful", text="Old line.", max_tokens=256)
    prompts.save_prompt(prompt)
    url = reverse("admin:conversations_systemprompt_change", args=[prompt.pk])

    response = client_for(root).post(
        url, prompt_form(text="New line.", max_tokens="256", is_default="on", _preview="1")
    )
    assert response.status_code == 200
    assert "Preview of this edit (not saved)" in response.text
    assert "&quot;content&quot;: &quot;New line.&quot;" in response.text  # the request the model gets
    assert "&quot;max_tokens&quot;: 256" in response.text
    assert "-Old line." in response.text and "+New line." in response.text  # the diff against v1
    prompt.refresh_from_db()
    assert prompt.text == "Old line." and prompt.versions.count() == 1


def test_non_staff_cannot_open_the_prompt_admin(alice: Any) -> None:
    response = client_for(alice).get(reverse("admin:conversations_systemprompt_changelist"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


# --- The ledger ---------------------------------------------------------------------------


def test_ledger_is_read_only_with_totals_of_the_filtered_rows(root: Any, alice: Any, bob: Any) -> None:
    usage(alice, prompt=100, completion=50, cost="0.5")
    usage(alice, prompt=10, completion=5, cost="0.25", estimated=True)
    usage(bob, model="m-2", prompt=1000, completion=1, cost="2")
    client = client_for(root)
    url = reverse("admin:conversations_tokenusage_changelist")

    page = client.get(url)
    assert page.context["spend_total"].total_tokens == 1166
    assert page.context["spend_total"].cost == Decimal("2.75")

    page = client.get(url, {"username": "alice"})
    total = page.context["spend_total"]
    assert (total.calls, total.prompt_tokens, total.completion_tokens, total.cost) == (
        2,
        110,
        55,
        Decimal("0.75"),
    )
    assert '<td class="total-cost">$0.75</td>' in page.text

    page = client.get(url, {"username": "alice", "estimated__exact": "1"})
    assert page.context["spend_total"].calls == 1
    page = client.get(url, {"model_name": "m-2"})
    assert page.context["spend_total"].cost == Decimal("2")

    row = TokenUsage.objects.filter(user=bob).get()
    assert client.get(reverse("admin:conversations_tokenusage_add")).status_code == 403
    detail = client.get(reverse("admin:conversations_tokenusage_change", args=[row.pk]))
    assert detail.status_code == 200 and 'name="_save"' not in detail.text
    assert client.post(reverse("admin:conversations_tokenusage_delete", args=[row.pk]),
                       {"post": "yes"}).status_code == 403  # fmt: skip
    assert TokenUsage.objects.count() == 3


def test_ledger_filter_by_date(root: Any, alice: Any) -> None:
    usage(alice, cost="1")
    usage(alice, cost="4", days_ago=40)
    # The "Past 7 days" link of the date filter.
    midnight = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    page = client_for(root).get(
        reverse("admin:conversations_tokenusage_changelist"),
        {
            "created_at__gte": str(midnight - timedelta(days=7)),
            "created_at__lt": str(midnight + timedelta(days=1)),
        },
    )
    assert page.context["spend_total"].cost == Decimal("1")


def test_spend_report_page_by_user_with_chart_and_csv(root: Any, alice: Any, bob: Any) -> None:
    usage(alice, prompt=100, completion=50, cost="0.5")
    usage(bob, prompt=10, completion=1, cost="3")
    usage(bob, cost="9", days_ago=60)  # outside the range
    client = client_for(root)
    url = reverse("admin:conversations_tokenusage_report")
    today = timezone.localdate()
    query = {"by": "user", "since": str(today - timedelta(days=7)), "until": str(today), "metric": "cost"}

    page = client.get(url, query)
    assert page.status_code == 200
    assert [row.key for row in page.context["spend"]] == ["bob", "alice"]  # dearest first
    assert page.context["total"].cost == Decimal("3.5")
    assert "<svg" in page.text and 'class="chart-bar"' in page.text and ">bob</text>" in page.text

    csv = client.get(url, {**query, "format": "csv"})
    assert csv["Content-Type"].startswith("text/csv")
    assert "attachment" in csv["Content-Disposition"]
    lines = csv.content.decode().splitlines()
    assert lines[0] == "user,calls,prompt_tokens,completion_tokens,cached_tokens,total_tokens,cost,estimated"
    assert lines[1:] == ["bob,1,10,1,0,11,3.000000,0", "alice,1,100,50,0,150,0.500000,0"]


def test_spend_report_defaults_to_the_last_30_days_by_day(root: Any, alice: Any) -> None:
    usage(alice, cost="1")
    page = client_for(root).get(reverse("admin:conversations_tokenusage_report"))
    assert page.status_code == 200
    assert [row.key for row in page.context["spend"]] == [timezone.localdate().isoformat()]
    assert "format=csv" in page.text


def test_spend_report_rejects_a_backwards_range(root: Any) -> None:
    page = client_for(root).get(
        reverse("admin:conversations_tokenusage_report"),
        {"by": "day", "since": "2026-02-01", "until": "2026-01-01", "metric": "cost"},
    )
    assert "starts after it ends" in page.text
    assert "spend" not in page.context


def test_spend_report_needs_staff_and_the_view_permission(alice: Any) -> None:
    url = reverse("admin:conversations_tokenusage_report")
    assert client_for(alice).get(url).status_code == 302  # to the admin login
    clerk = staff_with("clerk")
    assert client_for(clerk).get(url).status_code == 403
    auditor = staff_with("auditor", "view_tokenusage")
    assert client_for(auditor).get(url).status_code == 200


# --- Conversation review ------------------------------------------------------------------


@pytest.fixture
def chat(alice: Any) -> Conversation:
    conversation = Conversation.objects.create(owner=alice, title="Secret plans")
    Message.objects.create(conversation=conversation, role="user", content="my private question")
    Message.objects.create(conversation=conversation, role="assistant", content="the private answer")
    return conversation


def test_a_reviewer_reads_conversations_read_only(chat: Conversation) -> None:
    reviewer = staff_with("reviewer", "review_conversation")
    client = client_for(reviewer)

    listing = client.get(reverse("admin:conversations_conversation_changelist"))
    assert listing.status_code == 200 and "Secret plans" in listing.text
    page = client.get(reverse("admin:conversations_conversation_change", args=[chat.pk]))
    assert page.status_code == 200
    assert "my private question" in page.text and "the private answer" in page.text
    assert 'name="_save"' not in page.text  # read only
    response = client.post(reverse("admin:conversations_conversation_change", args=[chat.pk]), {"title": "x"})
    assert response.status_code == 403
    assert Conversation.objects.get(pk=chat.pk).title == "Secret plans"


def test_staff_without_the_review_permission_cannot_read_conversations(chat: Conversation) -> None:
    # Even the model's ordinary view/change permissions are not enough.
    clerk = staff_with("clerk", "view_conversation", "change_conversation", "view_message")
    client = client_for(clerk)
    assert client.get(reverse("admin:conversations_conversation_changelist")).status_code == 403
    page = client.get(reverse("admin:conversations_conversation_change", args=[chat.pk]))
    assert page.status_code == 403
    assert "my private question" not in page.text
    assert "Secret plans" not in client.get(reverse("admin:index")).text


def test_non_staff_cannot_reach_conversation_review(alice: Any, chat: Conversation) -> None:
    alice.user_permissions.add(Permission.objects.get(codename="review_conversation"))
    response = client_for(alice).get(reverse("admin:conversations_conversation_change", args=[chat.pk]))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


# --- Quotas -------------------------------------------------------------------------------


def test_staff_set_a_users_quota_in_the_admin(root: Any, alice: Any) -> None:
    response = client_for(root).post(
        reverse("admin:accounts_quota_add"),
        {"user": alice.pk, "tokens_per_day": "5000", "cost_per_month": "2.50", "answers_per_minute": "3"},
    )
    assert response.status_code == 302, response.content
    quota = Quota.objects.get(user=alice)
    assert (quota.tokens_per_day, quota.cost_per_month, quota.answers_per_minute) == (5000, Decimal("2.5"), 3)
    assert quota.tokens_per_month is None  # blank = unlimited


def test_a_quota_applies_to_exactly_one_subject(root: Any, alice: Any) -> None:
    response = client_for(root).post(
        reverse("admin:accounts_quota_add"), {"user": alice.pk, "is_default": "on", "tokens_per_day": "1"}
    )
    assert response.status_code == 200  # refused, with the form again
    assert not Quota.objects.exists()
