"""End to end on the lab: plan and run the Linux VMs to Proxmox VE, then look at what landed."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import lab_harness
from lab_harness import Lab, guest_sha256
from migrate.connectors.proxmox import ProxmoxTarget
from migrate.disks.bootcheck import boot_check
from migrate.inventory import ProxmoxSpec, load_inventory
from migrate.plan import load_plan

lab = lab_harness.lab
pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def migrated(lab: Lab) -> tuple[Lab, Path, str]:
    """The linux-to-proxmox playbook planned and run once; later tests inspect the result."""
    lab.migrate(
        "plan", "-i", str(lab.inventory), "-p", "playbooks/linux-to-proxmox.yaml", "-o", "plan.yaml", check=0
    )
    proc = lab.migrate("run", "plan.yaml", "-y", check=0, timeout=600)
    return lab, lab.workdir / "plan.yaml", proc.stdout


def _vms(lab: Lab) -> dict[str, dict]:  # type: ignore[type-arg]
    return {vm["name"]: vm for vm in lab.control("fakepve", "state")["vms"]}


def test_every_planned_vm_arrives_with_its_planned_config(migrated: tuple[Lab, Path, str]) -> None:
    """Each planned VM exists on Proxmox with the plan's CPU, memory, firmware, NICs (MAC kept) and tag."""
    lab, plan_path, _ = migrated
    plan = load_plan(plan_path)
    vms = _vms(lab)
    assert {v.name for v in plan.vms} <= set(vms)
    for vp in plan.vms:
        assert vp.proxmox is not None
        config = vms[vp.name]["config"]
        planned = dict(vp.proxmox.params)
        for key in ("cores", "sockets", "memory", "ostype", "scsihw", "bios", "machine"):
            if key in planned:
                assert str(config[key]) == planned[key], (vp.name, key)
        for nic in vp.nics:
            assert nic.mac.upper() in str(config[nic.slot]).upper(), (vp.name, nic.slot)
        assert vms[vp.name]["vmid"] == vp.proxmox.vmid
        assert any(t.startswith("migrate-") for t in str(config.get("tags", "")).split(";"))
        assert vp.source.moref in str(config.get("description", ""))


def test_disk_bytes_equal_the_source(migrated: tuple[Lab, Path, str]) -> None:
    """Every disk on the target holds exactly the source's guest-visible bytes (snapshot consolidated)."""
    lab, plan_path, _ = migrated
    plan = load_plan(plan_path)
    vms = _vms(lab)
    checked = 0
    for vp in plan.vms:
        seeded = next(v for v in lab.estate.vms if v.moref == vp.source.moref)
        config = vms[vp.name]["config"]
        for disk, seeded_disk in zip(vp.disks, seeded.disks, strict=True):
            volid = str(config[disk.slot]).split(",", 1)[0]
            image = lab.pve_volume_file(volid)
            assert guest_sha256(image) == seeded_disk.sha256, (vp.name, disk.slot)
            checked += 1
    assert checked >= 2


def test_migrated_boot_disk_boots(migrated: tuple[Lab, Path, str]) -> None:
    """The boot disk that landed on the node boots under QEMU and prints the VM's own line."""
    lab, plan_path, _ = migrated
    plan = load_plan(plan_path)
    vp = next(v for v in plan.vms if v.source.name == "web-01")
    seeded = next(v for v in lab.estate.vms if v.name == "web-01")
    config = _vms(lab)[vp.name]["config"]
    image = lab.pve_volume_file(str(config[vp.disks[0].slot]).split(",", 1)[0])
    probe = ["qemu-img", "info", "--output=json", str(image)]
    info = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    assert seeded.serial_line
    result = boot_check(
        image,
        fmt=info["format"],
        firmware=seeded.firmware,
        expect=seeded.serial_line,
        fail_prefix="MIGRATE-LAB-BOOT-OK",
    )
    assert result.line == seeded.serial_line


