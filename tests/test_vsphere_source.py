"""The executor's vSphere source against vcsim holding the lab estate: identity checks, power
policies, disk files of flat disks and snapshot chains, ranged reads, TLS and cut connections."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import vim

import fixtures_vcsim
from migrate.connectors.base import DatastoreFile, DiskSpec, Source, VmSpec
from migrate.connectors.vsphere import VsphereSource
from migrate.connectors.vsphere_source import VsphereExecSource
from migrate.errors import NotFoundError, PermanentError, StepError, TlsError, TransientError
from migrate.inventory import VsphereSpec
from migrate.lab import certs
from migrate.lab.estate import SeededDisk
from migrate.model import Vm
from migrate.plan import source_facts
from migrate.secrets import Secret

lab_certs = fixtures_vcsim.lab_certs
vcsim_server = fixtures_vcsim.vcsim_server
seeded_lab = fixtures_vcsim.seeded_lab
SeededLab = fixtures_vcsim.SeededLab
DB = "Žluťoučký kůň / db"


def _spec(lab: SeededLab, *, port: int | None = None, ca: Path | None = None) -> VsphereSpec:
    return VsphereSpec(type="vsphere", host=lab.server.host, port=port or lab.server.port,
                       user=fixtures_vcsim.USER, password=Secret(fixtures_vcsim.PASSWORD, "env:VC_PASSWORD"),
                       ca_file=ca or lab.ca)


@pytest.fixture(scope="module")
def discovered(seeded_lab: SeededLab) -> dict[str, Vm]:
    """The estate as discovery reports it (what a plan is made from), by VM name."""
    with VsphereSource("vc-lab", _spec(seeded_lab)) as vsphere:
        return {vm.name: vm for vm in vsphere.discover().vms}


@pytest.fixture(scope="module")
def source(seeded_lab: SeededLab) -> Iterator[VsphereExecSource]:
    with VsphereExecSource("vc-lab", _spec(seeded_lab), poll_s=0.05) as src:
        yield src


def vm_spec(vm: Vm) -> VmSpec:
    """A VmSpec as executor.fromplan builds it from the plan's SourceFacts."""
    facts = source_facts(vm)
    return VmSpec(key=vm.moref, name=vm.name, source="vc-lab", source_moref=facts.moref, target="pve",
                  target_kind="proxmox", source_name=facts.name, datacenter=facts.datacenter,
                  source_uuid=facts.instance_uuid)


def disk_spec(vm: Vm, index: int) -> DiskSpec:
    disk = vm.disks[index]
    return DiskSpec(key=str(disk.key), label=disk.label, size_bytes=disk.capacity_bytes,
                    source_path=disk.path, storage="local-lvm", slot=f"scsi{index}", datacenter=vm.datacenter,
                    datastore=disk.datastore, source_backing=disk.backing, source_chain=disk.chain)


def _seeded_disk(lab: SeededLab, name: str, index: int) -> SeededDisk:
    return lab.estate.vm(name).disks[index]


def _power(lab: SeededLab, moref: str) -> str:
    return str(vim.VirtualMachine(moref, lab.si._stub).runtime.powerState)


@pytest.fixture
def app02_running(seeded_lab: SeededLab) -> Iterator[str]:
    """app-02's moref; whatever a test does to it, it is running again afterwards."""
    moref = seeded_lab.estate.vm("app-02").moref
    assert _power(seeded_lab, moref) == "poweredOn"
    yield moref
    if _power(seeded_lab, moref) != "poweredOn":
        WaitForTask(vim.VirtualMachine(moref, seeded_lab.si._stub).PowerOnVM_Task())


def _sha256(src: VsphereExecSource, file: DatastoreFile, offset: int = 0) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    with src.open_file(file, offset) as reader:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            total += len(chunk)
    return digest.hexdigest(), total


# -- identity and power ---------------------------------------------------------------------


def test_power_state_of_each_lab_vm(source: VsphereExecSource, discovered: dict[str, Vm]) -> None:
    """Each lab VM's power state reads as the estate seeded it, and the class satisfies base.Source."""
    assert isinstance(source, Source)
    states = {name: source.power_state(vm_spec(vm)) for name, vm in discovered.items()}
    assert states == {"web-01": "off", "win-app-01": "off", DB: "off", "app-02": "on", "tmpl-rhel9": "off"}


