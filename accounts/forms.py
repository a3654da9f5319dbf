from __future__ import annotations

from typing import TYPE_CHECKING

from django import forms
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.forms import UserCreationForm
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.core.mail import send_mail
from django.template.loader import render_to_string

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User

    # Django's forms are not subscriptable at run time (no django_stubs_ext here).
    _UserCreationForm = UserCreationForm[User]
else:
    _UserCreationForm = UserCreationForm


class SignupForm(_UserCreationForm):
    """Django's sign-up form, with its errors where a person looks for them:
    a password the validators refuse ("too short") is said under the
    password, not under its confirmation; and a form refused for another
    reason (a username taken) keeps the passwords typed."""

    def validate_password_for_user(self, user: User, password_field_name: str = "password1") -> None:
        # SetPasswordMixin's, which django-stubs leave out of BaseUserCreationForm's bases.
        super().validate_password_for_user(user, password_field_name="password1")  # type: ignore[misc]

    def full_clean(self) -> None:
        super().full_clean()
        if self.is_bound and self.errors and not {"password1", "password2"} & set(self.errors):
            for name in ("password1", "password2"):
                self.fields[name].widget.render_value = True


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

    def send(self, user: User, link: str, *, invited_by: User | AnonymousUser) -> None:
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
