"""chatsite.settings as configured by the environment, each case in a fresh
Python process (settings are read once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).parent.parent
SECRET_KEY = "q3Vw9-Lx7Zp2Rk8Tn4Hs6Jd1Fg5Mb0Yc_Ua3Ei7Ow2Pl9Kz4Xv8Nr6Qt1Sy5"  # 60 chars, many distinct

# Everything settings.py reads: stripped from the inherited environment so that
# a CI job's DATABASE_URL or REDIS_URL does not leak into a case.
CONFIG_PREFIXES = (
    "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "CSRF_", "DATABASE_", "REDIS_URL", "REDIS_PREFIX",
    "OPENAI_", "SECURE_", "SESSION_COOKIE_", "BEHIND_TLS_PROXY", "CHAT_",
)  # fmt: skip

SHOW_SETTINGS = """
import json
from django.conf import settings
db = settings.DATABASES["default"]
print(json.dumps({
    "DEBUG": settings.DEBUG,
    "SECRET_KEY": settings.SECRET_KEY,
    "ENGINE": db["ENGINE"],
    "NAME": str(db["NAME"]),
    "CONN_MAX_AGE": db["CONN_MAX_AGE"],
    "CONN_HEALTH_CHECKS": db.get("CONN_HEALTH_CHECKS"),
    "OPTIONS": db.get("OPTIONS", {}),
    "CHANNEL_LAYERS": getattr(settings, "CHANNEL_LAYERS", None),
    "CACHE": settings.CACHES["default"]["BACKEND"],
    "CACHE_LOCATION": settings.CACHES["default"].get("LOCATION"),
}))
"""


def run(args: list[str], **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CONFIG_PREFIXES)}
    env.update(DJANGO_SETTINGS_MODULE="chatsite.settings", **variables)
    return subprocess.run(
        [sys.executable, *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )


def load_settings(**variables: str) -> dict[str, Any]:
    result = run(["-c", SHOW_SETTINGS], **variables)
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def test_debug_false_without_secret_key_is_improperly_configured() -> None:
    result = run(["-c", SHOW_SETTINGS], DEBUG="False")

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY" in result.stderr


def test_debug_false_with_secret_key_loads() -> None:
    loaded = load_settings(DEBUG="False", SECRET_KEY=SECRET_KEY)

    assert loaded["DEBUG"] is False
    assert loaded["SECRET_KEY"] == SECRET_KEY


def test_debug_defaults_to_true_with_a_development_key() -> None:
    loaded = load_settings()

    assert loaded["DEBUG"] is True
    assert loaded["SECRET_KEY"]


def test_default_is_sqlite_no_channel_layer_and_local_memory_cache() -> None:
    loaded = load_settings()

    assert loaded["ENGINE"] == "django.db.backends.sqlite3"
    assert loaded["NAME"].endswith("db.sqlite3")
    assert loaded["CHANNEL_LAYERS"] is None  # frames travel through the hub, not a Channels layer
    assert loaded["CACHE"] == "django.core.cache.backends.locmem.LocMemCache"


def test_redis_url_gives_the_redis_cache_and_still_no_channel_layer() -> None:
    url = "redis://127.0.0.1:6379/0"

    loaded = load_settings(REDIS_URL=url)

    assert loaded["CHANNEL_LAYERS"] is None
    assert loaded["CACHE"] == "chatsite.cache.SharedPoolRedisCache"
    assert loaded["CACHE_LOCATION"] == url


def test_postgres_database_url_gives_psycopg_pool_and_no_persistent_connections() -> None:
    loaded = load_settings(DATABASE_URL="postgres://postgres@127.0.0.1:5432/test")

    assert loaded["ENGINE"] == "django.db.backends.postgresql"
    assert loaded["NAME"] == "test"
    assert isinstance(loaded["OPTIONS"]["pool"], dict)
    assert loaded["OPTIONS"]["pool"]["max_size"] >= 1
    # Connections are checked as they leave the pool: after PostgreSQL restarts
    # the dead ones are replaced instead of failing one request each.
    assert loaded["CONN_HEALTH_CHECKS"] is True
    assert loaded["CONN_MAX_AGE"] == 0


def test_check_deploy_is_clean_with_production_settings() -> None:
    result = run(
        ["manage.py", "check", "--deploy"],
        DEBUG="False",
        SECRET_KEY=SECRET_KEY,
        SECURE_SSL_REDIRECT="True",
        SESSION_COOKIE_SECURE="True",
        CSRF_COOKIE_SECURE="True",
        SECURE_HSTS_SECONDS="31536000",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="True",
        SECURE_HSTS_PRELOAD="True",
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "no issues" in output, output
    assert "WARNING" not in output.upper(), output


def test_the_asgi_application_imports_the_urlconf_before_any_request() -> None:
    # Else the first HTTP request imports it (allauth's URLs: 150 ms, the GIL
    # held) while a burst of requests waits (bench/load.py --client api).
    check = "import sys, chatsite.asgi; print('allauth.urls' in sys.modules, 'api.views' in sys.modules)"
    result = run(["-c", check])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
