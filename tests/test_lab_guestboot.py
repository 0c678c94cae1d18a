"""Lab guests really boot: fakepve and the XAPI fake boot a started VM's disk under QEMU, and the
guest agent (XCP-ng: guest metrics) answers only once the disk printed its boot line."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from migrate.connectors.base import CreatedObject, DiskLanding, DiskSpec, Intent, NicSpec, TargetVm, VmSpec
from migrate.connectors.proxmox import ProxmoxTarget
from migrate.connectors.proxmox_target import ProxmoxExecTarget
from migrate.connectors.xcpng import XcpngTarget
from migrate.inventory import ProxmoxSpec, XcpngSpec
from migrate.lab import bootdisk
from migrate.lab.certs import CertPaths, make_certs
from migrate.lab.guestboot import GuestBoots, GuestDisk
from migrate.lab.pve import MIGRATE_PRIVILEGES, RunningPve, default_seed, start_pve
from migrate.lab.xapi_fake import XapiFake
from migrate.lab.xapi_fake.server import control as xapi_control
from migrate.secrets import Secret

MiB = 1024 * 1024
GiB = 1024 * MiB
NODE = "pve1"
T = TypeVar("T")


def _wait(what: str, probe: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout:g} s")


def _gone(pid: int) -> bool:
    """True once the process no longer runs: gone, or dead and waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _corrupt(image: Path) -> None:
    """Random bytes over the first MiB: no MBR, no boot code, no partition table."""
    with open(image, "r+b") as f:
        f.write(os.urandom(MiB))


# -- fakepve ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pve:
    lab: RunningPve
    api: ProxmoxTarget
    target: ProxmoxExecTarget
    imports: Path  # the node directory behind local:import/


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _start_pve(work: Path, certs: CertPaths) -> Pve:
    # The documented role plus the right to see whether a guest's agent answers (PVE 9).
    seed = dataclasses.replace(default_seed(), privileges=(*MIGRATE_PRIVILEGES, "VM.GuestAgent.Audit"))
    lab = start_pve(work / "lab", certs, seed=seed)
    key = work / "unused-ssh-key"  # the node shells are not used here; the spec wants a key file
    key.write_text("")
    entry = lab.inventory_entry({"user": "root", "key_file": str(key), "hosts": {NODE: "127.0.0.1"}})
    spec = ProxmoxSpec.model_validate(entry)
    imports = lab.node_root / "var/lib/vz/import"
    return Pve(lab, ProxmoxTarget("lab", spec), ProxmoxExecTarget("lab", spec), imports)


@pytest.fixture(scope="module")
def pve(tmp_path_factory: pytest.TempPathFactory, certs: CertPaths) -> Iterator[Pve]:
    running = _start_pve(tmp_path_factory.mktemp("pve"), certs)
    try:
        yield running
    finally:
        running.api.close()
        running.target.close()
        running.lab.stop()


def _pve_vm(pve: Pve, vmid: int, name: str, disk: bootdisk.BootDisk, *, corrupt: bool = False) -> TargetVm:
    """A VM whose scsi0 is imported (import-from) from a raw file holding ``disk``'s bytes."""
    image = pve.imports / f"{name}.raw"
    disk.layout.write_raw(image)
    if corrupt:
        _corrupt(image)
    config: dict[str, Any] = {
        "name": name, "agent": "1", "memory": 512, "boot": "order=scsi0",
        "scsi0": f"local-lvm:0,import-from=local:import/{image.name}",
    }  # fmt: skip
    if disk.firmware == "efi":
        config.update(bios="ovmf", machine="q35")
    pve.api.create_vm(NODE, vmid, config)
    return TargetVm("lab", str(vmid), name, node=NODE)


def _serial(pve: Pve, vm: TargetVm) -> dict[str, Any]:
    return pve.lab.control("serial", vmid=int(vm.id))  # type: ignore[no-any-return]


def _settled(pve: Pve, vm: TargetVm) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        found = _serial(pve, vm)
        return found if found and found["phase"] in ("booted", "failed") else None

    return probe


