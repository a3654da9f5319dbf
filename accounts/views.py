from __future__ import annotations

from collections.abc import Mapping
from functools import wraps
from typing import TYPE_CHECKING, Any

from allauth.account import views as allauth_views
from allauth.mfa.base import views as mfa_views
from allauth.socialaccount.models import SocialAccount
from django.conf import settings
from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth import get_user_model
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import SetPasswordForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse, reverse_lazy
from django.utils.encoding import force_bytes
from django.utils.http import url_has_allowed_host_and_scheme, urlencode, urlsafe_base64_encode

from . import security, sso
from .adapter import AccountAdapter
from .forms import InviteForm
from .links import invitation_links

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def _throttled(request: HttpRequest, template: str, context: Mapping[str, object], wait: int) -> HttpResponse:
    """The page again with "try again in N s": HTTP 429 with Retry-After, so
    that a script gets a plain refusal and a person a readable one."""
    response = render(request, template, {**context, "throttled": security.describe_wait(wait)}, status=429)
    response["Retry-After"] = str(wait)
    return response


class LoginView(allauth_views.LoginView):
    """allauth's login (its steps after the password: two-factor, a stage
    for an inactive account), throttled: after CHAT_LOGIN_RATE failures
    from one address or for one username, every attempt (the right password
    too) is refused with 429 until the window ends. Successful logins never
    count. With CHAT_PASSWORD_LOGIN=false only the provider's button is left."""

    template_name = "registration/login.html"

    def _next(self) -> str:
        return str(self.request.POST.get("next") or self.request.GET.get("next", ""))

    def _staff_door(self) -> bool:
        """With CHAT_PASSWORD_LOGIN=false, the admin's login (here with
        `next` into /admin/) still takes a staff member's password (from
        `manage.py createsuperuser` or `changepassword`), and only a staff
        member's: anyone else's is answered as a wrong password."""
        return not settings.CHAT_PASSWORD_LOGIN and self._next().startswith("/admin/")

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        return {
            **super().get_context_data(**kwargs),
            "signup_open": security.signup_policy() != "closed",
            "password_login": settings.CHAT_PASSWORD_LOGIN or self._staff_door(),
            "staff_door": self._staff_door(),
            "sso_providers": sso.providers(self.request),
            "next": self._next(),
        }

    def render_to_response(self, context: dict[str, Any], **response_kwargs: Any) -> HttpResponse:
        response = super().render_to_response(context, **response_kwargs)
        return sso.with_form_action(response, context.get("sso_providers") or [])

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not settings.CHAT_PASSWORD_LOGIN and not self._staff_door():
            security.event("password_login_off", address=security.request_address(request))
            return self.render_to_response(self.get_context_data(password_refused=True), status=403)
        username = str(request.POST.get("username", ""))[:150]
        wait = security.login_wait(request, username)
        if wait:
            security.event(
                "login_throttled", user=username, address=security.request_address(request), wait=wait
            )
            form = self.get_form_class()(request=request, initial={"username": username})
            return _throttled(request, self.template_name, self.get_context_data(form=form), wait)
        response: HttpResponse = super().post(request, *args, **kwargs)
        return response

    def form_valid(self, form: Any) -> HttpResponse:
        if self._staff_door() and not form.user.is_staff:
            form.add_error(None, AccountAdapter.error_messages["username_password_mismatch"])
            return self.form_invalid(form)
        response: HttpResponse = super().form_valid(form)
        return response

    def form_invalid(self, form: Any) -> HttpResponse:
        username = str(self.request.POST.get("username", ""))[:150]
        security.count_login_failure(self.request, username)
        security.event("login_failed", user=username, address=security.request_address(self.request))
        response: HttpResponse = super().form_invalid(form)
        return response


