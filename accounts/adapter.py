"""allauth's account rules where this product has its own (ACCOUNT_ADAPTER).

- Sign-up under CHAT_SIGNUP: `closed` shows the closed page; the first
  account of an empty install is its administrator (staff, superuser,
  active); under `approval` a new account waits, inactive, for staff.
- An inactive account that signs up or comes back from the provider gets
  a page that says why (waiting for approval, or turned off by staff).
- The wording of a failed login is Django's, as it always was here.

The throttles (accounts/security.py) run in the views, which answer 429.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from allauth.account.adapter import DefaultAccountAdapter
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from . import security

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser
    from django.forms import BaseForm


class AccountAdapter(DefaultAccountAdapter):
    error_messages = {
        **DefaultAccountAdapter.error_messages,
        "username_password_mismatch": (
            "Please enter a correct username and password. Note that both fields may be case-sensitive."
        ),
    }

    def is_open_for_signup(self, request: HttpRequest) -> bool:
        return security.signup_policy() != "closed"

    def save_user(
        self, request: HttpRequest, user: AbstractBaseUser, form: BaseForm, commit: bool = True
    ) -> AbstractBaseUser:
        """A new account under CHAT_SIGNUP: the first of an empty install is
        staff and superuser (who ran `make run` reaches the admin); under
        `approval` it is inactive until staff turn it on."""
        if not commit:
            unsaved: AbstractBaseUser = super().save_user(request, user, form, commit=False)
            return unsaved
        User = get_user_model()
        with transaction.atomic():
            user = super().save_user(request, user, form, commit=False)
            first = not User.objects.exists()
            user.is_staff = user.is_superuser = first  # type: ignore[attr-defined]
            user.is_active = first or security.signup_policy() == "open"
            user.save()
        return user

    def respond_user_inactive(self, request: HttpRequest, user: Any) -> HttpResponse:
        """A new account waiting for staff (CHAT_SIGNUP `approval`), or one
        staff turned off."""
        if not user.last_login:
            via = settings.OIDC_NAME if user.socialaccount_set.exists() else None
            context = {"username": user.username, "via_provider": via}
            return render(request, "accounts/signup_pending.html", context)
        return render(
            request,
            "accounts/sso_refused.html",
            {
                "reason": "This account has been turned off. Ask your administrator.",
                "provider": settings.OIDC_NAME,
            },
            status=403,
        )
