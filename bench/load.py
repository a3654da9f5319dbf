"""The streaming path under load, against the direct-SDK floor in the same run.

Starts everything it needs on 127.0.0.1 and stops it at the end: a fake
OpenAI-compatible upstream (bench/fake_upstream.py, its own process), the
database (a SQLite file in a temp dir, or a fresh PostgreSQL database
bench_load_<pid>), its own redis-server on a free port (postgres-redis), one
or more real daphne servers (more than one: behind nginx), then
websocket clients (bench/load_clients.py, subprocesses) that send
`message.send` frames and check every answer: seqs exactly 1..K, the deltas
== generation.finished.content == the upstream's text == the database row,
status complete. The floor (bench/load_floor.py) reads the same streams
straight from the fake upstream with the openai SDK in one process.

Scenarios:
  burst     N users, one open socket each, all send one new-conversation message at the same instant.
  steady    M sockets open (U of them active users, the rest idle), answers started at R per second
            for S seconds (Poisson or even arrivals), each by a random active user whose socket is not
            waiting on an answer.
  capacity  bursts of 25, 50, 100, 200, 400 ... up to --max against one server, one JSON line each, then
            the largest burst whose added TTFT p99 < 1 s with every answer exact.

Prints one JSON line per run (per burst for capacity, then a summary line) on
stdout; progress goes to stderr. Figures: added TTFT = client-side time from
the send (steady: from the scheduled send) to the first generation.delta,
minus the upstream's own first-token delay (--delay); frame gap = time between
consecutive generation.delta frames of one answer; server CPU = utime+stime
of every daphne process over the measured window (from the go instant until
the servers are idle again, so a title made after an answer counts), per
1,000 content tokens of exact answers.

Failure reasons (one per answer, the first that applies): connect_failed,
socket_closed, error:<code> (an error frame), timeout (nothing within --timeout),
timeout_no_delta (started, no delta), timeout_mid_stream (no generation.finished),
seq_gap / seq_dup, deltas_ne_finished[:tail_missing], status:<status>,
content_ne_upstream, db_missing, db_status:<status>, db_content_ne_frames,
skipped_no_free_socket (steady: every active socket was still waiting).
Diagnostics beside the figures: generation_started p50/p99 (send ->
generation.started, i.e. accepting the turn), the CPU of the upstream, redis,
nginx, PostgreSQL backends and the client processes, the client processes'
CPU use and event-loop lag (client saturation), CPU that other processes on
the machine used meanwhile (foreign_cpu_s) and hypervisor steal. Before each
measured run it waits (--quiet-wait) for the machine to be about idle.

Examples:
  python bench/load.py --scenario burst --users 200
  python bench/load.py --scenario burst --users 100 --config postgres-redis --workers 2
  python bench/load.py --scenario steady --sockets 200 --users 50 --rate 5 --seconds 20
  python bench/load.py --scenario capacity --max 800 --config embedded
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load_common import CLK_TCK, log, machine_jiffies, ms, percentile, proc_cpu, proc_hwm_mib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from deploy.nginx import find_nginx, render, start_nginx, wait_ok, write_config  # noqa: E402

BENCH = ROOT / "bench"
PY = sys.executable
SECRET_KEY = "bench-load-fixed-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz"
ERROR_MARKERS = ("Traceback", "ERROR", "Exception")


class BenchError(Exception):
    pass


# --- Children ------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    buf: bytearray = field(default_factory=bytearray)
    log_offset: int = 0  # log errors are counted from here (per step)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, obj: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj, separators=(",", ":")) + "\n").encode())
        self.proc.stdin.flush()

    def read_line(self, timeout: float) -> dict[str, Any]:
        """The next JSON line on the child's stdout, within `timeout` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: nothing in {timeout:.0f} s\n{self.tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.proc.wait(5)
                    raise BenchError(f"{self.name} exited ({self.proc.returncode})\n{self.tail()}")
                self.buf += chunk
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        message: dict[str, Any] = json.loads(line)
        return message

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def error_lines(self) -> list[str]:
        """Lines of its log since `log_offset` that look like errors."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if any(m in line for m in ERROR_MARKERS)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (nginx: master and workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def wait_http(url: str, timeout: float, child: Child | None = None) -> None:
    """deploy/'s `wait_ok`, failing with the child's last log lines."""
    try:
        wait_ok(url, timeout, *([child.proc] if child is not None else []))
    except (RuntimeError, TimeoutError) as exc:
        raise BenchError(f"{exc}\n{child.tail() if child else ''}") from None


def psql(sql: str) -> None:
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql],
        check=True,
        capture_output=True,
        timeout=60,
    )


# --- Figures -----------------------------------------------------------------------


def figures(items: list[dict[str, Any]], delay: float, tokens: int, cpu_s: float | None) -> dict[str, Any]:
    """The report's figures for product answers or floor streams."""
    completed = [i for i in items if i["reason"] is None]
    reasons: dict[str, int] = {}
    for item in items:
        if item["reason"] is not None:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    added = [i["ttft"] - delay for i in items if i["ttft"] is not None]
    gaps = [g for i in items for g in i["gaps"]]
    started = [i["started"] for i in items if i.get("started") is not None]
    total_tokens = tokens * len(completed)
    return {
        "n": len(items),
        "completed": len(completed),
        "failed": len(items) - len(completed),
        "failure_reasons": dict(sorted(reasons.items())),
        "added_ttft_p50_ms": ms(percentile(added, 50)),
        "added_ttft_p99_ms": ms(percentile(added, 99)),
        "ttft_missing": len(items) - len(added),
        "started_p50_ms": ms(percentile(started, 50)) if started else None,
        "started_p99_ms": ms(percentile(started, 99)) if started else None,
        "frame_gap_p99_ms": ms(percentile(gaps, 99)),
        "frames_per_answer": round(sum(i["frames"] for i in completed) / len(completed), 1)
        if completed
        else None,
        "cpu_s": None if cpu_s is None else round(cpu_s, 3),
        "cpu_s_per_1k_tokens": round(cpu_s / total_tokens * 1000, 4)
        if cpu_s is not None and total_tokens
        else None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


# --- The benchmark -------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
        self.tmp.chmod(0o755)  # nginx workers run as nobody
        self.children: list[Child] = []
        self.daphnes: list[Child] = []
        self.api_tokens: list[str] = []
        self.nginx: Child | None = None
        self.redis: Child | None = None
        self.upstream: Child | None = None
        self.pg_db: str | None = None
        self.django_ready = False
        self.base_url = ""
        self.env: dict[str, str] = {}
        self.port = 0  # what the clients connect to: daphne, or nginx in front of several
        self.sessions: list[str] = []
        self.warm_sessions: list[str] = []
        self.expected = "".join(f" w{i}" for i in range(args.tokens))

    # --- processes ---

    def spawn(
        self, name: str, cmd: list[str], *, pipes: bool = False, env: dict[str, str] | None = None
    ) -> Child:
        log_path = self.tmp / f"{name}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env or self.env or None,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log_file,
                stderr=log_file,
                start_new_session=True,  # its own process group: stopped as one, by its id
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.proc.wait(5)
        else:
            # Its group may outlive it (nginx workers): end whatever is left of it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
        for stream in (child.proc.stdin, child.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if child in self.children:
            self.children.remove(child)

    def cleanup(self) -> None:
        for child in reversed(list(self.children)):
            try:
                self.stop(child)
            except Exception as exc:
                log(f"cleanup: stopping {child.name}: {exc!r}")
        if self.django_ready:
            from django.db import connections

            for conn in connections.all():
                with contextlib.suppress(Exception):
                    conn.close()
                close_pool = getattr(conn, "close_pool", None)
                if close_pool is not None:
                    with contextlib.suppress(Exception):
                        close_pool()
        if self.pg_db:
            try:
                psql(
                    f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{self.pg_db}' AND pid <> pg_backend_pid()"
                )
                psql(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
                log(f"dropped database {self.pg_db}")
            except Exception as exc:
                log(f"cleanup: could not drop {self.pg_db}: {exc!r}")
        if self.args.log_dir:
            dest = Path(self.args.log_dir)
            dest.mkdir(parents=True, exist_ok=True)
            for path in self.tmp.glob("*.log"):
                shutil.copy(path, dest / path.name)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- set-up ---

    def start_upstream(self) -> None:
        a = self.args
        self.upstream = self.spawn(
            "upstream",
            [
                PY,
                str(BENCH / "fake_upstream.py"),
                "--port",
                "0",
                "--tokens",
                str(a.tokens),
                "--delay",
                str(a.delay),
            ],
            pipes=True,
            env=dict(os.environ),
        )
        assert self.upstream.proc.stdout is not None
        ready, _, _ = select.select([self.upstream.proc.stdout.fileno()], [], [], 15)
        line = os.read(self.upstream.proc.stdout.fileno(), 4096).decode() if ready else ""
        if not line.startswith("listening "):
            raise BenchError(f"fake upstream did not start\n{self.upstream.tail()}")
        self.base_url = line.split()[1]
        log(f"fake upstream at {self.base_url} ({a.tokens} tokens, {a.delay} s apart)")

    def start_database(self) -> str:
        if self.args.config == "embedded":
            return f"sqlite:///{self.tmp / 'db.sqlite3'}"
        self.pg_db = f"bench_load_{os.getpid()}"
        psql(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
        psql(f'CREATE DATABASE "{self.pg_db}"')
        log(f"created database {self.pg_db}")
        return f"postgres://postgres@127.0.0.1:5432/{self.pg_db}"

    def start_redis(self) -> str:
        port = free_port()
        self.redis = redis = self.spawn(
            "redis",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
                "--daemonize",
                "no",
            ],
            env=dict(os.environ),
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if redis.proc.poll() is not None:
                raise BenchError(f"redis-server exited\n{redis.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    log(f"redis-server on port {port}")
                    return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.1)
        raise BenchError("redis-server did not answer PING")

    def build_env(self, database_url: str, redis_url: str | None) -> None:
        drop = ("OPENAI_", "DATABASE_", "REDIS_", "CHAT_", "DJANGO_", "CACHE_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "chatsite.settings",
                "DATABASE_URL": database_url,
                "DEBUG": "False",
                "SECRET_KEY": SECRET_KEY,
                "ALLOWED_HOSTS": "127.0.0.1,localhost",
                "OPENAI_API_KEY": "sk-bench",
                "OPENAI_BASE_URL": self.base_url,
                "OPENAI_MODEL": "fake-model",
                "OPENAI_MAX_RETRIES": "0",
                "CHAT_RATE_LIMIT": "1000/m",
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if redis_url:
            env["REDIS_URL"] = redis_url
        self.env = env

    def migrate(self) -> None:
        started = time.monotonic()
        result = subprocess.run(
            [PY, "manage.py", "migrate", "--no-input"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise BenchError(f"migrate failed:\n{result.stdout.decode()}\n{result.stderr.decode()}")
        log(f"migrated in {time.monotonic() - started:.1f} s")

    def make_users(self, count: int, warm: int) -> None:
        """`count` load users and `warm` warm-up users, each with a database session."""
        started = time.monotonic()
        for name in (
            "DJANGO_SETTINGS_MODULE",
            "DATABASE_URL",
            "SECRET_KEY",
            "DEBUG",
            "ALLOWED_HOSTS",
            "REDIS_URL",
        ):
            if name in self.env:
                os.environ[name] = self.env[name]
            else:
                os.environ.pop(name, None)
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        self.django_ready = True
        from datetime import timedelta

        from django.contrib.auth import get_user_model
        from django.contrib.sessions.backends.base import VALID_KEY_CHARS
        from django.contrib.sessions.backends.db import SessionStore
        from django.contrib.sessions.models import Session
        from django.db import transaction
        from django.utils import timezone
        from django.utils.crypto import get_random_string

        user_model = get_user_model()
        names = [f"load{i}" for i in range(count)] + [f"loadwarm{i}" for i in range(warm)]
        users = []
        for name in names:
            user = user_model(username=name)
            user.set_unusable_password()
            users.append(user)
        store = SessionStore()
        expire = timezone.now() + timedelta(days=1)
        with transaction.atomic():
            user_model.objects.bulk_create(users, batch_size=500)
            by_name = {u.username: u for u in user_model.objects.filter(username__in=names)}
            keys = []
            sessions = []
            for name in names:
                user = by_name[name]
                data = {
                    "_auth_user_id": str(user.pk),
                    "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                    "_auth_user_hash": user.get_session_auth_hash(),
                }
                key = get_random_string(32, VALID_KEY_CHARS)
                keys.append(key)
                sessions.append(Session(session_key=key, session_data=store.encode(data), expire_date=expire))
            Session.objects.bulk_create(sessions, batch_size=500)
        self.sessions, self.warm_sessions = keys[:count], keys[count:]
        if self.args.client == "api":
            from api import tokens

            self.api_tokens = [tokens.create(by_name[name], "bench")[1] for name in names[:count]]
        log(f"{count} users and sessions in {time.monotonic() - started:.1f} s")

    def start_servers(self) -> None:
        a = self.args
        ports = [free_port() for _ in range(a.workers)]
        for i, port in enumerate(ports):
            self.daphnes.append(
                self.spawn(
                    f"daphne{i}",
                    [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatsite.asgi:application"],
                )
            )
        self.daphne_ports = ports
        for child, port in zip(self.daphnes, ports, strict=True):
            wait_http(f"http://127.0.0.1:{port}/healthz", 60, child)
        log(f"{a.workers} daphne worker(s) up on {ports}")
        if a.workers == 1:
            self.port = ports[0]
            return
        self.port = free_port()
        # The config that ships (deploy/nginx.conf.template), sized for a burst.
        text = render(
            self.port,
            ports,
            ROOT / "static",
            self.tmp,
            worker_processes=1,
            worker_connections=16384,
            access_log=False,
        )
        log_path = self.tmp / "nginx.log"
        with log_path.open("wb") as log_file:
            proc = start_nginx(write_config(text, self.tmp), self.tmp, nginx=find_nginx(), output=log_file)
        self.nginx = Child("nginx", proc, log_path)
        self.children.append(self.nginx)
        wait_http(f"http://127.0.0.1:{self.port}/healthz", 30, self.nginx)
        log(f"nginx on port {self.port} in front of them")

    def warm_up(self) -> None:
        """One answer on every worker (straight to its port) before anything is measured:
        the start-up sweep, the SDK client, the first connections. It must be exact."""
        from load_clients import Answer, Socket, judge, run_answer

        async def one(port: int, session: str) -> str | None:
            sock = Socket(0, session)
            await sock.open(f"ws://127.0.0.1:{port}/ws/chat/", f"http://127.0.0.1:{port}")
            answer = Answer(0, 0, time.monotonic())
            await run_answer(sock, answer, max(self.args.timeout, 60.0), "Warm-up question", from_send=True)
            assert sock.ws is not None
            await sock.ws.close()
            return judge(answer, self.expected)

        async def all_workers() -> list[str | None]:
            return await asyncio.gather(
                *(one(p, s) for p, s in zip(self.daphne_ports, self.warm_sessions, strict=True))
            )

        reasons = asyncio.run(all_workers())
        if any(reasons):
            tails = "\n".join(d.tail() for d in self.daphnes)
            raise BenchError(f"warm-up answers failed: {reasons}\n{tails}")
        log(f"warm-up answer exact on {len(reasons)} worker(s); idle after {self.quiesce():.1f} s")

    # --- measuring ---

    def server_cpu(self) -> float:
        return sum(proc_cpu(d.pid) for d in self.daphnes)

    def quiesce(self, limit: float = 20.0) -> float:
        """Wait until the servers are idle (titles and checkpoints done); seconds waited."""
        started = time.monotonic()
        previous = self.server_cpu()
        idle = 0
        while time.monotonic() - started < limit and idle < 2:
            time.sleep(0.25)
            current = self.server_cpu()
            idle = idle + 1 if current - previous < 0.01 else 0
            previous = current
        return time.monotonic() - started

    def wait_quiet_machine(self) -> None:
        """Wait (up to --quiet-wait s) until the machine is about idle: another
        process's load would show up as our latency."""
        limit = self.args.quiet_wait
        started = time.monotonic()
        while True:
            before = machine_jiffies()
            time.sleep(1.0)
            after = machine_jiffies()
            cores_busy = (after[0] - before[0]) / max(1, after[1] - before[1]) * (os.cpu_count() or 1)
            waited = time.monotonic() - started
            if cores_busy < 0.25:
                if waited > 1.5:
                    log(f"  machine quiet after {waited:.0f} s")
                return
            if waited >= limit:
                log(
                    f"  WARNING: machine still busy ({cores_busy:.2f} cores) after {waited:.0f} s: "
                    "measuring anyway"
                )
                return
            if waited < 1.5:
                log(
                    f"  machine busy ({cores_busy:.2f} cores used by something else): "
                    f"waiting up to {limit:.0f} s"
                )

    def pg_backends(self) -> dict[int, float]:
        """CPU seconds so far of each PostgreSQL backend connected to our database."""
        if not self.pg_db:
            return {}
        result = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-Atc",
                f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.pg_db}'",
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        pids = [int(line) for line in result.stdout.decode().split() if line.isdigit()]
        return {pid: proc_cpu(pid) for pid in pids}

    def run_floor(self, offsets: list[float], wait: float, reader: str = "sdk") -> dict[str, Any]:
        floor = self.spawn("floor", [PY, str(BENCH / "load_floor.py")], pipes=True, env=dict(os.environ))
        try:
            floor.send(
                {
                    "base_url": self.base_url,
                    "offsets": offsets,
                    "timeout": self.args.timeout,
                    "expected": self.expected,
                    "reader": reader,
                }
            )
            ready = floor.read_line(60)
            if ready.get("warmup") is not None:
                raise BenchError(f"floor warm-up stream failed: {ready['warmup']}")
            upstream_before = proc_cpu(self.upstream.pid) if self.upstream else 0.0
            machine_before = machine_jiffies()
            go = time.monotonic() + 0.5
            floor.send({"go": go})
            result = floor.read_line(wait)
            machine_after = machine_jiffies()
            upstream_cpu = (proc_cpu(self.upstream.pid) if self.upstream else 0.0) - upstream_before
            busy = (machine_after[0] - machine_before[0]) / CLK_TCK
            total = (machine_after[1] - machine_before[1]) / CLK_TCK
            result["window_s"] = result["end"] - go
            result["upstream_cpu_s"] = upstream_cpu
            result["machine_busy_pct"] = round(100 * busy / total, 1) if total else None
            result["steal_pct"] = (
                round(100 * (machine_after[2] - machine_before[2]) / CLK_TCK / total, 1) if total else None
            )
            # Whatever else the machine did meanwhile (other people's work on it).
            result["foreign_cpu_s"] = round(max(0.0, busy - result["cpu_s"] - upstream_cpu), 2)
            return result
        finally:
            self.stop(floor)

    def run_product(
        self, n_sockets: int, active: list[int], offsets: list[float] | None, wait: float
    ) -> dict[str, Any]:
        a = self.args
        procs = max(1, min(a.client_procs, n_sockets))
        script = "load_api_clients.py" if a.client == "api" else "load_clients.py"
        clients = [
            self.spawn(f"clients{p}", [PY, str(BENCH / script)], pipes=True, env=dict(os.environ))
            for p in range(procs)
        ]
        try:
            # Socket i goes to client process i % procs; steady arrivals k to process k % procs.
            active_set = set(active)
            for p, client in enumerate(clients):
                mine = list(range(p, n_sockets, procs))
                if a.client == "api":
                    client.send(
                        {
                            "base": f"http://127.0.0.1:{self.port}",
                            "tokens": [self.api_tokens[i] for i in mine],
                            "active": [j for j, i in enumerate(mine) if i in active_set],
                            "mode": "burst" if offsets is None else "steady",
                            "offsets": [] if offsets is None else offsets[p::procs],
                            "timeout": a.timeout,
                            "expected": self.expected,
                            "endpoint": a.endpoint,
                            "seed": a.seed + p,
                        }
                    )
                    continue
                client.send(
                    {
                        "url": f"ws://127.0.0.1:{self.port}/ws/chat/",
                        "origin": f"http://127.0.0.1:{self.port}",
                        "sessions": [self.sessions[i] for i in mine],
                        "active": [j for j, i in enumerate(mine) if i in active_set],
                        "mode": "burst" if offsets is None else "steady",
                        "offsets": [] if offsets is None else offsets[p::procs],
                        "timeout": a.timeout,
                        "expected": self.expected,
                        "connect_concurrency": a.connect_concurrency,
                        "seed": a.seed + p,
                    }
                )
            readies = [c.read_line(300) for c in clients]
            opened = sum(r["open"] for r in readies)
            connect_errors: dict[str, int] = {}
            for r in readies:
                for k, v in r["connect_errors"].items():
                    connect_errors[k] = connect_errors.get(k, 0) + v
            if a.client != "api":
                log(
                    f"  {opened}/{n_sockets} sockets open in {max(r['connect_s'] for r in readies):.1f} s"
                    + (f", connect errors {connect_errors}" if connect_errors else "")
                )
            for d in self.daphnes:
                d.log_offset = d.log_path.stat().st_size
            nginx_pids = group_pids(self.nginx.pid) if self.nginx else []
            others = {
                "upstream": [self.upstream.pid] if self.upstream else [],
                "nginx": nginx_pids,
                "redis": [self.redis.pid] if self.redis else [],
                "clients": [c.pid for c in clients],
            }
            pg_before = self.pg_backends()
            before_other = {k: [proc_cpu(p) for p in pids] for k, pids in others.items()}
            before_machine = machine_jiffies()
            before_workers = [proc_cpu(d.pid) for d in self.daphnes]
            go = time.monotonic() + 0.3
            for c in clients:
                c.send({"go": go})
            results = [c.read_line(wait) for c in clients]
            clients_end = max(r["end"] for r in results)
            clients_cpu = [proc_cpu(p) for p in others["clients"]]  # before they exit
            tail = self.quiesce()
            after_clients = {k: [proc_cpu(p) for p in pids] for k, pids in others.items()}
            after_clients["clients"] = clients_cpu
            worker_cpu = [proc_cpu(d.pid) - b for d, b in zip(self.daphnes, before_workers, strict=True)]
            server_cpu = sum(worker_cpu)
            after_machine = machine_jiffies()
            window = time.monotonic() - go
            other_cpu = {
                k: round(sum(after_clients[k]) - sum(before_other[k]), 3) for k in others if others[k]
            }
            if self.pg_db:
                pg_after = self.pg_backends()
                other_cpu["postgres_backends"] = round(
                    sum(cpu - pg_before.get(pid, 0.0) for pid, cpu in pg_after.items()), 3
                )
            client_util = [
                round((x - y) / (clients_end - go), 2)
                for x, y in zip(after_clients["clients"], before_other["clients"], strict=True)
            ]
            busy = after_machine[0] - before_machine[0]
            total = after_machine[1] - before_machine[1]
            ours = server_cpu + sum(other_cpu.values())
            answers = [ans for r in results for ans in r["answers"]]
            return {
                "answers": answers,
                "server_cpu_s": server_cpu,
                "worker_cpu_s": [round(c, 2) for c in worker_cpu],
                "window_s": window,
                "clients_s": clients_end - go,
                "idle_tail_s": tail,
                "other_cpu_s": other_cpu,
                "client_cpu_util": client_util,
                "client_loop_lag_p99_ms": max((ms(r["loop_lag_p99"]) or 0) for r in results),
                "client_loop_lag_max_ms": max((ms(r["loop_lag_max"]) or 0) for r in results),
                "send_late_max_ms": max((ms(r["send_late_max"]) or 0) for r in results),
                "machine_busy_pct": round(100 * busy / total, 1) if total else None,
                "foreign_cpu_s": round(max(0.0, busy / CLK_TCK - ours), 2),
                "steal_pct": round(100 * (after_machine[2] - before_machine[2]) / total, 1)
                if total
                else None,
                "sockets_open": opened,
                "connect_s": round(max(r["connect_s"] for r in readies), 2),
            }
        finally:
            for c in clients:
                self.stop(c)

    def check_database(self, answers: list[dict[str, Any]]) -> None:
        """An exact answer's row must hold the same content, status complete
        (stateless chat completions store no message: their ledger rows are
        counted instead, `ledger_rows`)."""
        from conversations.models import Message

        if self.args.client == "api" and self.args.endpoint == "completions":
            return

        ids = [ans["message"] for ans in answers if ans["reason"] is None]
        rows = {}
        for start in range(0, len(ids), 500):
            for pk, content, status in Message.objects.filter(pk__in=ids[start : start + 500]).values_list(
                "pk", "content", "status"
            ):
                rows[str(pk)] = (content, status)
        for ans in answers:
            if ans["reason"] is not None:
                continue
            row = rows.get(ans["message"])
            if row is None:
                ans["reason"] = "db_missing"
            elif row[1] != "complete":
                ans["reason"] = f"db_status:{row[1]}"
            elif row[0] != ans["content"]:
                ans["reason"] = "db_content_ne_frames"

    def step(
        self, scenario: str, n_sockets: int, active: list[int], offsets: list[float] | None
    ) -> dict[str, Any]:
        """One measured load: the floor, then the product, then the report line."""
        a = self.args
        started = time.monotonic()
        length = 0.0 if offsets is None else max(offsets, default=0.0)
        wait = length + a.timeout + 120
        floor_offsets = [0.0] * len(active) if offsets is None else offsets
        self.wait_quiet_machine()
        log(f"  floor: {len(floor_offsets)} SDK streams")
        floor = self.run_floor(floor_offsets, wait)
        self.wait_quiet_machine()
        log(f"  raw floor: {len(floor_offsets)} aiohttp streams")
        raw_floor = self.run_floor(floor_offsets, wait, reader="raw")
        self.wait_quiet_machine()
        log(f"  product: {len(floor_offsets)} answers over {n_sockets} sockets")
        from conversations.models import TokenUsage

        kind = TokenUsage.Kind.API if a.client == "api" and a.endpoint == "completions" else "answer"
        rows_before = TokenUsage.objects.filter(kind=kind).count()
        product = self.run_product(n_sockets, active, offsets, wait)
        self.check_database(product["answers"])
        ledger_rows = TokenUsage.objects.filter(kind=kind).count() - rows_before
        error_lines = [line for d in self.daphnes for line in d.error_lines()]
        for line in error_lines[:5]:
            log(f"  server log: {line[:200]}")

        ours = figures(product["answers"], a.delay, a.tokens, product["server_cpu_s"])
        base = figures(floor["streams"], a.delay, a.tokens, floor["cpu_s"])
        raw = figures(raw_floor["streams"], a.delay, a.tokens, raw_floor["cpu_s"])
        hwm = [proc_hwm_mib(d.pid) for d in self.daphnes]
        result: dict[str, Any] = {
            "scenario": scenario,
            "config": a.config,
            "workers": a.workers,
            "n": ours["n"],
            "completed": ours["completed"],
            "failed": ours["failed"],
            "failure_reasons": ours["failure_reasons"],
            "added_ttft_p50_ms": ours["added_ttft_p50_ms"],
            "added_ttft_p99_ms": ours["added_ttft_p99_ms"],
            "ttft_missing": ours["ttft_missing"],
            "generation_started_p50_ms": ours["started_p50_ms"],
            "generation_started_p99_ms": ours["started_p99_ms"],
            "frame_gap_p99_ms": ours["frame_gap_p99_ms"],
            "frames_per_answer": ours["frames_per_answer"],
            "server_cpu_s": ours["cpu_s"],
            "server_cpu_s_per_1k_tokens": ours["cpu_s_per_1k_tokens"],
            "peak_rss_mib_per_worker": round(max((h for h in hwm if h is not None), default=0.0), 1),
            "peak_rss_mib_workers": [None if h is None else round(h, 1) for h in hwm],
            "log_error_lines": len(error_lines),
            "floor": {
                "n": base["n"],
                "completed": base["completed"],
                "failed": base["failed"],
                "failure_reasons": base["failure_reasons"],
                "added_ttft_p50_ms": base["added_ttft_p50_ms"],
                "added_ttft_p99_ms": base["added_ttft_p99_ms"],
                "frame_gap_p99_ms": base["frame_gap_p99_ms"],
                "frames_per_answer": base["frames_per_answer"],
                "cpu_s": base["cpu_s"],
                "cpu_s_per_1k_tokens": base["cpu_s_per_1k_tokens"],
                "peak_rss_mib": None if floor["hwm_mib"] is None else round(floor["hwm_mib"], 1),
                "window_s": round(floor["window_s"], 2),
                "cpu_util": round(floor["cpu_s"] / floor["window_s"], 2) if floor["window_s"] > 0 else None,
                "upstream_cpu_s": round(floor["upstream_cpu_s"], 2),
                "machine_busy_pct": floor["machine_busy_pct"],
                "foreign_cpu_s": floor["foreign_cpu_s"],
                "steal_pct": floor["steal_pct"],
            },
            # The cheapest reader of the same streams: raw aiohttp, no SDK.
            "floor_raw": {
                "n": raw["n"],
                "completed": raw["completed"],
                "failed": raw["failed"],
                "added_ttft_p50_ms": raw["added_ttft_p50_ms"],
                "added_ttft_p99_ms": raw["added_ttft_p99_ms"],
                "frame_gap_p99_ms": raw["frame_gap_p99_ms"],
                "cpu_s": raw["cpu_s"],
                "cpu_s_per_1k_tokens": raw["cpu_s_per_1k_tokens"],
                "window_s": round(raw_floor["window_s"], 2),
                "steal_pct": raw_floor["steal_pct"],
            },
            "ratio": {
                "ttft_p99": ratio(ours["added_ttft_p99_ms"], base["added_ttft_p99_ms"]),
                "cpu_per_1k": ratio(ours["cpu_s_per_1k_tokens"], base["cpu_s_per_1k_tokens"]),
                "gap_p99": ratio(ours["frame_gap_p99_ms"], base["frame_gap_p99_ms"]),
            },
            "ratio_raw": {
                "ttft_p99": ratio(ours["added_ttft_p99_ms"], raw["added_ttft_p99_ms"]),
                "cpu_per_1k": ratio(ours["cpu_s_per_1k_tokens"], raw["cpu_s_per_1k_tokens"]),
                "gap_p99": ratio(ours["frame_gap_p99_ms"], raw["frame_gap_p99_ms"]),
            },
            "client": a.client if a.client == "socket" else f"api-{a.endpoint}",
            "ledger_rows": ledger_rows,  # this run's model calls in the ledger (one per answer)
            "tokens": a.tokens,
            "delay_s": a.delay,
            "sockets": n_sockets,
            "sockets_open": product["sockets_open"],
            "connect_s": product["connect_s"],
            "window_s": round(product["window_s"], 2),
            "answers_s": round(product["clients_s"], 2),
            "idle_tail_s": round(product["idle_tail_s"], 2),
            "server_cpu_util": round(product["server_cpu_s"] / product["window_s"], 2),
            "server_cpu_s_workers": product["worker_cpu_s"],
            "machine_busy_pct": product["machine_busy_pct"],
            "foreign_cpu_s": product["foreign_cpu_s"],
            "steal_pct": product["steal_pct"],
            "other_cpu_s": product["other_cpu_s"],
            "client_procs": len(product["client_cpu_util"]),
            "client_cpu_util": product["client_cpu_util"],
            "client_loop_lag_p99_ms": product["client_loop_lag_p99_ms"],
            "client_loop_lag_max_ms": product["client_loop_lag_max_ms"],
            "send_late_max_ms": product["send_late_max_ms"],
            "step_wall_s": round(time.monotonic() - started, 1),
        }
        if result["floor"]["cpu_util"] and result["floor"]["cpu_util"] > 0.9:
            log("  NOTE: the floor process was CPU-bound (one core): its latencies include its own SDK CPU")
        for name, foreign, window in (
            ("product", product["foreign_cpu_s"], product["window_s"]),
            ("floor", floor["foreign_cpu_s"], floor["window_s"]),
        ):
            if window > 0 and foreign / window > 0.15:
                log(
                    f"  WARNING: other processes used {foreign:.1f} CPU s during the {name} run "
                    f"({window:.1f} s)"
                )
        if max(product["client_cpu_util"], default=0) > 0.85:
            log("  WARNING: a client process was near 100% CPU: figures may show client lag (--client-procs)")
        return result


# --- Scenarios -----------------------------------------------------------------------


def arrivals(rate: float, seconds: float, kind: str, seed: int) -> list[float]:
    if kind == "even":
        return [i / rate for i in range(int(rate * seconds))]
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(int(rate * seconds * 10) + 10):  # bounded
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        offsets.append(t)
    return offsets


def capacity_sizes(start: int, largest: int) -> list[int]:
    sizes: list[int] = []
    n = start
    while n < largest and len(sizes) < 30:
        sizes.append(n)
        n *= 2
    return [*sizes, largest]


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def run(args: argparse.Namespace) -> int:
    wall = time.monotonic()
    bench = Bench(args)
    try:
        log(
            f"bench: scenario {args.scenario}, config {args.config}, {args.workers} worker(s); "
            f"temp {bench.tmp}"
        )
        bench.start_upstream()
        database_url = bench.start_database()
        redis_url = bench.start_redis() if args.config == "postgres-redis" else None
        bench.build_env(database_url, redis_url)
        bench.migrate()
        if args.scenario == "burst":
            users = args.users
        elif args.scenario == "steady":
            users = args.sockets
        else:
            users = args.max
        bench.make_users(users, args.workers)
        bench.start_servers()
        bench.warm_up()

        if args.scenario == "burst":
            log(f"burst of {args.users}")
            result = bench.step("burst", args.users, list(range(args.users)), None)
            result["wall_s"] = round(time.monotonic() - wall, 1)
            emit(result)
        elif args.scenario == "steady":
            offsets = arrivals(args.rate, args.seconds, args.arrivals, args.seed)
            log(
                f"steady: {len(offsets)} answers at {args.rate}/s for {args.seconds} s, "
                f"{args.users} active of {args.sockets} sockets"
            )
            result = bench.step("steady", args.sockets, list(range(args.users)), offsets)
            result.update(
                {
                    "rate": args.rate,
                    "seconds": args.seconds,
                    "active_users": args.users,
                    "arrivals": args.arrivals,
                    "wall_s": round(time.monotonic() - wall, 1),
                }
            )
            emit(result)
        else:
            steps = []
            best = None
            for size in capacity_sizes(args.start, args.max):
                log(f"capacity: burst of {size}")
                result = bench.step("capacity", size, list(range(size)), None)
                emit(result)
                p99 = result["added_ttft_p99_ms"]
                ok = result["failed"] == 0 and p99 is not None and p99 < 1000
                steps.append(
                    {
                        "n": size,
                        "added_ttft_p99_ms": p99,
                        "failed": result["failed"],
                        "floor_added_ttft_p99_ms": result["floor"]["added_ttft_p99_ms"],
                        "ok": ok,
                    }
                )
                if ok:
                    best = size
                elif not args.keep_going:
                    break
                bench.quiesce()
            emit(
                {
                    "scenario": "capacity",
                    "summary": True,
                    "config": args.config,
                    "workers": args.workers,
                    "capacity_burst": best,
                    "criterion": "added TTFT p99 < 1000 ms and every answer exact",
                    "steps": steps,
                    "wall_s": round(time.monotonic() - wall, 1),
                }
            )
        return 0
    except BenchError as exc:
        log(f"bench failed: {exc}")
        return 1
    finally:
        bench.cleanup()
        log(f"done in {time.monotonic() - wall:.1f} s; everything stopped, temp dir removed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/load.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["burst", "steady", "capacity"], default="burst")
    parser.add_argument(
        "--client",
        choices=["socket", "api"],
        default="socket",
        help="socket: the page's websocket; api: the HTTP API with raw aiohttp clients (default socket)",
    )
    parser.add_argument(
        "--endpoint",
        choices=["completions", "messages"],
        default="completions",
        help="--client api: streamed POST /api/v1/chat/completions, or POST "
        "/api/v1/conversations/{id}/messages with its server-sent events (default completions)",
    )
    parser.add_argument(
        "--config",
        choices=["embedded", "postgres-redis"],
        default="embedded",
        help="embedded: SQLite in a temp dir, in-memory layer (one worker); postgres-redis: a fresh "
        "PostgreSQL database on 127.0.0.1:5432 and an own redis-server (default embedded)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="daphne processes; more than 1 puts nginx in front (postgres-redis only; default 1)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=None,
        help="burst: users, one socket and one answer each (default 200); "
        "steady: active users among --sockets (default 50)",
    )
    parser.add_argument("--sockets", type=int, default=200, help="steady: open sockets (default 200)")
    parser.add_argument(
        "--rate", type=float, default=5.0, help="steady: answers started per second (default 5)"
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="steady: seconds of arrivals (default 20)"
    )
    parser.add_argument(
        "--arrivals",
        choices=["poisson", "even"],
        default="poisson",
        help="steady: arrival process (default poisson)",
    )
    parser.add_argument(
        "--start", type=int, default=25, help="capacity: first burst size, doubled (default 25)"
    )
    parser.add_argument("--max", type=int, default=800, help="capacity: largest burst (default 800)")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="capacity: go on with larger bursts after one misses the criterion",
    )
    parser.add_argument(
        "--tokens", type=int, default=100, help="upstream content chunks per answer (default 100)"
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.02,
        help="upstream seconds before the first chunk and between chunks (default 0.02)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds an answer may take from its send to generation.finished (default 60)",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="websocket client subprocesses the sockets are split over (default 1)",
    )
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        help="websocket handshakes in flight per client process (default 64)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed of arrivals and socket choice")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each measured run, wait up to this many seconds for other load on the machine to stop "
        "(default 60)",
    )
    parser.add_argument(
        "--log-dir", default=None, help="copy the server, nginx and other logs here at the end"
    )
    args = parser.parse_args(argv)
    if args.users is None:
        args.users = 50 if args.scenario == "steady" else 200
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and args.config != "postgres-redis":
        parser.error("--workers > 1 needs --config postgres-redis (the embedded layer is one process)")
    if args.scenario == "steady" and not 1 <= args.users <= args.sockets:
        parser.error("steady: --users (active) must be between 1 and --sockets")
    if (
        min(args.users, args.sockets, args.max, args.start, args.tokens, args.client_procs) < 1
        or args.rate <= 0
    ):
        parser.error("sizes, --tokens and --rate must be positive")
    return args


def main() -> int:
    args = parse_args()
    if args.workers > 1 and find_nginx() is None:
        log(
            f"nginx is not installed (not on PATH, no /usr/sbin/nginx): --workers {args.workers} "
            "needs it as the load balancer"
        )
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` cleans up
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
