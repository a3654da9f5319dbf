"""Several real daphne workers behind a real nginx, for tests (a helper, not a test file).

    with cluster(tmp_path, workers=2, database_url=url, llm_base_url=fake.base_url) as c:
        ws = await c.connect(cookie)                  # through nginx
        c.worker_of(ws)                               # which worker it reached (X-Chat-Upstream)
        other = await c.connect(cookie, not_on=c.worker_of(ws))
        c.workers[0].kill(); c.workers[0].wait_exit(10); c.workers[0].start(); c.workers[0].wait_up()
        c.redis.stop(); c.redis.start()               # same port

Each worker is `python -m daphne` on its own free port with the environment
of conftest's `daphne_server` (this process's SECRET_KEY, the test database,
the fake model) plus REDIS_URL of the cluster's own redis-server and any
`env` overrides. nginx runs from deploy/nginx.conf.template (one nginx
worker process, so that the balancing is exact). Every process is stopped at
the end, also when the test fails. Tests that use it need `transactional_db`
and PostgreSQL (SQLite and the in-memory layer are one process's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Origin

from conversations.generation import identity
from deploy.nginx import find_nginx, render, start_nginx, stop_nginx, wait_ok, write_config
from tests.conftest import free_port

BASE_DIR = Path(__file__).resolve().parent.parent
APP = "chatsite.asgi:application"


def _stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL to its whole process group (each child here has its own)."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


# --- Redis ---------------------------------------------------------------------------


@dataclass
class RedisServer:
    """An own redis-server on 127.0.0.1 (no persistence): stop and start it
    again on the same port to play a Redis restart."""

    port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def start(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("redis-server is already running")
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"]
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log_path.read_text(errors='replace')}")
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """SIGTERM (a clean stop) or SIGKILL (a crash); returns when it is gone."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
        _stop_process(self.process, timeout)


