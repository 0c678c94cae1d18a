"""Paging, faults and cases vcsim cannot produce, replayed from real vcsim recordings.

vcsim 0.24 never pages and has no RDMs, trunk VLANs or vApp children without a folder, but a
vCenter does. So this module records vcsim's own RetrievePropertiesEx answer once, then serves
it from a small HTTPS server on 127.0.0.1: split into pages joined by continuation tokens, or
edited the way a vCenter would answer. Both retrieval paths read the replay.
"""

from __future__ import annotations

import copy
import http.client
import io
import itertools
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from pyVmomi import SoapStubAdapter, vim, vmodl

from migrate.connectors import vsphere_fast, vsphere_pyvmomi
from migrate.connectors.vsphere import VsphereSource
from migrate.connectors.vsphere_convert import build_inventory
from migrate.connectors.vsphere_props import PROPERTIES, VIEW_TYPES
from migrate.errors import AuthError, TransientError
from migrate.inventory import VsphereSpec
from migrate.lab import certs, vcsim
from migrate.model import SourceInventory
from migrate.secrets import Secret

V = "{urn:vim25}"
XSI = "{http://www.w3.org/2001/XMLSchema-instance}type"
GIB = 1024**3


@dataclass
class Recording:
    """What vcsim answered, and what discovery made of it directly."""

    answer: bytes  # the RetrievePropertiesExResponse envelope, one page
    not_authenticated: bytes  # a fault envelope for a dead session
    not_found: bytes  # a fault envelope for a view that does not exist
    direct: SourceInventory
    version: str  # the pyvmomi API version the session negotiated
    view: str
    collector: str
    fields_manager: str
    ca: Path
    paths: certs.CertPaths


def _post(endpoint: vsphere_fast.SoapEndpoint, body: bytes, cookie: str | None = None) -> bytes:
    conn = http.client.HTTPSConnection(endpoint.host, endpoint.port, context=endpoint.ssl_context, timeout=30)
    try:
        conn.request("POST", endpoint.path, body, {"Cookie": endpoint.cookie if cookie is None else cookie,
                                                   "SOAPAction": endpoint.soap_action,
                                                   "Content-Type": "text/xml; charset=utf-8"})
        return conn.getresponse().read()
    finally:
        conn.close()


def _make_vapp(source: VsphereSource) -> None:
    """A vApp in folder 'apps' with one child VM (vcsim files the child under the folder)."""
    content = source.content
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.ClusterComputeResource], True)
    pool = view.view[0].resourcePool
    view.Destroy()
    datacenter = content.rootFolder.childEntity[0]
    folder = datacenter.vmFolder.CreateFolder("apps")
    allocation = vim.ResourceAllocationInfo(reservation=0, limit=-1, expandableReservation=True,
                                            shares=vim.SharesInfo(level="normal", shares=0))
    vapp = pool.CreateVApp(name="erp", resSpec=vim.ResourceConfigSpec(cpuAllocation=allocation,
                                                                        memoryAllocation=allocation),
                           configSpec=vim.vApp.VAppConfigSpec(), vmFolder=folder)
    files = vim.vm.FileInfo(vmPathName="[LocalDS_0] erp/erp.vmx")
    vapp.CreateChildVM_Task(config=vim.vm.ConfigSpec(name="erp-app", guestId="otherGuest", files=files))


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    paths = certs.make_certs(tmp_path_factory.mktemp("certs"))
    server = vcsim.start(vcsim.VcsimOptions(vms_per_pool=3, tls_cert=str(paths.cert), tls_key=str(paths.key)))
    spec = VsphereSpec(type="vsphere", host=server.host, port=server.port, user="user",
                       password=Secret("pass", "env:VSPHERE_PASSWORD"), ca_file=paths.ca)
    try:
        with VsphereSource("lab", spec) as source:
            _make_vapp(source)
            direct = source.discover()
            content = source.content
            types = [getattr(vim, kind) for kind in VIEW_TYPES]
            view = content.viewManager.CreateContainerView(content.rootFolder, types, True)._moId
            collector, fields = content.propertyCollector._moId, content.customFieldsManager._moId
            endpoint = source.soap_endpoint()
            spec_xml = vsphere_fast.filter_spec(view, PROPERTIES, {"CustomFieldsManager": fields})
            answer = _post(endpoint, vsphere_fast.retrieve_request(collector, spec_xml, 1000))
            bogus = vsphere_fast.filter_spec("session[x]nothing", PROPERTIES, {})
            not_found = _post(endpoint, vsphere_fast.retrieve_request(collector, bogus, 1000))
            create_view = (
                b'<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/'
                b'envelope/"><soapenv:Body><CreateContainerView xmlns="urn:vim25"><_this type="ViewManager">'
                b'ViewManager</_this><container type="Folder">group-d1</container><recursive>true'
                b"</recursive></CreateContainerView></soapenv:Body></soapenv:Envelope>")
            not_authenticated = _post(endpoint, create_view, cookie='vmware_soap_session="dead"')
            version = source.service_instance._stub.version
        yield Recording(answer, not_authenticated, not_found, direct, version, view, collector, fields,
                        paths.ca, paths)
    finally:
        server.stop()


