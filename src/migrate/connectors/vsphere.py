"""vSphere as a migration source: log in, read the whole inventory in one PropertyCollector
session, log out.

    with VsphereSource("dc1", spec) as vsphere:
        inventory = vsphere.discover()

Discovery is read only. It creates one ContainerView over the inventory (kept for the session,
destroyed at logout) and asks for every property the model needs with a single
RetrievePropertiesEx of up to ``page_size`` objects per answer, plus ContinueRetrievePropertiesEx
while the server pages: 2 round trips for 10,000 VMs on vcsim, about 1 + objects/2,000 on a
vCenter. Never attribute walking, which costs a round trip per property per object. The default
path streams and parses the SOAP response itself (``vsphere_fast``); ``method="pyvmomi"`` sends
the same request through plain pyvmomi (``vsphere_pyvmomi``), kept as the reference both are
tested against. pyvmomi owns the session either way.

Every SDK, socket and TLS failure leaves this module as a migrate error (UnreachableError,
TlsError, AuthError, TransientError, PermanentError) whose message is one line naming
host:port and what to do. The password is revealed only inside the login call.
"""

from __future__ import annotations

import gc
import http.client
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookies import SimpleCookie
from types import TracebackType
from typing import Any, Literal

import structlog
from pyVim import connect as pyvim_connect
from pyVmomi import VmomiSupport, vim, vmodl

from migrate.connectors import vsphere_fast, vsphere_pyvmomi
from migrate.connectors.vsphere_convert import build_inventory
from migrate.connectors.vsphere_props import PROPERTIES, VIEW_TYPES
from migrate.errors import (
    AuthError,
    ConnectorError,
    MigrateError,
    PermanentError,
    TlsError,
    TransientError,
    UnreachableError,
)
from migrate.inventory import VsphereSpec
from migrate.model import SourceInventory

log = structlog.get_logger(__name__)

Method = Literal["fast", "pyvmomi"]

# pyvmomi ships no type hints.
_pyvim: Any = pyvim_connect
_smart_connect: Any = pyvim_connect.SmartConnect
_wsdl_type: Any = VmomiSupport.GetWsdlType


def _msg(fault: BaseException) -> str:
    return str(getattr(fault, "msg", "") or type(fault).__name__)


