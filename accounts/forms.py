from __future__ import annotations

from typing import Any

from django.contrib.auth.forms import UserCreationForm


class SignupForm(UserCreationForm):
    """Django's sign-up form, with its errors where a person looks for them:
    a password the validators refuse ("too short") is said under the
    password, not under its confirmation; and a form refused for another
    reason (a username taken) keeps the passwords typed."""

    def validate_password_for_user(self, user: Any, password_field_name: str = "password1") -> None:
        super().validate_password_for_user(user, password_field_name="password1")

    def full_clean(self) -> None:
        super().full_clean()
        if self.is_bound and self.errors and not {"password1", "password2"} & set(self.errors):
            for name in ("password1", "password2"):
                self.fields[name].widget.render_value = True
