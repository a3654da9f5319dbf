"""A throwaway PostgreSQL cluster for a test (a helper, not a test file):
never the machine's shared server, so that a test may stop and start it.

    with postgres_cluster() as pg:                # initdb + start, on a free port
        pg.create_database("chat")
        migrate(pg.url("chat"))                   # manage.py migrate, in a subprocess
        pg.stop("fast")                           # or "immediate" (a crash)
        pg.start()                                # the same port and data directory

The data directory and the unix socket live in a temp dir of their own,
owned by the `postgres` OS user when this runs as root (the server refuses
to run as root). Only 127.0.0.1 is listened on; `-A trust` for the
`postgres` role. At the end the server is stopped (`-m immediate`, then
SIGKILL to the postmaster if it is still there) and the directory removed,
also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.cluster import BASE_DIR, worker_env
from tests.conftest import free_port

SERVER_OS_USER = "postgres"  # who runs initdb and the server when we are root


def find_bindir() -> Path | None:
    """The directory of initdb and pg_ctl: $PG_BINDIR, else PATH, else the
    newest /usr/lib/postgresql/N/bin (Debian does not put them on PATH)."""
    configured = os.environ.get("PG_BINDIR")
    if configured:
        return Path(configured) if (Path(configured) / "initdb").exists() else None
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        number = re.match(r"\d+", initdb.parent.parent.name)
        if number and (initdb.parent / "pg_ctl").exists():
            versions.append((int(number[0]), initdb.parent))
    return max(versions)[1] if versions else None


@dataclass
class PostgresCluster:
    bindir: Path
    dir: Path  # the temp dir: data/, the unix socket, the server's log
    port: int
    os_user: str | None  # None: run as this process's user

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.os_user is not None:
            command = ["runuser", "-u", self.os_user, "--", *command]
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.dir,  # a directory the server's user may enter
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n{self.log()[-3000:]}"
            )

    def init(self) -> None:
        result = self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
        )
        self._check(result, "initdb")

    def start(self, timeout: float = 30) -> None:
        """Start the server (on the same port and data directory as before)
        and return once it accepts connections."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        result = self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(timeout)),
            "-o",
            options,
            timeout=timeout + 10,
        )
        self._check(result, "pg_ctl start")
        deadline = time.monotonic() + timeout
        while not self.accepts():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL on port {self.port} does not accept connections\n{self.log()}"
                )
            time.sleep(0.05)

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """`pg_ctl stop -m fast` (a clean restart: sessions are ended) or
        `immediate` (a crash: recovery on the next start); returns when the
        server is gone."""
        result = self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)))
        self._check(result, f"pg_ctl stop -m {mode}")

    def postmaster_pid(self) -> int | None:
        """The pid of the running postmaster, from its pid file (None: not running)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, 0)
            return pid
        return None

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def accepts(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=2) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop the server however it is (never raises) and remove its directory."""
        try:
            if self.running:
                with contextlib.suppress(Exception):
                    self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "20")
            pid = self.postmaster_pid()
            if pid is not None:  # pg_ctl could not stop it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while self.postmaster_pid() is not None and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def postgres_cluster(bindir: Path | None = None) -> Iterator[PostgresCluster]:
    """A new cluster, started, on a free port of 127.0.0.1; always destroyed at the end."""
    bindir = bindir or find_bindir()
    if bindir is None:
        raise RuntimeError("initdb not found (install PostgreSQL's server package)")
    as_root = os.geteuid() == 0
    # Not under pytest's tmp_path: its parents are root's alone (0700), and
    # the server's user must reach its directory.
    directory = Path(tempfile.mkdtemp(prefix="chat-pg-"))
    os_user = SERVER_OS_USER if as_root else None
    if os_user is not None:
        account = pwd.getpwnam(os_user)
        os.chown(directory, account.pw_uid, account.pw_gid)
    directory.chmod(0o700)
    cluster = PostgresCluster(bindir, directory, free_port(), os_user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


# --- The product's side: its schema and data, made by the product's own code -------------


def manage_env(database_url: str) -> dict[str, str]:
    """A worker's environment (this process's SECRET_KEY, so that sessions
    made there are valid in the workers) on `database_url`, without Redis."""
    env = worker_env(database_url, "", None, None)
    env.pop("REDIS_URL", None)
    return env


def manage(database_url: str, *args: str, timeout: float = 120) -> str:
    """`manage.py ARGS` on `database_url` in a subprocess; its stdout."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=manage_env(database_url),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def migrate(database_url: str) -> None:
    manage(database_url, "migrate", "--no-input")


_MAKE_USER = """
from accounts.models import Quota
from tests.factories import make_user, session_cookie
user = make_user({username!r})
if {tokens_per_day!r} is not None:
    Quota.objects.create(user=user, tokens_per_day={tokens_per_day!r})
print("USER", user.pk, session_cookie(user))
"""


def make_logged_in_user(
    database_url: str, username: str, *, tokens_per_day: int | None = None
) -> tuple[int, str]:
    """A user (with a daily token quota, if given) and a logged-in session,
    made in `database_url` by a subprocess: (user id, session cookie)."""
    out = manage(
        database_url, "shell", "-c", _MAKE_USER.format(username=username, tokens_per_day=tokens_per_day)
    )
    found = re.search(r"^USER (\d+) (\S+)$", out, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no session printed by manage.py shell:\n{out}")
    return int(found[1]), found[2]
