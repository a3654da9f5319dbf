from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class ConversationsConfig(AppConfig):
    name = "conversations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from .models import ModelPrice, forget_prices

        post_save.connect(forget_prices, sender=ModelPrice, dispatch_uid="forget_prices_on_save")
        post_delete.connect(forget_prices, sender=ModelPrice, dispatch_uid="forget_prices_on_delete")
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
