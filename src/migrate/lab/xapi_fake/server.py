"""The XAPI fake as a server: XML-RPC on ``POST /``, disk imports on ``PUT /import_raw_vdi``, and
a lab control endpoint (``POST /_lab/<action>``, guarded by a secret header) through which a
test in another process arms faults and reads the fake's state.

``XapiFake`` runs it in a background thread (tests); ``python -m migrate.lab.xapi_fake`` runs
it as a process (the lab). HTTPS uses the lab CA's certificate, so clients verify TLS as they
would against a real pool.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog

from migrate.errors import LabError
from migrate.lab.certs import CertPaths, make_certs
from migrate.lab.control import CONTROL_HEADER
from migrate.lab.xapi_fake import datamodel, guests, handlers, seed, upload, wire
from migrate.lab.xapi_fake.dispatch import Xapi
from migrate.lab.xapi_fake.faults import Faults
from migrate.lab.xapi_fake.store import Store

log = structlog.get_logger(__name__)

_REGISTERED = handlers.login  # importing handlers registers the hand-written messages


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], xapi: Xapi, tls: ssl.SSLContext | None, secret: str) -> None:
        self.xapi = xapi
        self.tls = tls
        self.secret = secret
        self.open: set[socket.socket] = set()
        self.open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Headers and body leave in separate writes; without NODELAY each answer waits for a
        # delayed ACK (40 ms).
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The TLS handshake runs here, in the connection's own thread, not in the accept loop.
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.debug("xapi_fake_tls_handshake_failed", error=str(exc))
                return
        with self.open_lock:
            self.open.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with self.open_lock:
                self.open.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client vanishing mid-request is routine in fault tests; log it instead of printing.
        log.info("xapi_fake_connection_error", client=str(client_address), exc_info=True)

    def close_connections(self) -> None:
        with self.open_lock:
            for sock in list(self.open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as XenAPI's transport expects
    server: _Server
    server_version = "xapi/24.19"

    def log_message(self, format: str, *args: Any) -> None:  # the base class names it format
        pass  # one line per request is noise in test output; errors are logged where they happen

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        body = self._body()
        if path.startswith("/_lab/"):
            self._control(path[len("/_lab/") :], body)
            return
        try:
            method, params = wire.parse_call(body)
        except ValueError as exc:
            self._send(400, f"{exc}\n".encode(), "text/plain")
            return
        self._send(200, wire.response(self.server.xapi.call(method, params)), "text/xml")

    def do_PUT(self) -> None:
        if urllib.parse.urlsplit(self.path).path == "/import_raw_vdi":
            upload.handle(self.server.xapi, self)
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_GET(self) -> None:
        self._send(200, b"<html><body>XCP-ng (migrate XAPI fake)</body></html>\n", "text/html")

    def _control(self, action: str, body: bytes) -> None:
        if not secrets.compare_digest(self.headers.get(CONTROL_HEADER, ""), self.server.secret):
            self._send(403, b"bad or missing X-Lab-Control\n", "text/plain")
            return
        try:
            params = json.loads(body or b"{}")
            data = control(self.server.xapi, action, params)
        except (ValueError, KeyError) as exc:
            self._send(400, json.dumps({"error": str(exc)}).encode(), "application/json")
            return
        self._send(200, json.dumps({"data": data}).encode(), "application/json")


def control(x: Xapi, action: str, params: dict[str, Any]) -> Any:
    """The lab control actions: fail, clear_failures, faults, calls, state, and the guests' (see
    ``guests.control``)."""
    if action == "fail":
        x.faults.arm(**params)
        return x.faults.as_dict()
    if action == "clear_failures":
        x.faults.clear()
        return x.faults.as_dict()
    if action == "faults":
        return x.faults.as_dict()
    if action == "calls":
        return list(x.calls)
    if action == "state":
        with x.store.lock:
            return {
                "faults": x.faults.as_dict(),
                "counts": {cls: len(rows) for cls, rows in x.store.tables.items() if rows},
                "vms": sorted(
                    r["name_label"]
                    for _, r in x.store.items("VM")
                    if not r["is_a_template"] and not r["is_control_domain"]
                ),
            }
    if action in guests.ACTIONS:
        return guests.control(x, action, params)
    raise ValueError(
        f"unknown control action {action!r}; known: fail, clear_failures, faults, calls, state, "
        + ", ".join(guests.ACTIONS)
    )


class XapiFake:
    """An XCP-ng pool's API on 127.0.0.1, for tests and the lab.

    ``workdir`` holds the VDI files (``vdis/<uuid>.raw``), the certificates (unless given) and,
    after ``stop()``, the database (``db.json``) that a later start resumes from.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = True,
        certs: CertPaths | None = None,
        user: str = "root",
        password: str | None = None,
        seed_data: dict[str, Any] | None = None,
        datamodel_path: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        control_secret: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.vdi_dir = self.workdir / "vdis"
        self.vdi_dir.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.password = password or secrets.token_urlsafe(12)
        self.control_secret = control_secret or secrets.token_urlsafe(18)
        self.certs = (certs or make_certs(self.workdir / "certs")) if tls else None
        dm = datamodel.load(datamodel_path)
        store = Store(dm)
        db = self.workdir / "db.json"
        if db.exists():
            store.load(db)
        else:
            seed.build(store, self.vdi_dir, seed_data)
        self.xapi = Xapi(dm, store, self.vdi_dir, {user: self.password})
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> XapiFake:
        ctx = None
        if self.certs is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.certs.cert, self.certs.key)
        try:
            self._server = _Server(self._address, self.xapi, ctx, self.control_secret)
        except OSError as exc:
            raise LabError(
                f"XAPI fake cannot listen on {self._address[0]}:{self._address[1]}: {exc}"
            ) from None
        # A short poll interval keeps stop() quick (shutdown waits for the loop to notice).
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="xapi-fake", daemon=True
        )
        self._thread.start()
        log.info("xapi_fake_started", url=self.url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        guests.close(self.xapi)
        self.xapi.store.dump(self.workdir / "db.json")
        log.info("xapi_fake_stopped")

    def __enter__(self) -> XapiFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests look at -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise LabError("the XAPI fake is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.certs is not None else "http"
        return f"{scheme}://{self._address[0]}:{self.port}/"

    @property
    def ca_file(self) -> Path | None:
        return self.certs.ca if self.certs is not None else None

    @property
    def faults(self) -> Faults:
        return self.xapi.faults

    @property
    def calls(self) -> list[str]:
        return self.xapi.calls

    def vdi_path(self, uuid: str) -> Path:
        return self.vdi_dir / f"{uuid}.raw"

    def objects(self, cls: str) -> dict[str, dict[str, Any]]:
        """Every ``cls`` object as a record (relations resolved), keyed by reference."""
        with self.xapi.store.lock:
            return {ref: self.xapi.store.record(cls, ref) for ref in self.xapi.store.refs(cls)}

    def find(self, cls: str, **equal: Any) -> dict[str, dict[str, Any]]:
        return {
            ref: rec
            for ref, rec in self.objects(cls).items()
            if all(rec.get(k) == v for k, v in equal.items())
        }