def test_guest_shutdown_powers_app02_off(seeded_lab: SeededLab, source: VsphereExecSource,
                                         discovered: dict[str, Vm], app02_running: str) -> None:
    """Policy guest asks the guest to shut down and waits: vcsim reports app-02 poweredOff afterwards."""
    spec = vm_spec(discovered["app-02"])
    assert source.power_off(spec, "guest", timeout_s=10) == "off"
    assert _power(seeded_lab, app02_running) == "poweredOff"
    assert source.power_state(spec) == "off"
    assert source.power_off(spec, "guest", timeout_s=10) == "off"  # already off: nothing to do, no fault
    assert source.power_on(spec) == "on" and _power(seeded_lab, app02_running) == "poweredOn"


def test_policies_never_and_require_off_leave_the_vm_running(
    seeded_lab: SeededLab, source: VsphereExecSource, discovered: dict[str, Vm], app02_running: str
) -> None:
    """never returns the state as is; require-off refuses a running VM with a StepError; both keep it on."""
    spec = vm_spec(discovered["app-02"])
    assert source.power_off(spec, "never", timeout_s=1) == "on"
    with pytest.raises(StepError, match="'app-02' is on; shutdown policy require-off") as err:
        source.power_off(spec, "require-off", timeout_s=1)
    assert err.value.vm == spec.key and err.value.hint
    assert _power(seeded_lab, app02_running) == "poweredOn"
    off = vm_spec(discovered["web-01"])
    assert source.power_off(off, "require-off", timeout_s=1) == "off"


def test_force_and_a_suspended_guest(seeded_lab: SeededLab, source: VsphereExecSource,
                                     discovered: dict[str, Vm], app02_running: str) -> None:
    """force powers off at once; guest leaves a suspended VM suspended, guest-then-force powers it off."""
    spec = vm_spec(discovered["app-02"])
    assert source.power_off(spec, "force", timeout_s=1) == "off"
    assert _power(seeded_lab, app02_running) == "poweredOff"
    assert source.power_on(spec) == "on"
    WaitForTask(vim.VirtualMachine(app02_running, seeded_lab.si._stub).SuspendVM_Task())
    assert source.power_state(spec) == "suspended"
    assert source.power_off(spec, "guest", timeout_s=0.2) == "suspended"
    assert _power(seeded_lab, app02_running) == "suspended"
    assert source.power_off(spec, "guest-then-force", timeout_s=0.2) == "off"
    assert _power(seeded_lab, app02_running) == "poweredOff"


def test_a_different_vm_at_the_moref_is_never_touched(seeded_lab: SeededLab, source: VsphereExecSource,
                                                      discovered: dict[str, Vm], app02_running: str) -> None:
    """A VM whose moref exists but whose instance uuid differs from the plan's is refused, and stays on."""
    other_uuid = discovered["web-01"].instance_uuid
    impostor = replace(vm_spec(discovered["app-02"]), source_uuid=other_uuid)
    for call in (lambda: source.power_state(impostor), lambda: source.power_off(impostor, "force", 1),
                 lambda: source.disk_files(impostor, disk_spec(discovered["app-02"], 0))):
        with pytest.raises(NotFoundError) as err:
            call()
        assert f"not the planned 'app-02' (instance uuid {other_uuid})" in str(err.value)
        assert "run migrate plan again" in str(err.value)
    assert _power(seeded_lab, app02_running) == "poweredOn"
    # A plan without uuids falls back on the name: the right name passes, another is refused.
    legacy = replace(vm_spec(discovered["app-02"]), source_uuid="")
    assert source.power_state(legacy) == "on"
    with pytest.raises(NotFoundError, match="is 'app-02'"):
        source.power_state(replace(legacy, source_name="app-03"))


