"""One XenAPI session to an XCP-ng pool, with every fault translated at this border.

``XenAPI.Session`` carries the XML-RPC; calls go through ``XapiSession.call`` so that a
``SESSION_INVALID`` (xapi restarted, session expired) logs in again once and repeats the
call, and so that nothing but ``migrate.errors`` types ever leaves: refused credentials are
``AuthError``, an unverifiable certificate ``TlsError``, a refused connection or unknown
host ``UnreachableError``, resets, timeouts and busy objects ``TransientError``, and the rest
``PermanentError`` with xapi's error code in the message.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import xmlrpc.client
from typing import Any, Final
from urllib.parse import urlsplit
from xml.parsers.expat import ExpatError

import structlog
import XenAPI

from migrate.errors import (
    AuthError,
    ConnectorError,
    NotFoundError,
    PermanentError,
    TlsError,
    TransientError,
    UnreachableError,
)
from migrate.inventory import XcpngSpec

log = structlog.get_logger(__name__)

TIMEOUT_S: Final = 60.0
# xapi error codes that may clear up on their own: busy objects, a host rebooting, a locked VDI.
TRANSIENT_CODES: Final = frozenset(
    {
        "OTHER_OPERATION_IN_PROGRESS",
        "TOO_BUSY",
        "HOST_OFFLINE",
        "HOST_STILL_BOOTING",
        "HOST_NOT_LIVE",
        "CANNOT_CONTACT_HOST",
        "SR_BACKEND_FAILURE_46",
        "VDI_IO_ERROR",
        "SESSION_INVALID",
        "TOO_MANY_PENDING_TASKS",
        "TASK_CANCELLED",
        "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN",
    }
)
NOT_FOUND_CODES: Final = frozenset({"HANDLE_INVALID", "UUID_INVALID", "VDI_MISSING"})


def tls_context(target: str, spec: XcpngSpec) -> ssl.SSLContext | None:
    """The TLS context for ``spec.url``: verified against ``ca_file`` (or the system CAs) by default."""
    if urlsplit(spec.url).scheme != "https":
        log.warning("tls_not_used", target=target, url=spec.url)
        return None
    if not spec.verify_tls:
        log.warning("tls_verification_disabled", target=target, url=spec.url)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=str(spec.ca_file) if spec.ca_file else None)


class _Transport(xmlrpc.client.SafeTransport):
    """XML-RPC over HTTP or HTTPS with a timeout, which the standard transports lack."""

    def __init__(self, context: ssl.SSLContext | None, timeout: float) -> None:
        super().__init__(context=context)
        self._tls = context is not None
        self._timeout = timeout

    def make_connection(self, host: Any) -> Any:
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        conn: http.client.HTTPConnection
        if self._tls:
            conn = super().make_connection(host)
        else:
            chost, self._extra_headers, _x509 = self.get_host_info(host)
            conn = http.client.HTTPConnection(chost)
            self._connection = host, conn
        conn.timeout = self._timeout
        return conn


def translate(exc: BaseException, *, target: str, url: str, what: str) -> ConnectorError:
    """Any fault raised while talking to the pool -> a migrate error naming the pool and the call."""
    system = f"xcpng:{target}"
    where = f"XCP-ng target {target} ({url})"
    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, XenAPI.Failure):
        return failure(list(exc.details), target=target, url=url, what=what)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsError(
            f"{where}: certificate not trusted ({exc.verify_message})",
            system=system,
            hint=f"set targets.{target}.ca_file to the PEM of the CA that signed the pool's "
            "certificate (verify_tls: false turns checking off, not recommended)",
        )
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
        # The peer closed or reset a working TLS connection: a lost connection, not a TLS problem.
        return TransientError(f"{where}: {what}: connection lost ({exc})", system=system)
    if isinstance(exc, ssl.SSLError):
        return TlsError(
            f"{where}: TLS failed: {exc}",
            system=system,
            hint="check that the URL's port speaks HTTPS and the CA file is right",
        )
    if isinstance(exc, ConnectionRefusedError):
        return UnreachableError(
            f"{where}: connection refused",
            system=system,
            hint="check the URL and that xapi runs on the pool master",
        )
    if isinstance(exc, socket.gaierror):
        return UnreachableError(
            f"{where}: cannot resolve the host name ({exc.strerror})",
            system=system,
            hint=f"check targets.{target}.url",
        )
    if isinstance(exc, (TimeoutError, ConnectionError, http.client.HTTPException)):
        return TransientError(
            f"{where}: {what}: connection lost ({type(exc).__name__}: {exc})", system=system
        )
    if isinstance(exc, xmlrpc.client.ProtocolError):
        cls = TransientError if exc.errcode >= 500 else PermanentError
        return cls(f"{where}: {what}: HTTP {exc.errcode} {exc.errmsg}", system=system)
    if isinstance(exc, (xmlrpc.client.Fault, ExpatError, xmlrpc.client.ResponseError)):
        return PermanentError(
            f"{where}: {what}: not a valid XAPI answer ({exc})",
            system=system,
            hint="check that the URL points at the pool master's XAPI",
        )
    if isinstance(exc, OSError):
        return UnreachableError(f"{where}: {exc.strerror or exc}", system=system)
    return PermanentError(f"{where}: {what}: {type(exc).__name__}: {exc}", system=system)


def failure(details: list[str], *, target: str, url: str, what: str) -> ConnectorError:
    """An xapi ``ErrorDescription`` -> the migrate error retrying can or cannot fix."""
    code = details[0] if details else "UNKNOWN_ERROR"
    params = ", ".join(details[1:])
    text = f"XCP-ng target {target}: {what} failed: {code}" + (f" ({params})" if params else "")
    system = f"xcpng:{target}"
    if code == "SESSION_AUTHENTICATION_FAILED":
        return AuthError(
            f"XCP-ng target {target} ({url}) refused the login: {params}",
            system=system,
            hint=f"check targets.{target}.user and the password its reference points to",
        )
    if code == "HOST_IS_SLAVE":
        return PermanentError(
            text, system=system, hint=f"point targets.{target}.url at the pool master ({details[1:2]})"
        )
    if code == "SR_FULL":
        return PermanentError(
            text, system=system, hint="free space on the SR or plan the disks onto another SR"
        )
    if code in NOT_FOUND_CODES:
        return NotFoundError(text, system=system)
    if code in TRANSIENT_CODES:
        return TransientError(text, system=system)
    return PermanentError(text, system=system)


class XapiSession:
    """A logged-in session; ``call("VM.get_all_records")`` runs one API call."""

    def __init__(self, target: str, spec: XcpngSpec, *, timeout: float = TIMEOUT_S) -> None:
        self.target = target
        self.spec = spec
        self.url = spec.url.rstrip("/") + "/"
        self.tls = tls_context(target, spec)
        self._timeout = timeout
        self._session: XenAPI.Session | None = None

    @property
    def ref(self) -> str:
        """The session reference, for the HTTP handlers (``import_raw_vdi``)."""
        if self._session is None:
            raise PermanentError(f"XCP-ng target {self.target}: not logged in", system=f"xcpng:{self.target}")
        return str(self._session.handle)

    def login(self) -> None:
        session = XenAPI.Session(self.url, transport=_Transport(self.tls, self._timeout))
        try:
            session.login_with_password(self.spec.user, self.spec.password.reveal(), "2.21", "migrate")
        except Exception as exc:  # every fault is translated at this border
            raise translate(exc, target=self.target, url=self.url, what="login") from None
        self._session = session
        log.info("xcpng_logged_in", target=self.target, user=self.spec.user)

    def logout(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        try:
            session.xenapi.session.logout()
        except Exception as exc:  # logging out is best effort; the session expires anyway
            log.warning("xcpng_logout_failed", target=self.target, error=str(exc))

    def call(self, method: str, *args: Any) -> Any:
        """Run ``method`` (``"VM.clone"``) with the session first; relogin once on SESSION_INVALID."""
        for attempt in (1, 2):
            if self._session is None:
                self.login()
            assert self._session is not None
            try:
                raw = getattr(self._session, method)(self._session.handle, *args)
            except Exception as exc:  # every fault is translated at this border
                raise translate(exc, target=self.target, url=self.url, what=method) from None
            if not isinstance(raw, dict) or "Status" not in raw:
                raise PermanentError(
                    f"XCP-ng target {self.target}: {method}: answer without a Status",
                    system=f"xcpng:{self.target}",
                )
            if raw["Status"] == "Success":
                return raw.get("Value")
            details = [str(d) for d in raw.get("ErrorDescription") or ["UNKNOWN_ERROR"]]
            if details[0] == "SESSION_INVALID" and attempt == 1:
                log.info("xcpng_session_renewed", target=self.target, method=method)
                self._session = None
                continue
            raise failure(details, target=self.target, url=self.url, what=method)
        raise AssertionError("unreachable")