def start_redis(tmp_dir: Path) -> RedisServer:
    """A new redis-server on a free port, its log and dir in `tmp_dir`."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(free_port(), tmp_dir)
    server.start()
    return server


# --- Workers ---------------------------------------------------------------------------


@dataclass
class Worker:
    """One daphne process on 127.0.0.1:port; start() again after kill() to
    restart it on the same port (its log goes on in the same file)."""

    port: int
    url: str
    ws_url: str
    process: subprocess.Popen[bytes] | None
    log_path: Path
    env: dict[str, str]
    starts: int = 0

    @property
    def worker_id(self) -> str:
        """The id its answers carry in `Message.worker` (that of the running process)."""
        assert self.process is not None
        return identity.worker_id(self.process.pid)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"worker on port {self.port} is already running")
        with self.log_path.open("ab") as log_file:
            if self.starts:
                log_file.write(f"\n===== restart {self.starts} =====\n".encode())
                log_file.flush()
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "daphne",
                    "--proxy-headers",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    APP,
                ],
                cwd=BASE_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def wait_up(self, timeout: float = 30) -> None:
        """Until its /healthz answers 200 (fails at once if it exits)."""
        assert self.process is not None
        try:
            wait_ok(self.url + "/healthz", timeout, self.process)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"worker on port {self.port}: {exc}\n{self.log()[-5000:]}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """Its exit code (negative: the signal), or TimeoutError."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"worker on port {self.port} still running after {timeout} s") from None

    def stop(self, timeout: float = 10.0) -> None:
        _stop_process(self.process, timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --- The cluster -------------------------------------------------------------------------


@dataclass
class Cluster:
    workers: list[Worker]
    url: str  # nginx's
    ws_url: str
    redis: RedisServer
    nginx: subprocess.Popen[bytes]
    run_dir: Path  # nginx's config, pid and logs
    owns_redis: bool = True
    _stopped: bool = field(default=False, repr=False)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def worker_by_id(self, worker_id: str) -> Worker:
        """The running worker whose answers carry `worker_id` in `Message.worker`."""
        for worker in self.workers:
            if worker.alive and worker.worker_id == worker_id:
                return worker
        raise AssertionError(f"no running worker has the id {worker_id!r}")

    def worker_of(self, ws: ClientConnection) -> Worker:
        """The worker a websocket reached, from the X-Chat-Upstream header
        nginx adds to the handshake's response (host:port of the worker)."""
        assert ws.response is not None
        # "a, b" when nginx tried a first (a draining worker refuses): b took it.
        upstream = ws.response.headers.get("X-Chat-Upstream", "").split(",")[-1].strip()
        for worker in self.workers:
            if upstream == f"127.0.0.1:{worker.port}":
                return worker
        raise AssertionError(f"the handshake's X-Chat-Upstream is {upstream!r}: no worker of this cluster")

    async def connect(
        self,
        cookie: str | None,
        *,
        on: Worker | None = None,
        not_on: Worker | None = None,
        attempts: int = 8,
        url: str | None = None,
    ) -> ClientConnection:
        """A websocket to /ws/chat/ through nginx (or `url`), logged in with
        the session cookie. With `on` / `not_on`: sockets are opened (and the
        wrong ones closed) until one reaches that worker / another one."""
        base = url or self.ws_url
        origin = Origin(base.replace("ws://", "http://", 1))
        headers = {"Cookie": f"{django_settings.SESSION_COOKIE_NAME}={cookie}"} if cookie else {}
        seen = []
        for _ in range(attempts):
            ws = await ws_connect(
                base + "/ws/chat/", origin=origin, additional_headers=headers, open_timeout=30, max_size=None
            )
            if on is None and not_on is None:
                return ws
            try:
                worker = self.worker_of(ws)
            except BaseException:
                await ws.close()
                raise
            if (on is None or worker is on) and (not_on is None or worker is not not_on):
                return ws
            seen.append(worker.port)
            await ws.close()
        if on is not None:
            wanted = f"the one on port {on.port}"
        else:
            assert not_on is not None  # with neither, the first socket was returned
            wanted = f"another than the one on port {not_on.port}"
        raise AssertionError(f"{attempts} sockets through nginx reached workers {seen}, never " + wanted)

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        """GET through nginx: status, headers, body (an error status is returned, not raised)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def logs(self) -> str:
        """Every worker's log and nginx's error log, for a failure message."""
        parts = [f"--- worker {w.port} ---\n{w.log()[-8000:]}" for w in self.workers]
        with contextlib.suppress(OSError):
            parts.append("--- nginx ---\n" + (self.run_dir / "nginx-error.log").read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop every worker, nginx and (if the cluster started it) redis.
        Idempotent; never raises for a process that is already gone."""
        if self._stopped:
            return
        self._stopped = True
        try:
            for worker in self.workers:
                with contextlib.suppress(Exception):
                    worker.kill(signal.SIGTERM)
            for worker in self.workers:
                with contextlib.suppress(Exception):
                    worker.stop()
        finally:
            with contextlib.suppress(Exception):
                stop_nginx(self.nginx)
            if self.owns_redis:
                with contextlib.suppress(Exception):
                    self.redis.stop()


def need_cluster(vendor: str) -> None:
    """Several workers need PostgreSQL (the SQLite pass of CI skips them; its
    PostgreSQL pass runs them), nginx and redis-server: a missing binary
    fails when CI requires the services, else skips."""
    from tests.conftest import REQUIRE_POSTGRES, REQUIRE_REDIS

    problem, required = "", REQUIRE_POSTGRES or REQUIRE_REDIS
    if vendor != "postgresql":
        problem = "several workers need PostgreSQL; CI runs these with DATABASE_URL=postgres://..."
        required = REQUIRE_POSTGRES
    else:
        binaries = {"nginx": find_nginx(), "redis-server": shutil.which("redis-server")}
        missing = [name for name, path in binaries.items() if not path]
        if missing:
            problem = (
                f"{' and '.join(missing)} not installed: several workers need them (.ci/run installs them)"
            )
    if problem:
        if required:  # CI: fail, never skip
            pytest.fail(problem)
        pytest.skip(problem)


def worker_env(
    database_url: str, redis_url: str, llm_base_url: str | None, env: dict[str, str] | None
) -> dict[str, str]:
    """conftest's `daphne_server` environment, plus REDIS_URL, plus `env`."""
    base = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DEBUG": "False",
        # The same key as this process, so that sessions made here are valid there.
        "SECRET_KEY": django_settings.SECRET_KEY,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "OPENAI_MAX_RETRIES": "0",
        "OPENAI_TIMEOUT": "5",
        # Tests change quotas from this process: the workers must not keep them.
        "CHAT_LIMITS_CACHE_SECONDS": "0",
        "PYTHONUNBUFFERED": "1",
    }
    if llm_base_url:
        base.update(
            {
                "OPENAI_API_KEY": "sk-test-fake-key",
                "OPENAI_BASE_URL": llm_base_url,
                "OPENAI_MODEL": "fake-model",
            }
        )
    return {**base, **(env or {})}


