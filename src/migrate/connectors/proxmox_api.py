"""The Proxmox VE HTTP API through proxmoxer: one session per target, faults translated, tasks awaited.

This is the border. ``proxmoxer.ResourceException``, its ``AuthenticationError`` and every
``requests`` exception stop here and leave as migrate's errors:

    401, refused login              AuthError
    403                             PermanentError (names the missing privilege)
    400, 404, 501                   PermanentError (400 lists PVE's per-field errors)
    500 "does not exist"            NotFoundError
    500 "already exists", no space  PermanentError
    other 5xx (locks, quorum, 595)  TransientError
    TLS verification failed         TlsError
    connection refused, DNS         UnreachableError
    timeouts, resets                TransientError

A task (UPID) that ends in anything but OK is an error too, transient when PVE says it timed
out waiting for a lock and permanent otherwise, with the tail of the task log in the message.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any, Final

import proxmoxer
import requests
import structlog
import urllib3.exceptions

from migrate import failpoints
from migrate.errors import (
    AuthError,
    ConnectorError,
    NotFoundError,
    PermanentError,
    TlsError,
    TransientError,
    UnreachableError,
)
from migrate.inventory import ProxmoxSpec

log = structlog.get_logger(__name__)

TIMEOUT: Final = 30.0
TASK_TIMEOUT: Final = 3600.0
# Words in a PVE error or task exit status that say "try again later" (locks, quorum, busy).
_TRANSIENT = re.compile(r"\block(?:ed)?\b|lock file|got timeout|timed? ?out|no quorum|temporar|try again|"
                        r"busy|connection (?:refused|reset)|no route to host", re.I)
_NOT_FOUND = re.compile(r"does not exist|no such|not found|unable to find", re.I)
_PERMANENT = re.compile(r"already exists|no space left|not enough space|not supported|unable to parse|"
                        r"invalid|permission|only root", re.I)
# A task that finished with warnings still did its job.
_TASK_OK = re.compile(r"^(OK|WARNINGS: \d+)$")
Value = str | int | float | bool


def _content(exc: proxmoxer.core.ResourceException) -> str:
    text = str(exc.content or "").strip()
    if exc.errors:
        fields = exc.errors if isinstance(exc.errors, Mapping) else {"": exc.errors}
        text += " (" + "; ".join(f"{k}: {str(v).strip()}" for k, v in sorted(fields.items())) + ")"
    return text


def _root_reason(exc: BaseException) -> BaseException:
    """The urllib3 reason inside a requests ConnectionError (MaxRetryError.reason)."""
    inner = exc.args[0] if exc.args else None
    reason: BaseException = getattr(inner, "reason", None) or inner or exc
    return reason


def classify_message(message: str, *, unknown: type[ConnectorError] = PermanentError) -> type[ConnectorError]:
    """The error class for a PVE error text (a 500's message, a task's exit status); ``unknown`` when
    the text says nothing either way."""
    if _NOT_FOUND.search(message) and not _TRANSIENT.search(message):
        return NotFoundError
    if _PERMANENT.search(message):
        return PermanentError
    if _TRANSIENT.search(message):
        return TransientError
    return unknown


def translate(
    exc: BaseException, *, system: str, endpoint: str, doing: str, login: str = ""
) -> ConnectorError:
    """Turn a proxmoxer or requests failure into migrate's error, with what to do about it."""
    if isinstance(exc, ConnectorError):
        return exc
    where = f"Proxmox VE {system} ({endpoint})"
    if isinstance(exc, proxmoxer.AuthenticationError):
        return AuthError(f"{where} refused the login {login}: {exc}", system=system,
                         hint="check user and password in the inventory (realm included, e.g. migrate@pve)")
    if isinstance(exc, proxmoxer.core.ResourceException):
        status, text = exc.status_code, _content(exc)
        what = f"{doing} on {where} failed ({status}): {text}"
        if status == 401:
            return AuthError(f"{where} refused the credentials of {login}: {text}", system=system,
                             hint="check token_id and token_secret; the token may have expired or been "
                                  "deleted (pveum user token list)")
        if status == 403:
            return PermanentError(what, system=system,
                                  hint=f"grant {login.split('!')[0]} the privilege named above, e.g. a role "
                                       "on / (see the Proxmox VE section of the documentation)")
        if status in (400, 404, 501):
            return PermanentError(what, system=system)
        if status == 500:
            # PVE answers 500 for nearly everything; what it says decides, and silence means retry.
            return classify_message(text, unknown=TransientError)(what, system=system)
        if status >= 500:
            return TransientError(what, system=system)
        return PermanentError(what, system=system)
    if isinstance(exc, requests.exceptions.SSLError):
        return TlsError(f"TLS verification of {where} failed: {_root_reason(exc)}", system=system,
                        hint="set ca_file to the CA that signed the API certificate (on a node: "
                             "/etc/pve/pve-root-ca.pem), or opt out explicitly with verify_tls: false")
    if isinstance(exc, requests.exceptions.Timeout):
        return TransientError(f"{doing} on {where} timed out", system=system)
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = _root_reason(exc)
        if isinstance(reason, urllib3.exceptions.NewConnectionError):
            return UnreachableError(f"cannot connect to {where}: {reason}", system=system,
                                    hint="check host and port (8006), that pveproxy runs, and the firewall")
        return TransientError(f"connection to {where} broke during {doing}: {reason}", system=system)
    if isinstance(exc, requests.exceptions.RequestException):
        return TransientError(f"{doing} on {where} failed: {exc}", system=system)
    return PermanentError(f"{doing} on {where} failed unexpectedly: {exc!r}", system=system)


