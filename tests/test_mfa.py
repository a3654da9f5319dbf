"""Two-factor authentication through allauth.mfa, and the account pages
allauth serves here: a staff member turns on an authenticator app (TOTP,
computed here from the secret by RFC 6238, independently of allauth), then
a password alone no longer logs in, the code does, a recovery code does
once; the admin's login is the site's; a password change keeps the session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
import time
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings

from tests.factories import PASSWORD, make_user

pytestmark = pytest.mark.django_db


def totp(secret: str, at: float, step: int = 30, digits: int = 6) -> str:
    """RFC 6238 (HMAC-SHA1), as an authenticator app computes it."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8), casefold=True)
    counter = struct.pack(">Q", int(at // step))
    digest = hmac.new(key, counter, hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    number = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(number % 10**digits).zfill(digits)


def html(response: Any) -> str:
    return str(response.content.decode())


def log_in(client: Client, username: str, password: str = PASSWORD) -> Any:
    return client.post("/accounts/login/", {"username": username, "password": password})


def logged_in(client: Client) -> bool:
    return client.get("/").status_code == 200


def turn_on_totp(client: Client) -> tuple[str, list[str]]:
    """Through the pages: the secret shown beside the QR code, the first
    code, then the recovery codes allauth makes."""
    ask = client.get("/accounts/2fa/totp/activate/")
    # allauth asks for the password again before a change to the sign-in itself.
    assert ask.status_code == 302 and ask["Location"].startswith("/accounts/reauthenticate/")
    again = client.get(ask["Location"])
    assert again.status_code == 200 and 'name="password"' in html(again)
    back = client.post(ask["Location"], {"password": PASSWORD})
    assert back.status_code == 302 and back["Location"] == "/accounts/2fa/totp/activate/"
    page = client.get("/accounts/2fa/totp/activate/")
    assert page.status_code == 200
    secret = re.search(r'id="authenticator_secret"[^>]*value="([A-Z2-7]+)"', html(page))
    assert secret, html(page)
    assert 'src="data:image/svg+xml' in html(page)  # the QR code, inline (CSP img-src data:)
    done = client.post("/accounts/2fa/totp/activate/", {"code": totp(secret.group(1), time.time())})
    assert done.status_code == 302, html(done)
    codes = client.get("/accounts/2fa/recovery-codes/")
    recovery = re.findall(r"\b[0-9a-f]{8}\b", html(codes))
    assert recovery, html(codes)
    return secret.group(1), recovery


@override_settings(MFA_TOTP_TOLERANCE=1)  # the next period's code: no wait for a fresh one
def test_an_authenticator_app_makes_the_password_alone_not_enough() -> None:
    make_user("staffer", is_staff=True)
    client = Client()
    assert log_in(client, "staffer").status_code == 302
    assert "Two-factor authentication" in html(client.get("/"))  # in the account menu
    assert "not active" in html(client.get("/accounts/2fa/"))
    secret, recovery = turn_on_totp(client)
    assert "is active" in html(client.get("/accounts/2fa/"))
    client.post("/accounts/logout/")

    # The password alone: a second step, not a session.
    second = Client()
    step = log_in(second, "staffer")
    assert step.status_code == 302 and step["Location"].startswith("/accounts/2fa/authenticate/")
    assert not logged_in(second)
    wrong = second.post("/accounts/2fa/authenticate/", {"code": "000000"})
    assert wrong.status_code == 200 and "Incorrect code" in html(wrong)
    assert not logged_in(second)
    right = second.post("/accounts/2fa/authenticate/", {"code": totp(secret, time.time() + 30)})
    assert right.status_code == 302 and right["Location"] == "/"
    assert logged_in(second)

    # A recovery code works once.
    third = Client()
    log_in(third, "staffer")
    assert third.post("/accounts/2fa/authenticate/", {"code": recovery[0]}).status_code == 302
    assert logged_in(third)
    fourth = Client()
    log_in(fourth, "staffer")
    again = fourth.post("/accounts/2fa/authenticate/", {"code": recovery[0]})
    assert again.status_code == 200 and not logged_in(fourth)


def test_a_wrong_password_never_reaches_the_second_step() -> None:
    make_user("guarded", is_staff=True)
    client = Client()
    log_in(client, "guarded")
    turn_on_totp(client)
    stranger = Client()
    refused = log_in(stranger, "guarded", "not-the-password")
    assert refused.status_code == 200 and "correct username and password" in html(refused)
    assert stranger.get("/accounts/2fa/authenticate/").status_code == 302  # no pending login to finish


def test_the_admin_login_is_the_sites_and_asks_for_the_second_factor() -> None:
    make_user("boss", is_staff=True, is_superuser=True)
    anonymous = Client()
    first = anonymous.get("/admin/")
    assert first.status_code == 302 and first["Location"].startswith("/admin/login/")
    to_site = anonymous.get(first["Location"])
    assert to_site.status_code == 302 and to_site["Location"] == "/accounts/login/?next=%2Fadmin%2F"
    # Django's own admin form cannot be posted around it.
    anonymous.post("/admin/login/?next=/admin/", {"username": "boss", "password": PASSWORD})
    assert anonymous.get("/admin/").status_code == 302
    # A stranger's next is not followed off the site.
    away = anonymous.get("/admin/login/?next=https://evil.example/")
    assert away["Location"] == "/accounts/login/?next=%2Fadmin%2F"
    # With the second factor on, the admin is reached through both steps.
    boss = Client()
    log_in(boss, "boss")
    secret, _recovery = turn_on_totp(boss)
    boss.post("/accounts/logout/")
    client = Client()
    step = client.post("/accounts/login/", {"username": "boss", "password": PASSWORD, "next": "/admin/"})
    assert step["Location"].startswith("/accounts/2fa/authenticate/")
    with override_settings(MFA_TOTP_TOLERANCE=1):
        done = client.post("/accounts/2fa/authenticate/", {"code": totp(secret, time.time() + 30)})
    assert done["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200


def test_someone_logged_in_who_is_not_staff_gets_a_page_not_a_password_form() -> None:
    make_user("plain")
    client = Client()
    log_in(client, "plain")
    page = client.get("/admin/login/?next=/admin/")
    assert page.status_code == 403 and "Staff only" in html(page)
    assert 'name="password"' not in html(page)


def test_a_password_change_keeps_this_session_and_the_new_password_logs_in() -> None:
    make_user("changer")
    client = Client()
    log_in(client, "changer")
    new = "a-brand-new-passphrase-7"
    short = client.post(
        "/accounts/password/change/", {"oldpassword": PASSWORD, "password1": "abc", "password2": "abc"}
    )
    assert short.status_code == 200 and "too short" in html(short)
    wrong = client.post(
        "/accounts/password/change/", {"oldpassword": "nope", "password1": new, "password2": new}
    )
    assert wrong.status_code == 200 and get_user_model().objects.get(username="changer").check_password(
        PASSWORD
    )
    done = client.post(
        "/accounts/password/change/", {"oldpassword": PASSWORD, "password1": new, "password2": new}
    )
    assert done.status_code == 302
    assert logged_in(client)
    assert log_in(Client(), "changer", new).status_code == 302
    assert log_in(Client(), "changer", PASSWORD).status_code == 200


def test_old_addresses_still_answer() -> None:
    # A reset link mailed before allauth's (Django's uidb64/token): dead, said so, a new one offered.
    old = Client().get("/accounts/password-reset/MQ/abc-123/")
    assert old.status_code == 410 and "This link no longer works" in html(old)
    # allauth sends people to "the e-mail page": here, the password page (e-mail management is off).
    assert Client().get("/accounts/email/")["Location"] == "/accounts/password/change/"


def test_guessing_the_code_is_throttled_like_the_password() -> None:
    make_user("guessed", is_staff=True)
    owner = Client()
    log_in(owner, "guessed")
    secret, _recovery = turn_on_totp(owner)
    attacker = Client()  # knows the password, not the code
    log_in(attacker, "guessed")
    for _ in range(10):  # CHAT_LOGIN_RATE: 10 a minute
        assert attacker.post("/accounts/2fa/authenticate/", {"code": "123456"}).status_code == 200
    refused = attacker.post("/accounts/2fa/authenticate/", {"code": totp(secret, time.time())})
    assert refused.status_code == 429 and "Too many attempts" in html(refused) and refused["Retry-After"]
    assert not logged_in(attacker)


def test_no_reset_mail_for_an_account_without_a_password_and_no_password_set_through_sso(
    mailoutbox: list[Any],
) -> None:
    from allauth.socialaccount.models import SocialAccount

    invited = make_user("invited_one", email="invited@example.com")
    invited.set_unusable_password()
    invited.save()
    make_user("has_one", email="has@example.com")
    Client().post("/accounts/password-reset/", {"email": "invited@example.com"})
    assert mailoutbox == []  # staff resend the invitation instead
    Client().post("/accounts/password-reset/", {"email": "has@example.com"})
    assert len(mailoutbox) == 1 and "/accounts/password-reset/key/" in mailoutbox[0].body
    # An account of the provider sets no password here (it would outlive the provider's say).
    sso_user = make_user("from_provider")
    sso_user.set_unusable_password()
    sso_user.save()
    SocialAccount.objects.create(user=sso_user, provider="sso", uid="abc-123")
    client = Client()
    client.force_login(sso_user)
    refused = client.post(
        "/accounts/password/set/", {"password1": "a-new-pass-99", "password2": "a-new-pass-99"}
    )
    assert refused.status_code == 403
    sso_user.refresh_from_db()
    assert not sso_user.has_usable_password()


def test_signup_asks_no_address_and_the_connections_page_is_not_there() -> None:
    page = html(Client().get("/accounts/signup/"))
    assert 'name="username"' in page and 'name="email"' not in page
    make_user("connector")
    client = Client()
    log_in(client, "connector")
    assert client.get("/accounts/3rdparty/")["Location"] == "/accounts/password/change/"
