"""The streaming discovery path: RetrievePropertiesEx as raw SOAP, parsed while it arrives.

pyvmomi deserialises every property of every device into Python objects before returning,
which costs tens of seconds and gigabytes on 10,000 VMs. Here the request is written by
hand, POSTed on the pyvmomi session's cookie, and the response is fed to lxml's iterparse:
each ``<objects>`` element is turned into a ``RawObject`` the moment it is complete and then
cleared, so memory stays flat however large the page. Pages are followed with
ContinueRetrievePropertiesEx until the server stops sending a token.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Final
from xml.sax.saxutils import escape

import structlog
from lxml import etree  # type: ignore[import-untyped]

from migrate.connectors.vsphere_props import DEVICES, IGNORED_DEVICES, LIST_FIELDS, RawObject
from migrate.errors import AuthError, ConnectorError, PermanentError, TransientError

log = structlog.get_logger(__name__)

_NS: Final = "{urn:vim25}"
_XSI_TYPE: Final = "{http://www.w3.org/2001/XMLSchema-instance}type"
_OBJECTS: Final = _NS + "objects"
_TOKEN: Final = _NS + "token"
_PROPSET: Final = _NS + "propSet"
_MISSING: Final = _NS + "missingSet"
_SKIP: Final = frozenset(_NS + t for t in ("dynamicProperty", "dynamicType", "slotInfo", "summary"))
_KEYS: dict[str, str] = {}  # "{urn:vim25}key" -> "key", filled as tags are met

_ENVELOPE: Final = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"'
    ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{}</soapenv:Body></soapenv:Envelope>'
)


@dataclass(frozen=True, slots=True)
class SoapEndpoint:
    """Where and as whom to POST: the pyvmomi session's host, cookie and API version."""

    host: str
    port: int
    path: str
    ssl_context: ssl.SSLContext
    cookie: str  # the session: a credential, never logged
    soap_action: str  # e.g. '"urn:vim25/8.0.2.0"', as pyvmomi negotiated it
    timeout: float = 300.0

    def __repr__(self) -> str:
        return f"SoapEndpoint({self.host}:{self.port}{self.path})"


# -- requests ---------------------------------------------------------------------------------


def filter_spec(view: str, properties: Mapping[str, tuple[str, ...]], extra: Mapping[str, str]) -> str:
    """The specSet XML: every type's paths, the view's contents, and ``extra`` objects (type -> moref)."""
    props = "".join(
        f"<propSet><type>{kind}</type><all>false</all>"
        + "".join(f"<pathSet>{path}</pathSet>" for path in paths)
        + "</propSet>"
        for kind, paths in properties.items()
    )
    objects = (
        f'<objectSet><obj type="ContainerView">{escape(view)}</obj><skip>true</skip>'
        '<selectSet xsi:type="TraversalSpec"><name>view</name><type>ContainerView</type>'
        "<path>view</path><skip>false</skip></selectSet></objectSet>"
    )
    objects += "".join(
        f'<objectSet><obj type="{kind}">{escape(moref)}</obj><skip>false</skip></objectSet>'
        for kind, moref in extra.items()
    )
    return f"<specSet>{props}{objects}</specSet>"


def retrieve_request(collector: str, spec: str, page_size: int) -> bytes:
    body = (
        f'<RetrievePropertiesEx xmlns="urn:vim25"><_this type="PropertyCollector">{escape(collector)}</_this>'
        f"{spec}<options><maxObjects>{page_size}</maxObjects></options></RetrievePropertiesEx>"
    )
    return _ENVELOPE.format(body).encode()


def continue_request(collector: str, token: str, *, cancel: bool = False) -> bytes:
    method = "CancelRetrievePropertiesEx" if cancel else "ContinueRetrievePropertiesEx"
    body = (
        f'<{method} xmlns="urn:vim25"><_this type="PropertyCollector">{escape(collector)}</_this>'
        f"<token>{escape(token)}</token></{method}>"
    )
    return _ENVELOPE.format(body).encode()


# -- the response -----------------------------------------------------------------------------


def _xsi_type(el: Any) -> str | None:
    xtype: str | None = el.get(_XSI_TYPE)
    return xtype.rpartition(":")[2] if xtype is not None and ":" in xtype else xtype


def _plain(el: Any) -> Any:
    """A property value as plain data: a dict (with ``_type``) per structure, a list per array, text."""
    xtype = _xsi_type(el)
    if xtype is not None and xtype.startswith("ArrayOf"):
        return [_struct(child, _xsi_type(child)) if len(child) else (child.text or "") for child in el]
    return _struct(el, xtype) if len(el) else (el.text or "")


def _struct(el: Any, xtype: str | None) -> dict[str, Any]:
    # The hot loop of discovery (hundreds of thousands of elements): leaves are read inline.
    out: dict[str, Any] = {"_type": xtype}
    keys = _KEYS
    for child in el:
        tag = child.tag
        if tag in _SKIP:
            continue
        key = keys.get(tag)
        if key is None:
            key = keys[tag] = tag.rpartition("}")[2]
        value = _struct(child, _xsi_type(child)) if len(child) else (child.text or "")
        if key in LIST_FIELDS:
            out.setdefault(key, []).append(value)
        else:
            out[key] = value
    return out


