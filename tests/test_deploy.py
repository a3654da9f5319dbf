"""The README's production recipe, run as written: `deploy/run.py --workers 2`
on PostgreSQL and a redis-server of the test's own. It migrates, collects the
static files, serves through nginx, starts a worker that dies again, and
stops everything on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Origin

from deploy.nginx import wait_ok
from tests.cluster import BASE_DIR, free_port, need_cluster, start_redis
from tests.conftest import database_url
from tests.factories import make_user, session_cookie

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


SEEN: set[int] = set()  # every worker pid seen, to be sure none outlives the test


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "daphne"], capture_output=True, text=True)
    found = [int(p) for p in out.stdout.split()]
    SEEN.update(found)
    return found


def _kill_leftovers(run_dir: Path) -> None:
    nginx = subprocess.run(["pgrep", "-f", f"nginx.*{run_dir}"], capture_output=True, text=True)
    for pid in [*SEEN, *(int(p) for p in nginx.stdout.split())]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _upstream(url: str, cookie: str) -> str:
    async def handshake() -> str:
        headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"}
        async with ws_connect(
            url.replace("http", "ws", 1) + "/ws/chat/", origin=Origin(url), additional_headers=headers
        ) as ws:
            assert ws.response is not None
            return ws.response.headers["X-Chat-Upstream"]

    return asyncio.run(handshake())


def test_deploy_run_serves_two_workers_behind_nginx_and_stops_cleanly(tmp_path: Path) -> None:
    need_cluster(connection.vendor)
    cookie = session_cookie(make_user("pat"))
    # Where nginx's workers (nobody, when the test runs as root) can read.
    static_root = Path(tempfile.mkdtemp(prefix="chat-static-"))
    static_root.chmod(0o755)
    redis = start_redis(tmp_path / "redis")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHAT_"))},
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis.url,
        "SECRET_KEY": settings.SECRET_KEY,
        "DEBUG": "False",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "STATIC_ROOT": str(static_root),
        "PYTHONUNBUFFERED": "1",
    }
    run_dir = tmp_path / "run"
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen(
        [sys.executable, "deploy/run.py", "--workers", "2", "--port", str(port), "--run-dir", str(run_dir),
         "--grace", "15"],
        cwd=BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(url + "/healthz", 90, run)
        # collectstatic ran into STATIC_ROOT and nginx serves from it.
        assert (static_root / "js" / "chat.js").exists()
        with urllib.request.urlopen(url + "/static/js/chat.js", timeout=10) as response:
            assert response.headers["Cache-Control"] == "public, max-age=3600"
        # Two workers behind it: sockets reach both.
        assert _both_upstreams(url, cookie)
        workers = _children(run.pid)
        assert len(workers) == 2

        os.kill(workers[0], signal.SIGKILL)  # a worker dies: it is started again
        wait = _wait_for(lambda: len(_children(run.pid)) == 2 and workers[0] not in _children(run.pid))
        assert wait, (tmp_path / "run.log").read_text()
        wait_ok(url + "/healthz", 30, run)
        # nginx takes the restarted worker back once its fail_timeout (5 s) is over.
        assert _both_upstreams(url, cookie)

        run.send_signal(signal.SIGTERM)  # workers drain, nginx stops, nothing is left
        assert run.wait(30) == 0
        assert not _children(run.pid)
        text = (tmp_path / "run.log").read_text()
        assert re.search(r"restart", text, re.IGNORECASE), text
        assert "Traceback" not in text, text
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(30)
        if run.poll() is None:
            run.kill()
            run.wait(10)
        _kill_leftovers(run_dir)
        log.close()
        redis.stop()
        shutil.rmtree(static_root, ignore_errors=True)


def _both_upstreams(url: str, cookie: str, timeout: float = 20) -> set[str]:
    """Open sockets through nginx until two workers have taken one."""
    seen: set[str] = set()

    def two() -> bool:
        seen.add(_upstream(url, cookie))
        return len(seen) == 2

    assert _wait_for(two, timeout), f"sockets reached only {seen}"
    return seen


def _wait_for(condition: Any, timeout: float = 30) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False