class VsphereSource:
    """A logged-in vSphere (vCenter or ESXi) session; use as a context manager."""

    def __init__(
        self,
        name: str,
        spec: VsphereSpec,
        *,
        page_size: int = 2000,
        timeout: float = 300.0,
        connect_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.spec = spec
        # vCenter pages at 100 objects when not told otherwise; 2,000 keeps 10k VMs at ~6 round trips.
        self.page_size = page_size
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._si: Any = None
        self._content: Any = None
        self._ssl: ssl.SSLContext | None = None
        self._view: Any = None
        self._round_trips = 0

    @property
    def where(self) -> str:
        return f"{self.spec.host}:{self.spec.port}"

    @property
    def round_trips(self) -> int:
        """SOAP requests sent since login (login itself not counted)."""
        return self._round_trips

    @property
    def service_instance(self) -> Any:
        if self._si is None:
            raise ConnectorError(f"vSphere source {self.name} is not connected; use it in a 'with' block")
        return self._si

    @property
    def content(self) -> Any:
        """The ServiceContent read at login (no round trip)."""
        if self._content is None:
            raise ConnectorError(f"vSphere source {self.name} is not connected; use it in a 'with' block")
        return self._content

    # -- session --------------------------------------------------------------------------

    def __enter__(self) -> VsphereSource:
        self.connect()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _ssl_context(self) -> ssl.SSLContext:
        if not self.spec.verify_tls:
            log.warning("tls_verification_disabled", source=self.name, host=self.spec.host,
                        port=self.spec.port)
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(cafile=str(self.spec.ca_file) if self.spec.ca_file else None)

    def _unreachable(self, reason: str) -> UnreachableError:
        return UnreachableError(
            f"cannot reach vSphere at {self.where} ({reason}); check host and port of source "
            f"'{self.name}' in the inventory and that this machine can reach it",
            system="vsphere",
        )

    def _probe(self) -> None:
        # pyvmomi's first request has no timeout: a silent firewall would hang for minutes.
        try:
            socket.create_connection((self.spec.host, self.spec.port), timeout=self.connect_timeout).close()
        except socket.gaierror:
            raise self._unreachable(f"unknown host {self.spec.host!r}") from None
        except ConnectionRefusedError:
            raise self._unreachable("connection refused") from None
        except TimeoutError:
            raise self._unreachable(f"no answer within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise self._unreachable(exc.strerror or type(exc).__name__) from None

    def _login_error(self, exc: BaseException) -> MigrateError:
        if isinstance(exc, vim.fault.InvalidLogin):
            ref = self.spec.password.reference
            where_pw = f"the password ({ref})" if ref else "the password"
            return AuthError(
                f"vSphere at {self.where} refused the login of user '{self.spec.user}'; check the user and "
                f"{where_pw} of source '{self.name}'",
                system="vsphere",
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or str(exc)
            fix = (f"set host of source '{self.name}' to a name the certificate is issued for"
                   if "mismatch" in reason else
                   f"set ca_file of source '{self.name}' to the PEM of the CA that signed it "
                   "(verify_tls: false only for a lab)")
            return TlsError(f"cannot verify the TLS certificate of vSphere at {self.where} "
                            f"({reason.rstrip('.')}); {fix}", system="vsphere")
        if isinstance(exc, ssl.SSLError):
            return TlsError(
                f"TLS handshake with vSphere at {self.where} failed ({exc.reason or exc}); check that "
                f"the port of source '{self.name}' speaks HTTPS and accepts a TLS 1.2+ client",
                system="vsphere",
            )
        if isinstance(exc, (OSError, http.client.HTTPException)):
            return self._unreachable(str(exc) or type(exc).__name__)
        if isinstance(exc, vmodl.MethodFault):
            return PermanentError(
                f"vSphere at {self.where} refused the login ({type(exc).__name__}: {_msg(exc)}); check "
                f"the account of source '{self.name}'",
                system="vsphere",
            )
        # pyvmomi raises a bare Exception when nothing at /sdk speaks the vSphere API.
        return UnreachableError(
            f"no vSphere API answers at https://{self.where}/sdk; check host and port of source "
            f"'{self.name}' (vCenter and ESXi listen on 443)",
            system="vsphere",
        )

    def connect(self) -> None:
        """Log in; raise UnreachableError, TlsError or AuthError with a one-line fix."""
        self._ssl = self._ssl_context()
        self._probe()
        failure: MigrateError | None = None
        try:
            self._si = _smart_connect(
                host=self.spec.host,
                port=self.spec.port,
                user=self.spec.user,
                pwd=self.spec.password.reveal(),
                sslContext=self._ssl,
                httpConnectionTimeout=self.timeout,
            )
        except Exception as exc:  # the border: every SDK failure becomes a migrate error
            failure = self._login_error(exc)
        if failure is not None:
            # Raised outside the except block so no SDK frame (which held the password) is chained.
            raise failure
        try:
            with self._sdk_errors("starting the session"):
                self._content = self._si.RetrieveContent()
        except MigrateError:
            self.close()
            raise
        self._si._GetStub().requestModifierList.append(self._count_request)
        about = self._content.about
        log.info("vsphere_connected", source=self.name, host=self.spec.host, port=self.spec.port,
                 api_version=about.apiVersion, product=about.fullName)

    def _count(self) -> None:
        self._round_trips += 1

    def _count_request(self, request: Any) -> Any:
        self._round_trips += 1
        return request

    def close(self) -> None:
        """Destroy the view and log out; never raises (a failed logout only expires later)."""
        si, self._si = self._si, None
        if si is None:
            return
        try:
            if self._view is not None:
                self._view.Destroy()
        except Exception as exc:  # logout below frees it too
            log.debug("vsphere_view_destroy_failed", source=self.name, error=type(exc).__name__)
        try:
            (self._content or si.RetrieveContent()).sessionManager.Logout()
            log.info("vsphere_logged_out", source=self.name)
        except Exception as exc:  # logout is best effort: the session times out anyway
            log.warning("vsphere_logout_failed", source=self.name, error=type(exc).__name__)
        finally:
            self._view = self._content = None
            si._GetStub().DropConnections()
            if _pyvim.GetSi() is si:  # SmartConnect keeps the last session in a module global
                _pyvim.SetSi(None)

    # -- discovery ------------------------------------------------------------------------

    @staticmethod
    @contextmanager
    def _gc_paused() -> Iterator[None]:
        # Discovery allocates millions of short-lived, acyclic objects; the cyclic collector would
        # rescan the growing inventory again and again (~15% of the time) to find nothing.
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if enabled:
                gc.enable()

    @contextmanager
    def _sdk_errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except MigrateError:
            raise
        except vim.fault.NotAuthenticated:
            raise AuthError(f"vSphere at {self.where} ended the session while {doing}; run it again",
                            system="vsphere") from None
        except vmodl.MethodFault as exc:
            raise PermanentError(f"vSphere at {self.where} refused {doing} "
                                 f"({type(exc).__name__}: {_msg(exc)})", system="vsphere") from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"lost the connection to vSphere at {self.where} while {doing} ({exc}); "
                                 "retry", system="vsphere") from None

    def _container_view(self) -> Any:
        # Created once per session and destroyed at logout, so discovery costs the pages alone.
        if self._view is None:
            content = self.content
            types = [_wsdl_type("urn:vim25", kind) for kind in VIEW_TYPES]
            self._view = content.viewManager.CreateContainerView(content.rootFolder, types, True)
        return self._view

    def soap_endpoint(self) -> vsphere_fast.SoapEndpoint:
        """Where and with which session cookie to POST raw SOAP (or HTTP) on this session."""
        stub = self.service_instance._GetStub()
        morsel = SimpleCookie(stub.cookie).get("vmware_soap_session")
        if morsel is None:
            raise AuthError(f"vSphere at {self.where} gave no session cookie; log in again", system="vsphere")
        assert self._ssl is not None
        return vsphere_fast.SoapEndpoint(
            host=self.spec.host,
            port=self.spec.port,
            path="/sdk",
            ssl_context=self._ssl,
            cookie=f'vmware_soap_session="{morsel.value}"',
            soap_action=stub.versionId,
            timeout=self.timeout,
        )

    def discover(self, *, method: Method = "fast") -> SourceInventory:
        """Every VM, host, cluster, datastore and network, sorted; read only."""
        if method not in ("fast", "pyvmomi"):
            raise ValueError(f"method must be 'fast' or 'pyvmomi', not {method!r}")
        started, trips = time.perf_counter(), self._round_trips
        try:
            inventory = self._discover(method)
        except MigrateError:
            self._view = None  # it may be what failed; a retry makes a new one (logout cleans the old)
            raise
        log.info("discovery_finished", source=self.name, method=method, vms=len(inventory.vms),
                 hosts=len(inventory.hosts), datastores=len(inventory.datastores),
                 seconds=round(time.perf_counter() - started, 3), round_trips=self._round_trips - trips)
        return inventory

    def _discover(self, method: Method) -> SourceInventory:
        with self._sdk_errors("reading the inventory"), self._gc_paused():
            content = self.content
            view = self._container_view()
            cfm = content.customFieldsManager
            if method == "fast":
                extra = {"CustomFieldsManager": cfm._moId} if cfm is not None else {}
                spec_xml = vsphere_fast.filter_spec(view._moId, PROPERTIES, extra)
                retrieval = vsphere_fast.Retrieval(self.soap_endpoint(), content.propertyCollector._moId,
                                                   self._count)
                objects = retrieval.objects(spec_xml, self.page_size)
            else:
                spec = vsphere_pyvmomi.filter_spec(view, PROPERTIES, (cfm,) if cfm is not None else ())
                objects = vsphere_pyvmomi.retrieve(content.propertyCollector, spec, self.page_size)
            inventory = build_inventory(
                objects,
                source=self.name,
                endpoint=self.where,
                api_version=content.about.apiVersion,
                instance_uuid=content.about.instanceUuid or "",
            )
        return inventory