def test_pve_started_vm_boots_its_imported_disk_and_then_its_agent_answers(pve: Pve) -> None:
    """An imported BIOS disk boots on start, then the agent answers; a stop kills QEMU and the agent."""
    vm = _pve_vm(pve, 301, "web-01", bootdisk.bios_disk("web-01", 16))
    assert _serial(pve, vm) is None  # created, never started: nothing boots
    pve.api.start_vm(NODE, 301)
    state = _wait("the guest agent", lambda: (s := pve.target.vm_state(vm)).guest_agent and s)
    assert (state.power, state.disk_slots) == ("on", ("scsi0",))
    boot = _serial(pve, vm)
    assert (boot["phase"], boot["firmware"]) == ("booted", "bios")
    assert boot["expect"] == "MIGRATE-LAB-BOOT-OK web-01" and boot["expect"] in boot["serial"].splitlines()
    assert boot["image"] == str(pve.lab.node_root / "dev/pve/vm-301-disk-0")  # the bytes the import wrote
    osinfo = pve.api.api.get(f"nodes/{NODE}/qemu/301/agent/get-osinfo")["result"]
    assert osinfo["pretty-name"] == "migrate lab guest (MIGRATE-LAB-BOOT-OK web-01)"

    pid = boot["pid"]
    assert not _gone(pid)
    pve.api.stop_vm(NODE, 301)
    assert _gone(pid)  # killed and reaped before the stop task ended
    assert pve.target.vm_state(vm).guest_agent is False
    assert _serial(pve, vm)["phase"] == "stopped"

    pve.api.start_vm(NODE, 301)  # a new start is a new boot, with a new QEMU
    again = _wait("the second boot", _settled(pve, vm))
    assert again["phase"] == "booted" and again["generation"] > boot["generation"] and again["pid"] != pid
    pve.api.stop_vm(NODE, 301)
    pve.api.destroy_vm(NODE, 301)
    assert _gone(again["pid"])
    assert _wait("the guest to be forgotten", lambda: _serial(pve, vm) is None)


def test_pve_disk_that_does_not_boot_never_gets_an_answering_agent(pve: Pve) -> None:
    """Corrupted or foreign bytes never get an answering agent and the serial says why; EFI boots."""
    broken = _pve_vm(pve, 302, "broken", bootdisk.bios_disk("broken", 16), corrupt=True)
    other = _pve_vm(pve, 303, "db-01", bootdisk.bios_disk("web-01", 16))  # web-01's bytes
    efi = _pve_vm(pve, 304, "app-01", bootdisk.efi_disk("app-01", 32))
    pve.lab.control("guests_set", timeout=6)  # a guest's timeout is fixed when its QEMU starts
    try:
        pve.api.start_vm(NODE, int(broken.id))
        _wait("broken's QEMU", lambda: _serial(pve, broken)["pid"])
    finally:
        pve.lab.control("guests_set", timeout=120)
    for vm in (other, efi):
        pve.api.start_vm(NODE, int(vm.id))
    wrong = _wait("db-01's verdict", _settled(pve, other))
    assert wrong["phase"] == "failed" and "printed 'MIGRATE-LAB-BOOT-OK web-01'" in wrong["reason"]
    failed = _wait("broken's verdict", _settled(pve, broken))
    assert failed["phase"] == "failed" and "did not appear within 6 s" in failed["reason"]
    assert "Boot failed: not a bootable disk" in failed["serial"]  # SeaBIOS, on COM1
    assert failed["pid"] is None  # QEMU is not left spinning
    booted = _wait("app-01's verdict", _settled(pve, efi), timeout=40)
    assert (booted["phase"], booted["firmware"]) == ("booted", "efi")
    for vm in (broken, other):
        state = pve.target.vm_state(vm)
        assert (state.power, state.guest_agent) == ("on", False)
    assert pve.target.vm_state(efi).guest_agent is True


def test_pve_boot_expect_names_the_line_of_a_renamed_vm(pve: Pve) -> None:
    """A VM named unlike its disk's tag boots once the lab is told which line to expect."""
    pve.lab.control("boot_expect", vmid=305, tag="src-name")
    vm = _pve_vm(pve, 305, "mig-src-name", bootdisk.bios_disk("src-name", 16))
    pve.api.start_vm(NODE, 305)
    assert _wait("the boot", _settled(pve, vm))["phase"] == "booted"
    assert _wait("the agent", lambda: pve.target.vm_state(vm).guest_agent)