# -- a replaying vCenter ------------------------------------------------------------------------


@dataclass
class Reply:
    body: bytes
    status: int = 200
    truncate: bool = False  # announce the full length, send half, hang up


@dataclass
class Replayer:
    """An HTTPS server answering SOAP calls from a script keyed by method (and token)."""

    paths: certs.CertPaths
    script: dict[str, Reply]
    seen: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def __enter__(self) -> Replayer:
        replayer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                method = re.search(r"<(\w+) xmlns=\"urn:vim25\"", body)
                token = re.search(r"<token[^>]*>([^<]*)</token>", body)
                key = (method.group(1) if method else "?") + (f":{token.group(1)}" if token else "")
                replayer.seen.append(key)
                replayer.bodies.append(body)
                reply = replayer.script.get(key) or Reply(b"no script for " + key.encode(), 599)
                self.send_response(reply.status)
                self.send_header("Content-Type", "text/xml; charset=utf-8")
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body[: len(reply.body) // 2] if reply.truncate else reply.body)
                if reply.truncate:
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.paths.cert, self.paths.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])


def _pages(answer: bytes, sizes: list[int]) -> list[bytes]:
    """Split one recorded answer into pages of ``sizes`` objects (the rest last), joined by tokens."""
    root = etree.fromstring(answer)
    objects = root.findall(f".//{V}returnval/{V}objects")
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    bounds.append(len(objects))
    pages = []
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        page = copy.deepcopy(root)
        returnval = page.find(f".//{V}returnval")
        assert returnval is not None
        for index, element in enumerate(returnval.findall(f"{V}objects")):
            if not start <= index < end:
                returnval.remove(element)
        if end < len(objects):
            token = etree.Element(f"{V}token")
            token.text = f"t{number + 1}"
            returnval.insert(0, token)  # where a vCenter puts it: before the objects
        if number:
            response = returnval.getparent()
            assert response is not None
            response.tag = f"{V}ContinueRetrievePropertiesExResponse"
        pages.append(etree.tostring(page, xml_declaration=True, encoding="UTF-8"))
    return pages


def _script(pages: list[bytes]) -> dict[str, Reply]:
    script = {"RetrievePropertiesEx": Reply(pages[0])}
    for number, page in enumerate(pages[1:], start=1):
        script[f"ContinueRetrievePropertiesEx:t{number}"] = Reply(page)
    return script


def _endpoint(rec: Recording, port: int) -> vsphere_fast.SoapEndpoint:
    context = ssl.create_default_context(cafile=str(rec.ca))
    return vsphere_fast.SoapEndpoint("127.0.0.1", port, "/sdk", context, 'vmware_soap_session="replayed"',
                                     '"urn:vim25/6.5"')


def _fast(rec: Recording, port: int, page_size: int = 2) -> SourceInventory:
    retrieval = vsphere_fast.Retrieval(_endpoint(rec, port), rec.collector)
    spec = vsphere_fast.filter_spec(rec.view, PROPERTIES, {"CustomFieldsManager": rec.fields_manager})
    return _build(retrieval.objects(spec, page_size), rec)


def _pyvmomi(rec: Recording, port: int, page_size: int = 2) -> SourceInventory:
    stub = SoapStubAdapter(host="127.0.0.1", port=port, version=rec.version,
                           sslContext=ssl.create_default_context(cafile=str(rec.ca)))
    collector = vmodl.query.PropertyCollector(rec.collector, stub)
    spec = vsphere_pyvmomi.filter_spec(vim.view.ContainerView(rec.view, stub), PROPERTIES,
                                       (vim.CustomFieldsManager(rec.fields_manager, stub),))
    return _build(vsphere_pyvmomi.retrieve(collector, spec, page_size), rec)


def _build(objects: Any, rec: Recording) -> SourceInventory:
    return build_inventory(objects, source=rec.direct.source, endpoint=rec.direct.endpoint,
                           api_version=rec.direct.api_version, instance_uuid=rec.direct.instance_uuid)


