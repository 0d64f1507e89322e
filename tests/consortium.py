"""Helpers for integration tests that run a real consortium: ports, processes, waiting."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Linux /proc), before anyone is killed."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill9(pid: int) -> None:
    """SIGKILL a process and everything below it (a machine losing power)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


class Processes:
    """Every process the scenario starts, killed with its descendants at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("a")
        proc = subprocess.Popen([sys.executable, "-m", "fedscan", *args], cwd=self.root,
                                stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill9(proc.pid)
        for pid_file in (self.root / "run" / "superlink.pid",
                         self.root / "run" / "front" / "nginx.pid"):
            kill_pid_file(pid_file, str(self.root))


def kill_pid_file(pid_file: Path, needle: str) -> None:
    """SIGKILL the process a pid file names (and below), only if its command line mentions
    ``needle``: a pid reused by someone else's process is left alone."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):
        return
    if needle in cmdline:
        kill9(pid)


def wait_for(what: str, condition, timeout: float, procs: Processes, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    tails = "\n".join(f"--- {n}\n{procs.log(n)[-3000:]}" for n in logs)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def completed_rounds(run: Path) -> list[int]:
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["round"] for r in summary["rounds"] if r.get("seconds") is not None]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


