"""Sign-in through a real OpenID Connect provider: panva's oidc-provider
(OpenID Certified, from npm, run by Node.js on 127.0.0.1), against a real
daphne. The whole authorization code flow with PKCE, redirect by redirect
with httpx: first sign-ins under each CHAT_SIGNUP, linking an existing
account only through a verified address, a required group, the provider's
groups replaced on the next sign-in (and the quota that follows them),
staff groups, a tampered state, and password logins turned off."""

from __future__ import annotations

import contextlib
import html
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from accounts.models import ProviderMembership, Quota
from conversations.quotas import forget_limits, limits_for
from tests.conftest import LiveServer, database_url, free_port, run_daphne
from tests.factories import PASSWORD, make_user, session_cookie
from tests.fake_llm import FakeLLM

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

OIDC_DIR = Path(__file__).parent / "oidc"
CALLBACK = "/accounts/oidc/sso/login/callback/"


@dataclass
class Site:
    """The product, and the identity provider it trusts."""

    server: LiveServer
    provider_url: str
    people_file: Path

    @property
    def url(self) -> str:
        return self.server.url

    def people(self, **people: dict[str, Any]) -> None:
        """Who the provider knows, and what it says of them (read at every sign-in)."""
        self.people_file.write_text(json.dumps(people))


