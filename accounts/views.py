from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth import get_user_model, login
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm, PasswordResetForm, SetPasswordForm
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse, reverse_lazy
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from django.views.decorators.debug import sensitive_post_parameters

from . import security, sso
from .forms import InviteForm, SignupForm
from .links import one_time_links

if TYPE_CHECKING:
    from django.contrib.auth.models import User


def _throttled(request: HttpRequest, template: str, context: Mapping[str, object], wait: int) -> HttpResponse:
    """The page again with "try again in N s": HTTP 429 with Retry-After, so
    that a script gets a plain refusal and a person a readable one."""
    response = render(request, template, {**context, "throttled": security.describe_wait(wait)}, status=429)
    response["Retry-After"] = str(wait)
    return response


class LoginView(auth_views.LoginView):
    """Django's login, throttled: after CHAT_LOGIN_RATE failures from one
    address or for one username, every attempt (the right password too) is
    refused until the window ends. Successful logins never count."""

    template_name = "registration/login.html"  # Django's, said here for its type (str)
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        return {
            **super().get_context_data(**kwargs),
            "signup_open": security.signup_policy() != "closed",
            "password_login": settings.CHAT_PASSWORD_LOGIN,
            "sso_providers": sso.providers(self.request),
        }

    def render_to_response(self, context: dict[str, Any], **response_kwargs: Any) -> HttpResponse:
        response = super().render_to_response(context, **response_kwargs)
        return sso.with_form_action(response, context.get("sso_providers") or [])

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not settings.CHAT_PASSWORD_LOGIN:
            # Staff keep a way in: `manage.py createsuperuser` / `changepassword` and the admin's own login.
            security.event("password_login_off", address=security.request_address(request))
            return self.render_to_response(self.get_context_data(password_refused=True), status=403)
        username = str(request.POST.get("username", ""))[:150]
        wait = security.login_wait(request, username)
        if wait:
            security.event(
                "login_throttled", user=username, address=security.request_address(request), wait=wait
            )
            form = AuthenticationForm(request, initial={"username": username})
            return _throttled(request, self.template_name, self.get_context_data(form=form), wait)
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form: AuthenticationForm) -> HttpResponse:
        username = str(self.request.POST.get("username", ""))[:150]
        security.count_login_failure(self.request, username)
        security.event("login_failed", user=username, address=security.request_address(self.request))
        return super().form_invalid(form)


@sensitive_post_parameters("password1", "password2")
def signup(request: HttpRequest) -> HttpResponse:
    """Sign-up under CHAT_SIGNUP. The first account of an empty install is
    staff and superuser (and active): who ran `make run` reaches the admin."""
    if request.user.is_authenticated:
        return redirect("chat:new")
    policy = security.signup_policy()
    User = get_user_model()
    if policy == "closed":
        return render(request, "accounts/signup_closed.html", status=403)
    first = not User.objects.exists()
    form = SignupForm(request.POST or None)
    if request.method == "POST":
        wait = security.address_wait(request, security.SIGNUP_GROUP, settings.CHAT_SIGNUP_RATE)
        if wait:
            security.event("signup_throttled", address=security.request_address(request), wait=wait)
            return _throttled(request, "accounts/signup.html", {"form": SignupForm()}, wait)
        if form.is_valid():
            with transaction.atomic():
                user = form.save(commit=False)
                first = not User.objects.exists()
                user.is_staff = user.is_superuser = first
                user.is_active = first or policy == "open"
                user.save()
            security.count_address(request, security.SIGNUP_GROUP, settings.CHAT_SIGNUP_RATE)
            security.event(
                "signup", user=user, address=security.request_address(request), active=user.is_active
            )
            if not user.is_active:
                return render(request, "accounts/signup_pending.html", {"username": user.username})
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect("chat:new")
    return render(request, "accounts/signup.html", {"form": form, "first": first, "policy": policy})


class PasswordResetView(auth_views.PasswordResetView):
    """Django's password reset, its mails throttled per address. The page
    says the same whether the address has an account or not."""

    token_generator = one_time_links
    template_name = "registration/password_reset_form.html"
    email_template_name = "registration/password_reset_email.txt"
    subject_template_name = "registration/password_reset_subject.txt"

    def form_valid(self, form: PasswordResetForm) -> HttpResponse:
        request = self.request
        wait = security.address_wait(request, security.RESET_GROUP, settings.CHAT_PASSWORD_RESET_RATE)
        if wait:
            security.event("password_reset_throttled", address=security.request_address(request), wait=wait)
            return _throttled(request, self.template_name, self.get_context_data(form=form), wait)
        security.count_address(request, security.RESET_GROUP, settings.CHAT_PASSWORD_RESET_RATE)
        security.event("password_reset_asked", address=security.request_address(request))
        return super().form_valid(form)


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    """The mailed link: a new password, for an active account only (the
    token also hashes `is_active`: a link mailed before a deactivation is
    dead)."""

    token_generator = one_time_links
    template_name = "registration/password_reset_set.html"
    success_url = reverse_lazy("password_reset_complete")
    refusal = "password_reset_refused"

    def may_use_link(self, user: User) -> bool:
        return user.is_active

    def get_user(self, uidb64: str) -> User | None:
        user = super().get_user(uidb64)
        if user is not None and not self.may_use_link(user):
            security.event(self.refusal, user=user, address=security.request_address(self.request))
            return None  # the page says the link is no longer valid
        return user


class InvitationAcceptView(PasswordResetConfirmView):
    """An invitation's one-time link: the invited person sets a password and
    is logged in. Only for what staff made it for: an active account that
    never had a password (a password-reset link of any other account is
    refused here); it stops working once a password is set, and after
    PASSWORD_RESET_TIMEOUT."""

    template_name = "registration/invitation_accept.html"
    post_reset_login = True
    post_reset_login_backend = "django.contrib.auth.backends.ModelBackend"
    success_url = reverse_lazy("chat:new")
    refusal = "invitation_refused"

    def may_use_link(self, user: User) -> bool:
        return user.is_active and not user.has_usable_password()

    def form_valid(self, form: SetPasswordForm[User]) -> HttpResponse:
        security.event("invitation_accepted", user=form.user, address=security.request_address(self.request))
        return super().form_valid(form)


@staff_member_required
def invite(request: HttpRequest) -> HttpResponse:
    """Staff who may add users invite someone by e-mail: an active account
    without a password, and a one-time link that sets one."""
    if not request.user.has_perm("auth.add_user"):
        security.event("invite_refused", user=request.user, address=security.request_address(request))
        return render(request, "accounts/invite.html", {"refused": True}, status=403)
    form = InviteForm(request.POST or None)
    sent = None
    if request.method == "POST" and form.is_valid():
        user = form.save()
        uid = urlsafe_base64_encode(force_bytes(user.pk))
        token = one_time_links.make_token(user)
        link = request.build_absolute_uri(
            reverse("invitation_accept", kwargs={"uidb64": uid, "token": token})
        )
        form.send(user, link, invited_by=request.user)
        security.event(
            "invited", user=request.user, address=security.request_address(request), invitee=user.username
        )
        sent = user
        form = InviteForm()
    return render(request, "accounts/invite.html", {"form": form, "sent": sent})
