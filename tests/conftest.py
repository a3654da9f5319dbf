"""Shared fixtures: the scripted fake model, three personas, websocket
clients over the real ASGI stack, and a real daphne server process."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connection

from conversations.models import forget_prices
from tests.factories import make_user, session_cookie
from tests.fake_llm import FakeLLM

BASE_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS = BASE_DIR / "artifacts"

# In CI a test that needs PostgreSQL, Redis or the browser must fail when it is
# missing, never skip: these say what CI expects.
REQUIRE_POSTGRES = bool(os.environ.get("REQUIRE_POSTGRES"))
REQUIRE_REDIS = bool(os.environ.get("REQUIRE_REDIS"))


# PBKDF2 was two thirds of the suite's time: a fast hasher here and in every
# server process the tests start (they inherit the environment).
FAST_HASHERS = "django.contrib.auth.hashers.MD5PasswordHasher"
os.environ["PASSWORD_HASHERS"] = FAST_HASHERS
# Uploaded files go to a directory of the session's (this process and the
# servers it starts share it), never into the checkout.
MEDIA_ROOT = tempfile.mkdtemp(prefix="chat-test-media-")
os.environ["MEDIA_ROOT"] = MEDIA_ROOT
atexit.register(shutil.rmtree, MEDIA_ROOT, True)


def pytest_configure(config: pytest.Config) -> None:
    django_settings.PASSWORD_HASHERS = [FAST_HASHERS]
    django_settings.MEDIA_ROOT = MEDIA_ROOT


def pytest_sessionstart(session: pytest.Session) -> None:
    engine = django_settings.DATABASES["default"]["ENGINE"]
    if REQUIRE_POSTGRES and "postgresql" not in engine:
        raise pytest.UsageError("REQUIRE_POSTGRES is set but DATABASE_URL is not PostgreSQL")
    if REQUIRE_REDIS and not django_settings.REDIS_URL:
        raise pytest.UsageError("REQUIRE_REDIS is set but REDIS_URL is empty")


# --- The fake model -------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_llm_server() -> Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(fake_llm_server: FakeLLM, settings: Any) -> FakeLLM:
    """The fake model, freshly scripted, configured as this test's endpoint."""
    fake_llm_server.reset()
    settings.OPENAI_API_KEY = "sk-test-fake-key"
    settings.OPENAI_BASE_URL = fake_llm_server.base_url
    settings.OPENAI_MODEL = "fake-model"
    settings.OPENAI_MAX_RETRIES = 0
    settings.OPENAI_TIMEOUT = 5.0
    return fake_llm_server


@pytest.fixture
def demo_mode(settings: Any) -> None:
    settings.OPENAI_API_KEY = ""
    settings.OPENAI_BASE_URL = ""


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    from django.core.cache import cache

    cache.clear()
    from accounts import limits
    from conversations import quotas

    limits._blocked_until.clear()  # the process's memo of users over their limit
    forget_prices()  # a price cached by an earlier test's rolled-back rows
    quotas.forget_limits()  # likewise limits
    from conversations import llm

    llm.forget_refusals()  # a server an earlier test scripted to refuse JSON output, or tools
    yield


# --- Personas ---------------------------------------------------------------------


@pytest.fixture
def alice(db: None) -> Any:
    return make_user("alice")


@pytest.fixture
def bob(db: None) -> Any:
    return make_user("bob")


def dead_pid() -> int:
    """A process id that no process has now."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- Websocket clients over the real ASGI application -------------------------


async def connect(
    user: Any | None, *, origin: str | None = "http://localhost", path: str = "/ws/chat/"
) -> WebsocketCommunicator:
    """A connected WebsocketCommunicator through the whole ASGI stack: origin
    check, session-cookie auth, router. Always `await ws.disconnect()`."""
    from chatsite.asgi import application

    headers = [(b"host", b"localhost")]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if user is not None:
        cookie = await sync_to_async(session_cookie)(user)
        headers.append((b"cookie", f"{django_settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect()
    assert connected, "the websocket handshake was refused"
    return communicator


# --- A real daphne server process ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def database_url() -> str:
    """The URL of the test database this pytest process uses."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class LiveServer:
    url: str
    ws_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_daphne(
    db_url: str, llm_base_url: str, log_path: Path, *, probe: bool = True, **env: str
) -> Iterator[LiveServer]:
    """daphne serving chatsite.asgi on a free port, on `db_url`, with the
    fake model as its endpoint; `env` overrides its environment. Up once
    its /healthz answers; without `probe`, once its port takes a connection
    (a worker that must not have served a request yet)."""
    port = free_port()
    variables = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "DATABASE_URL": db_url,
        "DEBUG": "False",
        # The same key as this process, so that sessions made here are valid there.
        "SECRET_KEY": django_settings.SECRET_KEY,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "OPENAI_API_KEY": "sk-test-fake-key",
        "OPENAI_BASE_URL": llm_base_url,
        "OPENAI_MODEL": "fake-model",
        "OPENAI_MAX_RETRIES": "0",
        "OPENAI_TIMEOUT": "5",
        # Tests change quotas from this process: the server must not keep them.
        "CHAT_LIMITS_CACHE_SECONDS": "0",
        # This server lives through the whole session: its caretaker must not
        # settle the dead answers other tests make on purpose (tests/test_sweep.py).
        # The caretaker's own tests run their own workers (tests/test_faults.py).
        "CHAT_SWEEP_INTERVAL": "86400",
        # Sign-ups go through at once, however many the suite makes; each
        # test of the throttles sends an X-Forwarded-For address of its own
        # (tests/test_security.py), trusted as from one proxy.
        "CHAT_SIGNUP": "open",
        "CHAT_SIGNUP_RATE": "10000/h",
        # Fixed windows (django-ratelimit): an hour's makes a roll-over in
        # the middle of a test unlikely; the limit is the default's.
        "CHAT_LOGIN_RATE": "10/h",
        "CHAT_TRUSTED_PROXIES": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatsite.asgi:application"],
        cwd=BASE_DIR,
        env=variables,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    server = LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", process, log_path)
    try:
        if probe:
            _wait_until_up(server)
        else:
            _wait_for_port(server, port)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log_file.close()


