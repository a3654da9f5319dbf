"""The HTTP side: chat pages, accounts, /healthz and the headers every page carries."""

from __future__ import annotations

import re
import uuid
from typing import Any, cast

import pytest
from django.contrib.auth import get_user_model
from django.http import HttpResponse, HttpResponseBase
from django.test import Client

from conversations.models import Conversation, Message
from tests.factories import PASSWORD

pytestmark = pytest.mark.django_db

API_KEY = "sk-test-fake-key"
XSS_USER = "<script>alert(1)</script> and [x](javascript:alert(1))"
XSS_ANSWER = "**Bold** <script>alert(1)</script> [x](javascript:alert(1)) <img src=x onerror=alert(1)>"


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def conversation_of(user: Any, title: str, *messages: tuple[str, str]) -> Conversation:
    conversation = Conversation.objects.create(owner=user, title=title)
    for role, content in messages:
        Message.objects.create(conversation=conversation, role=role, content=content)
    return conversation


def page(response: HttpResponseBase) -> str:
    return cast(HttpResponse, response).content.decode()  # the test client's pages are not streamed


# --- Access ----------------------------------------------------------------------------


def test_new_chat_redirects_anonymous_users_to_login() -> None:
    response = Client().get("/")

    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/"


def test_conversation_redirects_anonymous_users_to_login(alice: Any) -> None:
    conversation = conversation_of(alice, "Private")
    path = f"/c/{conversation.id}/"

    response = Client().get(path)

    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


def test_owner_sees_her_conversation_with_its_messages(alice: Any) -> None:
    conversation = conversation_of(
        alice, "Trip to Lima", ("user", "Where should I eat?"), ("assistant", "Try the **ceviche**.")
    )

    response = client_for(alice).get(f"/c/{conversation.id}/")

    assert response.status_code == 200
    html = page(response)
    assert "Trip to Lima" in html
    assert "Where should I eat?" in html
    assert "Try the <strong>ceviche</strong>." in html


def test_messages_are_rendered_escaped_and_sanitised(alice: Any) -> None:
    conversation = conversation_of(alice, "XSS", ("user", XSS_USER), ("assistant", XSS_ANSWER))

    response = client_for(alice).get(f"/c/{conversation.id}/")

    html = page(response)
    assert response.status_code == 200
    assert "<strong>Bold</strong>" in html  # the markdown was rendered...
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # ...and the markup shown as text
    assert "<script>alert" not in html
    assert "onerror" not in html.replace("onerror=alert(1)&gt;", "")  # only as escaped text
    assert not re.search(r"<img\b", html)
    assert not re.search(r"""href\s*=\s*["']?\s*javascript:""", html, re.IGNORECASE)
    # The only script elements are the page's own files and its JSON config.
    for tag in re.findall(r"<script\b[^>]*>", html, re.IGNORECASE):
        assert re.search(r'src="/static/js/[\w.-]+\.js"', tag) or 'type="application/json"' in tag, tag


def test_another_user_gets_404_for_a_conversation_not_theirs(alice: Any, bob: Any) -> None:
    conversation = conversation_of(alice, "Alice only", ("user", "alice's secret"))

    response = client_for(bob).get(f"/c/{conversation.id}/")

    assert response.status_code == 404
    assert "alice's secret" not in page(response)
    assert "Alice only" not in page(response)


def test_an_unknown_conversation_id_gives_404(alice: Any) -> None:
    response = client_for(alice).get(f"/c/{uuid.uuid4()}/")

    assert response.status_code == 404


def test_sidebar_lists_only_the_users_own_conversations(alice: Any, bob: Any) -> None:
    first = conversation_of(alice, "Alice trip plans")
    conversation_of(alice, "Alice recipes")
    conversation_of(bob, "Bob secret project")

    for path in ("/", f"/c/{first.id}/"):
        html = page(client_for(alice).get(path))
        assert "Alice trip plans" in html
        assert "Alice recipes" in html
        assert "Bob secret project" not in html


# --- Accounts --------------------------------------------------------------------------------


def test_signup_creates_a_user_and_logs_them_in() -> None:
    client = Client()

    response = client.post(
        "/accounts/signup/",
        {"username": "carol", "password1": PASSWORD, "password2": PASSWORD},
    )

    assert response.status_code == 302
    assert response["Location"] == "/"
    carol = get_user_model().objects.get(username="carol")
    assert carol.check_password(PASSWORD)
    assert client.session["_auth_user_id"] == str(carol.pk)
    assert client.get("/").status_code == 200