@pytest.mark.parametrize("ending", ["terminate", "kill"])
def test_no_qemu_outlives_the_fake(tmp_path: Path, certs: CertPaths, ending: str) -> None:
    """fakepve stopped (SIGTERM) or killed (SIGKILL) takes its guests' QEMUs with it."""
    lab = _start_pve(tmp_path, certs)
    try:
        vm = _pve_vm(lab, 310, "web-01", bootdisk.bios_disk("web-01", 16))
        lab.api.start_vm(NODE, 310)
        pid = _wait("the boot", _settled(lab, vm))["pid"]
        assert pid and not _gone(pid)
    finally:
        lab.api.close()
        lab.target.close()
        if ending == "kill" and lab.lab.process is not None:
            lab.lab.process.kill()
            lab.lab.process.wait()
        lab.lab.stop()
    # A killed fake cannot reap: the kernel kills QEMU (parent-death signal) and init reaps it.
    _wait("QEMU to go", lambda: _gone(pid), timeout=10)


# -- the XAPI fake ------------------------------------------------------------------------------


def _xcp_vm(name: str, disk: bootdisk.BootDisk) -> tuple[VmSpec, DiskSpec]:
    spec = DiskSpec(
        key="2000", label="Hard disk 1", size_bytes=disk.size, source_path=f"[ds1] {name}/{name}.vmdk",
        storage="nfs-sr", slot="0", boot=True, landing_format="raw", name=f"{name} disk 0",
    )  # fmt: skip
    memory = str(2 * GiB)
    settings = (
        ("name_label", name), ("memory_static_min", memory), ("memory_static_max", memory),
        ("memory_dynamic_min", memory), ("memory_dynamic_max", memory), ("hvm_boot_policy", "BIOS order"),
        ("hvm_boot_params:order", "c"),
        ("hvm_boot_params:firmware", "uefi" if disk.firmware == "efi" else "bios"),
    )  # fmt: skip
    vm = VmSpec(
        key=f"vm-{name}", name=name, source="vc1", source_moref=f"vm-{name}", target="lab-xcp",
        target_kind="xcpng", template="Debian Bookworm 12", settings=settings, disks=(spec,),
        nics=(NicSpec(key="4000", mac="00:50:56:AA:BB:01", network="apps-vlan20", slot="0"),),
    )  # fmt: skip
    return vm, spec


def _xcp_target(fake: XapiFake) -> XcpngTarget:
    spec = XcpngSpec(type="xcpng", url=fake.url, user="root", ca_file=fake.ca_file,
                     password=Secret(fake.password, "env:XCPNG_PASSWORD"))  # fmt: skip
    return XcpngTarget("lab-xcp", spec)


def _intent(name: str) -> Intent:
    return Intent(run_id="Run-1", vm=f"vm-{name}", kind="create_vm", key=name, note=lambda k, v: None)


def _xcp_build(
    target: XcpngTarget, name: str, disk: bootdisk.BootDisk
) -> tuple[TargetVm, DiskLanding, list[CreatedObject]]:
    """A VM made by the connector, its disk uploaded raw through import_raw_vdi and attached."""
    vm, disk_spec = _xcp_vm(name, disk)
    intent = _intent(name)
    handle, created = target.create_vm(vm, intent)
    landing = target.prepare_disk(vm, disk_spec, intent)
    sink = target.receive_disk(landing)
    for piece in disk.layout.iter_bytes():
        sink.write(piece)
    sink.close()
    attached = target.attach_disks(handle, [(disk_spec, landing)], intent)
    return handle, landing, [*created, *attached]


def _xcp_serial(fake: XapiFake, vm: str) -> dict[str, Any]:
    return xapi_control(fake.xapi, "serial", {"vm": vm})  # type: ignore[no-any-return]


