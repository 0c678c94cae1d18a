"""Stopping the lab's processes: our own children (Popen) and detached daemons known by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def end_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate a child, kill it if it does not go within ``timeout``, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def running(pid: int) -> bool:
    """True while ``pid`` runs; reaps it if it is our own exited child (a zombie is not running)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; no error if it is already gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop_pid_file(pid_file: Path, timeout: float = 10.0) -> None:
    """End a detached daemon by the pid in ``pid_file`` (no error if it is already gone)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    stop_pid(pid, timeout)
