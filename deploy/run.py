"""Run the chat in its production shape on one machine: N daphne workers behind nginx.

    .venv/bin/python deploy/run.py --workers 2 --port 8080

It migrates, collects the static files, starts the workers on 127.0.0.1
(the environment passes through: DATABASE_URL, REDIS_URL, SECRET_KEY ...),
writes the nginx config from deploy/nginx.conf.template into a run directory,
starts nginx, waits until /healthz answers through it and prints the URL. A
worker that dies is started again on its port. Ctrl-C or SIGTERM: every
worker gets SIGTERM and --grace seconds to finish, then SIGKILL; then nginx
stops. Python's standard library only; runs as any user.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.nginx import find_nginx, render, start_nginx, stop_nginx, wait_ok, write_config  # noqa: E402

PY = sys.executable
APP = "chatsite.asgi:application"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} run: {message}", file=sys.stderr, flush=True)


def settings_facts() -> dict[str, str]:
    """What the workers will see (environment and .env): database engine,
    REDIS_URL, STATIC_ROOT."""
    code = (
        "import json; from django.conf import settings as s; "
        "print(json.dumps({'engine': s.DATABASES['default']['ENGINE'], "
        "'redis': s.REDIS_URL, 'static_root': str(s.STATIC_ROOT)}))"
    )
    env = {"DJANGO_SETTINGS_MODULE": "chatsite.settings", **os.environ}
    out = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"run: the settings do not load:\n{out.stderr}")
    facts: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return facts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Worker:
    def __init__(self, port: int, run_dir: Path) -> None:
        self.port = port
        self.log_path = run_dir / f"worker-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.quick_deaths = 0  # deaths in a row, each within a minute of its start
        self.restart_at: float | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                # No --proxy-headers: daphne would take X-Forwarded-For's first
                # entry, which the client writes. The app reads the entry nginx
                # added (CHAT_TRUSTED_PROXIES=1, set below).
                [PY, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), APP],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops the workers
            )
        self.started = time.monotonic()
        self.restart_at = None

    def check(self) -> None:
        """Start it again if it died: at once, or later when it keeps dying
        right after its start (1, 2, 4 ... 30 s)."""
        assert self.process is not None
        now = time.monotonic()
        if self.restart_at is None:
            code = self.process.poll()
            if code is None:
                return
            lived = now - self.started
            self.quick_deaths = self.quick_deaths + 1 if lived < 60 else 0
            pause = min(30.0, 2.0 ** (self.quick_deaths - 2)) if self.quick_deaths > 1 else 0.0
            log(
                f"worker on port {self.port} (pid {self.process.pid}) exited with code {code} "
                f"after {lived:.0f} s; restarting{f' in {pause:.0f} s' if pause else ''}"
            )
            self.restart_at = now + pause
        if now >= self.restart_at:
            self.start()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="daphne workers (default: cores)"
    )
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="nginx's address (default 127.0.0.1)")
    parser.add_argument(
        "--worker-port",
        type=int,
        default=0,
        help="first worker port, the next ones follow (default: free ports)",
    )
    parser.add_argument("--grace", type=float, default=30.0, help="seconds workers get to stop (default 30)")
    parser.add_argument("--run-dir", default=None, help="nginx config, pid, logs (default: a new temp dir)")
    parser.add_argument("--skip-setup", action="store_true", help="no migrate, no collectstatic")
    args = parser.parse_args()
    # The workers sit behind one proxy, this nginx: the client's address is
    # the last entry of X-Forwarded-For (accounts/security.py).
    os.environ.setdefault("CHAT_TRUSTED_PROXIES", "1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    nginx = find_nginx()
    if nginx is None:
        return fail("nginx is not installed (apt-get install nginx)")
    facts = settings_facts()
    if args.workers > 1 and (not facts["redis"] or facts["engine"].endswith("sqlite3")):
        return fail(
            f"--workers {args.workers} needs REDIS_URL (shared answer logs, cache, rate limits) and a "
            f"PostgreSQL DATABASE_URL; now REDIS_URL is {'set' if facts['redis'] else 'unset'} and the "
            f"database is {facts['engine'].rsplit('.', 1)[-1]}. Set both, or use --workers 1."
        )
    if not args.skip_setup:
        for command in (["migrate", "--no-input"], ["collectstatic", "--no-input", "-v", "0"]):
            log("manage.py " + " ".join(command))
            if subprocess.run([PY, "manage.py", *command], cwd=ROOT).returncode != 0:
                return fail(f"manage.py {command[0]} failed")

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="chat-run-")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ports = [args.worker_port + i if args.worker_port else free_port() for i in range(args.workers)]
    workers = [Worker(port, run_dir) for port in ports]
    nginx_process: subprocess.Popen[bytes] | None = None
    serving = stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log(f"{signal.Signals(signum).name}: stopping")
        stopping = True
        if not serving:  # still starting: leave whatever wait this is
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            assert worker.process is not None
            wait_ok(f"http://127.0.0.1:{worker.port}/healthz", 60, worker.process)
        log(f"{len(workers)} worker(s) on ports {ports}, logs in {run_dir}")
        text = render(args.port, ports, facts["static_root"], run_dir, listen_host=args.host)
        conf = write_config(text, run_dir)
        nginx_process = start_nginx(conf, run_dir, nginx=nginx)
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        url = f"http://{host}:{args.port}"
        wait_ok(url + "/healthz", 30, nginx_process)
        print(f"serving on {url}/ ({len(workers)} worker(s); Ctrl-C stops)", flush=True)
        serving = True

        while not stopping:
            time.sleep(0.5)
            if nginx_process.poll() is not None:
                log(f"nginx exited with code {nginx_process.returncode}; see {run_dir}/nginx-error.log")
                return 1
            for worker in workers:
                worker.check()
        return 0
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError, OSError) as exc:
        log(f"failed: {exc} (logs in {run_dir})")
        return 1
    finally:
        stop_workers(workers, args.grace)
        if nginx_process is not None:
            stop_nginx(nginx_process)
        log("stopped")


def stop_workers(workers: list[Worker], grace: float) -> None:
    """SIGTERM to every worker (they finish what they can), SIGKILL after `grace` s."""
    running = [w.process for w in workers if w.process is not None and w.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"worker pid {process.pid} still running after {grace:.0f} s: SIGKILL")
            process.kill()
            process.wait()


def fail(message: str) -> int:
    log(message)
    return 2


if __name__ == "__main__":
    sys.exit(main())
