"""Signals of this app for the apps that build on it."""

from django.dispatch import Signal

# Sent with `user_ids` when accounts changed in bulk (QuerySet.update sends
# no post_save): a deactivation in the admin. `conversations` closes those
# users' sockets that may no longer be open (conversations/signins.py).
accounts_changed = Signal()