def module_server(name: str, doc: str = "", **env: str) -> Any:
    """A fixture: a module's own daphne (`run_daphne` on the test database,
    the fake model as its endpoint) with `env` on top, for the module's
    tests. `server = module_server("projects", CHAT_X="1")` names it."""

    @pytest.fixture(scope="module")
    def fixture(
        django_db_setup: None, django_db_blocker: Any, fake_llm_server: FakeLLM, tmp_path_factory: Any
    ) -> Iterator[LiveServer]:
        with django_db_blocker.unblock():
            db_url = database_url()
        log_path = tmp_path_factory.mktemp(name) / "daphne.log"
        with run_daphne(db_url, fake_llm_server.base_url, log_path, **cast(Any, env)) as live:  # not `probe`
            yield live

    fixture.__doc__ = doc or f"daphne with {env}"
    return fixture


@pytest.fixture(scope="session")
def daphne_server(
    django_db_setup: None, django_db_blocker: Any, fake_llm_server: FakeLLM, tmp_path_factory: Any
) -> Iterator[LiveServer]:
    """daphne on the test database, for the whole session. Tests that use it
    need `transactional_db`."""
    with django_db_blocker.unblock():
        db_url = database_url()
    log_path = tmp_path_factory.mktemp("daphne") / "daphne.log"
    with run_daphne(db_url, fake_llm_server.base_url, log_path) as server:
        yield server


@pytest.fixture(autouse=True)
def _live_server_quiet_before_flush(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that used the live server ends when its client saw what it
    waited for; the server may still be writing (a title after the answer).
    Its teardown waits for the server to be quiet before the test database is
    flushed: on PostgreSQL a TRUNCATE racing those writes deadlocks. Every
    live server (the session's, or a module's own) answers through the
    fake model: a test with both and a flushed database waits."""
    names = request.fixturenames
    transactional = "transactional_db" in names or any(
        mark.kwargs.get("transaction") for mark in request.node.iter_markers("django_db")
    )
    if not ("daphne_server" in names or ("fake_llm_server" in names and transactional)):
        yield
        return
    request.getfixturevalue("transactional_db")  # so that this teardown comes first
    yield
    fake: FakeLLM = request.getfixturevalue("fake_llm_server")
    _wait_quiet(fake)


def _wait_quiet(fake: FakeLLM, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        busy = fake.in_flight > 0 or _other_sessions_busy()
        quiet = 0 if busy else quiet + 1
        time.sleep(0.03)


def _other_sessions_busy() -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state <> 'idle'"
        )
        row = cursor.fetchone()
        assert row is not None
        return bool(row[0] > 0)


def _wait_for_port(server: LiveServer, port: int, timeout: float = 30.0) -> None:
    """Until the port takes a TCP connection: no request reaches the application."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"daphne exited:\n{server.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"daphne did not listen:\n{server.log()}")


def _wait_until_up(server: LiveServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"daphne exited:\n{server.log()}")
        try:
            with urllib.request.urlopen(server.url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"daphne did not come up:\n{server.log()}")


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's, plus: the tests start from no system prompt (the one
    a fresh install gets is tested by tests/test_prompts.py on a database of
    its own); and psycopg's pool is closed before the test database is
    dropped (an idle pooled connection would keep it open)."""
    from conversations.models import SystemPrompt

    with django_db_blocker.unblock():
        SystemPrompt.objects.all().delete()
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    with django_db_blocker.unblock():
        # Async tests ran their ORM calls on asgiref's shared thread: close
        # that thread's connections too, then every pool.
        SyncToAsync.single_thread_executor.submit(connections.close_all).result()
        for conn in connections.all():
            close_pool = getattr(conn, "close_pool", None)
            if close_pool is not None:
                close_pool()


@pytest.fixture(name="sockets")
def _sockets() -> Iterator[contextlib.ExitStack]:
    """Every socket a test opens is closed when it ends."""
    with contextlib.ExitStack() as stack:
        yield stack


# --- Browser tests: one Chromium per module, fresh tabs per test --------------------


@pytest.fixture(scope="module", name="browser")
def _browser() -> Iterator[Any]:
    from tests.test_browser import launch_browser  # Playwright only where a browser test runs

    yield from launch_browser()


@pytest.fixture(name="tabs")
def _tabs(browser: Any, daphne_server: LiveServer) -> Iterator[Any]:
    from tests.test_browser import open_tabs

    yield from open_tabs(browser, daphne_server)
