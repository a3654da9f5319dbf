"""Keeping strangers out, each attack against a real daphne: password
guessing, sign-up floods and policies, invitations and password resets that
work once, too many sockets, floods of bad frames; and the `security` log.

The throttles count per client address: each test sends an address of its
own in X-Forwarded-For (the servers trust one proxy), so that tests never
share a counter, also on a Redis that outlives the run."""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import random
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from tests.conftest import LiveServer, database_url, module_server, run_daphne
from tests.factories import PASSWORD, make_conversation, make_user, session_cookie
from tests.fake_llm import FakeLLM

if TYPE_CHECKING:
    from tests.cluster import Worker

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def an_address() -> str:
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


class Visitor:
    """A client with cookies, posting forms as a browser does (CSRF token,
    Origin), from `address` (X-Forwarded-For)."""

    def __init__(self, server: LiveServer | Worker, address: str | None = None) -> None:
        self.server = server
        self.address = address or an_address()
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def _open(self, url: str, data: bytes | None = None) -> tuple[int, str, str]:
        headers = {"X-Forwarded-For": self.address, "Origin": self.server.url, "Referer": url}
        request = urllib.request.Request(url, data=data, headers=headers)
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, response.url, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.url, exc.read().decode()

    def get(self, path: str) -> tuple[int, str, str]:
        url = path if path.startswith("http") else self.server.url + path
        return self._open(url)

    def post(self, path: str, form: dict[str, str] | list[tuple[str, str]]) -> tuple[int, str, str]:
        """GET the form's page for its CSRF token, then POST to it (a list:
        a field may come more than once)."""
        url = path if path.startswith("http") else self.server.url + path
        status, url, page = self._open(url)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token is not None, (status, page[:500])
        fields = list(form.items()) if isinstance(form, dict) else form
        data = urllib.parse.urlencode([("csrfmiddlewaretoken", token[1]), *fields]).encode()
        return self._open(url, data)

    def log_in(self, username: str, password: str = PASSWORD) -> tuple[int, str, str]:
        return self.post("/accounts/login/", {"username": username, "password": password})

    def use_session_of(self, user: Any) -> None:
        cookie = http.cookiejar.Cookie(
            0, settings.SESSION_COOKIE_NAME, session_cookie(user), None, False, "127.0.0.1", False, False,
            "/", True, False, None, True, None, None, {},
        )  # fmt: skip
        self.jar.set_cookie(cookie)


def logged_in(result: tuple[int, str, str], server: LiveServer) -> bool:
    status, url, _ = result
    return status == 200 and url == server.url + "/"


def security_lines(server: LiveServer, event: str) -> list[str]:
    return [line for line in server.log().splitlines() if " security " in line and f" {event} " in line]


# --- Password guessing ---------------------------------------------------------------------


def test_the_eleventh_wrong_password_is_refused_and_then_the_right_one_too(daphne_server: LiveServer) -> None:
    make_user("victim")
    guesser = Visitor(daphne_server)
    for _ in range(10):
        status, _, page = guesser.log_in("victim", "wrong-password")
        assert status == 200
        assert "correct username and password" in page
    status, _, page = guesser.log_in("victim", "wrong-password")
    assert status == 429
    assert re.search(r"Try again in \d+ (s|min|h)", page)
    # Now even the right password is refused, from here ...
    status, _, _ = guesser.log_in("victim", PASSWORD)
    assert status == 429
    # ... and from anywhere else: the username itself is throttled.
    assert Visitor(daphne_server).log_in("victim", PASSWORD)[0] == 429
    # A username that does not exist is throttled the same way: the answers
    # tell nothing about which usernames exist.
    prober = Visitor(daphne_server)
    pages = [prober.log_in("nobody-here", "wrong-password") for _ in range(11)]
    assert [status for status, _, _ in pages] == [200] * 10 + [429]
    same = lambda text: re.sub(r'\d+ (s|min|h)|value="[^"]*"', "", text)  # noqa: E731 (the wait, the form's values)
    assert same(pages[-1][2]) == same(page)
    # Other people log in as usual, also from the guesser's neighbours.
    make_user("neighbour")
    assert logged_in(Visitor(daphne_server).log_in("neighbour"), daphne_server)
    failed = security_lines(daphne_server, "login_failed")
    assert any("user=victim" in line and f"address={guesser.address}" in line for line in failed)
    assert security_lines(daphne_server, "login_throttled")
    assert not [line for line in failed if PASSWORD in line or "wrong-password" in line]  # no secrets