class SignupView(allauth_views.SignupView):
    """allauth's sign-up under CHAT_SIGNUP (the rules: accounts.adapter),
    throttled per address (CHAT_SIGNUP_RATE, 429). Closed: a 403 page."""

    template_name = "accounts/signup.html"
    template_name_signup_closed = "accounts/signup_closed.html"

    def closed(self) -> HttpResponse:
        return render(self.request, self.template_name_signup_closed, status=403)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        return {
            **super().get_context_data(**kwargs),
            "first": not get_user_model().objects.exists(),
            "policy": security.signup_policy(),
        }

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        wait = security.address_wait(request, security.SIGNUP_GROUP, settings.CHAT_SIGNUP_RATE)
        if wait:
            security.event("signup_throttled", address=security.request_address(request), wait=wait)
            form = self.get_form_class()()
            return _throttled(request, self.template_name, self.get_context_data(form=form), wait)
        response: HttpResponse = super().post(request, *args, **kwargs)
        return response

    def form_valid(self, form: Any) -> HttpResponse:
        response: HttpResponse = super().form_valid(form)
        user = getattr(self, "user", None)
        if user is not None and user.pk:
            security.count_address(self.request, security.SIGNUP_GROUP, settings.CHAT_SIGNUP_RATE)
            security.event(
                "signup", user=user, address=security.request_address(self.request), active=user.is_active
            )
        return response


class PasswordResetView(allauth_views.PasswordResetView):
    """allauth's password reset, its mails throttled per address
    (CHAT_PASSWORD_RESET_RATE, 429). The page says the same whether the
    address has an account or not, and only an account gets a mail."""

    template_name = "registration/password_reset_form.html"

    def form_valid(self, form: Any) -> HttpResponse:
        request = self.request
        wait = security.address_wait(request, security.RESET_GROUP, settings.CHAT_PASSWORD_RESET_RATE)
        if wait:
            security.event("password_reset_throttled", address=security.request_address(request), wait=wait)
            return _throttled(request, self.template_name, self.get_context_data(form=form), wait)
        security.count_address(request, security.RESET_GROUP, settings.CHAT_PASSWORD_RESET_RATE)
        security.event("password_reset_asked", address=security.request_address(request))
        response: HttpResponse = super().form_valid(form)
        return response


class PasswordResetFromKeyView(allauth_views.PasswordResetFromKeyView):
    """allauth's mailed link; a dead one (used, expired, or the account
    turned off since: accounts.links) is on the security log."""

    def dispatch(self, request: HttpRequest, uidb36: str, key: str, **kwargs: Any) -> HttpResponse:
        response: HttpResponse = super().dispatch(request, uidb36, key, **kwargs)
        if getattr(self, "reset_user", False) is None:
            security.event("password_reset_refused", address=security.request_address(request), uid=uidb36)
        return response