def test_a_vm_gone_from_vsphere_is_not_found(source: VsphereExecSource, discovered: dict[str, Vm]) -> None:
    """A moref vSphere no longer knows gives NotFoundError naming the VM, the moref and the fix."""
    gone = replace(vm_spec(discovered["web-01"]), source_moref="vm-424242")
    with pytest.raises(NotFoundError) as err:
        source.power_state(gone)
    text = str(err.value)
    assert "source VM 'web-01' (vm-424242) is no longer in vSphere" in text and "migrate plan again" in text
    assert err.value.vm == gone.key and err.value.system == "vc-lab"


# -- disk files and bytes -------------------------------------------------------------------


def test_snapshot_chain_lists_descriptors_and_extents(seeded_lab: SeededLab, source: VsphereExecSource,
                                                      discovered: dict[str, Vm]) -> None:
    """web-01's disk is its chain, base first: descriptor, flat extent, delta descriptor, COWD extent."""
    web = discovered["web-01"]
    files = source.disk_files(vm_spec(web), disk_spec(web, 0))
    seeded = _seeded_disk(seeded_lab, "web-01", 0)
    assert [(f.path, f.size_bytes) for f in files] == [(f.path, f.size) for f in seeded.files]
    assert [f.path.rsplit("/", 1)[1] for f in files] == [
        "web-01.vmdk", "web-01-flat.vmdk", "web-01-000001.vmdk", "web-01-000001-delta.vmdk"]
    assert {f.datacenter for f in files} == {"DC0"}
    with source.open_file(files[3]) as reader:
        assert reader.read(4) == b"COWD"
    with source.open_file(files[2]) as reader:
        assert 'parentFileNameHint="web-01.vmdk"' in reader.read().decode()
    for file, expected in zip(files, seeded.files, strict=True):
        assert _sha256(source, file) == (expected.sha256, expected.size), file.path


def test_flat_disks_are_their_extent_alone(seeded_lab: SeededLab, source: VsphereExecSource,
                                           discovered: dict[str, Vm]) -> None:
    """Every disk without snapshots is one -flat file whose bytes are exactly the guest's disk."""
    for name in ("win-app-01", DB, "app-02", "tmpl-rhel9"):
        vm = discovered[name]
        for index, seeded in enumerate(seeded_lab.estate.vm(name).disks):
            (file,) = source.disk_files(vm_spec(vm), disk_spec(vm, index))
            assert file.path == next(f.path for f in seeded.files if f.path.endswith("-flat.vmdk"))
            assert file.size_bytes == seeded.capacity_bytes
            assert _sha256(source, file) == (seeded.sha256, seeded.capacity_bytes), file.path


def test_reads_from_a_middle_offset_return_exactly_the_rest(seeded_lab: SeededLab, source: VsphereExecSource,
                                                             discovered: dict[str, Vm]) -> None:
    """open_file at an odd middle offset gives the file's bytes from there; prefix + rest hash to the file."""
    db = discovered[DB]
    seeded = _seeded_disk(seeded_lab, DB, 2)  # the monolithicFlat disk, non-ASCII and %2f in its path
    (file,) = source.disk_files(vm_spec(db), disk_spec(db, 2))
    offset = file.size_bytes // 2 + 12_345
    with source.open_file(file) as reader:
        prefix = reader.read(offset)
    assert len(prefix) == offset
    with source.open_file(file, offset) as reader:
        head = reader.read(70_000)
        rest = head + reader.read()
    assert hashlib.sha256(prefix + rest).hexdigest() == seeded.sha256
    relative = file.path.split("] ", 1)[1]
    with seeded_lab.http() as http:
        assert head == fixtures_vcsim.range_bytes(http, relative, offset, 70_000)
    with source.open_file(file, file.size_bytes) as reader:
        assert reader.read() == b""


def test_a_snapshot_taken_since_planning_is_refused(source: VsphereExecSource,
                                                    discovered: dict[str, Vm]) -> None:
    """A disk planned before its snapshot (the base as top) is refused rather than read stale."""
    web = discovered["web-01"]
    stale = disk_spec(web, 0)
    base = stale.source_chain[0]
    stale = replace(stale, source_path=base, source_chain=(base,))
    with pytest.raises(PermanentError, match="a snapshot was taken, reverted or consolidated since planning"):
        source.disk_files(vm_spec(web), stale)
    with pytest.raises(NotFoundError, match="no disk with key 4242"):
        source.disk_files(vm_spec(web), replace(stale, key="4242"))


