"""``PUT /import_raw_vdi``: disk bytes into a VDI, with xapi's contract.

Like xapi's handler: the session comes in the query (401 without a valid one), the VDI by
reference or uuid, ``format`` is raw (default) or vhd, a ``task_id`` may name a task made with
``task.create`` (otherwise one is made). The 200 and the ``task-id`` header go out before
the body is read; how the import ended is the task's status, result (``<value>VDI ref</value>``)
or error_info. A chunked body is refused, as xapi does. Raw bytes are written as given; a VHD
is decoded to raw. Writing past the VDI's virtual_size fails the task.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog

from migrate.lab.xapi_fake import vhd
from migrate.lab.xapi_fake.dispatch import Xapi
from migrate.lab.xapi_fake.handlers import thick
from migrate.lab.xapi_fake.rawfile import SparseWriter, VdiOverflow, allocated_bytes

log = structlog.get_logger(__name__)

CHUNK = 1024 * 1024


class _Dropped(Exception):
    """The fake cut the connection on purpose (fault injection)."""


class _Cancelled(Exception):
    pass


def handle(x: Xapi, req: BaseHTTPRequestHandler) -> None:
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(req.path).query))
    with x.store.lock:
        x.calls.append("PUT /import_raw_vdi")
        session = query.get("session_id", "")
        if not x.store.exists("session", session):
            _reply(req, 401, "Unauthorised: no valid session_id")
            return
        task = query.get("task_id", "")
        if task and not x.store.exists("task", task):
            _reply(req, 400, f"task_id {task} is not a task")
            return
        fmt = query.get("format", "raw").lower()
        problem = _refusal(req, fmt)
        vdi = _find_vdi(x, query.get("vdi", ""))
        if vdi is None:
            problem = problem or (404, ["VDI_MISSING"], f"no VDI {query.get('vdi', '')!r}")
        if problem:
            status, refusal, text = problem
            if task:
                x.finish_task(task, error=refusal)
            _reply(req, status, text)
            return
        assert vdi is not None
        task = task or x.new_task("VDI.import", "")
        row = x.store.row("VDI", vdi)
        path = x.vdi_dir / f"{row['uuid']}.raw"
        limit = row["virtual_size"]
        x.busy_vdis.add(vdi)
    req.close_connection = True
    try:
        req.send_response(200)
        req.send_header("task-id", task)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Connection", "close")
        req.send_header("Content-Length", "0")
        req.end_headers()
        req.wfile.flush()
    except OSError:  # the client is gone already
        with x.store.lock:
            x.busy_vdis.discard(vdi)
        x.finish_task(task, error=["INTERNAL_ERROR", "End_of_file"])
        return
    length = int(req.headers.get("Content-Length", "-1"))
    drop_at = x.faults.drop_after_bytes if x.faults.take("drop_upload") else None
    received = [0]

    def read(n: int) -> bytes:
        if length >= 0:
            n = min(n, length - received[0])
            if n <= 0:
                return b""
        if drop_at is not None:
            n = min(n, drop_at - received[0])
            if n <= 0:
                raise _Dropped
        data = req.rfile.read(n) if length >= 0 else req.rfile.read1(n)
        received[0] += len(data)
        if len(data) and x.store.tables["task"].get(task, {}).get("status") == "cancelling":
            raise _Cancelled
        return data

    progress = _progress(x, task, length)
    error: list[str] | None = None

    try:
        with open(path, "r+b") as f:
            f.truncate(0)  # an import replaces the whole disk: start from zeros
            f.truncate(limit)
            writer = SparseWriter(f, limit)
            if fmt == "vhd":
                vhd.decode(read, length, writer, progress)
            else:
                while chunk := read(CHUNK):
                    writer.write(chunk)
                    progress(received[0])
            if length >= 0 and received[0] < length:
                raise EOFError
        if x.faults.take("fail_task"):
            error = list(x.faults.task_error)
    except _Dropped:
        error = ["VDI_IO_ERROR", "Device I/O errors"]
        _reset(req)
    except _Cancelled:
        error = ["TASK_CANCELLED", task]
        _reset(req)
    except (EOFError, OSError) as exc:
        error = ["INTERNAL_ERROR", "End_of_file" if isinstance(exc, EOFError) else f"Unix.Unix_error: {exc}"]
    except VdiOverflow as exc:
        error = ["VDI_IO_ERROR", f"Device I/O errors: {exc}"]
        _drain(req, length, received[0])
    except vhd.VhdError as exc:
        error = ["INTERNAL_ERROR", f"vhd-tool: {exc}"]
        _drain(req, length, received[0])
    finally:
        with x.store.lock:
            x.busy_vdis.discard(vdi)
            _account(x, vdi, path)
    x.finish_task(task, result=f"<value>{vdi}</value>" if error is None else "", error=error)
    log.info("xapi_fake_import", vdi=row["uuid"], format=fmt, bytes=received[0], error=error)


def _refusal(req: BaseHTTPRequestHandler, fmt: str) -> tuple[int, list[str], str] | None:
    if fmt not in ("raw", "vhd"):
        return 404, ["INTERNAL_ERROR", f"Unknown format {fmt}"], f"unknown format {fmt}"
    encoding = req.headers.get("Transfer-Encoding")
    if encoding:
        return 404, ["INTERNAL_ERROR", f"Cannot handle encoding: {encoding}"], "send a Content-Length"
    if fmt == "vhd" and req.headers.get("Content-Length") is None:
        return 404, ["INTERNAL_ERROR", "Cannot handle chunked VHD"], "send a Content-Length"
    return None


def _find_vdi(x: Xapi, key: str) -> str | None:
    if x.store.exists("VDI", key):
        return key
    found = [ref for ref, row in x.store.items("VDI") if row["uuid"] == key]
    return found[0] if found else None


def _progress(x: Xapi, task: str, length: int) -> Callable[[int], None]:
    last = [0.0]

    def update(done: int) -> None:
        if length > 0 and done / length - last[0] >= 0.01:
            last[0] = done / length
            with x.store.lock:
                if x.store.exists("task", task):
                    x.store.row("task", task)["progress"] = min(last[0], 0.99)

    return update


def _account(x: Xapi, vdi: str, path: Any) -> None:
    """A file-based SR's usage follows the data actually stored, as a thin VHD's does."""
    if not x.store.exists("VDI", vdi):
        return
    row = x.store.row("VDI", vdi)
    sr = x.store.row("SR", row["SR"])
    if thick(sr):
        return
    used = allocated_bytes(path)
    sr["physical_utilisation"] += used - row["physical_utilisation"]
    row["physical_utilisation"] = used


def _drain(req: BaseHTTPRequestHandler, length: int, done: int) -> None:
    # Read what the client still sends, so it gets to see the 200 and asks the task.
    left = length - done
    while left > 0:
        chunk = req.rfile.read(min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)


def _reset(req: BaseHTTPRequestHandler) -> None:
    """Cut the connection with a TCP reset, as a crashed or restarted xapi would."""
    req.close_connection = True
    sock: socket.socket = req.connection
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def _discard_body(req: BaseHTTPRequestHandler, limit: int = 64 * CHUNK) -> None:
    """Read (up to ``limit``) what the client sends, so that it gets to read the refusal."""
    if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
        while limit > 0:
            size = int(req.rfile.readline().split(b";")[0].strip() or b"0", 16)
            req.rfile.read(size + 2)
            limit -= size
            if size == 0:
                return
        return
    _drain(req, min(int(req.headers.get("Content-Length", "0")), limit), 0)


def _reply(req: BaseHTTPRequestHandler, status: int, text: str) -> None:
    # The client may have gone away or sent garbage; the answer is still worth a try.
    with contextlib.suppress(OSError, ValueError):
        _discard_body(req)
    body = (text + "\n").encode()
    req.close_connection = True
    req.send_response(status)
    req.send_header("Content-Type", "text/plain")
    req.send_header("Content-Length", str(len(body)))
    req.send_header("Connection", "close")
    req.end_headers()
    req.wfile.write(body)
