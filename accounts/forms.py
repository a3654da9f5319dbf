from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING, Any, cast

from allauth.account import forms as allauth_forms
from django import forms
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.mail import send_mail
from django.template.loader import render_to_string

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User


class LoginForm(allauth_forms.LoginForm):
    """allauth's login by username, its field named `username` as it always
    was here (password managers and scripts post it) and what was typed
    NFKC-normalised as Django's own login form does (`bob` typed in fullwidth
    letters is `bob`; the throttle counts both under one key)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fields = cast(dict[str, forms.Field], self.fields)  # type: ignore[has-type]  # allauth: untyped
        field = fields.pop("login")
        field.widget.attrs.update(autofocus=True, autocapitalize="none")
        fields["password"].help_text = ""  # allauth's "Forgot your password?": the page has its own
        self.fields = {"username": field, **fields}

    def clean_username(self) -> str:
        username = unicodedata.normalize("NFKC", str(self.cleaned_data["username"]).strip())
        self.cleaned_data["login"] = username  # where allauth's own steps read it
        return username


class ResetPasswordForm(allauth_forms.ResetPasswordForm):
    """allauth's reset request, for accounts that have a password only (as
    Django's own): an account that signs in through the provider, or an
    invited one that has not set its password yet, gets no mail (its
    staff resend an invitation)."""

    def clean_email(self) -> str:
        email: str = super().clean_email()
        found: list[Any] = self.users  # type: ignore[has-type]  # allauth: untyped
        self.users = [user for user in found if user.has_usable_password()]
        return email


class SignupForm(allauth_forms.SignupForm):
    """allauth's sign-up (username, an optional e-mail, the password twice),
    with its errors where a person looks for them: a form refused for a
    reason that is not the password (a username taken) keeps the passwords
    typed."""

    def full_clean(self) -> None:
        super().full_clean()
        if self.is_bound and self.errors and not {"password1", "password2"} & set(self.errors):
            for name in ("password1", "password2"):
                widget = self.fields[name].widget
                if isinstance(widget, forms.PasswordInput):
                    widget.render_value = True


class InviteForm(forms.Form):
    """Staff invite someone: a username and the address the link goes to."""

    username = forms.CharField(max_length=150, validators=[UnicodeUsernameValidator()])
    email = forms.EmailField(label="E-mail")

    def clean_username(self) -> str:
        username: str = self.cleaned_data["username"]
        if get_user_model().objects.filter(username__iexact=username).exists():
            raise forms.ValidationError("A user with that username already exists.")
        return username

    def save(self) -> User:
        user = get_user_model()(username=self.cleaned_data["username"], email=self.cleaned_data["email"])
        user.set_unusable_password()
        user.is_active = True
        user.save()
        return user

    @staticmethod
    def send(user: User, link: str, *, invited_by: User | AnonymousUser) -> None:
        context = {
            "user": user,
            "link": link,
            "invited_by": invited_by,
            "hours": settings.PASSWORD_RESET_TIMEOUT // 3600,
        }
        send_mail(
            render_to_string("accounts/invitation_subject.txt", context).strip(),
            render_to_string("accounts/invitation_email.txt", context),
            None,
            [user.email],
        )
