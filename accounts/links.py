"""One-time links (invitations, password resets): Django's password-reset
tokens, which also hash whether the account is active, so that a link made
before staff deactivated someone stops working then (with Django's own, a
banned user's old reset or invitation link set a password and, through the
invitation, logged them in again)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib.auth.tokens import PasswordResetTokenGenerator

if TYPE_CHECKING:
    from django.contrib.auth.models import User


class OneTimeLinks(PasswordResetTokenGenerator):
    def _make_hash_value(self, user: User, timestamp: int) -> str:
        return f"{super()._make_hash_value(user, timestamp)}{int(user.is_active)}"


class InvitationLinks(OneTimeLinks):
    """An invitation's token: a salt of its own, so that a password-reset
    key (OneTimeLinks) never opens the invitation address, which logs in
    an account without a password."""

    key_salt = "accounts.links.InvitationLinks"


one_time_links = OneTimeLinks()
invitation_links = InvitationLinks()