class PasswordSetView(allauth_views.PasswordSetView):
    """A first password for an account that has none: not for one that
    signs in through the identity provider (its password would outlive the
    provider taking it away), nor while password logins are off."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        linked = user.is_authenticated and SocialAccount.objects.filter(user_id=user.pk).exists()
        if user.is_authenticated and (not settings.CHAT_PASSWORD_LOGIN or linked):
            security.event("password_set_refused", user=user, address=security.request_address(request))
            return render(
                request,
                "accounts/sso_refused.html",
                {"reason": "Your account signs in through your organisation: it has no password here."},
                status=403,
            )
        response: HttpResponse = super().dispatch(request, *args, **kwargs)
        return response


class TwoFactorView(mfa_views.AuthenticateView):
    """allauth's second step (the authenticator's code or a recovery code),
    under the password's throttle: its failures count against the same
    username and address (CHAT_LOGIN_RATE), and past it every code, the
    right one too, is refused with 429 until the window ends."""

    def _username(self) -> str:
        return str(self.stage.login.user.get_username())

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        wait = security.login_wait(request, self._username())
        if wait:
            security.event(
                "login_throttled", user=self._username(), address=security.request_address(request), wait=wait
            )
            messages.error(request, f"Too many attempts. Try again in {security.describe_wait(wait)}.")
            response: HttpResponse = self.render_to_response(self.get_context_data(), status=429)
            response["Retry-After"] = str(wait)
            return response
        result: HttpResponse = super().post(request, *args, **kwargs)
        return result

    def form_invalid(self, form: Any) -> HttpResponse:
        security.count_login_failure(self.request, self._username())
        security.event(
            "login_failed", user=self._username(), address=security.request_address(self.request), step="2fa"
        )
        response: HttpResponse = super().form_invalid(form)
        return response


def old_password_reset_link(request: HttpRequest, uidb64: str, token: str) -> HttpResponse:
    """A reset link mailed before allauth's (Django's uidb64/token): it no
    longer works; the page says so and offers a new one."""
    return render(request, "account/password_reset_from_key.html", {"token_fail": True}, status=410)


class InvitationAcceptView(auth_views.PasswordResetConfirmView):
    """An invitation's one-time link: the invited person sets a password and
    is logged in. Only for what staff made it for: an active account that
    never had a password (a password-reset key of any other account is
    refused here); it stops working once a password is set, and after
    PASSWORD_RESET_TIMEOUT. The token also hashes `is_active`
    (accounts.links): a link mailed before a deactivation is dead."""

    token_generator = invitation_links
    template_name = "registration/invitation_accept.html"
    post_reset_login = True
    post_reset_login_backend = "django.contrib.auth.backends.ModelBackend"
    success_url = reverse_lazy("chat:new")

    def get_user(self, uidb64: str) -> User | None:
        user = super().get_user(uidb64)
        if user is not None and not invitable(user):
            security.event("invitation_refused", user=user, address=security.request_address(self.request))
            return None  # the page says the link is no longer valid
        return user

    def form_valid(self, form: SetPasswordForm[User]) -> HttpResponse:
        security.event("invitation_accepted", user=form.user, address=security.request_address(self.request))
        return super().form_valid(form)


def invitable(user: User) -> bool:
    """May an invitation's link set this account's password? An active
    account that never had one nor signs in through the company's provider,
    on a site that takes passwords (CHAT_PASSWORD_LOGIN: a link that logs
    in would get round the provider and its required groups)."""
    return (
        settings.CHAT_PASSWORD_LOGIN
        and user.is_active
        and not user.has_usable_password()
        and not SocialAccount.objects.filter(user=user).exists()
    )


@staff_member_required
def invite(request: HttpRequest) -> HttpResponse:
    """Staff who may add users invite someone by e-mail: an active account
    without a password, and a one-time link that sets one."""
    if not request.user.has_perm("auth.add_user"):
        security.event("invite_refused", user=request.user, address=security.request_address(request))
        return render(request, "accounts/invite.html", {"refused": True}, status=403)
    if not settings.CHAT_PASSWORD_LOGIN:
        return render(request, "accounts/invite.html", {"provider_only": True}, status=403)
    form = InviteForm(request.POST or None)
    sent = None
    if request.method == "POST" and form.is_valid():
        user = form.save()
        send_invitation(request, user)
        sent = user
        form = InviteForm()
    return render(request, "accounts/invite.html", {"form": form, "sent": sent})


def send_invitation(request: HttpRequest, user: User, *, event: str = "invited") -> None:
    """Mail `user` a one-time link that sets their password (the invite
    page's, and the admin's "send a new invitation")."""
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    token = invitation_links.make_token(user)
    link = request.build_absolute_uri(reverse("invitation_accept", kwargs={"uidb64": uid, "token": token}))
    InviteForm.send(user, link, invited_by=request.user)
    security.event(event, user=request.user, address=security.request_address(request), invitee=user.username)


def admin_login(view: Any) -> Any:
    """The admin's login made the site's (admin.site.login): someone not
    logged in goes to /accounts/login/ (the password, then the second
    factor) and comes back; someone logged in who is not staff gets a page
    that says so (Django's admin would offer its own password form, which
    skips the second factor)."""

    @wraps(view)
    def login(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.user.is_authenticated:
            if request.user.is_staff and request.user.is_active:
                response: HttpResponse = view(request, *args, **kwargs)
                return response
            return render(request, "accounts/not_staff.html", status=403)
        target = request.GET.get("next") or reverse("admin:index")
        if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
            target = reverse("admin:index")
        return redirect(f"{reverse('login')}?{urlencode({'next': target})}")

    return login