def test_failures_from_one_address_lock_that_address_out(daphne_server: LiveServer) -> None:
    for name in ("ann", "ben", "cy"):
        make_user(name)
    sprayer = Visitor(daphne_server)  # one password tried on many accounts
    results = [sprayer.log_in(name, "Summer2026!")[0] for name in ["ann", "ben", "cy"] * 4]
    assert results[:10] == [200] * 10 and results[10:] == [429, 429]
    assert sprayer.log_in("ann", PASSWORD)[0] == 429
    assert logged_in(Visitor(daphne_server).log_in("ann"), daphne_server)  # elsewhere: fine


def test_successful_logins_never_count(daphne_server: LiveServer) -> None:
    make_user("regular")
    visitor = Visitor(daphne_server)
    for _ in range(12):
        visitor.jar.clear()
        assert logged_in(visitor.log_in("regular"), daphne_server)


# --- Sign-up policy --------------------------------------------------------------------------


approval_server = module_server("approval", CHAT_SIGNUP="approval", CHAT_SIGNUP_RATE="3/h")


def sign_up(visitor: Visitor, username: str) -> tuple[int, str, str]:
    password = "a-long-enough-passphrase"
    return visitor.post(
        "/accounts/signup/", {"username": username, "password1": password, "password2": password}
    )


def test_approval_the_first_account_is_the_admin_later_ones_wait_for_staff(
    approval_server: LiveServer,
) -> None:
    User = get_user_model()
    assert not User.objects.exists()
    founder = Visitor(approval_server)
    status, url, _ = sign_up(founder, "founder")
    assert (status, url) == (200, approval_server.url + "/")  # logged in, chatting
    first = User.objects.get(username="founder")
    assert first.is_active and first.is_staff and first.is_superuser
    assert founder.get("/admin/")[0] == 200

    newcomer = Visitor(approval_server)
    status, _, page = sign_up(newcomer, "newcomer")
    assert status == 200 and "Waiting for approval" in page
    waiting = User.objects.get(username="newcomer")
    assert not waiting.is_active and not waiting.is_staff
    assert not logged_in(newcomer.post("/accounts/login/", {
        "username": "newcomer", "password": "a-long-enough-passphrase",
    }), approval_server)  # fmt: skip

    # Staff approve them in the admin: the action on the user list.
    status, _, page = founder.post(
        "/admin/auth/user/",
        {"action": "activate_users", "_selected_action": str(waiting.pk), "index": "0"},
    )
    assert status == 200 and "1 user(s) activated" in page
    assert User.objects.get(username="newcomer").is_active
    status, url, _ = newcomer.post(
        "/accounts/login/", {"username": "newcomer", "password": "a-long-enough-passphrase"}
    )
    assert (status, url) == (200, approval_server.url + "/")
    assert security_lines(approval_server, "user_activated")


