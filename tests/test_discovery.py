"""vSphere discovery against vcsim: every model field, both retrieval paths, errors and secrets."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim
from structlog.testing import capture_logs

from migrate.connectors.vsphere import VsphereSource
from migrate.connectors.vsphere_props import unescape
from migrate.errors import AuthError, TlsError, UnreachableError
from migrate.inventory import VsphereSpec
from migrate.lab import certs, vcsim
from migrate.model import SourceInventory, Vm, source_from_dict, source_to_dict
from migrate.secrets import Secret

GIB = 1024**3
PASSWORD = "pa55-Žluť-secret"
RICH = "Žluťoučký kůň / db"
ESCAPED = "backup %25 a%2fb %5c c"  # what vCenter sends for the name 'backup % a/b \ c'
Dev = vim.vm.device


def spec_for(server: vcsim.RunningVcsim, ca: Path | None, *, password: str = PASSWORD,
             verify: bool = True) -> VsphereSpec:
    return VsphereSpec(type="vsphere", host=server.host, port=server.port, user="admin",
                       password=Secret(password, "env:VSPHERE_PASSWORD"), ca_file=ca, verify_tls=verify)


@dataclass
class Lab:
    server: vcsim.RunningVcsim
    ca: Path

    def spec(self, *, password: str = PASSWORD, trusted: bool = True, verify: bool = True) -> VsphereSpec:
        return spec_for(self.server, self.ca if trusted else None, password=password, verify=verify)


def _find(content: vim.ServiceContent, kind: type, name: str) -> vim.ManagedEntity:
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return next(o for o in view.view if o.name == name)
    finally:
        view.Destroy()


def _disk(key: int, controller: int, unit: int, gib: int, file: str, datastore: vim.Datastore, *,
          thin: bool = True, eager: bool = False, mode: str = "persistent",
          sharing: str | None = None) -> Dev.VirtualDisk:
    backing = Dev.VirtualDisk.FlatVer2BackingInfo(fileName=f"[LocalDS_0] zk/{file}", diskMode=mode,
                                                  thinProvisioned=thin, eagerlyScrub=eager,
                                                  datastore=datastore)
    if sharing:
        backing.sharing = sharing
    return Dev.VirtualDisk(key=key, controllerKey=controller, unitNumber=unit, capacityInBytes=gib * GIB,
                           capacityInKB=gib * GIB // 1024, backing=backing)


def _reconfigure(vm: vim.VirtualMachine, *changes: Dev.VirtualDeviceSpec) -> None:
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=list(changes))))


def build_rich_estate(si: vim.ServiceInstance) -> None:
    """VMs with every kind of device the model knows, made with CreateVM/ReconfigVM on vcsim."""
    content = si.RetrieveContent()
    dc = _find(content, vim.Datacenter, "DC0")
    pool = _find(content, vim.ClusterComputeResource, "DC0_C0").resourcePool
    ds = _find(content, vim.Datastore, "LocalDS_0")
    pg = _find(content, vim.dvs.DistributedVirtualPortgroup, "DC0_DVPG0")
    folder = dc.vmFolder.CreateFolder("prod % a/b").CreateFolder("db")
    add = Dev.VirtualDeviceSpec.Operation.add
    dvport = Dev.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
        port=vim.dvs.PortConnection(switchUuid=pg.config.distributedVirtualSwitch.uuid, portgroupKey=pg.key))
    devices = [
        Dev.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing"),
        Dev.VirtualLsiLogicSASController(key=1001, busNumber=1, sharedBus="physicalSharing"),
        Dev.VirtualAHCIController(key=15000, busNumber=0),
        _disk(2000, 1000, 0, 20, "os.vmdk", ds),
        _disk(2001, 1000, 1, 100, "data.vmdk", ds, thin=False, eager=True),
        _disk(2016, 1001, 0, 5, "quorum.vmdk", ds, thin=False, eager=True, mode="independent_persistent",
              sharing="sharingMultiWriter"),
        _disk(16000, 15000, 0, 1, "sata.vmdk", ds),
        Dev.VirtualVmxnet3(key=4000, macAddress="00:50:56:AA:BB:01", addressType="manual", backing=dvport,
                           connectable=Dev.VirtualDevice.ConnectInfo(connected=True, startConnected=True)),
        Dev.VirtualE1000e(key=4001,
                          backing=Dev.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
                          connectable=Dev.VirtualDevice.ConnectInfo(connected=False, startConnected=False)),
        Dev.VirtualCdrom(key=3002, controllerKey=15000, unitNumber=1,
                         backing=Dev.VirtualCdrom.IsoBackingInfo(fileName="[LocalDS_0] iso/debian-12.iso")),
    ]
    changes = [Dev.VirtualDeviceSpec(operation=add, device=d,
                                     fileOperation="create" if isinstance(d, Dev.VirtualDisk) else None)
               for d in devices]
    config = vim.vm.ConfigSpec(
        name=RICH, guestId="debian12_64Guest", numCPUs=4, numCoresPerSocket=2, memoryMB=4096, firmware="efi",
        bootOptions=vim.vm.BootOptions(efiSecureBootEnabled=True), annotation="owner: db team\n<&> ok",
        version="vmx-19", files=vim.vm.FileInfo(vmPathName="[LocalDS_0] zk/zk.vmx"), deviceChange=changes)
    task = folder.CreateVM_Task(config=config, pool=pool)
    WaitForTask(task)
    vm = task.info.result

    # A snapshot chain on the OS disk, as ESXi shows it after two snapshots: base <- 1 <- 2.
    # vcsim runs this task before answering, and its TaskInfo names a non-entity pyvmomi cannot
    # read back: no WaitForTask. A missing file would fail the ReconfigVM below.
    for name in ("os-000001.vmdk", "os-000002.vmdk"):
        content.virtualDiskManager.CreateVirtualDisk_Task(
            name=f"[LocalDS_0] zk/{name}", datacenter=dc,
            spec=vim.VirtualDiskManager.FileBackedVirtualDiskSpec(diskType="thin", adapterType="lsiLogic",
                                                                  capacityKb=1024))
    os_disk = next(d for d in vm.config.hardware.device if d.key == 2000)
    base = os_disk.backing
    middle = Dev.VirtualDisk.FlatVer2BackingInfo(fileName="[LocalDS_0] zk/os-000001.vmdk",
                                                 diskMode="persistent", datastore=ds, parent=base,
                                                 deltaDiskFormat="redoLogFormat")
    os_disk.backing = Dev.VirtualDisk.FlatVer2BackingInfo(
        fileName="[LocalDS_0] zk/os-000002.vmdk", diskMode="persistent", datastore=ds, parent=middle,
        deltaDiskFormat="redoLogFormat", thinProvisioned=False, uuid="6000C29a-0000-0000-0000-000000000002")
    _reconfigure(vm, Dev.VirtualDeviceSpec(operation=Dev.VirtualDeviceSpec.Operation.edit, device=os_disk))
    usb = Dev.VirtualUSB(key=9000, connected=True,
                         backing=Dev.VirtualUSB.USBBackingInfo(deviceName="path:1/0/1"))
    gpu = Dev.VirtualPCIPassthrough(key=13000, backing=Dev.VirtualPCIPassthrough.DeviceBackingInfo(
        id="0000:3b:00.0", deviceId="1eb8", systemId="sys", vendorId=4318, deviceName="NVIDIA T4"))
    # (vcsim 0.24 panics on an RDM backing; test_discovery_paging covers RDMs with an edited recording.)
    for device in (usb, gpu):
        _reconfigure(vm, Dev.VirtualDeviceSpec(operation=add, device=device))
    for name, description in (("before upgrade", "pre-12.4"), ("after/upgrade", "")):
        WaitForTask(vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=False))
    fields = content.customFieldsManager
    # vcsim leaves a global field's 'type' empty, which pyvmomi cannot read back: scope them to VMs.
    owner = fields.AddCustomFieldDef(name="owner", moType=vim.VirtualMachine)
    wave = fields.AddCustomFieldDef(name="wave", moType=vim.VirtualMachine)
    fields.SetField(entity=vm, key=owner.key, value="team-db")
    fields.SetField(entity=vm, key=wave.key, value="2")

    for name, extra in ((ESCAPED, {}), ("golden-image", {"template": True})):
        directory = name.split()[0]
        task = dc.vmFolder.CreateVM_Task(config=vim.vm.ConfigSpec(
            name=name, guestId="windows2019srv_64Guest", numCPUs=2, memoryMB=2048,
            files=vim.vm.FileInfo(vmPathName=f"[LocalDS_0] {directory}/{directory}.vmx")), pool=pool)
        WaitForTask(task)
        if extra:
            task.info.result.MarkAsTemplate()
    WaitForTask(_find(content, vim.VirtualMachine, "DC0_C0_RP0_VM0").PowerOnVM_Task())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    paths = certs.make_certs(tmp_path_factory.mktemp("certs"))
    server = vcsim.start(vcsim.VcsimOptions(vms_per_pool=2, username="admin", password=PASSWORD,
                                            tls_cert=str(paths.cert), tls_key=str(paths.key)))
    try:
        si = SmartConnect(host=server.host, port=server.port, user="admin", pwd=PASSWORD,
                          sslContext=ssl.create_default_context(cafile=str(paths.ca)))
        try:
            build_rich_estate(si)
        finally:
            Disconnect(si)
        yield Lab(server, paths.ca)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def discovered(lab: Lab) -> dict[str, SourceInventory]:
    with VsphereSource("lab", lab.spec()) as source:
        return {"fast": source.discover(), "pyvmomi": source.discover(method="pyvmomi")}


def _vm(inventory: SourceInventory, name: str) -> Vm:
    vm = inventory.vm(name)
    assert vm is not None, f"{name} not discovered; have {[v.name for v in inventory.vms]}"
    return vm


# -- both paths, every field ------------------------------------------------------------------


def test_streaming_and_pyvmomi_paths_give_identical_inventories(
        discovered: dict[str, SourceInventory]) -> None:
    """The hand-parsed SOAP stream and pyvmomi's own deserialisation yield the same inventory."""
    fast, reference = discovered["fast"], discovered["pyvmomi"]
    assert len(fast.vms) == 5 and _vm(fast, RICH).disks  # not vacuous: the rich VM is in both
    assert source_to_dict(fast) == source_to_dict(reference)
    assert fast == reference


