"""The sample estate: its file loads, it seeds into vcsim as described, its disks hold the expected
bytes (base + snapshot delta included) and boot, and seeding twice changes nothing."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

import fixtures_vcsim
from migrate.disks.bootcheck import boot_check
from migrate.errors import ConfigError
from migrate.lab import estatedisks
from migrate.lab.bootcode import BOOT_MARKER
from migrate.lab.estate import SeededEstate, load_estate, read_seeded, write_seeded

lab_certs = fixtures_vcsim.lab_certs
vcsim_server = fixtures_vcsim.vcsim_server
seeded_lab = fixtures_vcsim.seeded_lab
SeededLab = fixtures_vcsim.SeededLab
DB = "Žluťoučký kůň / db"


def _vms(lab: SeededLab) -> dict[str, vim.VirtualMachine]:
    content = lab.si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return {vm.name: vm for vm in view.view}
    finally:
        view.Destroy()


def _devices(vm: vim.VirtualMachine, kind: type) -> list[Any]:
    return [d for d in vm.config.hardware.device if isinstance(d, kind)]


def _relative(ds_path: str) -> str:
    return ds_path.split("] ", 1)[1]


def test_example_estate_loads() -> None:
    """examples/lab-estate.yaml validates and describes the VMs the lab promises."""
    spec = load_estate(fixtures_vcsim.ESTATE_FILE)
    assert [vm.name for vm in spec.vms] == ["web-01", "win-app-01", DB, "app-02", "tmpl-rhel9"]
    db = spec.vm(DB)
    assert (db.inventory_name, db.tag, len(db.disks)) == ("Žluťoučký kůň %2f db", "Zlutoucky-kun-db", 3)
    assert spec.vm("win-app-01").secure_boot and spec.vm("tmpl-rhel9").template


def test_estate_errors_name_file_line_and_field(tmp_path: Path) -> None:
    """A bad estate file reports every problem at once, each with its line and $.path."""
    bad = tmp_path / "estate.yaml"
    bad.write_text(
        "vms:\n"
        "  - name: a\n"
        "    guest_id: otherGuest\n"
        "    secure_boot: true\n"
        "    disks: [{size_mib: 16}]\n"
        "  - name: b\n"
        "    guest_id: otherGuest\n"
        "    colour: blue\n"
        "    disks: [{size_mib: 4}]\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_estate(bad)
    text = str(err.value)
    assert f"{bad}:2 $.vms[0]: secure_boot needs firmware: efi" in text
    assert f"{bad}:8 $.vms[1].colour: unknown field" in text
    assert f"{bad}:9 $.vms[1].disks[0].size_mib:" in text


def test_seeded_vms_read_back_as_described(seeded_lab: SeededLab) -> None:
    """Every VM reads back from vSphere with the described hardware, network, state and metadata."""
    vms = _vms(seeded_lab)
    fields = {f.key: f.name for f in seeded_lab.si.RetrieveContent().customFieldsManager.field}

    web = vms["web-01"]
    assert (web.config.guestId, web.config.firmware) == ("debian12_64Guest", "bios")
    assert web.config.hardware.numCPU == 2
    assert web.parent.name == "Web" and web.parent.parent.name == "Production"
    assert [type(c).__name__ for c in _devices(web, vim.vm.device.VirtualSCSIController)] == [
        "vim.vm.device.ParaVirtualSCSIController"]
    assert isinstance(_devices(web, vim.vm.device.VirtualEthernetCard)[0], vim.vm.device.VirtualVmxnet3)
    assert web.config.annotation.startswith("Public web front end.\n")
    assert {fields[v.key]: v.value for v in web.customValue} == {"owner": "web-team", "wave": "1"}
    (snap,) = web.snapshot.rootSnapshotList
    assert (snap.name, snap.description) == ("before-upgrade", "Before apt full-upgrade")
    backing = _devices(web, vim.vm.device.VirtualDisk)[0].backing
    assert backing.fileName == "[LocalDS_0] web-01/web-01-000001.vmdk"
    assert backing.deltaDiskFormat == "redoLogFormat"
    assert backing.parent.fileName == "[LocalDS_0] web-01/web-01.vmdk" and backing.parent.parent is None
    assert backing.uuid == backing.parent.uuid == seeded_lab.estate.vm("web-01").disks[0].uuid != ""

    win = vms["win-app-01"]
    assert (win.config.firmware, win.config.bootOptions.efiSecureBootEnabled) == ("efi", True)
    (sas,) = _devices(win, vim.vm.device.VirtualSCSIController)
    assert isinstance(sas, vim.vm.device.VirtualLsiLogicSASController)
    assert isinstance(_devices(win, vim.vm.device.VirtualEthernetCard)[0], vim.vm.device.VirtualE1000e)
    assert [d.capacityInBytes for d in _devices(win, vim.vm.device.VirtualDisk)] == [48 << 20, 16 << 20]

    db = vms["Žluťoučký kůň %2f db"]
    assert len(_devices(db, vim.vm.device.VirtualDisk)) == 3
    assert sorted(c.busNumber for c in _devices(db, vim.vm.device.VirtualSCSIController)) == [0, 1]
    nic = _devices(db, vim.vm.device.VirtualEthernetCard)[0]
    assert isinstance(nic.backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo)
    networks = seeded_lab.si.RetrieveContent().rootFolder.childEntity[0].network
    dvpg = next(n for n in networks if n.name == "DC0_DVPG0")
    assert nic.backing.port.portgroupKey == dvpg.key

    app = vms["app-02"]
    assert app.runtime.powerState == "poweredOn"
    app_nic = _devices(app, vim.vm.device.VirtualEthernetCard)[0]
    assert (app_nic.addressType, app_nic.macAddress) == ("manual", "00:50:56:3f:a1:02")
    (cdrom,) = _devices(app, vim.vm.device.VirtualCdrom)
    assert cdrom.backing.fileName == "[LocalDS_0] iso/debian-12.5.0-amd64-netinst.iso"

    tmpl = vms["tmpl-rhel9"]
    assert tmpl.config.template and tmpl.config.guestId == "rhel9_64Guest"

    seeded = seeded_lab.estate
    assert seeded.vm("web-01").moref == web._moId and seeded.vm(DB).moref == db._moId
    assert seeded.vm(DB).inventory_name == db.name


def test_datastore_files_hold_the_expected_bytes(seeded_lab: SeededLab) -> None:
    """Every uploaded file reads back over HTTP with its recorded sha256; Range reads return exact bytes."""
    files = [f for vm in seeded_lab.estate.vms for d in vm.disks for f in d.files]
    assert len(files) == 18  # 8 disks x (descriptor + flat) + web-01's delta descriptor and extent
    with seeded_lab.http() as http:
        for file in files:
            assert fixtures_vcsim.file_sha256(http, _relative(file.path)) == file.sha256, file.path

        plan = estatedisks.plan_vm(seeded_lab.spec.vm(DB))
        flat = plan.disks[1].files[1]
        assert isinstance(flat.content, estatedisks.Layout)
        tail = flat.content.chunks[-1]
        got = fixtures_vcsim.range_bytes(http, _relative(f"[x] {flat.path}"), tail.offset - 100, 4196)
        assert got == flat.content.read(tail.offset - 100, 4196) and got[:100] == bytes(100)
        descriptor = http.read_bytes(_relative(seeded_lab.estate.vm(DB).disks[2].descriptor)).decode("utf-8")
    assert 'createType="monolithicFlat"' in descriptor
    assert 'RW 32768 FLAT "Žluťoučký kůň %2f db_2-flat.vmdk" 0' in descriptor


def test_disks_without_snapshots_are_their_flat_extent(seeded_lab: SeededLab) -> None:
    """For a disk with no snapshot, guest-visible content is exactly the flat extent."""
    for vm in seeded_lab.estate.vms:
        for disk in vm.disks:
            if len(disk.chain) == 1:
                flat = next(f for f in disk.files if f.path.endswith("-flat.vmdk"))
                assert disk.sha256 == disk.base_sha256 == flat.sha256


def _download_chain(lab: SeededLab, disk: Any, into: Path) -> Path:
    with lab.http() as http:
        for file in disk.files:
            http.download(_relative(file.path), into / _relative(file.path).rsplit("/", 1)[1], resume=False)
    return into / _relative(disk.descriptor).rsplit("/", 1)[1]


def _raw_sha256(image: Path, out: Path) -> str:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def test_snapshot_chain_consolidates_and_boots(seeded_lab: SeededLab, tmp_path: Path) -> None:
    """web-01's base + vmfsSparse delta read as one disk with the expected sha256 that boots its own line,
    while the base alone prints the pre-snapshot line."""
    disk = seeded_lab.estate.vm("web-01").disks[0]
    top = _download_chain(seeded_lab, disk, tmp_path)
    info = json.loads(subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(top)],
                                     check=True, capture_output=True, text=True).stdout)
    assert [i["format-specific"]["data"]["create-type"] for i in info] == ["vmfsSparse", "vmfs"]

    consolidated = tmp_path / "web-01.raw"
    assert _raw_sha256(top, consolidated) == disk.sha256 != disk.base_sha256
    boot_check(consolidated, fmt="raw", firmware="bios", expect=disk.serial_line or "",
               timeout=30, fail_prefix=BOOT_MARKER)
    base = tmp_path / "web-01.vmdk"
    assert disk.base_serial_line == "MIGRATE-LAB-BOOT-OK web-01.pre-snapshot"
    boot_check(base, fmt="vmdk", firmware="bios", expect=disk.base_serial_line,
               timeout=30, fail_prefix=BOOT_MARKER)


def test_non_ascii_vm_boots_from_its_vmdk(seeded_lab: SeededLab, tmp_path: Path) -> None:
    """The VM with a non-ASCII, slashed name boots its own line straight from its downloaded VMDK."""
    vm = seeded_lab.estate.vm(DB)
    disk = vm.boot_disk
    assert disk is not None and vm.serial_line == "MIGRATE-LAB-BOOT-OK Zlutoucky-kun-db"
    top = _download_chain(seeded_lab, disk, tmp_path)
    assert top.name == "Žluťoučký kůň %2f db.vmdk"
    boot_check(top, fmt="vmdk", firmware="bios", expect=vm.serial_line,
               timeout=30, fail_prefix=BOOT_MARKER)


def test_efi_vm_boots_from_its_vmdk(seeded_lab: SeededLab, tmp_path: Path) -> None:
    """win-app-01's boot disk boots under OVMF from the datastore's VMDK and prints its line."""
    vm = seeded_lab.estate.vm("win-app-01")
    assert vm.boot_disk is not None and vm.boot_disk.firmware == "efi"
    top = _download_chain(seeded_lab, vm.boot_disk, tmp_path)
    boot_check(top, fmt="vmdk", firmware="efi", expect=vm.serial_line or "",
               timeout=90, fail_prefix=BOOT_MARKER)


def test_seeding_twice_changes_nothing(seeded_lab: SeededLab, tmp_path: Path) -> None:
    """A second seeding makes no change, reports none, and returns the same estate; JSON round-trips."""
    before = len(_vms(seeded_lab))
    again = seeded_lab.seed_again()
    assert again.changes == ()
    assert again == seeded_lab.estate.without_changes()
    assert len(_vms(seeded_lab)) == before
    web = _vms(seeded_lab)["web-01"]
    assert len(web.customValue) == 2  # SetField was not called again (vcsim would append)

    path = tmp_path / "seeded.json"
    write_seeded(seeded_lab.estate, path)
    loaded: SeededEstate = read_seeded(path)
    assert loaded == seeded_lab.estate
    assert "Žluťoučký kůň / db" in path.read_text(encoding="utf-8")
