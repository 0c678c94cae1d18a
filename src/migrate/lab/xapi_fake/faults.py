"""Faults the XAPI fake injects on request, so tests can watch the connector cope with them.

Each fault is a counter: it fires on the next N matching events and then stops. The same
knobs are reachable in-process (``XapiFake.faults``) and from another process through the
fake's control endpoint (``POST /_lab/fail``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any

# A transient storage-backend failure as XCP-ng's SM layer reports it for a busy VDI.
TRANSIENT_TASK_ERROR = ("SR_BACKEND_FAILURE_46", "", "The VDI is not available [opterr=VDI locked]", "")


@dataclass
class Faults:
    # VDI.create answers SR_FULL.
    sr_full: int = 0
    # The next authenticated call answers SESSION_INVALID and the session is gone (re-login needed).
    session_invalid: int = 0
    # An upload's connection is cut after ``drop_after_bytes`` body bytes; the task fails and
    # the bytes written so far stay in the VDI.
    drop_upload: int = 0
    drop_after_bytes: int = 1024 * 1024
    # An upload receives every byte, then its task fails with ``task_error``.
    fail_task: int = 0
    task_error: tuple[str, ...] = TRANSIENT_TASK_ERROR
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def take(self, name: str) -> bool:
        """True (and one fewer left) if fault ``name`` is armed."""
        with self._lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False

    def arm(self, **settings: Any) -> None:
        known = {f.name for f in fields(self) if not f.name.startswith("_")}
        unknown = set(settings) - known
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(known)}")
        with self._lock:
            for name, value in settings.items():
                if name == "task_error":
                    value = tuple(str(v) for v in value)
                elif not isinstance(value, int) or value < 0:
                    raise ValueError(f"fault {name} must be an integer >= 0 (got {value!r})")
                setattr(self, name, value)

    def clear(self) -> None:
        with self._lock:
            self.sr_full = self.session_invalid = self.drop_upload = self.fail_task = 0

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        data["task_error"] = list(self.task_error)
        return data