def test_rich_vm_identity_placement_and_hardware(discovered: dict[str, SourceInventory]) -> None:
    """Identity, placement, firmware, CPU/memory, notes, attributes and vmx path of a rich VM."""
    vm = _vm(discovered["fast"], RICH)
    assert vm.moref.startswith("vm-") and len(vm.instance_uuid) == 36 and len(vm.bios_uuid) == 36
    assert vm.instance_uuid != vm.bios_uuid
    assert (vm.folder, vm.datacenter, vm.cluster, vm.resource_pool) == (
        "prod % a/b/db", "DC0", "DC0_C0", "Resources")
    assert vm.host in ("DC0_C0_H0", "DC0_C0_H1")
    assert (vm.power_state, vm.template, vm.hw_version) == ("poweredOff", False, "vmx-19")
    assert (vm.guest_id, vm.guest_full_name) == ("debian12_64Guest", "debian12_64Guest")
    assert vm.tools_status == "guestToolsNotRunning"
    assert (vm.firmware, vm.secure_boot) == ("efi", True)
    assert (vm.cpu_sockets, vm.cores_per_socket, vm.vcpus, vm.memory_mib) == (2, 2, 4, 4096)
    assert vm.annotation == "owner: db team\n<&> ok"
    assert vm.custom_attributes == (("owner", "team-db"), ("wave", "2"))
    assert vm.vmx_path == "[LocalDS_0] zk/zk.vmx"


