"""Sign-in through the company's identity provider: OpenID Connect through
django-allauth, with this product's rules on top.

- `SSOProvider`: allauth's OpenID Connect provider with a `nonce` (allauth
  sends `state` and PKCE, not a nonce): a fresh one per sign-in, kept with
  the state and compared with the ID token's.
- `SSOAdapter`: who gets in. A first sign-in makes an account under
  CHAT_SIGNUP (`approval`: it waits for staff; `closed`: only accounts that
  exist or were invited); an existing account is linked only through an
  address the provider says is verified (allauth's e-mail authentication);
  OIDC_REQUIRED_GROUPS refuses someone in none of them; on every sign-in
  the groups from the provider (`OIDC_GROUPS_CLAIM`) replace the ones it
  gave before (groups staff gave by hand stay), and OIDC_STAFF_GROUPS
  decides `is_staff`.

Every refusal lands on a page that says what happened (`sso_refused.html`).
"""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from allauth.core.exceptions import ImmediateHttpResponse
from allauth.socialaccount.adapter import DefaultSocialAccountAdapter
from allauth.socialaccount.providers.openid_connect.provider import OpenIDConnectProvider
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from chatsite.middleware import content_security_policy

from . import security
from .models import ProviderMembership

if TYPE_CHECKING:
    from allauth.socialaccount.models import SocialLogin
    from django.contrib.auth.models import User

PROVIDER_ID = "sso"
MAX_GROUPS = 200  # of one claim: more is a misconfigured claim, not a person
MAX_GROUP_NAME = 150  # Django's Group.name


def storable(value: Any) -> Any:
    """The provider's claims as the database can keep them: no NUL and no
    lone surrogate in any string (PostgreSQL refuses both in JSON), at any depth."""
    if isinstance(value, str):
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [storable(item) for item in value]
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    return value


class SSOProvider(OpenIDConnectProvider):
    """allauth's OpenID Connect provider, with a nonce; the claims it gets
    are made storable before allauth saves them."""

    package = "allauth.socialaccount.providers.openid_connect"  # its URLs and templates

    def sociallogin_from_response(self, request: HttpRequest, response: Any) -> Any:
        return super().sociallogin_from_response(request, storable(response))

    def redirect(
        self, request: HttpRequest, process: Any, next_url: Any = None, data: Any = None, **kwargs: Any
    ) -> HttpResponse:
        nonce = secrets.token_urlsafe(32)
        auth_params = kwargs.pop("auth_params", None)
        auth_params = dict(auth_params if auth_params is not None else self.get_auth_params())
        auth_params["nonce"] = nonce
        try:
            response: HttpResponse = super().redirect(
                request, process, next_url, data, auth_params=auth_params, nonce=nonce, **kwargs
            )
        except (requests.RequestException, ValueError, KeyError) as exc:
            # Its discovery document did not come (down, unreachable, not JSON).
            security.event("sso_unreachable", address=security.request_address(request), error=repr(exc))
            page: HttpResponse = refused(
                request,
                f"{settings.OIDC_NAME} did not answer. Try again in a moment; if it keeps failing, "
                "tell your administrator.",
                status=503,
            ).response
            return page
        return response


def _claims(sociallogin: SocialLogin) -> dict[str, Any]:
    """What the provider said of the person: its userinfo over its ID token."""
    data = sociallogin.account.extra_data or {}
    merged: dict[str, Any] = {**(data.get("id_token") or {}), **(data.get("userinfo") or {})}
    return merged


def claimed_groups(claims: dict[str, Any]) -> list[str] | None:
    """The group names in OIDC_GROUPS_CLAIM (a list of strings, or one
    string); None when the provider sent no such claim."""
    raw = claims.get(settings.OIDC_GROUPS_CLAIM)
    if raw is None:
        return None
    values = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    names: list[str] = []
    for value in values[:MAX_GROUPS]:
        if isinstance(value, str):
            printable = "".join(ch for ch in value if ch.isprintable())
            name = " ".join(printable.split())[:MAX_GROUP_NAME]
            if name and name not in names:
                names.append(name)
    return names


def refused(request: HttpRequest, reason: str, *, status: int = 403) -> ImmediateHttpResponse:
    security.event("sso_refused", address=security.request_address(request), reason=reason)
    page = render(
        request,
        "accounts/sso_refused.html",
        {"reason": reason, "provider": settings.OIDC_NAME},
        status=status,
    )
    return ImmediateHttpResponse(page)


def sync_groups(user: User, groups: list[str] | None) -> None:
    """Replace the groups the provider gave this user by `groups` (made when
    missing); groups staff gave by hand stay. OIDC_STAFF_GROUPS makes
    members staff and takes staff from those who left them (a superuser
    stays staff)."""
    if groups is None:
        return  # no claim: leave what the provider gave last time
    with transaction.atomic():
        given = {
            m.group.name: m for m in ProviderMembership.objects.filter(user=user).select_related("group")
        }
        for name, membership in given.items():
            if name not in groups:
                user.groups.remove(membership.group)
                membership.delete()
        staff_groups = set(settings.OIDC_STAFF_GROUPS)
        for name in groups:
            if name in given:
                continue
            group, _made = Group.objects.get_or_create(name=name)
            if name not in staff_groups and group.permissions.exists():
                # A group that grants rights in the admin is given by staff
                # (or listed in OIDC_STAFF_GROUPS), never by a claim alone.
                security.event("sso_group_skipped", user=user, group=name)
                continue
            if not user.groups.filter(pk=group.pk).exists():
                user.groups.add(group)
                ProviderMembership.objects.create(user=user, group=group)
        if staff_groups:
            staff = bool(staff_groups & set(groups)) or user.is_superuser
            if staff != user.is_staff:
                user.is_staff = staff
                user.save(update_fields=["is_staff"])


