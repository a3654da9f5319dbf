from django.apps import AppConfig
from django.db.models.signals import m2m_changed, post_delete, post_save


class ConversationsConfig(AppConfig):
    name = "conversations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.contrib.auth.signals import user_logged_out

        from accounts.models import Quota
        from accounts.signals import accounts_changed

        from . import signins
        from .models import ModelPrice, forget_prices
        from .quotas import forget_limits

        post_save.connect(forget_prices, sender=ModelPrice, dispatch_uid="forget_prices_on_save")
        post_delete.connect(forget_prices, sender=ModelPrice, dispatch_uid="forget_prices_on_delete")
        # A quota or a user's groups changed: this worker's cache of limits forgets.
        post_save.connect(forget_limits, sender=Quota, dispatch_uid="forget_limits_on_save")
        post_delete.connect(forget_limits, sender=Quota, dispatch_uid="forget_limits_on_delete")
        groups = get_user_model().groups.through
        m2m_changed.connect(forget_limits, sender=groups, dispatch_uid="forget_limits_on_groups")
        # A socket lives no longer than its sign-in.
        user = get_user_model()
        user_logged_out.connect(signins.on_logged_out, dispatch_uid="sockets_on_logout")
        post_save.connect(signins.on_user_saved, sender=user, dispatch_uid="sockets_on_user_saved")
        post_delete.connect(signins.on_user_deleted, sender=user, dispatch_uid="sockets_on_user_deleted")
        accounts_changed.connect(signins.accounts_changed, dispatch_uid="sockets_on_accounts_changed")
        _reconnect_steadily()


def _reconnect_steadily() -> None:
    """psycopg's pool tries to reconnect to a PostgreSQL that went away after
    1, 2, 4, 8 ... seconds: after a 3 s restart a worker waited up to 7 s for
    a connection (checkpoints, pages). Every second instead: a connection
    attempt to a server that is down costs next to nothing."""
    from django.conf import settings

    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        return
    from psycopg_pool.base import AttemptWithBackoff

    AttemptWithBackoff.DELAY_BACKOFF = 1.0
