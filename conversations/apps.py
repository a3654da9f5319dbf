from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class ConversationsConfig(AppConfig):
    name = "conversations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from .models import ModelPrice, forget_prices

        post_save.connect(forget_prices, sender=ModelPrice, dispatch_uid="forget_prices_on_save")
        post_delete.connect(forget_prices, sender=ModelPrice, dispatch_uid="forget_prices_on_delete")
