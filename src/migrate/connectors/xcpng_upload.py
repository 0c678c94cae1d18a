"""Disk bytes into a VDI through xapi's ``PUT /import_raw_vdi``, streamed as they are written.

xapi wants the whole body announced with a Content-Length (it refuses chunked uploads), and
answers 200 before it has read the body: how the import ended is told by a task. So the sink
makes a task first (``task.create``), sends the headers, streams ``write()`` straight into the
socket, and on ``close()`` waits for the task and reads its result or error. The import is
not resumable: after a failure the whole disk is sent again.
"""

from __future__ import annotations

import http.client
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Final, Literal

import structlog

from migrate import failpoints
from migrate.connectors.xcpng_session import XapiSession, failure, translate
from migrate.errors import PermanentError, TransientError

log = structlog.get_logger(__name__)

TASK_TIMEOUT_S: Final = 3600.0
UploadFormat = Literal["raw", "vhd"]


class VdiUpload:
    """A ``DiskSink`` writing ``length`` bytes into VDI ``vdi_ref``; ``close`` raises if xapi refused."""

    def __init__(
        self,
        session: XapiSession,
        vdi_ref: str,
        length: int,
        *,
        fmt: UploadFormat = "raw",
        timeout: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.session = session
        self.vdi_ref = vdi_ref
        self.length = length
        self.fmt = fmt
        self.sent = 0
        self._sleep = sleep
        self._started = time.monotonic()
        self._closed = False
        # A cheap call first: it renews an expired session before the body is on its way.
        self.task = str(session.call("task.create", f"migrate import {fmt}", f"into {vdi_ref}"))
        url = urllib.parse.urlsplit(session.url)
        query = urllib.parse.urlencode(
            {"session_id": session.ref, "vdi": vdi_ref, "format": fmt, "task_id": self.task}
        )
        if url.scheme == "https":
            self._conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                url.hostname or "", url.port or 443, context=session.tls, timeout=timeout
            )
        else:
            self._conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=timeout)
        try:
            self._conn.putrequest("PUT", f"/import_raw_vdi?{query}", skip_accept_encoding=True)
            self._conn.putheader("Content-Length", str(length))
            self._conn.putheader("Content-Type", "application/octet-stream")
            self._conn.endheaders()
        except Exception as exc:  # translated at the border
            self._discard_task()
            raise self._error(exc) from None

    def flush(self) -> int:
        # An XAPI import cannot resume, so nothing short of the whole disk is durable.
        return 0

    def write(self, data: bytes, /) -> int:
        if self.sent + len(data) > self.length:
            self.abort()
            raise PermanentError(
                f"upload into VDI {self.vdi_ref}: {self.sent + len(data)} bytes written, "
                f"more than the announced {self.length}",
                system=f"xcpng:{self.session.target}",
            )
        try:
            self._conn.send(data)
        except Exception as exc:  # translated at the border
            error = self._error(exc)
            self.abort()
            raise error from None
        self.sent += len(data)
        failpoints.reached("xapi-upload-chunk")
        return len(data)

    def close(self) -> None:
        """Finish the upload and wait for xapi's verdict; raise if the import failed."""
        if self._closed:
            return
        if self.sent != self.length:
            self.abort()
            raise PermanentError(
                f"upload into VDI {self.vdi_ref} closed after {self.sent} of {self.length} bytes",
                system=f"xcpng:{self.session.target}",
            )
        try:
            resp = self._conn.getresponse()
            body = resp.read()
        except Exception as exc:  # translated at the border
            error = self._error(exc)
            self.abort()
            raise error from None
        finally:
            self._conn.close()
        self._closed = True
        try:
            if resp.status != 200:
                text = body.decode(errors="replace").strip()
                cls = TransientError if resp.status >= 500 else PermanentError
                raise cls(
                    f"import into VDI {self.vdi_ref} refused: HTTP {resp.status} {text}",
                    system=f"xcpng:{self.session.target}",
                )
            record = self._wait()
            if record["status"] != "success":
                raise failure(
                    [str(i) for i in record["error_info"]],
                    target=self.session.target,
                    url=self.session.url,
                    what=f"import into VDI {self.vdi_ref}",
                )
        finally:
            self._discard_task()
        seconds = time.monotonic() - self._started
        log.info(
            "xcpng_vdi_imported", vdi=self.vdi_ref, bytes=self.sent, format=self.fmt, s=round(seconds, 3)
        )

    def abort(self) -> None:
        """Drop the upload: close the connection; xapi fails the task, the VDI keeps what arrived."""
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        self._discard_task()

    # -- internals ----------------------------------------------------------------------------

    def _wait(self) -> dict[str, Any]:
        deadline = time.monotonic() + TASK_TIMEOUT_S
        delay = 0.05
        while True:
            record: dict[str, Any] = self.session.call("task.get_record", self.task)
            if record["status"] not in ("pending", "cancelling"):
                return record
            if time.monotonic() > deadline:
                raise TransientError(
                    f"import into VDI {self.vdi_ref}: task still pending after {TASK_TIMEOUT_S:.0f} s",
                    system=f"xcpng:{self.session.target}",
                )
            self._sleep(delay)
            delay = min(delay * 2, 2.0)

    def _error(self, exc: BaseException) -> Exception:
        """The transport fault, with the task's own error when xapi recorded one."""
        base = translate(
            exc, target=self.session.target, url=self.session.url, what=f"import into VDI {self.vdi_ref}"
        )
        try:
            record = self.session.call("task.get_record", self.task)
        except Exception:  # the transport error is the one to report
            return base
        info = [str(i) for i in record.get("error_info") or []]
        if info:
            base.message += f"; xapi's task says {' '.join(info)}"
        return base

    def _discard_task(self) -> None:
        try:
            self.session.call("task.destroy", self.task)
        except Exception as exc:  # a leftover task is harmless; xapi expires it
            log.debug("xcpng_task_destroy_failed", task=self.task, error=str(exc))