def test_rich_vm_disks(discovered: dict[str, SourceInventory]) -> None:
    """Controllers, bus/unit, sizes, provisioning, modes, sharing and the snapshot chain."""
    disks = {d.key: d for d in _vm(discovered["fast"], RICH).disks}
    assert sorted(disks) == [2000, 2001, 2016, 16000]
    os_disk = disks[2000]
    assert (os_disk.controller, os_disk.bus, os_disk.unit) == ("pvscsi", 0, 0)
    assert os_disk.capacity_bytes == 20 * GIB
    assert os_disk.chain == ("[LocalDS_0] zk/os.vmdk", "[LocalDS_0] zk/os-000001.vmdk",
                             "[LocalDS_0] zk/os-000002.vmdk")
    assert os_disk.path == "[LocalDS_0] zk/os-000002.vmdk" and os_disk.datastore == "LocalDS_0"
    assert (os_disk.backing, os_disk.thin, os_disk.eager_zero) == ("flat", True, False)  # the base is thin
    assert os_disk.uuid == "6000C29a-0000-0000-0000-000000000002"
    data = disks[2001]
    assert (data.controller, data.unit, data.capacity_bytes, data.thin, data.eager_zero) == (
        "pvscsi", 1, 100 * GIB, False, True)
    assert data.chain == ("[LocalDS_0] zk/data.vmdk",) and not (data.shared or data.independent or data.rdm)
    quorum = disks[2016]
    assert (quorum.controller, quorum.bus, quorum.unit) == ("lsilogic-sas", 1, 0)
    assert (quorum.disk_mode, quorum.independent, quorum.shared) == ("independent_persistent", True, True)
    sata = disks[16000]
    assert (sata.controller, sata.bus, sata.unit, sata.capacity_bytes) == ("sata", 0, 0, GIB)