def _devices(val: Any) -> list[Any]:
    # Most of a VM's bytes are devices the model ignores (PCI/PS2/SIO, video, VMCI): skip them unread.
    out = []
    for device in val:
        xtype = _xsi_type(device)
        if xtype not in IGNORED_DEVICES:
            out.append(_struct(device, xtype))
    return out


def _raw(el: Any) -> RawObject:
    obj = el[0]
    props: dict[str, Any] = {}
    for child in el.iterchildren(_PROPSET, _MISSING):
        if child.tag == _MISSING:
            log.debug("property_missing", moref=obj.text, path=child.findtext(_NS + "path"))
            continue
        name = child[0].text
        if len(child) < 2:
            continue
        props[name] = _devices(child[1]) if name == DEVICES else _plain(child[1])
    return RawObject(type=obj.get("type"), moref=obj.text, props=props)


def parse_page(stream: IO[bytes]) -> Generator[RawObject, None, str]:
    """Yield each object of one RetrieveResult as soon as it is parsed; return the token or ""."""
    token = ""
    parser = etree.iterparse(stream, events=("end",), tag=(_OBJECTS, _TOKEN), resolve_entities=False,
                             no_network=True)
    for _, el in parser:
        if el.tag == _TOKEN:
            token = el.text or ""
            continue
        raw = _raw(el)
        el.clear(keep_tail=True)
        parent = el.getparent()
        while el.getprevious() is not None:
            del parent[0]  # drop finished objects: only this one and the parser's read-ahead stay
        yield raw
    return token


def _fault(status: int, body: bytes, where: str) -> ConnectorError:
    """A SOAP fault (or other HTTP error) as migrate's error, naming the fault type."""
    kind, message = "", ""
    try:
        root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
        message = (root.findtext(".//faultstring") or "").strip()
        detail = root.find(".//detail")
        if detail is not None and len(detail):
            fault = detail[0]
            kind = (fault.get(_XSI_TYPE) or etree.QName(fault).localname).rpartition(":")[2]
            kind = kind.removesuffix("Fault")
    except etree.XMLSyntaxError:
        message = body[:200].decode("utf-8", "replace")
    message = " ".join(message.split())[:300] or "no detail"
    text = f"vSphere at {where} answered HTTP {status}{' ' + kind if kind else ''}: {message}"
    if kind in ("NotAuthenticated", "InvalidLogin"):
        return AuthError(f"{text}; the session expired or was closed, log in again")
    if (status >= 500 and not kind) or kind in ("ManagedObjectNotFound", "RequestCanceled", "SystemError"):
        return TransientError(f"{text}; retry the discovery")
    if kind == "NoPermission":
        return PermanentError(f"{text}; give the account at least read-only access to the whole inventory")
    if kind in ("InvalidProperty", "InvalidType"):
        return PermanentError(f"{text}; this vSphere version lacks a property migrate reads; report it")
    return PermanentError(f"{text}; see the vCenter log for this fault")


class Retrieval:
    """One RetrievePropertiesEx and its continuations, on one kept-alive connection."""

    def __init__(self, endpoint: SoapEndpoint, collector: str,
                 on_round_trip: Callable[[], None] | None = None) -> None:
        self.endpoint = endpoint
        self.collector = collector
        self.round_trips = 0
        self._on_round_trip = on_round_trip
        self._conn: http.client.HTTPSConnection | None = None

    @property
    def where(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"

    def _post(self, body: bytes) -> http.client.HTTPResponse:
        ep = self.endpoint
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(ep.host, ep.port, context=ep.ssl_context,
                                                     timeout=ep.timeout)
        self.round_trips += 1
        if self._on_round_trip:
            self._on_round_trip()
        self._conn.request("POST", ep.path, body, {
            "Cookie": ep.cookie,
            "SOAPAction": ep.soap_action,
            "Content-Type": "text/xml; charset=utf-8",
            # Loopback and LAN are faster uncompressed; lxml then reads the socket directly.
            "Accept-Encoding": "identity",
        })  # fmt: skip
        response = self._conn.getresponse()
        if response.status != 200:
            raise _fault(response.status, response.read(), self.where)
        return response

    def objects(self, spec: str, page_size: int) -> Iterator[RawObject]:
        """Yield every object of every page."""
        token = ""
        body = retrieve_request(self.collector, spec, page_size)
        try:
            while True:
                response = self._post(body)
                # On failure mid-page ``token`` still names the open result set, for the cancel below.
                token = yield from parse_page(response)
                response.read()  # drain what follows the last object so the connection can be reused
                if not token:
                    return
                log.debug("page_followed", round_trips=self.round_trips)
                body = continue_request(self.collector, token)
        except etree.XMLSyntaxError as exc:
            raise TransientError(f"vSphere at {self.where} sent a broken response ({exc}); retry") from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"lost the connection to vSphere at {self.where} ({exc}); retry") from None
        finally:
            if token:
                self._cancel(token)
            self.close()

    def _cancel(self, token: str) -> None:
        # Given up halfway (an error or the caller stopped): free the server's result set, on a
        # fresh connection since the old one may be mid-response.
        self.close()
        try:
            self._post(continue_request(self.collector, token, cancel=True)).read()
        except (ConnectorError, OSError, http.client.HTTPException):
            log.debug("cancel_retrieve_failed")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
