"""Render deploy/nginx.conf.template and run nginx from it (stdlib only).

Used by deploy/run.py, bench/load.py and the tests, so that all three run the
config that ships:

    text = render(8080, [8001, 8002], static_root="/srv/chat/staticfiles", run_dir="/run/chat")
    conf = write_config(text, "/run/chat")
    process = start_nginx(conf, "/run/chat")
    wait_ok("http://127.0.0.1:8080/healthz", 30, process)
    ...
    stop_nginx(process)

From the command line (systemd's chat-nginx.service, the Procfile): print the
config, or with --exec write it into the run dir and become nginx:

    python deploy/nginx.py --listen 0.0.0.0:80 --upstreams 8001-8004 \
        --static-root /srv/chat/staticfiles --run-dir /run/chat-nginx [--exec]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import IO, cast

TEMPLATE = Path(__file__).resolve().with_name("nginx.conf.template")


def find_nginx() -> str | None:
    """The nginx binary: from PATH, else Debian's /usr/sbin/nginx; None if neither."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def render(
    listen_port: int,
    upstream_ports: Iterable[int],
    static_root: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    listen_host: str = "127.0.0.1",
    worker_processes: int | str = "auto",
    worker_connections: int = 4096,
    access_log: bool = True,
    upstream_host: str = "127.0.0.1",
) -> str:
    """The config for daphne workers on `upstream_ports`, served on
    listen_host:listen_port, static files from `static_root`, every file
    nginx writes under `run_dir`."""
    ports = list(upstream_ports)
    if not ports:
        raise ValueError("at least one upstream port")
    run = Path(run_dir).resolve()
    values = {
        "WORKER_PROCESSES": str(worker_processes),
        "WORKER_CONNECTIONS": str(worker_connections),
        "RLIMIT_NOFILE": str(2 * worker_connections + 1024),
        "RUN_DIR": str(run),
        "ACCESS_LOG": f"{run / 'nginx-access.log'} combined" if access_log else "off",
        "LISTEN": f"{listen_host}:{listen_port}",
        "UPSTREAMS": "\n".join(
            f"        server {upstream_host}:{port} max_fails=1 fail_timeout=5s;" for port in ports
        ),
        "STATIC_ROOT": str(Path(static_root).resolve()).rstrip("/"),
    }
    lines = []
    for line in TEMPLATE.read_text().splitlines(keepends=True):
        if not line.lstrip().startswith("#"):  # the comments keep naming the placeholders
            for name, value in values.items():
                line = line.replace("{{" + name + "}}", value)
            if "{{" in line:
                raise ValueError(f"unknown placeholder in {TEMPLATE}: {line.strip()}")
        lines.append(line)
    return "".join(lines)


def write_config(text: str, run_dir: str | os.PathLike[str]) -> Path:
    """Write the config as run_dir/nginx.conf. The run dir is made traversable:
    nginx started as root runs its workers as nobody."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    run.chmod(0o755)
    path = run / "nginx.conf"
    path.write_text(text)
    return path


def start_nginx(
    config: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    nginx: str | None = None,
    output: IO[bytes] | int | None = None,
) -> subprocess.Popen[bytes]:
    """nginx in the foreground (`daemon off`), its own process group, its
    error log in run_dir from the first line (even before the config is read)."""
    binary = nginx or find_nginx()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (not on PATH, no /usr/sbin/nginx)")
    run = Path(run_dir).resolve()
    check = subprocess.run(
        [binary, "-t", "-q", "-p", str(run), "-c", str(config), "-e", str(run / "nginx-error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejects {config}:\n{check.stderr}")
    return subprocess.Popen(
        [
            binary,
            "-p",
            str(run),
            "-c",
            str(config),
            "-e",
            str(run / "nginx-error.log"),
            "-g",
            "daemon off;",
        ],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
        start_new_session=True,  # master and workers: one group, stopped as one
    )


def stop_nginx(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Fast shutdown (SIGTERM: open websockets are closed), then SIGKILL to
    whatever is left of its process group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # workers that outlived their master
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def wait_ok(url: str, timeout: float, *processes: subprocess.Popen[bytes]) -> None:
    """Wait until `url` answers 200; fail early if one of `processes` exits."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            if process.poll() is not None:
                # Every process here is started from a list of str (start_nginx, run.py, tests).
                program = cast("list[str]", process.args)[0]
                raise RuntimeError(f"{program} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.1)


def _ports(text: str) -> list[int]:
    """ "8001,8002" or "8001-8004"."""
    ports: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        ports.extend(range(int(first), int(last or first) + 1))
    return ports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render deploy/nginx.conf.template (and run nginx).")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="address:port (default 127.0.0.1:8080)")
    parser.add_argument("--upstreams", required=True, help="worker ports: 8001,8002 or 8001-8004")
    parser.add_argument("--static-root", required=True, help="the STATIC_ROOT collectstatic filled")
    parser.add_argument("--run-dir", required=True, help="pid, logs and temp files")
    parser.add_argument("--worker-processes", default="auto")
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--exec", action="store_true", help="write run-dir/nginx.conf and exec nginx")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    text = render(
        int(port),
        _ports(args.upstreams),
        args.static_root,
        args.run_dir,
        listen_host=host or "127.0.0.1",
        worker_processes=args.worker_processes,
        access_log=not args.no_access_log,
    )
    if not args.exec:
        sys.stdout.write(text)
        return
    binary = find_nginx()
    if binary is None:
        sys.exit("nginx is not installed (not on PATH, no /usr/sbin/nginx)")
    conf = write_config(text, args.run_dir)
    run = str(Path(args.run_dir).resolve())
    os.execv(
        binary, [binary, "-p", run, "-c", str(conf), "-e", f"{run}/nginx-error.log", "-g", "daemon off;"]
    )


if __name__ == "__main__":
    main()