def test_rich_vm_nics_other_devices_and_snapshots(discovered: dict[str, SourceInventory]) -> None:
    """NIC models, MACs, portgroups, connection; CD-ROM, USB, PCI passthrough; the snapshot tree."""
    vm = _vm(discovered["fast"], RICH)
    vmxnet3, e1000e = vm.nics
    assert (vmxnet3.model, vmxnet3.mac, vmxnet3.mac_manual) == ("vmxnet3", "00:50:56:aa:bb:01", True)
    assert (vmxnet3.network, vmxnet3.distributed, vmxnet3.portgroup_key) == (
        "DC0_DVPG0", True, "dvportgroup-13")
    assert (vmxnet3.connected, vmxnet3.start_connected) == (True, True)
    assert (e1000e.model, e1000e.mac_manual, e1000e.network, e1000e.distributed) == (
        "e1000e", False, "VM Network", False)
    assert (e1000e.connected, e1000e.start_connected) == (False, False) and len(e1000e.mac) == 17
    assert vm.cdroms == ("cdrom-3002: [LocalDS_0] iso/debian-12.iso",)
    assert vm.usb == ("usb-9000: path:1/0/1",)
    assert vm.pci_passthrough == ("pcipassthrough-13000: NVIDIA T4",)
    assert [(s.name, s.path, s.description) for s in vm.snapshots] == [
        ("before upgrade", "before upgrade", "pre-12.4"),
        ("after/upgrade", "before upgrade/after/upgrade", ""),
    ]
    assert all(s.moref.startswith("snapshot-") and s.created.endswith("Z") for s in vm.snapshots)
    assert vm.snapshots[0].created <= vm.snapshots[1].created


