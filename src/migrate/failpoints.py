"""Crash points for resume tests (like FreeBSD's fail points): ``MIGRATE_FAILPOINTS="a,b:3"``
makes the process kill itself with SIGKILL the first time it reaches point ``a``, and the
third time it reaches ``b``. Unset (always, outside tests), ``reached`` is one dict lookup.

Points are named where they are reached: ``intent:<kind>`` (intent committed, request not yet
sent), ``settle:<kind>`` (request answered, answer not yet recorded), ``step-done:<step>``,
``transfer-chunk`` (a disk chunk written, progress not recorded), ``task-wait`` (a Proxmox
task running), ``xapi-upload-chunk`` (an XCP-ng upload under way).
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "MIGRATE_FAILPOINTS"


def _parse(text: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = item.rpartition(":") if item.rsplit(":", 1)[-1].isdigit() else (item, "", "1")
        points[name] = int(count)
    return points


_armed = _parse(os.environ.get(ENV, ""))
_seen: dict[str, int] = {}
_lock = threading.Lock()


def reached(name: str) -> None:
    if not _armed or name not in _armed:
        return
    with _lock:
        _seen[name] = _seen.get(name, 0) + 1
        if _seen[name] == _armed[name]:
            os.kill(os.getpid(), signal.SIGKILL)