@contextlib.contextmanager
def _provider(port: int, redirect_uri: str, people_file: Path, log: Path) -> Iterator[str]:
    node = shutil.which("node")
    assert node, "Node.js runs the tests' identity provider"
    assert (OIDC_DIR / "node_modules" / "oidc-provider").is_dir(), (
        "npm ci --prefix tests/oidc (make test does it)"
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [node, str(OIDC_DIR / "provider.mjs"), str(port), redirect_uri, str(people_file)],
            stdout=subprocess.PIPE,
            stderr=out,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # "ready", once it listens
            assert line.strip() == b"ready", (line, log.read_text())
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


@contextlib.contextmanager
def _site(tmp: Path, fake: FakeLLM, db_url: str, **env: str) -> Iterator[Site]:
    port = free_port()
    people = tmp / "people.json"
    people.write_text("{}")
    provider_url = f"http://127.0.0.1:{port}"
    with run_daphne(
        db_url,
        fake.base_url,
        tmp / "daphne.log",
        OIDC_SERVER_URL=provider_url,
        OIDC_CLIENT_ID="chat",
        OIDC_CLIENT_SECRET="chat-secret",
        OIDC_NAME="Acme SSO",
        OIDC_SCOPES="openid,profile,email,groups",
        **cast(Any, env),  # run_daphne's own keyword (`probe`) is not among them
    ) as server:
        with _provider(port, server.url + CALLBACK, people, tmp / "provider.log"):
            yield Site(server, provider_url, people)


def _site_fixture(**env: str) -> Callable[..., Iterator[Site]]:
    @pytest.fixture(scope="module")
    def fixture(
        django_db_setup: None, django_db_blocker: Any, fake_llm_server: FakeLLM, tmp_path_factory: Any
    ) -> Iterator[Site]:
        with django_db_blocker.unblock():
            db_url = database_url()
        with _site(tmp_path_factory.mktemp("sso"), fake_llm_server, db_url, **env) as site:
            yield site

    return fixture


open_site = _site_fixture(CHAT_SIGNUP="open", OIDC_STAFF_GROUPS="chat-admins")
approval_site = _site_fixture(CHAT_SIGNUP="approval")
closed_site = _site_fixture(
    CHAT_SIGNUP="closed", OIDC_REQUIRED_GROUPS="chat-users,chat-admins", CHAT_PASSWORD_LOGIN="false"
)


def _form(page: httpx.Response) -> tuple[str, dict[str, str]]:
    """The page's first form: where it posts, and its fields' values."""
    match = re.search(r"<form[^>]*action=\"([^\"]*)\"[^>]*>(.*?)</form>", page.text, re.S)
    assert match, page.text[:2000]
    fields = {}
    for tag in re.findall(r"<input[^>]*>", match[2]):
        attributes = dict(re.findall(r'(\w+)="([^"]*)"', tag))
        if "name" in attributes:
            fields[attributes["name"]] = html.unescape(attributes.get("value", ""))
    return html.unescape(match[1]), fields


@dataclass
class SignIn:
    client: httpx.Client
    page: httpx.Response  # the site's answer to the provider's redirect (the callback)
    authorize: httpx.URL  # the request that went to the provider


def sign_in(site: Site, login: str, *, tamper_state: bool = False) -> SignIn:
    """A person signing in with the provider's button: the login page, the
    button's POST, the provider's login and consent pages, the callback."""
    client = httpx.Client(follow_redirects=False, timeout=20)
    page = client.get(site.url + "/accounts/login/")
    action, fields = _form(page)
    assert action == "/accounts/oidc/sso/login/", action
    started = client.post(site.url + action, data=fields)
    assert started.status_code == 302, started.text[:500]
    authorize = httpx.URL(started.headers["Location"])
    assert str(authorize).startswith(site.provider_url + "/auth?")
    response = client.get(authorize)
    while True:
        while response.status_code in (302, 303):
            location = response.headers["Location"]
            target = httpx.URL(location) if "://" in location else response.url.join(location)
            if target.path == CALLBACK:
                if tamper_state:
                    target = target.copy_set_param("state", "forged-state")
                return SignIn(client, client.get(target), authorize)  # the site's answer to the provider
            response = client.get(target)
        if response.url.host == "127.0.0.1" and str(response.url).startswith(site.provider_url):
            # The provider's development pages: its login form, then its consent.
            action, fields = _form(response)
            if "login" in fields:
                fields.update(login=login, password="any")
            response = client.post(response.url.join(action), data=fields)
            continue
        raise AssertionError(
            f"the provider did not send the browser back: {response.status_code} {response.text[:500]}"
        )


def person(
    email: str, *, verified: bool = True, groups: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "email": email,
        "email_verified": verified,
        "name": extra.pop("name", "Some One"),
        "preferred_username": extra.pop("username", email.split("@")[0]),
        **({"groups": groups} if groups is not None else {}),
        **extra,
    }


User = get_user_model()


def test_the_code_flow_with_pkce_and_a_nonce_signs_a_new_person_in(open_site: Site) -> None:
    make_user("someone_first")  # not an empty install: no administrator is made
    open_site.people(ann=person("ann@acme.test", groups=["eng", "chat-users"], name="Ann Archer"))

    result = sign_in(open_site, "ann")

    assert result.page.status_code == 302 and result.page.headers["Location"] == "/"
    params = dict(result.authorize.params)
    assert params["code_challenge_method"] == "S256" and len(params["code_challenge"]) >= 43
    assert len(params["state"]) >= 12 and len(params["nonce"]) >= 32
    assert "groups" in params["scope"].split()
    ann = User.objects.get(email="ann@acme.test")
    assert (ann.username, ann.first_name, ann.last_name) == ("ann", "Ann", "Archer")
    assert ann.is_active and not ann.is_staff and not ann.has_usable_password()
    assert sorted(ann.groups.values_list("name", flat=True)) == ["chat-users", "eng"]
    assert result.client.get(open_site.url + "/").status_code == 200  # the chat page, signed in
    # A second sign-in is the same account.
    sign_in(open_site, "ann")
    assert User.objects.filter(email="ann@acme.test").count() == 1


def test_groups_are_replaced_on_every_sign_in_and_quotas_and_staff_follow(open_site: Site) -> None:
    make_user("someone_first")
    Quota.objects.create(group=Group.objects.create(name="interns"), tokens_per_day=1000)
    open_site.people(bo=person("bo@acme.test", groups=["interns", "chat-admins"]))
    sign_in(open_site, "bo")
    bo = User.objects.get(username="bo")
    assert set(bo.groups.values_list("name", flat=True)) == {"interns", "chat-admins"}
    assert bo.is_staff
    assert limits_for(bo).tokens_per_day == 1000
    hand_made = Group.objects.create(name="book-club")  # staff add bo by hand: it stays
    bo.groups.add(hand_made)

    open_site.people(bo=person("bo@acme.test", groups=["eng"]))  # the provider moved bo
    sign_in(open_site, "bo")

    bo.refresh_from_db()
    assert set(bo.groups.values_list("name", flat=True)) == {"eng", "book-club"}
    assert not bo.is_staff  # left the staff group
    forget_limits()
    assert limits_for(bo).tokens_per_day is None
    assert set(ProviderMembership.objects.filter(user=bo).values_list("group__name", flat=True)) == {"eng"}


def test_an_existing_account_is_linked_only_through_a_verified_address(open_site: Site) -> None:
    carl = make_user("carl_local", email="carl@acme.test")
    open_site.people(
        carl=person("carl@acme.test", verified=True, username="carl"),
        mallory=person("dora@acme.test", verified=False, username="mallory"),
    )
    dora = make_user("dora_local", email="dora@acme.test")

    sign_in(open_site, "carl")
    sign_in(open_site, "mallory")  # claims dora's address, unverified

    assert carl.socialaccount_set.count() == 1  # linked: the provider verified the address
    assert dora.socialaccount_set.count() == 0  # nothing merged
    dora.refresh_from_db()
    assert dora.has_usable_password()
    made = User.objects.exclude(pk__in=[carl.pk, dora.pk])
    assert [u.email for u in made] == ["dora@acme.test"]  # a new, separate account


def test_a_tampered_state_is_refused_with_a_page_that_says_so(open_site: Site) -> None:
    make_user("someone_first")
    open_site.people(eve=person("eve@acme.test"))

    result = sign_in(open_site, "eve", tamper_state=True)

    assert result.page.status_code == 400
    assert "did not complete" in result.page.text and "Traceback" not in result.page.text
    assert not User.objects.filter(email="eve@acme.test").exists()


def test_under_approval_a_new_account_waits_for_staff(approval_site: Site) -> None:
    make_user("someone_first")
    approval_site.people(fay=person("fay@acme.test"))

    result = sign_in(approval_site, "fay")

    assert result.page.status_code == 200 and "Waiting for approval" in result.page.text
    assert "through Acme SSO" in result.page.text
    fay = User.objects.get(email="fay@acme.test")
    assert not fay.is_active
    assert result.client.get(approval_site.url + "/").status_code == 302  # not signed in
    User.objects.filter(pk=fay.pk).update(is_active=True)  # staff approve
    assert sign_in(approval_site, "fay").page.headers.get("Location") == "/"


def test_the_first_account_of_an_empty_install_is_its_administrator(approval_site: Site) -> None:
    approval_site.people(gus=person("gus@acme.test"))
    sign_in(approval_site, "gus")
    gus = User.objects.get(email="gus@acme.test")
    assert gus.is_active and gus.is_staff and gus.is_superuser


def test_closed_lets_in_only_invited_people_in_a_required_group(closed_site: Site) -> None:
    make_user("someone_first")
    invited = make_user("hal_invited", email="hal@acme.test")
    closed_site.people(
        hal=person("hal@acme.test", groups=["chat-users"]),
        ivy=person("ivy@acme.test", groups=["chat-users"]),  # not invited
        jon=person("jon@acme.test", groups=["sales"]),  # invited, in no required group
    )
    make_user("jon_invited", email="jon@acme.test")

    assert sign_in(closed_site, "hal").page.headers.get("Location") == "/"
    assert invited.socialaccount_set.count() == 1

    stranger = sign_in(closed_site, "ivy")
    assert "Sign-up is closed" in stranger.page.text and "invitation" in stranger.page.text
    assert not User.objects.filter(email="ivy@acme.test").exists()

    outsider = sign_in(closed_site, "jon")
    assert outsider.page.status_code == 403
    assert "not in a group that may use this site" in outsider.page.text


def test_with_password_logins_off_the_form_is_gone_and_a_password_is_refused(closed_site: Site) -> None:
    make_user("kim", email="kim@acme.test")
    client = httpx.Client(timeout=20)
    page = client.get(closed_site.url + "/accounts/login/")
    assert "Sign in with Acme SSO" in page.text
    assert 'name="password"' not in page.text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token
    refused = client.post(
        closed_site.url + "/accounts/login/",
        data={"csrfmiddlewaretoken": token[1], "username": "kim", "password": "pw-for-tests"},
    )
    assert refused.status_code == 403 and "Password logins are turned off" in refused.text
    assert client.get(closed_site.url + "/", follow_redirects=False).status_code == 302


def test_with_password_logins_off_no_invitation_sets_a_password(closed_site: Site) -> None:
    """An invitation's link logs in with a password: with password logins
    off it would get round the provider (and its required groups)."""
    from django.conf import settings
    from django.utils.encoding import force_bytes
    from django.utils.http import urlsafe_base64_encode

    from accounts.links import invitation_links

    waiting = get_user_model().objects.create(username="lee_waiting", email="lee@acme.test")
    waiting.set_unusable_password()
    waiting.save()
    link = f"/accounts/invitation/{urlsafe_base64_encode(force_bytes(waiting.pk))}/"
    client = httpx.Client(timeout=20, follow_redirects=True)
    page = client.get(closed_site.url + link + invitation_links.make_token(waiting) + "/")
    assert "This link no longer works" in page.text and 'name="new_password1"' not in page.text
    staff = make_user("inviting_staff", is_staff=True, is_superuser=True)
    client.cookies.set(settings.SESSION_COOKIE_NAME, session_cookie(staff))
    refused = client.get(closed_site.url + "/accounts/invite/")
    assert refused.status_code == 403 and "through the company's provider only" in refused.text
    waiting.refresh_from_db()
    assert not waiting.has_usable_password()


def test_with_password_logins_off_staff_still_reach_the_admin_with_a_password(closed_site: Site) -> None:
    make_user("root_staff", is_staff=True, is_superuser=True)
    make_user("not_staff")
    client = httpx.Client(timeout=20)
    to_login = client.get(closed_site.url + "/admin/", follow_redirects=True)
    assert to_login.url.path == "/accounts/login/" and to_login.url.params["next"] == "/admin/"
    assert 'name="password"' in to_login.text and "Staff: log in to the admin" in to_login.text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', to_login.text)
    assert token

    def staff_login(username: str) -> httpx.Response:
        return client.post(
            closed_site.url + "/accounts/login/",
            data={
                "csrfmiddlewaretoken": token[1],
                "username": username,
                "password": PASSWORD,
                "next": "/admin/",
            },
        )

    # Someone else's right password is answered as a wrong one: no way in, no hint.
    other = staff_login("not_staff")
    assert other.status_code == 200 and "correct username and password" in other.text
    assert client.get(closed_site.url + "/", follow_redirects=False).status_code == 302
    done = staff_login("root_staff")
    assert done.status_code == 302 and done.headers["location"] == "/admin/"
    assert client.get(closed_site.url + "/admin/", follow_redirects=False).status_code == 200


@pytest.mark.browser
def test_in_chromium_the_button_signs_in_and_a_refusal_is_a_page(open_site: Site, browser: Any) -> None:
    from playwright.sync_api import expect

    from tests.test_browser import SHOTS, in_thread

    in_thread(lambda: make_user("someone_first"))
    open_site.people(
        lee=person("lee@acme.test", groups=["eng"], name="Lee Lopez"),
        max=person("max@acme.test", groups=["eng"]),
    )
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.goto(open_site.url + "/accounts/login/")
    button = page.get_by_role("button", name="Sign in with Acme SSO")
    expect(button).to_be_visible()
    expect(page.get_by_label("Username")).to_be_visible()  # passwords still work here
    page.screenshot(path=str(SHOTS / "sso-login.png"))

    button.click()
    page.wait_for_url(open_site.provider_url + "/interaction/**")  # the provider's own login page
    page.locator("input[name=login]").fill("lee")
    page.locator("input[name=password]").fill("anything")
    page.locator("button[type=submit]").click()
    page.locator("button[type=submit]").click()  # the provider's consent: Continue
    page.wait_for_url(open_site.url + "/")
    expect(page.locator("#composer[data-ready]")).to_have_count(1)  # the chat, signed in
    page.locator("#user-menu summary").click()
    expect(page.locator("#signed-in-with")).to_have_text("Signed in with Acme SSO")
    page.screenshot(path=str(SHOTS / "sso-signed-in.png"))
    assert in_thread(lambda: User.objects.get(email="lee@acme.test").first_name) == "Lee"
    context.close()

    # The provider says no (consent denied): a page that says so.
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.goto(open_site.url + "/accounts/login/")
    page.get_by_role("button", name="Sign in with Acme SSO").click()
    page.wait_for_url(open_site.provider_url + "/interaction/**")
    page.locator("input[name=login]").fill("max")
    page.locator("input[name=password]").fill("anything")
    page.locator("button[type=submit]").click()
    page.get_by_role("link", name=re.compile("Cancel", re.I)).click()  # "[ Cancel ]" on the consent page
    expect(page.locator("#sso-reason")).to_contain_text("cancelled the sign-in at Acme SSO")
    page.screenshot(path=str(SHOTS / "sso-cancelled.png"))
    context.close()


def test_an_id_token_whose_nonce_is_not_this_sign_ins_is_refused(rf: Any) -> None:
    from types import SimpleNamespace

    from allauth.core.exceptions import ImmediateHttpResponse

    from accounts.sso import SSOAdapter

    def login(expected: str | None, got: object) -> Any:
        account = SimpleNamespace(extra_data={"id_token": {"nonce": got, "sub": "x"}, "userinfo": {}})
        return SimpleNamespace(
            state={"nonce": expected} if expected else {}, account=account, is_existing=False
        )

    for expected, got in (("right-nonce", "replayed-nonce"), (None, "any"), ("right-nonce", None)):
        with pytest.raises(ImmediateHttpResponse) as refused:
            SSOAdapter().pre_social_login(rf.get("/accounts/oidc/sso/login/callback/"), login(expected, got))
        assert refused.value.response.status_code == 403
        assert b"nonce did not match" in refused.value.response.content
    SSOAdapter().pre_social_login(rf.get("/"), login("right-nonce", "right-nonce"))  # the right one passes


def test_allauths_own_account_pages_are_not_there_and_an_address_two_accounts_hold_links_neither(
    open_site: Site,
) -> None:
    client = httpx.Client(base_url=open_site.url, timeout=20)
    for path in (
        "/accounts/email/",
        "/accounts/password/set/",
        "/accounts/password/reset/",
        "/accounts/3rdparty/signup/",
    ):
        assert client.get(path).status_code in (302, 404), path  # no page of allauth's own to add an address
    assert client.get("/accounts/password/reset/").status_code == 404
    first = make_user("nia_one", email="nia@acme.test")
    second = make_user("nia_two", email="NIA@acme.test")  # someone else put her address on theirs
    open_site.people(nia=person("nia@acme.test", verified=True, username="nia"))

    assert sign_in(open_site, "nia").page.headers.get("Location") == "/"

    assert first.socialaccount_set.count() == 0 and second.socialaccount_set.count() == 0
    assert User.objects.filter(email__iexact="nia@acme.test").count() == 3  # a new account, nothing merged


def test_a_claim_never_gives_a_group_that_carries_admin_rights(open_site: Site) -> None:
    from django.contrib.auth.models import Permission

    make_user("someone_first")
    reviewers = Group.objects.create(name="reviewers")
    reviewers.permissions.add(Permission.objects.get(codename="review_conversation"))
    open_site.people(oli=person("oli@acme.test", groups=["reviewers", "eng\x00ops", "support"]))

    sign_in(open_site, "oli")

    oli = User.objects.get(email="oli@acme.test")
    assert sorted(oli.groups.values_list("name", flat=True)) == ["engops", "support"]


def test_a_provider_that_does_not_answer_gets_a_page_not_an_error(
    django_db_setup: None, django_db_blocker: Any, fake_llm_server: FakeLLM, tmp_path: Path
) -> None:
    with django_db_blocker.unblock():
        db_url = database_url()
    with run_daphne(
        db_url,
        fake_llm_server.base_url,
        tmp_path / "daphne.log",
        OIDC_SERVER_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        OIDC_CLIENT_ID="chat",
        OIDC_CLIENT_SECRET="chat-secret",
        OIDC_NAME="Acme SSO",
    ) as server:
        client = httpx.Client(base_url=server.url, timeout=20)
        action, fields = _form(client.get("/accounts/login/"))
        answer = client.post(action, data=fields)
        assert answer.status_code == 503 and "Acme SSO did not answer" in answer.text
        assert "Traceback" not in server.log()