def test_xapi_efi_vm_boots_its_uploaded_vdi_and_then_reports_guest_metrics(tmp_path: Path) -> None:
    """An uploaded EFI VDI boots with OVMF; guest_metrics appear after the line and go at the halt."""
    with XapiFake(tmp_path / "xapi") as fake, _xcp_target(fake) as target:
        handle, landing, made = _xcp_build(target, "app01", bootdisk.efi_disk("app01", 32))
        target.start_vm(handle, _intent(handle.name))
        assert target.vm_state(handle).guest_agent is False  # OVMF takes seconds to get there
        state = _wait("guest metrics", lambda: (s := target.vm_state(handle)).guest_agent and s, 40)
        assert (state.power, state.disk_slots) == ("on", ("0",))

        (ref, record) = next(iter(fake.find("VM", uuid=handle.id).items()))
        metrics = fake.objects("VM_guest_metrics")[record["guest_metrics"]]
        assert metrics["PV_drivers_detected"] is True and metrics["live"] is True
        assert metrics["os_version"]["name"] == "migrate lab guest (MIGRATE-LAB-BOOT-OK app01)"
        assert set(metrics["networks"]) == {"0/ip", "0/ipv4/0"}
        boot = _xcp_serial(fake, handle.id)
        assert (boot["phase"], boot["firmware"]) == ("booted", "efi")
        assert boot["image"] == str(fake.vdi_path(landing.ref))  # the bytes the upload wrote
        assert "MIGRATE-LAB-BOOT-OK app01" in boot["serial"].splitlines()

        target.remove(made)  # hard_shutdown, then destroy
        assert _gone(boot["pid"])
        assert fake.objects("VM_guest_metrics") == {} and ref not in fake.objects("VM")
        assert xapi_control(fake.xapi, "guests", {}) == {}


def test_xapi_vm_whose_disk_does_not_boot_keeps_guest_metrics_null(tmp_path: Path) -> None:
    """A corrupted BIOS disk never prints its line: guest_metrics stay NULL and no QEMU is left."""
    with XapiFake(tmp_path / "xapi") as fake, _xcp_target(fake) as target:
        xapi_control(fake.xapi, "guests_set", {"timeout": 4})
        handle, landing, made = _xcp_build(target, "db01", bootdisk.bios_disk("db01", 16))
        _corrupt(fake.vdi_path(landing.ref))
        target.start_vm(handle, _intent(handle.name))
        pid = _wait("QEMU", lambda: _xcp_serial(fake, "db01")["pid"])
        failed = _wait("the verdict", lambda: (b := _xcp_serial(fake, "db01"))["phase"] == "failed" and b)
        assert "did not appear within 4 s" in failed["reason"]
        assert "Boot failed: not a bootable disk" in failed["serial"]
        assert _gone(pid)  # a guest that failed does not keep a QEMU
        assert target.vm_state(handle).guest_agent is False
        assert next(iter(fake.find("VM", uuid=handle.id).values()))["guest_metrics"] == "OpaqueRef:NULL"
        target.remove(made)


# -- the boot queue -----------------------------------------------------------------------------


def test_at_most_two_guests_boot_at_once_and_the_rest_queue(tmp_path: Path) -> None:
    """Two guests that never boot hold both slots until their timeout; a third waits queued, then boots."""
    good, bad = tmp_path / "good.raw", tmp_path / "bad.raw"
    bootdisk.bios_disk("good", 16).layout.write_raw(good)
    bootdisk.bios_disk("bad", 16).layout.write_raw(bad)
    _corrupt(bad)
    booted: list[tuple[str, float]] = []
    guests = GuestBoots(lambda key, _generation: booted.append((key, time.monotonic())), timeout=3)
    try:
        started = time.monotonic()
        guests.boot("bad-1", GuestDisk(bad, "raw", "bios", "MIGRATE-LAB-BOOT-OK bad"))
        guests.boot("bad-2", GuestDisk(bad, "raw", "bios", "MIGRATE-LAB-BOOT-OK bad"))
        _wait("both bad guests to boot", lambda: {s.phase for s in guests.statuses().values()} == {"booting"})
        guests.timeout = 60  # for the good guest: its QEMU starts later
        generation = guests.boot("good", GuestDisk(good, "raw", "bios", "MIGRATE-LAB-BOOT-OK good"))
        time.sleep(1)
        status = guests.status("good")
        assert status is not None and (status.phase, status.pid) == ("queued", None)
        _wait("the good guest", lambda: booted)
        assert booted[0][0] == "good" and booted[0][1] - started >= 3  # only after a slot freed
        assert guests.is_current("good", generation)
        assert {k: s.phase for k, s in guests.statuses().items()} == {
            "bad-1": "failed", "bad-2": "failed", "good": "booted"}  # fmt: skip
        pid = guests.status("good").pid  # type: ignore[union-attr]
        assert pid is not None
    finally:
        guests.close()
    assert _gone(pid)