def test_sign_ups_from_one_address_are_throttled(approval_server: LiveServer) -> None:
    make_user("someone-first")  # not an empty install
    flood = Visitor(approval_server)
    statuses = [sign_up(flood, f"sock{i}")[0] for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    assert get_user_model().objects.filter(username__startswith="sock").count() == 3
    assert security_lines(approval_server, "signup_throttled")


def test_closed_sign_up_is_refused(
    django_db_setup: None, fake_llm_server: FakeLLM, tmp_path: Any
) -> None:  # fmt: skip
    with run_daphne(
        database_url(), fake_llm_server.base_url, tmp_path / "daphne.log", CHAT_SIGNUP="closed"
    ) as server:
        visitor = Visitor(server)
        status, _, page = visitor.get("/accounts/signup/")
        assert status == 403 and "Sign-up is closed" in page
        assert "Create one" not in visitor.get("/accounts/login/")[2]
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', visitor.get("/accounts/login/")[2])
        assert token is not None
        form = {
            "csrfmiddlewaretoken": token[1],
            "username": "x",
            "password1": "a-long-pass-1",
            "password2": "a-long-pass-1",
        }
        assert (
            visitor._open(server.url + "/accounts/signup/", urllib.parse.urlencode(form).encode())[0] == 403
        )
    assert not get_user_model().objects.exists()


# --- Invitations and password resets ---------------------------------------------------------


def mailed_link(server: LiveServer, pattern: str) -> str:
    links: list[str] = re.findall(rf"(http://127\.0\.0\.1:\d+{pattern}[^\s]*)", server.log())
    assert links, server.log()[-3000:]
    return links[-1]


def staff_who_may(username: str, *permissions: str) -> Any:
    """A staff member with these `auth` permissions (codenames) only."""
    staff = make_user(username, is_staff=True)
    staff.user_permissions.set(
        Permission.objects.filter(content_type__app_label="auth", codename__in=permissions)
    )
    return staff


def test_an_invitation_link_sets_a_password_once(daphne_server: LiveServer) -> None:
    staff = staff_who_may("staffer", "add_user", "view_user")
    admin = Visitor(daphne_server)
    admin.use_session_of(staff)
    status, _, page = admin.post("/accounts/invite/", {"username": "invitee", "email": "invitee@example.com"})
    assert status == 200 and "Invitation sent to invitee@example.com" in page
    link = mailed_link(daphne_server, "/accounts/invitation/")
    assert not get_user_model().objects.get(username="invitee").has_usable_password()

    guest = Visitor(daphne_server)
    status, url, page = guest.get(link)
    assert status == 200 and "Welcome, invitee" in page
    new = "invitee-chose-this-1"
    status, url, _ = guest.post(url, {"new_password1": new, "new_password2": new})
    assert (status, url) == (200, daphne_server.url + "/")  # logged in, chatting
    assert get_user_model().objects.get(username="invitee").check_password(new)
    # Once only.
    status, _, page = Visitor(daphne_server).get(link)
    assert "This link no longer works" in page
    # Not for everyone: a user who is not staff cannot invite.
    plain = Visitor(daphne_server)
    plain.use_session_of(make_user("plain"))
    assert "/admin/login/" in plain.get("/accounts/invite/")[1]


def test_an_invitation_lost_or_run_out_is_sent_again_from_the_admin_to_who_still_waits_for_one(
    daphne_server: LiveServer,
) -> None:
    from allauth.socialaccount.models import SocialAccount

    staff = staff_who_may("reinviter", "add_user", "view_user")
    admin = Visitor(daphne_server)
    admin.use_session_of(staff)
    admin.post("/accounts/invite/", {"username": "lost_invitee", "email": "lost@example.com"})

    def mails() -> int:
        return len(re.findall(r"http://127\.0\.0\.1:\d+/accounts/invitation/", daphne_server.log()))

    sent = mails()
    invitee = get_user_model().objects.get(username="lost_invitee")
    with_password = make_user("has_a_password", email="pw@example.com")
    through_sso = get_user_model().objects.create(username="sso_only", email="sso@example.com")
    through_sso.set_unusable_password()
    through_sso.save()
    SocialAccount.objects.create(user=through_sso, provider="acme", uid="sso-only-1")
    boss = get_user_model().objects.create(
        username="boss_waiting", email="boss@example.com", is_superuser=True
    )
    gone = get_user_model().objects.create(username="gone_waiting", email="gone@example.com", is_active=False)
    mailless = get_user_model().objects.create(username="no_address")
    for waiting in (boss, gone, mailless):
        waiting.set_unusable_password()
        waiting.save()
    selected = [invitee, with_password, through_sso, staff, boss, gone, mailless]
    status, _, page = admin.post(
        "/admin/auth/user/",
        [("action", "invite_again"), ("index", "0"), *(("_selected_action", str(u.pk)) for u in selected)],
    )
    assert status == 200 and "1 new invitation(s) sent." in page
    assert "No invitation for gone_waiting, has_a_password, no_address, sso_only" in page
    assert "Left as they are: boss_waiting, reinviter" in page  # a superuser's, and one's own
    assert mails() == sent + 1  # to lost_invitee only
    second = mailed_link(daphne_server, "/accounts/invitation/")
    assert len(security_lines(daphne_server, "invited_again")) == 1
    guest = Visitor(daphne_server)
    status, url, page = guest.get(second)
    assert "Welcome, lost_invitee" in page
    status, url, _ = guest.post(
        url, {"new_password1": "found-it-at-last-3", "new_password2": "found-it-at-last-3"}
    )
    assert (status, url) == (200, daphne_server.url + "/")
    # Staff who may not add users are not offered it (and the attempt is logged).
    viewer = Visitor(daphne_server)
    viewer.use_session_of(staff_who_may("only_views", "view_user", "change_user"))
    viewer.post(
        "/admin/auth/user/",
        [("action", "invite_again"), ("index", "0"), ("_selected_action", str(invitee.pk))],
    )
    assert mails() == sent + 1
    assert any("only_views" in line for line in security_lines(daphne_server, "admin_action_refused"))


def test_a_forgotten_password_is_reset_through_a_mailed_link_once(daphne_server: LiveServer) -> None:
    make_user("forgetful", email="forgetful@example.com")
    visitor = Visitor(daphne_server)
    assert "Forgot your password?" in visitor.get("/accounts/login/")[2]
    status, url, page = visitor.post("/accounts/password-reset/", {"email": "forgetful@example.com"})
    assert status == 200 and "Check your e-mail" in page
    link = mailed_link(daphne_server, "/accounts/password-reset/")
    status, url, page = visitor.get(link)
    assert "Choose a new password" in page
    new = "remembered-this-time-2"
    status, url, page = visitor.post(url, {"password1": new, "password2": new})  # allauth's form
    assert status == 200 and "Your password is changed" in page
    assert logged_in(Visitor(daphne_server).log_in("forgetful", new), daphne_server)
    assert "This link no longer works" in Visitor(daphne_server).get(link)[2]
    # An address with no account gets the same page, and no mail.
    mailed = re.compile(r"http://127\.0\.0\.1:\d+/accounts/password-reset/")
    before = len(mailed.findall(daphne_server.log()))
    status, _, page = Visitor(daphne_server).post(
        "/accounts/password-reset/", {"email": "stranger@example.com"}
    )
    assert status == 200 and "Check your e-mail" in page
    assert len(mailed.findall(daphne_server.log())) == before


# --- Sockets -----------------------------------------------------------------------------


def open_socket(server: LiveServer, cookie: str, stack: contextlib.ExitStack) -> ClientConnection:
    return stack.enter_context(
        ws_connect(
            server.ws_url + "/ws/chat/",
            additional_headers={"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}", "Origin": server.url},
            open_timeout=10,
        )
    )


def closed_with(ws: ClientConnection, timeout: float = 10) -> int | None:
    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    except TimeoutError:
        return None


def test_the_twenty_first_socket_of_a_user_is_closed_with_4429(
    daphne_server: LiveServer, sockets: contextlib.ExitStack
) -> None:
    cookie = session_cookie(make_user("tabby"))
    tabs = [open_socket(daphne_server, cookie, sockets) for _ in range(20)]
    for ws in tabs:  # all twenty open and answering
        ws.send(json.dumps({"type": "nonsense"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "error"
    assert closed_with(open_socket(daphne_server, cookie, sockets)) == 4429
    assert any("user=tabby" in line for line in security_lines(daphne_server, "socket_refused"))
    # Someone else is not affected.
    other = open_socket(daphne_server, session_cookie(make_user("someone")), sockets)
    other.send(json.dumps({"type": "nonsense"}))
    assert json.loads(other.recv(timeout=10))["type"] == "error"
    # Once a tab closes, a new one gets in (as soon as the server saw it close).
    tabs.pop().close()
    for _ in range(50):
        again = open_socket(daphne_server, cookie, sockets)
        try:
            again.send(json.dumps({"type": "nonsense"}))
            assert json.loads(again.recv(timeout=10))["type"] == "error"
            break
        except ConnectionClosed:
            continue
    else:
        raise AssertionError("no socket let in after one closed")


def test_a_flood_of_bad_frames_closes_the_socket(
    daphne_server: LiveServer, sockets: contextlib.ExitStack
) -> None:
    ws = open_socket(daphne_server, session_cookie(make_user("flooder")), sockets)
    errors = 0
    try:
        for i in range(1000):
            ws.send("{not json" if i % 2 else json.dumps({"type": "no.such.frame"}))
    except ConnectionClosed:
        pass
    try:
        while True:
            frame = json.loads(ws.recv(timeout=10))
            assert frame["type"] == "error"
            errors += 1
    except ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 4008, daphne_server.log()[-3000:]
    assert errors <= settings.CHAT_MAX_BAD_FRAMES  # answered a bounded number, then closed
    lines = security_lines(daphne_server, "socket_flood")
    assert any("user=flooder" in line for line in lines)


def test_too_many_joins_are_refused(daphne_server: LiveServer, sockets: contextlib.ExitStack) -> None:
    joiner = make_user("joiner")
    conversation = make_conversation(joiner)
    ws = open_socket(daphne_server, session_cookie(joiner), sockets)
    frame = json.dumps({"type": "conversation.join", "conversation": str(conversation.id)})
    try:
        for _ in range(settings.CHAT_JOIN_RATE + 1):
            ws.send(frame)
        while (reply := json.loads(ws.recv(timeout=10)))["type"] != "error":
            pass
    finally:
        ws.close()
    assert reply["code"] == "rate_limited"


def test_someone_elses_conversation_is_not_found_and_logged(
    daphne_server: LiveServer, sockets: contextlib.ExitStack
) -> None:
    theirs = make_conversation(make_user("owner"))
    ws = open_socket(daphne_server, session_cookie(make_user("snoop")), sockets)
    try:
        ws.send(json.dumps({"type": "conversation.join", "conversation": str(theirs.id)}))
        reply = json.loads(ws.recv(timeout=10))
    finally:
        ws.close()
    assert reply["code"] == "not_found"
    assert any(
        str(theirs.id) in line and "user=snoop" in line
        for line in security_lines(daphne_server, "ownership_refused")
    )