def test_missing_file_is_not_found(source: VsphereExecSource) -> None:
    """A datastore file that is not there is a NotFoundError naming it (HTTP 404), not a retry."""
    with pytest.raises(NotFoundError, match=r"\[LocalDS_0\] gone/gone-flat.vmdk .*HTTP 404"):
        source.open_file(DatastoreFile("[LocalDS_0] gone/gone-flat.vmdk", 1024, "DC0"), 512)


def test_datacenter_inside_a_folder(seeded_lab: SeededLab, discovered: dict[str, Vm]) -> None:
    """When the datacenter sits in a folder, files are read with its inventory path as dcPath."""
    content = seeded_lab.si.RetrieveContent()
    (dc,) = [e for e in content.rootFolder.childEntity if isinstance(e, vim.Datacenter)]
    region = content.rootFolder.CreateFolder("Region Ž")
    try:
        WaitForTask(region.MoveIntoFolder_Task([dc]))
        vm = discovered["win-app-01"]
        with VsphereExecSource("vc-lab", _spec(seeded_lab)) as src:
            (file,) = src.disk_files(vm_spec(vm), disk_spec(vm, 1))
            assert file.datacenter == "Region Ž/DC0"
            seeded = _seeded_disk(seeded_lab, "win-app-01", 1)
            assert _sha256(src, file) == (seeded.sha256, seeded.capacity_bytes)
    finally:
        WaitForTask(content.rootFolder.MoveIntoFolder_Task([dc]))
        WaitForTask(region.Destroy_Task())


# -- TLS and transport faults ---------------------------------------------------------------


def test_tls_verified_with_the_lab_ca(seeded_lab: SeededLab, discovered: dict[str, Vm],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads verify with ca_file though REQUESTS_CA_BUNDLE names another CA; a wrong CA is a TlsError."""
    other = certs.make_certs(tmp_path / "other")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other.ca))
    web = discovered["web-01"]
    with VsphereExecSource("vc-lab", _spec(seeded_lab)) as src:
        files = src.disk_files(vm_spec(web), disk_spec(web, 0))
        assert _sha256(src, files[0]) == (seeded_lab.estate.vm("web-01").disks[0].files[0].sha256,
                                          files[0].size_bytes)
    with pytest.raises(TlsError, match="cannot verify the TLS certificate"), \
            VsphereExecSource("vc-lab", _spec(seeded_lab, ca=other.ca)):
        pass


class _CuttingProxy:
    """A TCP relay to vcsim that drops each new connection after ``budget`` bytes towards the client."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.budget: int | None = None
        self.cuts = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.budget), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if budget is not None and sent + len(data) > budget:
                    dst.sendall(data[: budget - sent])
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (src, dst):  # shutdown, not just close: the other pump is blocked in recv on it
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._server.close()


def test_a_cut_connection_is_transient_and_resumes_at_the_offset(seeded_lab: SeededLab) -> None:
    """A read whose connection drops raises TransientError; reopening where it stopped completes the file."""
    disk = _seeded_disk(seeded_lab, "win-app-01", 1)
    seeded: Any = next(f for f in disk.files if f.path.endswith("-flat.vmdk"))
    proxy = _CuttingProxy((seeded_lab.server.host, seeded_lab.server.port))
    try:
        with VsphereExecSource("vc-lab", _spec(seeded_lab, port=proxy.port)) as src:
            proxy.budget = 3 << 20  # connections opened from now on (the datastore reads) are cut
            file = DatastoreFile(seeded.path, seeded.size, "DC0")
            digest, offset, faults = hashlib.sha256(), 0, []
            while offset < file.size_bytes:
                try:
                    with src.open_file(file, offset) as reader:
                        while chunk := reader.read(256 << 10):
                            digest.update(chunk)
                            offset += len(chunk)
                except TransientError as exc:
                    faults.append(exc)
                    assert len(faults) < 20
    finally:
        proxy.close()
    assert offset == seeded.size and digest.hexdigest() == seeded.sha256
    assert len(faults) >= 4 and proxy.cuts >= 4
