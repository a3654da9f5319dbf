from django.apps import AppConfig
from django.db.models.signals import m2m_changed, post_delete, post_save


class AccountsConfig(AppConfig):
    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model

        from .models import Quota
        from .quotas import forget_limits

        post_save.connect(forget_limits, sender=Quota, dispatch_uid="forget_limits_on_save")
        post_delete.connect(forget_limits, sender=Quota, dispatch_uid="forget_limits_on_delete")
        groups = get_user_model().groups.through
        m2m_changed.connect(forget_limits, sender=groups, dispatch_uid="forget_limits_on_groups")