def test_names_template_power_and_vcsim_own_vms(discovered: dict[str, SourceInventory]) -> None:
    """Escaped names come back exact, templates and powered-on VMs are told apart, vcsim's VMs are there."""
    inventory = discovered["fast"]
    assert unescape(ESCAPED) == "backup % a/b \\ c"
    assert _vm(inventory, "backup % a/b \\ c").folder == ""
    template = _vm(inventory, "golden-image")
    assert (template.template, template.resource_pool, template.firmware) == (True, "", "bios")
    on = _vm(inventory, "DC0_C0_RP0_VM0")
    assert on.power_state == "poweredOn" and _vm(inventory, "DC0_C0_RP0_VM1").power_state == "poweredOff"
    assert on.disks[0].controller == "pvscsi" and on.nics[0].model == "e1000"
    assert on.nics[0].network == "DC0_DVPG0" and on.cdroms
    names = [vm.name for vm in inventory.vms]
    assert names == sorted(names)


def test_hosts_clusters_datastores_networks(discovered: dict[str, SourceInventory]) -> None:
    """The estate around the VMs: hosts in their cluster, datastore capacity, networks by kind."""
    inventory = discovered["fast"]
    assert [(h.name, h.cluster, h.datacenter) for h in inventory.hosts] == [
        ("DC0_C0_H0", "DC0_C0", "DC0"), ("DC0_C0_H1", "DC0_C0", "DC0")]
    assert all(h.cpu_cores > 0 and h.memory_bytes > GIB and h.version == "6.5.0" for h in inventory.hosts)
    assert [(c.name, c.hosts) for c in inventory.clusters] == [("DC0_C0", ("DC0_C0_H0", "DC0_C0_H1"))]
    (ds,) = inventory.datastores
    assert (ds.name, ds.datacenter, ds.accessible) == ("LocalDS_0", "DC0", True)
    assert ds.capacity_bytes > ds.free_bytes > 0 and ds.url
    kinds = {n.name: (n.kind, n.switch, n.vlan) for n in inventory.networks}
    assert kinds["VM Network"] == ("standard", "", None) and kinds["DC0_DVPG0"] == ("distributed", "DVS0", 0)
    assert inventory.api_version == "6.5" and inventory.endpoint.startswith("127.0.0.1:")
    assert len(inventory.instance_uuid) == 36


def test_discovery_is_deterministic_and_round_trips_to_json(lab: Lab,
                                                            discovered: dict[str, SourceInventory]) -> None:
    """A second session discovers the same bytes; the JSON form loads back to the same inventory."""
    with VsphereSource("lab", lab.spec()) as source:
        again = source.discover()
    first = json.dumps(source_to_dict(discovered["fast"]), ensure_ascii=False)
    assert json.dumps(source_to_dict(again), ensure_ascii=False) == first
    assert source_from_dict(json.loads(first)) == again


def test_one_request_per_page_and_logout_always(lab: Lab) -> None:
    """Discovery is a view plus one RetrievePropertiesEx; the session ends even when the block raises."""
    with pytest.raises(RuntimeError), VsphereSource("lab", lab.spec()) as source:
        source.discover()
        assert source.round_trips == 2  # CreateContainerView + RetrievePropertiesEx
        source.discover(method="pyvmomi")
        assert source.round_trips == 3  # the view is reused
        session = source.content.sessionManager.currentSession.key
        raise RuntimeError("the caller fails")
    with VsphereSource("lab", lab.spec()) as other:
        alive = {s.key for s in other.content.sessionManager.sessionList}
        assert other.content.sessionManager.currentSession.key in alive
    assert session not in alive


# -- failures: one line, host:port, a fix, no secret ----------------------------------------


def _one_line_without_secret(exc: BaseException, where: str) -> str:
    message = str(exc)
    assert "\n" not in message and where in message, message
    rendered = "".join(traceback.format_exception(exc))
    assert PASSWORD not in rendered and PASSWORD not in repr(exc.__dict__)
    return message


