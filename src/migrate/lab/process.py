"""Stopping the lab's processes: our own children (Popen) and detached daemons known by pid."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from migrate.errors import LabError


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


def start_ready_child(
    what: str,
    command: list[str],
    log_file: Path | None,
    *,
    detach: bool,
    timeout: float = 30.0,
    hint: str | None = None,
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a lab peer that prints one JSON line once it listens; return it and that line.

    stderr goes to ``log_file`` (or nowhere); a child that exits or stays silent for ``timeout``
    seconds is killed and reported with the log's tail. ``detach`` lets it outlive this process.
    """
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") if log_file else contextlib.nullcontext(subprocess.DEVNULL) as log_out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_out,
            start_new_session=detach,
        )  # fmt: skip
    assert proc.stdout is not None
    ready_now, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready_now else b""
    proc.stdout.close()
    if not line:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        tail = log_file.read_text(errors="replace")[-3000:] if log_file else "(no log kept)"
        raise LabError(f"{what} exited with code {proc.returncode} before listening:\n{tail}", hint=hint)
    return proc, json.loads(line)