# -- paging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("read", [_fast, _pyvmomi], ids=["streaming", "pyvmomi"])
def test_continuation_tokens_are_followed_to_the_last_page(
        recording: Recording, read: Callable[[Recording, int], SourceInventory]) -> None:
    """Three pages joined by tokens give exactly the inventory of the single-page answer."""
    pages = _pages(recording.answer, [5, 7])
    assert [page.count(b"<token>") for page in pages] == [1, 1, 0]
    with Replayer(recording.paths, _script(pages)) as server:
        paged = read(recording, server.port)
    assert server.seen == ["RetrievePropertiesEx", "ContinueRetrievePropertiesEx:t1",
                           "ContinueRetrievePropertiesEx:t2"]
    assert len(paged.vms) == len(recording.direct.vms) == 4
    assert paged == recording.direct


def test_the_request_names_page_size_view_and_every_property(recording: Recording) -> None:
    """The hand-written request carries maxObjects, the view traversal and all property paths."""
    with Replayer(recording.paths, _script(_pages(recording.answer, []))) as server:
        _fast(recording, server.port, page_size=1234)
    request = etree.fromstring(server.bodies[0].encode())
    assert request.findtext(f".//{V}maxObjects") == "1234"
    assert request.findtext(f".//{V}objectSet/{V}obj") == recording.view
    paths = {(spec.findtext(f"{V}type"), path.text)
             for spec in request.iter(f"{V}propSet") for path in spec.iter(f"{V}pathSet")}
    assert paths == {(kind, path) for kind, names in PROPERTIES.items() for path in names}


# -- answers only a vCenter gives -------------------------------------------------------------


def _edit(answer: bytes) -> bytes:
    """Turn vcsim's answer into what a vCenter would send for an RDM, a seSparse delta, a VLAN
    trunk, an uplink portgroup, a vApp child without a folder and escaped names."""
    root = etree.fromstring(answer)

    def obj(moref_type: str, name: str) -> Any:
        for objects in root.iter(f"{V}objects"):
            if objects.find(f"{V}obj").get("type") == moref_type:
                names = [p.findtext(f"{V}val") for p in objects.iter(f"{V}propSet")
                         if p.findtext(f"{V}name") == "name"]
                if names == [name]:
                    return objects
        raise AssertionError(f"no {moref_type} {name}")

    def prop(objects: Any, name: str) -> Any:
        return next((p for p in objects.iter(f"{V}propSet") if p.findtext(f"{V}name") == name), None)

    def add_prop(objects: Any, name: str, xsi_type: str, text: str, **attrs: str) -> None:
        element = etree.SubElement(objects, f"{V}propSet")
        etree.SubElement(element, f"{V}name").text = name
        val = etree.SubElement(element, f"{V}val", {XSI: xsi_type, **attrs})
        val.text = text

    def backing(vm: str) -> Any:
        devices = prop(obj("VirtualMachine", vm), "config.hardware.device").iter(f"{V}VirtualDevice")
        return next(d for d in devices if d.get(XSI).endswith("VirtualDisk")).find(f"{V}backing")

    def retype(element: Any, xsi_type: str, drop: tuple[str, ...], add: dict[str, str]) -> None:
        element.set(XSI, xsi_type)
        for child in list(element):
            if etree.QName(child).localname in drop:
                element.remove(child)
        for name, text in add.items():
            etree.SubElement(element, f"{V}{name}").text = text

    retype(backing("DC0_C0_RP0_VM0"), "VirtualDiskRawDiskMappingVer1BackingInfo",
           ("split", "writeThrough", "thinProvisioned", "eagerlyScrub", "digestEnabled", "diskMode"),
           {"lunUuid": "0200000000600a0b80", "deviceName": "vml.0200000000600a0b80",
            "compatibilityMode": "physicalMode", "diskMode": "independent_persistent"})
    retype(backing("DC0_C0_RP0_VM1"), "VirtualDiskSeSparseBackingInfo",
           ("split", "thinProvisioned", "eagerlyScrub"), {"grainSize": "4"})
    port_config = prop(obj("DistributedVirtualPortgroup", "DC0_DVPG0"), "config.defaultPortConfig")
    vlan = port_config.find(f".//{V}vlan")
    retype(vlan, "VmwareDistributedVirtualSwitchTrunkVlanSpec", ("vlanId",), {})
    for start, end in (("100", "200"), ("300", "300")):
        span = etree.SubElement(vlan, f"{V}vlanId")
        etree.SubElement(span, f"{V}start").text = start
        etree.SubElement(span, f"{V}end").text = end
    uplink = obj("DistributedVirtualPortgroup", "DVS0-DVUplinks-9")
    add_prop(uplink, "config.uplink", "xsd:boolean", "true")
    child = obj("VirtualMachine", "erp-app")
    vapp = next(o.findtext(f"{V}obj") for o in root.iter(f"{V}objects")
                if o.find(f"{V}obj").get("type") == "VirtualApp")
    child.remove(prop(child, "parent"))  # a vCenter files a vApp's VMs under the vApp, not a folder
    add_prop(child, "parentVApp", "ManagedObjectReference", vapp, type="VirtualApp")
    prop(obj("Folder", "apps"), "name").find(f"{V}val").text = "apps%2f2024 %25 done"
    prop(obj("VirtualMachine", "DC0_C0_RP0_VM2"), "name").find(f"{V}val").text = "Žluťoučký kůň %2f db"
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def test_vcenter_only_answers_read_alike_on_both_paths(recording: Recording) -> None:
    """RDM, seSparse, VLAN trunk, uplink, vApp child and escaped names: same result, right values."""
    with Replayer(recording.paths, _script(_pages(_edit(recording.answer), [9]))) as server:
        fast, reference = _fast(recording, server.port), _pyvmomi(recording, server.port)
    assert fast == reference
    rdm = fast.vm("DC0_C0_RP0_VM0").disks[0]  # type: ignore[union-attr]
    assert (rdm.backing, rdm.rdm, rdm.independent, rdm.thin) == ("rdm", True, True, False)
    assert fast.vm("DC0_C0_RP0_VM1").disks[0].backing == "sesparse"  # type: ignore[union-attr]
    nets = {n.name: n for n in fast.networks}
    assert (nets["DC0_DVPG0"].kind, nets["DC0_DVPG0"].vlan) == ("distributed", None)
    assert nets["DVS0-DVUplinks-9"].kind == "uplink"
    assert fast.vm("Žluťoučký kůň / db") is not None and fast.vm("DC0_C0_RP0_VM2") is None
    erp = fast.vm("erp-app")
    assert erp is not None
    assert (erp.folder, erp.resource_pool, erp.datacenter) == ("apps/2024 % done/erp", "erp", "DC0")


