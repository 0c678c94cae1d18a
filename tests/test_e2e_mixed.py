"""End to end on the lab: one plan sends Linux VMs to Proxmox VE and the rest to XCP-ng, through one
executor; then every VM is checked on its target, and a rollback leaves both targets as before."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lab_harness
from lab_harness import Lab, guest_sha256
from migrate.connectors.xcpng import XcpngTarget
from migrate.inventory import XcpngSpec, load_inventory
from migrate.plan import Plan, load_plan

lab = lab_harness.lab
pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def before(lab: Lab) -> dict[str, Any]:
    """Both targets' object counts before anything runs."""
    return {"xcp": lab.control("xapi-fake", "state")["counts"], "pve": _pve_vmids(lab)}


@pytest.fixture(scope="module")
def migrated(lab: Lab, before: dict[str, Any]) -> tuple[Lab, Plan, str]:
    """The mixed-waves playbook planned and run once."""
    lab.migrate(
        "plan", "-i", str(lab.inventory), "-p", "playbooks/mixed-waves.yaml", "-o", "plan.yaml", check=0
    )
    proc = lab.migrate("run", "plan.yaml", "-y", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return lab, load_plan(lab.workdir / "plan.yaml"), proc.stdout


def _pve_vmids(lab: Lab) -> list[int]:
    return sorted(vm["vmid"] for vm in lab.control("fakepve", "state")["vms"])


@pytest.fixture()
def xcp(lab: Lab) -> Iterator[XcpngTarget]:
    spec = load_inventory(lab.inventory).targets["lab-xcp"]
    assert isinstance(spec, XcpngSpec)
    with XcpngTarget("lab-xcp", spec) as target:
        yield target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_plan_uses_both_targets(migrated: tuple[Lab, Plan, str]) -> None:
    """The mixed plan really splits the estate over Proxmox VE and XCP-ng."""
    _, plan, _ = migrated
    assert {v.kind for v in plan.vms} == {"proxmox", "xcpng"}


def test_xcpng_vms_arrive_as_planned(migrated: tuple[Lab, Plan, str], xcp: XcpngTarget) -> None:
    """Each XCP-ng VM has the planned vCPUs, memory, firmware, platform flags, disks in order and MACs."""
    lab, plan, _ = migrated
    call = xcp.session.call
    checked = 0
    for vp in (v for v in plan.vms if v.xcpng is not None):
        assert vp.xcpng is not None
        refs = call("VM.get_by_name_label", vp.xcpng.name_label)
        assert len(refs) == 1, vp.name
        rec = call("VM.get_record", refs[0])
        assert int(rec["VCPUs_max"]) == vp.xcpng.vcpus_max
        assert int(rec["memory_static_max"]) == vp.xcpng.memory_static_max
        for key, value in vp.xcpng.hvm_boot_params:
            assert rec["HVM_boot_params"].get(key) == value, (vp.name, key)
        for key, value in vp.xcpng.platform:
            assert rec["platform"].get(key) == value, (vp.name, key)
        assert any(t.startswith("migrate-") for t in rec["tags"])
        seeded = next(v for v in lab.estate.vms if v.moref == vp.source.moref)
        vbds = sorted((call("VBD.get_record", r) for r in rec["VBDs"]), key=lambda b: int(b["userdevice"]))
        disks = [b for b in vbds if b["type"] == "Disk"]
        assert [b["userdevice"] for b in disks] == [d.slot for d in vp.disks]
        assert disks[0]["bootable"] is True
        vdi_dir = Path(lab_harness.manager.service(lab.state_dir, "xapi-fake").node_root) / "vdis"
        for vbd, seeded_disk in zip(disks, seeded.disks, strict=True):
            uuid = call("VDI.get_uuid", vbd["VDI"])
            assert _sha256(vdi_dir / f"{uuid}.raw") == seeded_disk.sha256, (vp.name, vbd["userdevice"])
        macs = {call("VIF.get_MAC", r).lower() for r in rec["VIFs"]}
        assert {n.mac.lower() for n in vp.nics} <= macs
        assert rec["power_state"] == "Running"
        checked += 1
    assert checked >= 2


def test_proxmox_vms_of_the_same_run_arrive(migrated: tuple[Lab, Plan, str]) -> None:
    """The Proxmox half of the same run holds the source bytes too."""
    lab, plan, _ = migrated
    vms = {vm["name"]: vm for vm in lab.control("fakepve", "state")["vms"]}
    pve = [v for v in plan.vms if v.proxmox is not None]
    assert pve
    for vp in pve:
        seeded = next(v for v in lab.estate.vms if v.moref == vp.source.moref)
        config = vms[vp.name]["config"]
        for disk, seeded_disk in zip(vp.disks, seeded.disks, strict=True):
            image = lab.pve_volume_file(str(config[disk.slot]).split(",", 1)[0])
            assert guest_sha256(image) == seeded_disk.sha256


def test_every_vm_was_verified_by_booting(migrated: tuple[Lab, Plan, str]) -> None:
    """With verify: boot, each VM's verify step saw its guest answer: its migrated disk booted (QEMU)."""
    lab, plan, _ = migrated
    assert plan.options.verify == "boot"
    report = json.loads(lab.migrate("report", _latest_run(lab), "--format", "json", check=0).stdout)
    notes = {v["name"]: next(s["note"] for s in v["steps"] if s["step"] == "verify") for v in report["vms"]}
    assert set(notes) == {v.name for v in plan.vms}
    assert all("guest_agent=True" in note for note in notes.values()), notes


def test_rollback_leaves_targets_as_before(migrated: tuple[Lab, Plan, str], before: dict[str, Any]) -> None:
    """`migrate rollback RUN` removes exactly what the run made: both targets are back to their counts."""
    lab, _, _ = migrated
    runs = json.loads(lab.migrate("report", _latest_run(lab), "--format", "json", check=0).stdout)
    proc = lab.migrate("rollback", runs["run_id"], "-y")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = lab.control("xapi-fake", "state")["counts"]
    assert {k: v for k, v in after.items() if k not in ("task", "session")} == {
        k: v for k, v in before["xcp"].items() if k not in ("task", "session")
    }
    assert _pve_vmids(lab) == before["pve"]


def _latest_run(lab: Lab) -> str:
    listing = lab.migrate("status", check=0).stdout
    ids = [w for line in listing.splitlines() for w in line.replace("│", " ").split() if w.startswith("r2")]
    assert ids, listing
    return ids[-1]
