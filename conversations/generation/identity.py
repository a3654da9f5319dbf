"""Which worker process runs an answer, and whether a worker is still alive.

`WORKER_ID` (kept in a streaming answer's `Message.worker`) is
`host:pid:machine.start`:

- `machine`: a digest of the kernel's boot id and of this process's PID
  namespace. Containers that share a host name (or a kernel) each have a
  PID namespace of their own, and a pid means nothing outside it: a worker
  whose machine differs from ours is judged by its heartbeat alone, never
  by a pid we cannot see.
- `start`: when the process started (clock ticks since boot, from
  /proc/<pid>/stat): a new process that was given the pid of a dead worker
  is not that worker.

A worker of our machine is dead when its pid is gone, is a zombie (exited,
not yet reaped) or belongs to a process that started at another time.
Ids in the older `host:pid` form are judged by the pid, as before.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

PROC = Path("/proc")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, from /proc; None if there is none."""
    text = _read(PROC / str(pid) / "stat")
    if not text:
        return None
    # `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
    fields = text[text.rfind(")") + 2 :].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _namespace() -> str:
    try:
        return os.readlink(PROC / "self" / "ns" / "pid")
    except OSError:
        return ""


def _machine() -> str:
    boot = _read(PROC / "sys" / "kernel" / "random" / "boot_id")
    return hashlib.sha256(f"{boot}|{_namespace()}|{socket.gethostname()}".encode()).hexdigest()[:8]


HOST = socket.gethostname()[:60]
MACHINE = _machine()


def worker_id(pid: int) -> str:
    """The id of process `pid` of this machine (this process: WORKER_ID)."""
    found = _stat(pid)
    start = found[1] if found else "0"
    return f"{HOST}:{pid}:{MACHINE}.{start}"


WORKER_ID = worker_id(os.getpid())[:100]


def _pid_alive(pid: int) -> bool:
    found = _stat(pid)
    if found is not None:
        return found[0] not in ("Z", "X")  # a zombie has exited
    if PROC.joinpath("self").exists():
        return False  # /proc shows every process of our namespace: it is gone
    try:  # no /proc (not Linux): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_dead(worker: str, *, include_self: bool) -> bool:
    """Whether the worker of this id is known to be gone. False when this
    process cannot tell (another machine's, or another container's: only
    its heartbeat tells). This process itself only with `include_self`."""
    parts = worker.split(":")
    if worker == WORKER_ID:
        return include_self
    if len(parts) == 2:  # host:pid, the older form
        host, pid = parts
        return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    host, pid, instance = parts
    machine, _, start = instance.partition(".")
    if host != HOST or machine != MACHINE:
        return False
    found = _stat(int(pid))
    if found is None:
        return not _pid_alive(int(pid))
    state, started = found
    return state in ("Z", "X") or (start not in ("", "0") and started != start)