# -- faults and broken answers ------------------------------------------------------------------


def test_soap_faults_become_migrate_errors(recording: Recording) -> None:
    """vcsim's own fault answers: a dead session is an AuthError, a vanished view a TransientError."""
    cases = [(recording.not_authenticated, AuthError, "NotAuthenticated"),
             (recording.not_found, TransientError, "ManagedObjectNotFound"),
             (b"<html>Service Unavailable</html>", TransientError, "HTTP 503")]
    for body, error, words in cases:
        status = 503 if body.startswith(b"<html>") else 500
        with Replayer(recording.paths, {"RetrievePropertiesEx": Reply(body, status)}) as server, \
                pytest.raises(error) as caught:
            _fast(recording, server.port)
        assert words in str(caught.value) and f"127.0.0.1:{server.port}" in str(caught.value)
        assert "\n" not in str(caught.value)


def test_broken_page_is_transient_and_the_result_set_is_released(recording: Recording) -> None:
    """A continuation cut off mid-XML raises TransientError, and the open token is cancelled."""
    first, second = _pages(recording.answer, [4])
    script = {"RetrievePropertiesEx": Reply(first),
              "ContinueRetrievePropertiesEx:t1": Reply(second, truncate=True),
              "CancelRetrievePropertiesEx:t1": Reply(b"<ok/>")}
    with Replayer(recording.paths, script) as server, pytest.raises(TransientError, match="retry"):
        _fast(recording, server.port)
    assert server.seen == ["RetrievePropertiesEx", "ContinueRetrievePropertiesEx:t1",
                           "CancelRetrievePropertiesEx:t1"]


def test_streaming_parser_drops_finished_objects(recording: Recording) -> None:
    """Memory stays flat: parsing 2,000 VMs, the tree holds only the current object and a read-ahead."""
    root = etree.fromstring(recording.answer)
    returnval = root.find(f".//{V}returnval")
    assert returnval is not None
    vm = next(o for o in returnval if o.find(f"{V}obj").get("type") == "VirtualMachine")
    for _ in range(2000):
        returnval.append(copy.deepcopy(vm))
    stream = io.BytesIO(etree.tostring(root))
    assert len(stream.getvalue()) > 10_000_000
    page = vsphere_fast.parse_page(stream)
    held: list[int] = []
    for raw in page:
        assert page.gi_frame is not None
        current = page.gi_frame.f_locals["el"]
        assert current.getprevious() is None and len(current) == 0  # earlier objects gone, this one cleared
        held.append(len(current.getparent()))
        assert raw.moref
    assert len(held) > 2000 and max(held) < 100