def test_second_run_of_a_finished_plan_writes_nothing(migrated: tuple[Lab, Path, str]) -> None:
    """Running a finished plan again makes zero target write calls and exits 0."""
    lab, plan_path, _ = migrated
    lab.control("fakepve", "requests", clear=True)
    proc = lab.migrate("run", str(plan_path), "-y", check=0)
    assert "already carried out" in proc.stderr
    writes = [r for r in lab.control("fakepve", "requests") if r[0] not in ("GET", "HEAD")]
    assert writes == []


def test_status_and_report_describe_the_run(migrated: tuple[Lab, Path, str]) -> None:
    """`migrate status` lists the run as done and `report --format json` accounts every VM and byte."""
    lab, plan_path, _ = migrated
    listing = lab.migrate("status", check=0).stdout
    run_id = re.search(r"(r\d{8}-\d{6}-[0-9a-f]{4})", listing)
    assert run_id, listing
    report = json.loads(lab.migrate("report", run_id.group(1), "--format", "json", check=0).stdout)
    plan = load_plan(plan_path)
    assert report["status"] == "done"
    assert {v["name"] for v in report["vms"]} == {v.name for v in plan.vms}
    assert all(v["status"] == "done" for v in report["vms"])
    assert report["bytes_moved"] == sum(d.capacity_bytes for v in plan.vms for d in v.disks)


def test_planning_twice_gives_identical_bytes(lab: Lab) -> None:
    """Two plans of the same lab with the same playbook are byte-identical (before anything moves)."""
    for name in ("det-a.yaml", "det-b.yaml"):
        lab.migrate("plan", "-i", str(lab.inventory), "-p", "playbooks/windows-safe.yaml", "-o", name)
    assert (lab.workdir / "det-a.yaml").read_bytes() == (lab.workdir / "det-b.yaml").read_bytes()


def test_check_reports_no_drift_then_drift(lab: Lab) -> None:
    """`plan --check` finds no drift on an untouched lab, and reports a name taken on the target."""
    plan = lab.workdir / "check.yaml"
    lab.migrate("plan", "-i", str(lab.inventory), "-p", "playbooks/windows-safe.yaml", "-o", str(plan))
    assert lab.migrate("plan", "-i", str(lab.inventory), "--check", str(plan)).returncode == 0
    first = load_plan(plan).vms[0]
    spec = load_inventory(lab.inventory).targets["lab-pve"]
    assert isinstance(spec, ProxmoxSpec)
    with ProxmoxTarget("lab-pve", spec) as pve:
        pve.create_vm("pve2", 990, {"name": first.name})
        try:
            proc = lab.migrate("plan", "-i", str(lab.inventory), "--check", str(plan))
            assert proc.returncode == 3 and "name-taken" in proc.stdout, proc.stdout
        finally:
            pve.destroy_vm("pve2", 990)


def test_altered_plan_is_refused(migrated: tuple[Lab, Path, str]) -> None:
    """A plan edited after review fails its hash check: exit 2, nothing runs."""
    lab, plan_path, _ = migrated
    tampered = lab.workdir / "tampered.yaml"
    tampered.write_text(plan_path.read_text().replace("memory_mib: 2048", "memory_mib: 4096", 1))
    assert tampered.read_text() != plan_path.read_text()
    lab.control("fakepve", "requests", clear=True)
    proc = lab.migrate("run", str(tampered), "-y")
    assert proc.returncode == 2 and "hash" in proc.stderr
    assert lab.control("fakepve", "requests") == []


def test_no_secret_in_plan_state_or_logs(migrated: tuple[Lab, Path, str]) -> None:
    """The lab's passwords and token appear in no plan, state database, log or report."""
    lab, plan_path, _ = migrated
    lab_dir = lab.state_dir / "lab"
    kinds = (".pass", ".secret", ".password")
    files = [p for p in lab_dir.rglob("*") if p.is_file() and (p.suffix in kinds or p.stem == "token")]
    secrets = {p.read_text().strip() for p in files}
    secrets = {s for s in secrets if len(s) >= 8}
    assert secrets, "the lab should have secrets to look for"
    looked = 0
    for path in [plan_path, *lab.state_dir.rglob("*")]:
        if not path.is_file() or lab_dir in path.parents:
            continue
        data = path.read_bytes()
        looked += 1
        for secret in secrets:
            assert secret.encode() not in data, f"a secret is in {path}"
    assert looked >= 3