class SSOAdapter(DefaultSocialAccountAdapter):
    """This product's rules for a sign-in through the provider."""

    def pre_social_login(self, request: HttpRequest, sociallogin: SocialLogin) -> None:
        claims = _claims(sociallogin)
        expected = (sociallogin.state or {}).get("nonce")
        got = (sociallogin.account.extra_data.get("id_token") or {}).get("nonce")
        if not expected or not isinstance(got, str) or not hmac.compare_digest(expected, got):
            raise refused(request, "The sign-in could not be verified (its nonce did not match). Try again.")
        required = set(settings.OIDC_REQUIRED_GROUPS)
        if required and not required & set(claimed_groups(claims) or ()):
            raise refused(
                request,
                f"Your account at {settings.OIDC_NAME} is not in a group that may use this site. "
                "Ask your administrator for access.",
            )
        if sociallogin.is_existing:
            sync_groups(sociallogin.user, claimed_groups(claims))

    def authenticate_by_email(self, sociallogin: SocialLogin) -> tuple[Any, str] | None:
        """The existing account a verified address points to: only when
        exactly one account has it as its e-mail (allauth would take the
        first of any that ever added it, verified or not)."""
        User = get_user_model()
        for address in sociallogin.email_addresses:
            if not address.verified or not address.email:
                continue
            users = list(User.objects.filter(email__iexact=address.email)[:2])
            if len(users) == 1:
                return users[0], address.email
        return None

    def is_open_for_signup(self, request: HttpRequest, sociallogin: SocialLogin) -> bool:
        # `closed`: only accounts that exist (or were invited) get in; they
        # are found before this is asked.
        return security.signup_policy() != "closed" or not get_user_model().objects.exists()

    def populate_user(self, request: HttpRequest, sociallogin: SocialLogin, data: dict[str, Any]) -> Any:
        user = super().populate_user(request, sociallogin, data)
        name = str(data.get("name") or "").strip()
        if name and not (user.first_name or user.last_name):
            first, _space, last = name.partition(" ")
            user.first_name, user.last_name = first[:150], last[:150]
        return user

    def save_user(self, request: HttpRequest, sociallogin: SocialLogin, form: Any = None) -> Any:
        """A new account from the provider, under CHAT_SIGNUP: the first one
        of an empty install is its administrator; under `approval` it waits
        for staff."""
        User = get_user_model()
        with transaction.atomic():
            first = not User.objects.exists()
            user = sociallogin.user
            user.set_unusable_password()
            user.is_staff = user.is_superuser = first
            user.is_active = first or security.signup_policy() == "open"
            user = super().save_user(request, sociallogin, form)
            # The provider's address, never one typed on allauth's sign-up form (shown when
            # the username is taken): a typed one would catch its real owner's first sign-in.
            provided = next((a.email for a in sociallogin.email_addresses if a.email), "")
            if user.email != provided:
                user.email = provided
                user.save(update_fields=["email"])
            sync_groups(user, claimed_groups(_claims(sociallogin)))
        security.event(
            "signup", user=user, address=security.request_address(request), active=user.is_active, via="sso"
        )
        return user  # an inactive one gets AccountAdapter.respond_user_inactive

    def on_authentication_error(
        self,
        request: HttpRequest,
        provider: Any,
        error: Any = None,
        exception: Any = None,
        extra_context: Any = None,
    ) -> None:
        """Denied consent, a tampered or stale `state`, the provider unreachable:
        a page that says so (allauth's own page otherwise)."""
        reason = (
            f"You cancelled the sign-in at {settings.OIDC_NAME}."
            if str(error) == "cancelled"
            else f"The sign-in through {settings.OIDC_NAME} did not complete. Try again; if it keeps "
            "failing, tell your administrator."
        )
        security.event(
            "sso_failed",
            address=security.request_address(request),
            error=str(error),
            exception=repr(exception),
        )
        raise refused(request, reason, status=400)


def providers(request: HttpRequest) -> list[dict[str, str]]:
    """The identity providers the login page offers: {"name", "url"} (the
    environment's `sso`, and any staff added in the admin)."""
    from allauth.socialaccount.adapter import get_adapter

    found = []
    for app in get_adapter(request).list_apps(request):
        provider = app.get_provider(request)
        origin = urlsplit(str(app.settings.get("server_url", "")))
        found.append(
            {
                "name": app.name or provider.name,
                "url": provider.get_login_url(request),
                "origin": f"{origin.scheme}://{origin.netloc}" if origin.netloc else "",
            }
        )
    return found


def with_form_action(response: HttpResponse, providers_: list[dict[str, str]]) -> HttpResponse:
    """A page with sign-in buttons may send the browser on to the providers."""
    origins = tuple(sorted({p["origin"] for p in providers_ if p["origin"]}))
    if origins:
        response.headers["Content-Security-Policy"] = content_security_policy(origins)
    return response
