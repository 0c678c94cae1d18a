"""Kill -9 a real run at many points (inside a transfer, between create and attach, during a task
wait, inside an XCP-ng upload...), then `migrate resume`: it completes with one VM, no orphan
landing or VDI, and the source's bytes on the target."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lab_harness
from lab_harness import Lab, guest_sha256
from migrate.connectors.xcpng import XcpngTarget
from migrate.inventory import XcpngSpec, load_inventory
from migrate.plan import Plan, load_plan

lab = lab_harness.lab
pytestmark = pytest.mark.lab

DB = "Žluťoučký kůň / db"  # three flat disks: the streamed path
WEB = "web-01"  # a snapshot chain: the staged path
WIN = "win-app-01"  # EFI, two disks, to XCP-ng

# (target, VM, where the run is killed)
SCENARIOS = [
    ("lab-pve", DB, "intent:prepare_disk"),
    ("lab-pve", DB, "transfer-chunk:5"),
    ("lab-pve", DB, "step-done:transfer"),
    ("lab-pve", DB, "intent:create_vm"),
    ("lab-pve", DB, "task-wait"),
    ("lab-pve", DB, "settle:create_vm"),
    ("lab-pve", DB, "step-done:create_vm"),
    ("lab-pve", DB, "settle:attach_disks"),
    ("lab-pve", DB, "intent:start_vm"),
    ("lab-pve", WEB, "step-done:export"),
    ("lab-pve", WEB, "transfer-chunk:2"),
    ("lab-xcp", WIN, "xapi-upload-chunk:3"),
    ("lab-xcp", WIN, "step-done:transfer"),
    ("lab-xcp", WIN, "settle:create_vm"),
    ("lab-xcp", WIN, "settle:attach_disks"),
]

NETWORKS = {
    "lab-pve": {"VM Network": "vmbr0", "DC0_DVPG0": "vmbr1/20"},
    "lab-xcp": {"VM Network": "Pool-wide network associated with eth0", "DC0_DVPG0": "apps-vlan20"},
}
STORAGES = {"lab-pve": {"LocalDS_0": "local-lvm"}, "lab-xcp": {"LocalDS_0": "nfs-sr"}}


def _playbook(path: Path, index: int, target: str, vm: str) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "name": f"crash-{index}",
                "select": {"include": [{"vms": [vm]}]},
                "targets": {"default": target},
                "network_map": {target: NETWORKS[target]},
                "storage_map": {target: STORAGES[target]},
                "waves": [{"name": "only", "concurrency": 1}],
                "vmid": {"start": 400 + 10 * index, "end": 409 + 10 * index},
                "naming": {"template": f"{{name}}-crash{index}"},
                "options": {"shutdown": "never", "verify": "running"},
            },
            allow_unicode=True,
        )
    )


def _run_until_killed(lab: Lab, plan: Path, point: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MIGRATE_STATE_DIR=str(lab.state_dir), MIGRATE_FAILPOINTS=point)
    return subprocess.run(
        [sys.executable, "-m", "migrate", "run", str(plan), "-y"],
        cwd=lab.workdir, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_proxmox(lab: Lab, plan: Plan, run_id: str) -> None:
    vp = plan.vms[0]
    vms = [vm for vm in lab.control("fakepve", "state")["vms"] if vm["name"] == vp.name]
    assert len(vms) == 1, f"{len(vms)} VMs named {vp.name}"
    config = vms[0]["config"]
    seeded = next(v for v in lab.estate.vms if v.moref == vp.source.moref)
    for disk, seeded_disk in zip(vp.disks, seeded.disks, strict=True):
        image = lab.pve_volume_file(str(config[disk.slot]).split(",", 1)[0])
        assert guest_sha256(image) == seeded_disk.sha256, disk.slot
    tag = "migrate-" + run_id.lower()
    orphans = [p for p in lab.node_root.rglob(f"*{tag}*") if p.is_file()]
    assert orphans == [], orphans


def _check_xcpng(lab: Lab, plan: Plan, run_id: str) -> None:
    vp = plan.vms[0]
    spec = load_inventory(lab.inventory).targets["lab-xcp"]
    assert isinstance(spec, XcpngSpec)
    seeded = next(v for v in lab.estate.vms if v.moref == vp.source.moref)
    vdi_dir = Path(lab_harness.manager.service(lab.state_dir, "xapi-fake").node_root) / "vdis"
    tag = "migrate-" + run_id.lower()
    with XcpngTarget("lab-xcp", spec) as xcp:
        call = xcp.session.call
        refs = call("VM.get_by_name_label", vp.name)
        assert len(refs) == 1, f"{len(refs)} VMs named {vp.name}"
        vdis = [r for r in call("VDI.get_all_records").values() if tag in r["tags"]]
        assert len(vdis) == len(vp.disks), "duplicate or missing VDIs"
        vbds = [call("VBD.get_record", r) for r in call("VM.get_VBDs", refs[0])]
        disks = sorted((b for b in vbds if b["type"] == "Disk"), key=lambda b: int(b["userdevice"]))
        for vbd, seeded_disk in zip(disks, seeded.disks, strict=True):
            assert _sha256(vdi_dir / f"{call('VDI.get_uuid', vbd['VDI'])}.raw") == seeded_disk.sha256


@pytest.mark.parametrize(
    ("index", "scenario"), list(enumerate(SCENARIOS)), ids=[s[2] + "@" + s[0] for s in SCENARIOS]
)
def test_kill_then_resume_completes_without_duplicates(
    lab: Lab, index: int, scenario: tuple[str, str, str]
) -> None:
    """Killed with SIGKILL at the point, the run resumes to one VM, no orphans, equal checksums."""
    target, vm, point = scenario
    playbook = lab.workdir / f"crash-{index}.yaml"
    plan_path = lab.workdir / f"crash-{index}.plan.yaml"
    _playbook(playbook, index, target, vm)
    lab.migrate("plan", "-i", str(lab.inventory), "-p", str(playbook), "-o", str(plan_path), check=0)
    killed = _run_until_killed(lab, plan_path, point)
    assert killed.returncode == -9, f"the run was not killed at {point}:\n{killed.stdout}\n{killed.stderr}"
    plan = load_plan(plan_path)
    runs = lab.migrate("status", check=0).stdout
    run_id = re.findall(r"(r\d{8}-\d{6}-[0-9a-f]{4})\s.*" + re.escape(plan_path.name), runs)
    assert len(run_id) == 1, runs
    again = lab.migrate("run", str(plan_path), "-y")
    assert again.returncode == 2 and f"migrate resume {run_id[0]}" in again.stderr
    lab.migrate("resume", run_id[0], check=0, timeout=300)
    (_check_proxmox if target == "lab-pve" else _check_xcpng)(lab, plan, run_id[0])