@contextmanager
def cluster(
    tmp_path: Path,
    *,
    workers: int = 2,
    env: dict[str, str] | None = None,
    redis: RedisServer | None = None,
    database_url: str,
    llm_base_url: str | None = None,
    static_root: Path = BASE_DIR / "static",
) -> Iterator[Cluster]:
    """`workers` daphne workers behind nginx, on `database_url`, sharing a
    redis-server: `redis` if given (the caller stops it), else one of its own.
    Logs are in tmp_path (nginx's in a temp dir it removes: nginx's worker
    processes must be able to enter it)."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    owns_redis = redis is None
    redis = redis or start_redis(tmp_path / "redis")
    run_dir = Path(tempfile.mkdtemp(prefix="chat-cluster-nginx-"))
    variables = worker_env(database_url, redis.url, llm_base_url, env)
    members = []
    for i in range(workers):
        port = free_port()
        members.append(
            Worker(
                port,
                f"http://127.0.0.1:{port}",
                f"ws://127.0.0.1:{port}",
                None,
                tmp_path / f"worker-{i}.log",
                dict(variables),
            )
        )
    nginx: subprocess.Popen[bytes] | None = None
    started: Cluster | None = None
    try:
        for worker in members:
            worker.start()
        for worker in members:
            worker.wait_up(60)
        port = free_port()
        # One nginx worker process: least_conn then alternates exactly between equals.
        text = render(port, [w.port for w in members], static_root, run_dir, worker_processes=1)
        with (run_dir / "nginx.out").open("wb") as out:
            nginx = start_nginx(write_config(text, run_dir), run_dir, output=out)
        started = Cluster(
            members,
            f"http://127.0.0.1:{port}",
            f"ws://127.0.0.1:{port}",
            redis,
            nginx,
            run_dir,
            owns_redis=owns_redis,
        )
        try:
            wait_ok(started.url + "/healthz", 30, nginx)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"nginx in front of the workers: {exc}\n{started.logs()}") from None
        yield started
    finally:
        if started is not None:
            started.stop()
        else:
            for worker in members:
                worker.stop()
            if nginx is not None:
                stop_nginx(nginx)
            if owns_redis:
                redis.stop()
        with contextlib.suppress(OSError):
            shutil.copy(run_dir / "nginx-error.log", tmp_path / "nginx-error.log")
        shutil.rmtree(run_dir, ignore_errors=True)


async def recv_until(
    ws: ClientConnection,
    predicate: Callable[[dict[str, Any]], bool],
    frames: list[dict[str, Any]] | None = None,
    timeout: float = 30,
) -> dict[str, Any]:
    """The next frame for which predicate(frame) is true; every frame read is
    appended to `frames`. AssertionError (with what came) after `timeout` s."""
    seen = frames if frames is not None else []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), left))
            if frame.get("type") == "frame.part":  # a long frame, in parts
                parts = [frame["data"]]
                while frame["part"] < frame["parts"] - 1:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), max(left, 1)))
                    parts.append(frame["data"])
                frame = json.loads("".join(parts))
        except TimeoutError:
            got = [(f.get("type"), f.get("seq"), f.get("code")) for f in seen[-20:]]
            raise AssertionError(f"no such frame within {timeout} s; last frames: {got}") from None
        seen.append(frame)
        if predicate(frame):
            return frame
