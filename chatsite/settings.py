"""All configuration, read from the environment (and an optional `.env`).

Every variable is documented in `.env.example`. The defaults give a working
single-process site: SQLite, answers' logs in memory, a local-memory
cache and, without an API key, the offline demo model.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
env.read_env(BASE_DIR / ".env")  # optional; real environment variables win

DEBUG = env.bool("DEBUG", default=True)

_DEV_SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG=False.")
    SECRET_KEY = _DEV_SECRET_KEY

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",  # must come first: `runserver` then serves ASGI (websockets)
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "allauth",
    "allauth.account",
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "allauth.mfa",
    "accounts",
    "files",
    "conversations",
    "api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "chatsite.middleware.ContentSecurityPolicyMiddleware",
]

ROOT_URLCONF = "chatsite.urls"
ASGI_APPLICATION = "chatsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context.signed_in_with",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
_db = DATABASES["default"]
# Every ORM call of the sockets and answers runs on ONE thread (Channels'
# database_sync_to_async is thread-sensitive): opening a connection per call
# was a fifth of the server's CPU under load. PostgreSQL takes connections
# from psycopg's pool (Django requires CONN_MAX_AGE=0 with it); SQLite keeps
# one connection per thread open.
if _db["ENGINE"] == "django.db.backends.postgresql":
    _db["CONN_MAX_AGE"] = 0
    # A connection is checked as it leaves the pool (Django hands psycopg's
    # pool its `check`): after PostgreSQL restarted, the dead ones are
    # replaced instead of failing one request each. One round trip per
    # checkout: about 4% of a busy worker's CPU (py-spy, a burst of 200).
    _db["CONN_HEALTH_CHECKS"] = env.bool("DATABASE_HEALTH_CHECKS", default=True)
    _db.setdefault("OPTIONS", {})["pool"] = {
        "min_size": env.int("DATABASE_POOL_MIN", default=1),
        "max_size": env.int("DATABASE_POOL_MAX", default=10),
        "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
    }
elif _db["ENGINE"] == "django.db.backends.sqlite3":
    _db["CONN_MAX_AGE"] = None
    # Several threads (and the end-to-end tests' server process) write at once:
    # WAL lets readers go on, IMMEDIATE avoids deadlocked upgrades.
    _db.setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file, not memory, so that a server process started by the tests sees
    # it; one per test run, so that two runs never share it.
    _db["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"chatsite-test-{os.getpid()}.sqlite3")}

# Threads for answers' database work (conversations/database.py):
# 0 = automatic (4 on PostgreSQL, 1 on SQLite). Keep DATABASE_POOL_MAX above it.
DATABASE_THREADS = env.int("DATABASE_THREADS", default=0)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and the cache ----------------------------------------------------
# No Channels layer: an answer's frames travel through the hub and the
# answer's log (conversations/generation/fanout.py, answer_log.py).
REDIS_URL = env.str("REDIS_URL", default="")
# Every key and pub/sub channel of this site in Redis starts with it (the
# answers' logs, the live tail, socket counts, the cache): two sites can
# share one Redis server with prefixes of their own.
REDIS_PREFIX = env.str("REDIS_PREFIX", default="chat")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "chatsite.cache.SharedPoolRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_PREFIX,
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# django-ratelimit refuses a cache it cannot share between processes; the
# local-memory cache is right for the embedded single-process default; with
# Redis the backend is Django's RedisCache sharing one pool per process
# (chatsite/cache.py), which django-ratelimit does not know by name.
SILENCED_SYSTEM_CHECKS = (
    ["django_ratelimit.W001"] if REDIS_URL else ["django_ratelimit.E003", "django_ratelimit.W001"]
)

# --- Model endpoint ---------------------------------------------------------
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="")
OPENAI_MODEL = env.str("OPENAI_MODEL", default="gpt-4o-mini")
OPENAI_TIMEOUT = env.float("OPENAI_TIMEOUT", default=60.0)  # seconds between bytes
OPENAI_CONNECT_TIMEOUT = env.float("OPENAI_CONNECT_TIMEOUT", default=10.0)
OPENAI_MAX_RETRIES = env.int("OPENAI_MAX_RETRIES", default=2)
OPENAI_MAX_TOKENS = env.int("OPENAI_MAX_TOKENS", default=2048)
OPENAI_TEMPERATURE = env.float("OPENAI_TEMPERATURE", default=0.7)
# Tried in order when the chosen model fails before its first token
# (unreachable, 5xx, timeout, unknown model, rate limited after retries).
OPENAI_FALLBACK_MODELS = env.list("OPENAI_FALLBACK_MODELS", default=[])
# Models that can see images, for models not in the staff's list (a listed one has its own flag).
OPENAI_VISION_MODELS = env.list("OPENAI_VISION_MODELS", default=[])

# --- Chat behaviour ---------------------------------------------------------
CHAT_MAX_MESSAGE_CHARS = env.int("CHAT_MAX_MESSAGE_CHARS", default=16000)
# The currency sign put before every amount of money shown (costs, budgets).
CHAT_CURRENCY = env.ENVIRON.get("CHAT_CURRENCY", "$")  # read raw: django-environ expands a leading $
CHAT_CONTEXT_TOKENS = env.int("CHAT_CONTEXT_TOKENS", default=8000)  # history budget
# A long chat's older turns are summarised in at most this many tokens (and at
# most a quarter of CHAT_CONTEXT_TOKENS); 0 = no summaries, they are dropped.
CHAT_SUMMARY_TOKENS = env.int("CHAT_SUMMARY_TOKENS", default=500)
CHAT_RATE_LIMIT = env.str("CHAT_RATE_LIMIT", default="20/m")  # message.send per user
CHAT_DELTA_INTERVAL = env.float("CHAT_DELTA_INTERVAL", default=0.04)  # s between frames
CHAT_CHECKPOINT_INTERVAL = env.float("CHAT_CHECKPOINT_INTERVAL", default=1.0)  # s
# Liveness: a running answer's heartbeat (its `updated_at`) is refreshed every
# checkpoint; one not refreshed for CHAT_STALE_AFTER seconds belongs to a dead
# worker, and any worker settles it (looking every CHAT_SWEEP_INTERVAL).
CHAT_STALE_AFTER = env.float("CHAT_STALE_AFTER", default=15.0)
CHAT_SWEEP_INTERVAL = env.float("CHAT_SWEEP_INTERVAL", default=2.0)
# How long an answer's end is retried while the database is away.
CHAT_SAVE_RETRY_SECONDS = env.float("CHAT_SAVE_RETRY_SECONDS", default=300.0)
# SIGTERM (a deploy): sockets are closed with 4012 at once (pages reconnect to
# another worker); running answers get this long to finish, then are saved.
CHAT_DRAIN_SECONDS = env.float("CHAT_DRAIN_SECONDS", default=25.0)
CHAT_LIMITS_CACHE_SECONDS = env.float("CHAT_LIMITS_CACHE_SECONDS", default=5.0)  # quota changes reach workers
CHAT_AUTO_TITLE = env.bool("CHAT_AUTO_TITLE", default=True)  # a model-made title after the first answer
# Tools offered to the model (conversations/tools): unset = every built-in tool;
# "" = none; else comma-separated names. Read raw: with default=None,
# django-environ turns "" into None, which would mean every tool.
CHAT_TOOLS: str | None = env.ENVIRON.get("CHAT_TOOLS")
CHAT_TOOL_ROUNDS = env.int("CHAT_TOOL_ROUNDS", default=5)  # tool rounds per answer, then it must answer

# --- Auth, sessions, security -----------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# The test suite sets a fast hasher for itself and the servers it starts.
PASSWORD_HASHERS = env.list(
    "PASSWORD_HASHERS",
    default=[
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
        "django.contrib.auth.hashers.Argon2PasswordHasher",
        "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
        "django.contrib.auth.hashers.ScryptPasswordHasher",
    ],
)
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:new"
LOGOUT_REDIRECT_URL = "login"

# Who may sign up (accounts/security.py): "open" (anyone, at once),
# "approval" (anyone, then staff activate them in the admin), "closed" (only
# staff create users or send invitations). The first account of an empty
# install (open or approval) is staff and superuser.
CHAT_SIGNUP = env.str("CHAT_SIGNUP", default="approval")
# Shared links (/s/<token>/): `off`, `members` (anyone signed in here) or `public` (anyone with the link).
CHAT_SHARING = env.str("CHAT_SHARING", default="members")
# Password logins (the form on /accounts/login/): off when a team signs in only through its provider.
CHAT_PASSWORD_LOGIN = env.bool("CHAT_PASSWORD_LOGIN", default=True)

# Sign-in through the company's identity provider (OpenID Connect, django-allauth:
# accounts/sso.py). One provider from the environment, its id `sso`: its callback
# is /accounts/oidc/sso/login/callback/. More through the admin ("Social applications").
OIDC_SERVER_URL = env.str("OIDC_SERVER_URL", default="")  # the issuer (discovery from its .well-known)
OIDC_CLIENT_ID = env.str("OIDC_CLIENT_ID", default="")
OIDC_CLIENT_SECRET = env.str("OIDC_CLIENT_SECRET", default="")
OIDC_NAME = env.str("OIDC_NAME", default="Single sign-on")
OIDC_SCOPES = env.list("OIDC_SCOPES", default=["openid", "profile", "email"])
OIDC_GROUPS_CLAIM = env.str("OIDC_GROUPS_CLAIM", default="groups")
OIDC_REQUIRED_GROUPS = env.list("OIDC_REQUIRED_GROUPS", default=[])
OIDC_STAFF_GROUPS = env.list("OIDC_STAFF_GROUPS", default=[])
SOCIALACCOUNT_PROVIDERS = {
    "openid_connect": {
        "provider_class": "accounts.sso.SSOProvider",  # with a nonce
        "OAUTH_PKCE_ENABLED": True,
        "APPS": (
            [
                {
                    "provider_id": "sso",
                    "name": OIDC_NAME,
                    "client_id": OIDC_CLIENT_ID,
                    "secret": OIDC_CLIENT_SECRET,
                    "settings": {
                        "server_url": OIDC_SERVER_URL,
                        "oauth_pkce_enabled": True,
                        "fetch_userinfo": True,
                        "scope": OIDC_SCOPES,
                    },
                }
            ]
            if OIDC_SERVER_URL and OIDC_CLIENT_ID
            else []
        ),
    }
}
SOCIALACCOUNT_ADAPTER = "accounts.sso.SSOAdapter"
ACCOUNT_ADAPTER = "accounts.adapter.AccountAdapter"
SOCIALACCOUNT_AUTO_SIGNUP = True
# allauth is the account system (accounts/urls.py mounts the pages this site
# offers: log in, sign up, password reset, change and set, two-factor; not its
# e-mail management, which would let anyone add another's address to their
# account and catch that person's first sign-in through the provider). This
# site's policies live in its views and adapter (accounts/views.py, sso.py):
# CHAT_SIGNUP, the django-ratelimit throttles below, invitations.
ACCOUNT_FORMS = {
    "login": "accounts.forms.LoginForm",
    "signup": "accounts.forms.SignupForm",
    "reset_password": "accounts.forms.ResetPasswordForm",
}
# Asking again before a change to the sign-in itself (two-factor): the password or a code
# of the authenticator (allauth's third way, a mailed code, is not offered here).
ACCOUNT_REAUTHENTICATION_METHODS = ("password", "mfa")
# Ours (per NFKC-folded username and per address, in the shared cache) replace allauth's own.
ACCOUNT_RATE_LIMITS = {"login": None, "login_failed": None, "signup": None, "reset_password": None}
ACCOUNT_SESSION_REMEMBER = True  # no "remember me" box: a session lasts SESSION_COOKIE_AGE
ACCOUNT_PASSWORD_RESET_TOKEN_GENERATOR = "accounts.links.OneTimeLinks"  # dead once the account is off
ACCOUNT_EMAIL_UNKNOWN_ACCOUNTS = False  # an address without an account gets the same page, no mail
ACCOUNT_LOGOUT_REDIRECT_URL = "login"
ACCOUNT_EMAIL_SUBJECT_PREFIX = ""
# Two-factor authentication (allauth.mfa): an authenticator app (TOTP) and
# recovery codes, from the account menu; the admin's login goes through it.
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = env.str("MFA_TOTP_ISSUER", default="Chat")
# An existing account is found by its e-mail only when the provider says it is
# verified, and is then linked (allauth wipes a password set on an address this
# site never verified: someone may have signed up with another's address).
SOCIALACCOUNT_EMAIL_AUTHENTICATION = True
SOCIALACCOUNT_EMAIL_AUTHENTICATION_AUTO_CONNECT = True
SOCIALACCOUNT_LOGIN_ON_GET = False  # the button POSTs (with CSRF): no sign-in started by a link
SOCIALACCOUNT_STORE_TOKENS = False
SOCIALACCOUNT_EMAIL_VERIFICATION = "none"
ACCOUNT_EMAIL_VERIFICATION = "none"
ACCOUNT_LOGIN_METHODS = {"username"}
# No e-mail at sign-up: an address nobody verified would point the provider's first
# sign-in of its real owner at this account (SSOAdapter.authenticate_by_email).
ACCOUNT_SIGNUP_FIELDS = ["username*", "password1*", "password2*"]
ACCOUNT_UNIQUE_EMAIL = False
# Throttles, counted in the cache (shared by every worker with REDIS_URL):
# failed logins per client address and per username (successes never count),
# accounts made and password-reset mails per address.
CHAT_LOGIN_RATE = env.str("CHAT_LOGIN_RATE", default="10/m")
CHAT_SIGNUP_RATE = env.str("CHAT_SIGNUP_RATE", default="5/h")
CHAT_PASSWORD_RESET_RATE = env.str("CHAT_PASSWORD_RESET_RATE", default="5/h")
# Behind a proxy the client's address is in X-Forwarded-For: trust the last
# this many entries (one per proxy of yours: deploy/ sets 1 for its nginx);
# 0 = the socket's address, the header is ignored.
CHAT_TRUSTED_PROXIES = env.int("CHAT_TRUSTED_PROXIES", default=0)
# Websockets: open sockets per user (the next is closed with 4429); bad or
# unknown frames a socket may send in a minute before it is closed (4008);
# conversation.join frames per socket per minute.
CHAT_MAX_SOCKETS_PER_USER = env.int("CHAT_MAX_SOCKETS_PER_USER", default=20)
CHAT_MAX_BAD_FRAMES = env.int("CHAT_MAX_BAD_FRAMES", default=50)
CHAT_JOIN_RATE = env.int("CHAT_JOIN_RATE", default=60)
# A socket asks again whether its sign-in is still good (not logged out, the
# account active, the password unchanged) before it acts, if its last answer
# is older than this (s); a logout or a deactivation closes it at once anyway.
CHAT_SESSION_RECHECK = env.float("CHAT_SESSION_RECHECK", default=5.0)

# E-mail (invitations, password resets): django-environ's EMAIL_URL, e.g.
# smtp+tls://user:password@smtp.example.com:587; by default the console (the
# link shows in the terminal that runs the server).
vars().update(env.email_url("EMAIL_URL", default="consolemail://"))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="chat@localhost")

SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
if env.bool("BEHIND_TLS_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

# --- Static files (served by WhiteNoise in every mode) -----------------------
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env.path("STATIC_ROOT", default=BASE_DIR / "staticfiles")
# Uploaded files (files/): the file system under MEDIA_ROOT by default; for
# several hosts, an S3-compatible store through django-storages (README).
MEDIA_ROOT = env.path("MEDIA_ROOT", default=BASE_DIR / "media")
MEDIA_URL = "media/"  # never served as such: files go out through their owner's view
STORAGES = {
    "default": {"BACKEND": env.str("FILE_STORAGE", default="django.core.files.storage.FileSystemStorage")},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Without `collectstatic`, serve straight from the finders (the embedded default)
# and do not warn that STATIC_ROOT is still empty.
WHITENOISE_USE_FINDERS = True
warnings.filterwarnings("ignore", message="No directory at", module="whitenoise.base")

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        # Django's own default config gave "django" a console handler of its
        # own: with the root's, each of its lines came out twice.
        "django": {"handlers": [], "level": "INFO", "propagate": True},
        "conversations": {"level": LOG_LEVEL},
        "chatsite": {"level": LOG_LEVEL},
        # Failed logins, throttles, refused sockets, flood closes, refused
        # ownership: one line each, with the user and the address.
        "security": {"level": "INFO"},
        # runserver's access log has a handler of its own: don't print it twice.
        "django.channels.server": {"level": "INFO", "propagate": False},
    },
}

# --- Files in the chat (files/) -------------------------------------------------
CHAT_FILE_MAX_BYTES = env.int("CHAT_FILE_MAX_BYTES", default=20 * 1024 * 1024)
CHAT_FILE_MAX_PER_MESSAGE = env.int("CHAT_FILE_MAX_PER_MESSAGE", default=10)
# What the model reads of a message's text files and PDFs, together, at most (the rest is cut, and said).
CHAT_FILE_CONTEXT_TOKENS = env.int("CHAT_FILE_CONTEXT_TOKENS", default=6000)
# Projects (conversations/projects.py): what a chat reads of its project's files, together, at
# most (the rest is cut, and said); how many files a project holds; its instructions' length.
CHAT_PROJECT_CONTEXT_TOKENS = env.int("CHAT_PROJECT_CONTEXT_TOKENS", default=8000)
CHAT_PROJECT_MAX_FILES = env.int("CHAT_PROJECT_MAX_FILES", default=20)
CHAT_PROJECT_INSTRUCTIONS_CHARS = env.int("CHAT_PROJECT_INSTRUCTIONS_CHARS", default=8000)
CHAT_PROJECT_MAX_PER_USER = env.int("CHAT_PROJECT_MAX_PER_USER", default=200)
# The API may name images by an http(s) address (the upstream fetches it): off unless staff allow it.
CHAT_REMOTE_IMAGES = env.bool("CHAT_REMOTE_IMAGES", default=False)
CHAT_FILE_UPLOAD_RATE = env.str("CHAT_FILE_UPLOAD_RATE", default="60/m")  # uploads per user
# Per user, unless staff set `file_storage_bytes` on a quota (user, group, default).
CHAT_FILE_STORAGE_PER_USER = env.int("CHAT_FILE_STORAGE_PER_USER", default=500 * 1024 * 1024)
CHAT_FILE_MAX_TEXT_CHARS = env.int("CHAT_FILE_MAX_TEXT_CHARS", default=2_000_000)  # of one file's text
# A PDF's text is read by a child process with these limits, a few at a time.
CHAT_FILE_EXTRACT_SECONDS = env.float("CHAT_FILE_EXTRACT_SECONDS", default=20.0)
CHAT_FILE_EXTRACT_MEMORY_MB = env.int("CHAT_FILE_EXTRACT_MEMORY_MB", default=768)
CHAT_FILE_EXTRACT_CONCURRENCY = env.int("CHAT_FILE_EXTRACT_CONCURRENCY", default=2)
# FILE_STORAGE=storages.backends.s3.S3Storage (django-storages): its bucket and
# endpoint from the environment (the keys: boto3 reads AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY itself).
for _name in ("AWS_STORAGE_BUCKET_NAME", "AWS_S3_ENDPOINT_URL", "AWS_S3_REGION_NAME"):
    if _name in os.environ:
        globals()[_name] = os.environ[_name]

# --- Company tools through MCP (conversations/tools/mcp.py) --------------------------
# Servers as configuration (also editable as "MCP servers" in the admin): a JSON list of
# {"name", "url", "headers"} (streamable HTTP) or {"name", "command", "args", "env"} (stdio),
# with optional "enabled", "prompts" (names), "groups" (names), "tools" (names) and "timeout".
CHAT_MCP_SERVERS = env.json("CHAT_MCP_SERVERS", default=[])
CHAT_MCP_TOOLS_TTL = env.float("CHAT_MCP_TOOLS_TTL", default=300.0)  # seconds a tool list is reused
CHAT_MCP_CONFIG_TTL = env.float("CHAT_MCP_CONFIG_TTL", default=5.0)  # seconds the servers' rows are reused
# How long an answer waits for a server it has not reached yet (its tools are left out after).
CHAT_MCP_CONNECT_WAIT = env.float("CHAT_MCP_CONNECT_WAIT", default=3.0)
CHAT_MCP_RESULT_CHARS = env.int("CHAT_MCP_RESULT_CHARS", default=8000)  # of a result sent to the model
# The largest message a server may send (a JSON body, an SSE event, a stdio line): a
# larger one is not read, and the call it answers fails at once.
CHAT_MCP_MESSAGE_BYTES = env.int("CHAT_MCP_MESSAGE_BYTES", default=4 * 1024 * 1024)