def test_signup_says_a_short_password_under_the_password_and_keeps_what_it_can() -> None:
    short = Client().post("/accounts/signup/", {"username": "dave", "password1": "abc", "password2": "abc"})
    form = short.context["form"]
    assert "too short" in " ".join(form.errors["password1"]) and "password2" not in form.errors
    # A username taken: the passwords typed are kept.
    get_user_model().objects.create_user("erin", password=PASSWORD)
    taken = Client().post(
        "/accounts/signup/", {"username": "erin", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert "username" in taken.context["form"].errors
    assert page(taken).count(f'value="{PASSWORD}"') == 2


def test_signup_page_renders_a_form() -> None:
    response = Client().get("/accounts/signup/")

    assert response.status_code == 200
    assert 'name="password2"' in page(response)


def test_login_page_renders_a_form() -> None:
    response = Client().get("/accounts/login/")

    assert response.status_code == 200
    html = page(response)
    assert 'name="username"' in html
    assert 'name="password"' in html
    assert "csrfmiddlewaretoken" in html


def test_login_with_the_right_password_logs_in(alice: Any) -> None:
    client = Client()

    response = client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})

    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.session["_auth_user_id"] == str(alice.pk)


def test_logout_by_get_is_refused(alice: Any) -> None:
    client = client_for(alice)

    response = client.get("/accounts/logout/")

    assert response.status_code == 405
    assert client.get("/").status_code == 200  # still logged in


def test_logout_by_post_logs_out(alice: Any) -> None:
    client = client_for(alice)

    response = client.post("/accounts/logout/")

    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/"
    assert "_auth_user_id" not in client.session
    assert client.get("/").status_code == 302


# --- Health ------------------------------------------------------------------------------------


# database_sync_to_async closes the connection around its call, as under a real
# server: that needs a transactional test database, not one test-wide transaction.
@pytest.mark.django_db(transaction=True)
def test_healthz_reports_database_and_worker_ok(settings: Any) -> None:
    settings.REDIS_URL = ""
    response = Client().get("/healthz")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"ok": True, "checks": {"database": "ok", "worker": "ok"}}
    assert API_KEY not in page(response)


@pytest.mark.django_db(transaction=True)
def test_healthz_is_503_when_redis_is_down(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there

    response = Client().get("/healthz")

    assert response.status_code == 503
    assert response.json() == {"ok": False, "checks": {"database": "ok", "redis": "error", "worker": "ok"}}


# --- Headers and what a page may show --------------------------------------------------------------


def pages_of(user: Any) -> list[tuple[str, Any]]:
    conversation = conversation_of(user, "Some chat", ("user", "hi"), ("assistant", "hello"))
    anonymous, logged_in = Client(), client_for(user)
    return [
        ("/accounts/login/", anonymous.get("/accounts/login/")),
        ("/accounts/signup/", anonymous.get("/accounts/signup/")),
        ("/", logged_in.get("/")),
        (f"/c/{conversation.id}/", logged_in.get(f"/c/{conversation.id}/")),
        ("404", logged_in.get(f"/c/{uuid.uuid4()}/")),
    ]


def test_every_page_has_a_strict_content_security_policy(alice: Any) -> None:
    for path, response in pages_of(alice):
        policy = response.headers.get("Content-Security-Policy", "")
        directives = {d.strip().split(" ", 1)[0]: d.strip() for d in policy.split(";") if d.strip()}
        assert directives.get("script-src") == "script-src 'self'", (path, policy)
        assert "'unsafe-inline'" not in policy, (path, policy)
        assert "'unsafe-eval'" not in policy, (path, policy)


def test_demo_banner_shows_in_demo_mode(alice: Any, demo_mode: None) -> None:
    html = page(client_for(alice).get("/"))

    assert "banner-demo" in html
    assert "Demo mode" in html


def test_no_demo_banner_with_a_configured_model(alice: Any, fake_llm: Any) -> None:
    html = page(client_for(alice).get("/"))

    assert "banner-demo" not in html
    assert "Demo mode" not in html


def test_api_key_never_appears_in_any_page(alice: Any, fake_llm: Any) -> None:
    responses = pages_of(alice)

    assert len(responses) == 5
    for path, response in responses:
        assert API_KEY not in page(response), path
        assert all(API_KEY not in value for value in response.headers.values()), path


def test_cached_rendering_of_empty_and_repeated_answers() -> None:
    from conversations.rendering import render_many

    assert render_many(["", "**a**", ""]) == ["", "<p><strong>a</strong></p>\n", ""]
    assert render_many(["", "**a**"]) == ["", "<p><strong>a</strong></p>\n"]  # now from the cache