class PveApi:
    """A lazily opened proxmoxer session; every call goes through ``call()`` and its translation."""

    def __init__(self, name: str, spec: ProxmoxSpec, *, timeout: float = TIMEOUT) -> None:
        self.name = name
        self.spec = spec
        self.timeout = timeout
        self.endpoint = f"https://{spec.host}:{spec.port}"
        self.login = spec.token_id or spec.user or ""
        self._api: proxmoxer.ProxmoxAPI | None = None

    def _verify(self) -> bool | str:
        if not self.spec.verify_tls:
            log.warning("tls_verification_disabled", target=self.name, endpoint=self.endpoint)
            return False
        # requests takes a CA bundle path where it takes True.
        return str(self.spec.ca_file) if self.spec.ca_file else True

    def _open(self) -> proxmoxer.ProxmoxAPI:
        if self._api is not None:
            return self._api
        spec = self.spec
        common: dict[str, Any] = {"port": spec.port, "verify_ssl": self._verify(), "timeout": self.timeout}
        try:
            if spec.token_id is not None and spec.token_secret is not None:
                user, _, token_name = spec.token_id.partition("!")
                api = proxmoxer.ProxmoxAPI(spec.host, user=user, token_name=token_name,
                                           token_value=spec.token_secret.reveal(), **common)
            else:
                assert spec.user is not None and spec.password is not None
                # Password logins fetch a ticket right here, so failures surface now.
                api = proxmoxer.ProxmoxAPI(spec.host, user=spec.user, password=spec.password.reveal(),
                                           **common)
        except Exception as exc:
            raise self._translate(exc, "login") from None
        self._api = api
        return api

    def _translate(self, exc: BaseException, doing: str) -> ConnectorError:
        return translate(exc, system=self.name, endpoint=self.endpoint, doing=doing, login=self.login)

    def call(self, method: str, path: str, **params: Any) -> Any:
        """``GET /nodes/pve1/qemu`` as ``call("GET", "nodes/pve1/qemu")``; returns PVE's ``data``."""
        resource = self._open()(path.strip("/"))
        clean = {k: _wire(v) for k, v in params.items() if v is not None}
        try:
            if method in ("GET", "DELETE"):
                return resource._request(method, params=clean)
            return resource._request(method, data=clean)
        except Exception as exc:
            raise self._translate(exc, f"{method} /{path.strip('/')}") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, **params)

    def close(self) -> None:
        if self._api is not None:
            self._api._store["session"].close()
            self._api = None

    # -- tasks -------------------------------------------------------------------------------

    def wait_task(self, upid: str, *, timeout: float = TASK_TIMEOUT, vm: str | None = None) -> dict[str, Any]:
        """Poll a task until it stops (0.1 s, growing to 2 s); raise if it did not end OK.

        A poll that fails transiently is retried until ``timeout``: the task runs on regardless.
        """
        node = upid.split(":")[1] if upid.startswith("UPID:") else ""
        if not node:
            raise PermanentError(f"not a task id from {self.name}: {upid!r}", system=self.name, vm=vm)
        started = time.monotonic()
        delay = 0.1
        status: dict[str, Any] = {}
        last_error: TransientError | None = None
        while time.monotonic() - started < timeout:
            failpoints.reached("task-wait")
            try:
                status = self.get(f"nodes/{node}/tasks/{upid}/status")
                last_error = None
            except TransientError as exc:
                last_error = exc
            if status.get("status") == "stopped":
                break
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        else:
            why = f" (last poll: {last_error.message})" if last_error else ""
            raise TransientError(f"task {upid} on {self.name} still running after {timeout:.0f}s{why}",
                                 system=self.name, vm=vm)
        exit_status = str(status.get("exitstatus", ""))
        seconds = round(time.monotonic() - started, 3)
        if _TASK_OK.match(exit_status):
            log.info("proxmox_task_done", target=self.name, upid=upid, type=status.get("type"), s=seconds,
                     exitstatus=exit_status)
            return status
        tail = self._task_log_tail(node, upid)
        error = classify_message(exit_status)
        message = f"task {status.get('type', '')} {upid} on {self.name} failed: {exit_status}"
        if tail:
            message += "\n  task log: " + "\n            ".join(tail)
        log.warning("proxmox_task_failed", target=self.name, upid=upid, exitstatus=exit_status)
        raise error(message, system=self.name, vm=vm)

    def _task_log_tail(self, node: str, upid: str, lines: int = 8) -> list[str]:
        try:
            entries = self.get(f"nodes/{node}/tasks/{upid}/log", start=0, limit=500)
        except ConnectorError:
            return []
        return [str(e.get("t", "")) for e in entries[-lines:]]

    def run_task(self, method: str, path: str, params: Mapping[str, Any] | None = None, *,
                 vm: str | None = None, timeout: float = TASK_TIMEOUT) -> str:
        """Start a task (the call answers a UPID) and wait for it; returns the UPID."""
        upid = self.call(method, path, **(params or {}))
        if not isinstance(upid, str) or not upid.startswith("UPID:"):
            raise PermanentError(f"{method} /{path} on {self.name} answered {upid!r}, not a task id",
                                 system=self.name, vm=vm)
        self.wait_task(upid, timeout=timeout, vm=vm)
        return upid


def _wire(value: Any) -> Any:
    """PVE reads booleans as 0/1 in form data."""
    if isinstance(value, bool):
        return int(value)
    return value