def test_unreachable_host_is_one_clear_line(lab: Lab) -> None:
    """A closed port raises UnreachableError naming host:port and what to check."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: refused
        spec = VsphereSpec(type="vsphere", host="127.0.0.1", port=port, user="admin",
                           password=Secret(PASSWORD, "env:VSPHERE_PASSWORD"), ca_file=lab.ca)
        with pytest.raises(UnreachableError) as caught, VsphereSource("dc1", spec):
            pass
    message = _one_line_without_secret(caught.value, f"127.0.0.1:{port}")
    assert "connection refused" in message and "check host and port of source 'dc1'" in message


def test_bad_password_is_auth_error_and_never_shows_the_secret(lab: Lab) -> None:
    """Refused login: AuthError naming user, host:port and the password reference; no secret anywhere."""
    wrong = "wrong-" + PASSWORD
    with capture_logs() as logs, pytest.raises(AuthError) as caught, \
            VsphereSource("dc1", lab.spec(password=wrong)):
        pass
    message = _one_line_without_secret(caught.value, f"{lab.server.host}:{lab.server.port}")
    assert "user 'admin'" in message and "env:VSPHERE_PASSWORD" in message
    assert wrong not in "".join(traceback.format_exception(caught.value)) and wrong not in repr(logs)
    assert caught.value.__context__ is None and caught.value.__cause__ is None


def test_untrusted_certificate_is_tls_error_and_opt_out_warns(lab: Lab) -> None:
    """Without the lab CA verification fails with a fix; verify_tls: false works and logs a warning."""
    with pytest.raises(TlsError) as caught, VsphereSource("dc1", lab.spec(trusted=False)):
        pass
    message = _one_line_without_secret(caught.value, f"{lab.server.host}:{lab.server.port}")
    assert "certificate" in message and "ca_file" in message
    with capture_logs() as logs, VsphereSource("dc1", lab.spec(trusted=False, verify=False)) as source:
        assert _vm(source.discover(), RICH).disks
    warnings = [e for e in logs if e["event"] == "tls_verification_disabled"]
    assert warnings and warnings[0]["log_level"] == "warning" and warnings[0]["port"] == lab.server.port
    assert PASSWORD not in repr(logs)


def test_discover_command_prints_the_inventory(lab: Lab, tmp_path: Path) -> None:
    """`migrate discover` reads an inventory with a secret reference and prints the VMs as JSON."""
    (tmp_path / "pw").write_text(PASSWORD + "\n", encoding="utf-8")
    (tmp_path / "inv.yaml").write_text(
        f"sources:\n  lab:\n    type: vsphere\n    host: {lab.server.host}\n    port: {lab.server.port}\n"
        f"    user: admin\n    password: file:pw\n    ca_file: {lab.ca}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "migrate", "--state-dir", str(tmp_path / "state"), "discover",
         "-i", str(tmp_path / "inv.yaml"), "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    found = source_from_dict(json.loads(proc.stdout))
    assert _vm(found, RICH).nics[0].network == "DC0_DVPG0"
    assert PASSWORD not in proc.stdout + proc.stderr


# -- scale -------------------------------------------------------------------------------------


def test_past_a_thousand_vms(tmp_path: Path) -> None:
    """1,200 VMs come back complete, each with its own disk, NIC and placement, identical on both paths."""
    paths = certs.make_certs(tmp_path)
    server = vcsim.start(vcsim.VcsimOptions(vms_per_pool=1200, username="admin", password=PASSWORD,
                                            tls_cert=str(paths.cert), tls_key=str(paths.key)))
    try:
        with VsphereSource("big", spec_for(server, paths.ca)) as source:
            fast = source.discover()
            assert source.round_trips == 2
            reference = source.discover(method="pyvmomi")
    finally:
        server.stop()
    assert len(fast.vms) == 1200 and len({vm.moref for vm in fast.vms}) == 1200
    assert len({vm.instance_uuid for vm in fast.vms}) == 1200
    last = _vm(fast, "DC0_C0_RP0_VM1199")
    assert last.disks[0].path == "[LocalDS_0] DC0_C0_RP0_VM1199/disk1.vmdk" and last.cluster == "DC0_C0"
    assert all(vm.disks and vm.nics and vm.host for vm in fast.vms)
    assert fast == reference
