"""Start the XAPI fake as a child process (optionally detached) and talk to its control endpoint."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrate.lab.certs import CertPaths
from migrate.lab.control import call_control
from migrate.lab.process import end_process, start_ready_child, stop_pid_file


@dataclass
class RunningXapi:
    """A started fake pool; ``control()`` arms faults and reads its state."""

    url: str
    port: int
    user: str
    password_file: Path
    ca_file: Path | None
    state_dir: Path
    pid: int
    control_secret_file: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.process is None:
            stop_pid_file(self.state_dir / "xapi.pid")
            return
        end_process(self.process)

    def control(self, action: str, **params: Any) -> Any:
        """fail (arm faults: sr_full, session_invalid, drop_upload, drop_after_bytes, fail_task,
        task_error), clear_failures, faults, calls, state."""
        return call_control("XAPI fake", self.url, self.control_secret_file, self.ca_file, action, params)

    def inventory_entry(self) -> dict[str, Any]:
        """A ``targets:`` entry for an inventory file (the password as a file: reference)."""
        entry: dict[str, Any] = {
            "type": "xcpng",
            "url": self.url,
            "user": self.user,
            "password": f"file:{self.password_file}",
        }
        if self.ca_file:
            entry["ca_file"] = str(self.ca_file)
        return entry


def start_xapi(
    state_dir: Path, certs: CertPaths | None, *, detach: bool = False, port: int = 0
) -> RunningXapi:
    """Start ``python -m migrate.lab.xapi_fake`` on 127.0.0.1 (HTTPS with ``certs``, HTTP without)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "migrate.lab.xapi_fake", "--state", str(state_dir), "--port", str(port)]
    if certs is None:
        cmd.append("--plain")
    else:
        cmd += ["--certs", str(certs.ca.parent)]
    proc, ready = start_ready_child("the XAPI fake", cmd, state_dir / "xapi.log", detach=detach)
    (state_dir / "xapi.pid").write_text(f"{proc.pid}\n")
    return RunningXapi(
        url=ready["url"],
        port=int(ready["port"]),
        user="root",
        password_file=state_dir / "root.password",
        ca_file=certs.ca if certs else None,
        state_dir=state_dir,
        pid=proc.pid,
        control_secret_file=state_dir / "control.secret",
        process=None if detach else proc,
    )
