"""build_plan: golden cases, determinism, blockers, warnings, placement, plan files, drift, rendering.

Golden cases live in tests/planner_cases/<case>/ (inventory.json, targets.json, playbook.yaml,
plan.yaml). After an intended change to the planner, regenerate the expected plans with
``MIGRATE_REGEN_GOLDEN=1 pytest tests/test_planner.py -k golden`` and review the diff.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from migrate import planner
from migrate.errors import PlanError
from migrate.model import (
    ExistingVm,
    Snapshot,
    Storage,
    TargetNetwork,
    TargetSnapshot,
    Vm,
    source_from_dict,
    target_from_dict,
)
from migrate.plan import Plan, drift, dump_plan, load_plan, loads_plan, sha256_of
from migrate.plan_render import render, summarize
from migrate.planner import build_plan
from migrate.playbook import Playbook, load_playbook
from planner_builders import (
    GiB,
    disk,
    lab_source,
    lab_targets,
    lab_vms,
    nic,
    node,
    pve_target,
    source,
    vm,
)

CASES = Path(__file__).parent / "planner_cases"
REGEN = os.environ.get("MIGRATE_REGEN_GOLDEN") == "1"


def _case_plan(case: Path, monkeypatch: pytest.MonkeyPatch) -> Plan:
    monkeypatch.chdir(case)  # the plan records the playbook path as given: keep it relative
    source = source_from_dict(json.loads(Path("inventory.json").read_text(encoding="utf-8")))
    snaps: list[TargetSnapshot] = [target_from_dict(t) for t in json.loads(Path("targets.json").read_text())]
    return build_plan(
        source, load_playbook("playbook.yaml"), {t.name: t for t in snaps}, inventory_file="inventory.json"
    )


@pytest.mark.parametrize("case", sorted(p for p in CASES.iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_golden(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan for each case is byte-identical to the reviewed plan.yaml, and loads back unchanged."""
    text = dump_plan(_case_plan(case, monkeypatch))
    expected = case / "plan.yaml"
    if REGEN:
        expected.write_text(text, encoding="utf-8")
    assert text == expected.read_text(encoding="utf-8")
    assert dump_plan(loads_plan(text)) == text


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (
            "linux-to-proxmox.yaml",
            {"web-01": "lab-pve", "app-02": "lab-pve", "Žluťoučký kůň / db": "lab-pve"},
        ),
        ("windows-safe.yaml", {"win-app-01": "lab-pve"}),
        (
            "mixed-waves.yaml",
            {
                "web-01": "lab-pve",
                "app-02": "lab-pve",
                "Žluťoučký kůň / db": "lab-xcp",
                "win-app-01": "lab-xcp",
            },
        ),
    ],
)
def test_sample_playbooks_plan_the_lab_without_blockers(sample: str, expected: dict[str, str]) -> None:
    """Each shipped playbook plans the lab estate onto the lab targets with nothing blocked."""
    playbook = load_playbook(Path(__file__).parents[1] / "playbooks" / sample)
    plan = build_plan(lab_source(), playbook, lab_targets())
    assert {v.source.name: v.target for v in plan.vms} == expected
    assert plan.blocked == ()


# -- helpers ----------------------------------------------------------------------------------

XCP_NET = "Pool-wide network associated with eth0"


def pb(**over: Any) -> Playbook:
    """A playbook for the lab targets; keyword arguments replace top-level sections."""
    base: dict[str, Any] = {
        "name": "t",
        "select": {"include": [{"names": ["*"]}]},
        "targets": {"default": "lab-pve"},
        "network_map": {
            "lab-pve": {"VM Network": "vmbr0", "DC0_DVPG0": "vmbr1/20"},
            "lab-xcp": {"VM Network": XCP_NET, "DC0_DVPG0": "apps-vlan20"},
        },
        "storage_map": {
            "lab-pve": {"LocalDS_0": ["local-lvm", "nfs-shared"]},
            "lab-xcp": {"LocalDS_0": ["Local storage", "nfs-sr"]},
        },
    }
    base.update(over)
    return Playbook.model_validate(base)


def plan_of(*vms: Vm, snaps: dict[str, TargetSnapshot] | None = None, **over: Any) -> Plan:
    """Plan ``vms`` against the lab targets (or ``snaps``); ``over`` replaces playbook sections."""
    return build_plan(source(*vms), pb(**over), snaps if snaps is not None else lab_targets())


def codes(plan: Plan, name: str) -> set[str]:
    """Blocker codes of a blocked VM (by source name); fails if the VM was planned."""
    assert name not in {v.source.name for v in plan.vms}, f"{name} was planned"
    (b,) = [b for b in plan.blocked if b.name == name]
    assert all(i.hint for i in b.blockers), "every blocker says what to fix"
    return {i.code for i in b.blockers}


def warned(plan: Plan, name: str) -> set[str]:
    (v,) = [v for v in plan.vms if v.source.name == name]
    return {i.code for i in v.warnings}


def planned(plan: Plan, name: str) -> Any:
    (v,) = [v for v in plan.vms if v.source.name == name]
    return v


def one(name: str = "solo", n: int = 900, **kw: Any) -> Vm:
    base: dict[str, Any] = {
        "nics": (nic(0, mac=f"00:50:56:09:00:{n % 256:02x}"),),
        "disks": (disk(0, 10, vm=name),),
    }
    base.update(kw)
    return vm(name, f"vm-{n}", **base)


WIN = {"guest_id": "windows2019srv_64Guest", "guest_full_name": "Microsoft Windows Server 2019 (64-bit)"}


# -- blockers -----------------------------------------------------------------------------------


def _targets(**kw: Any) -> dict[str, TargetSnapshot]:
    t = lab_targets()
    for name, change in kw.items():
        t[name.replace("_", "-")] = change(t[name.replace("_", "-")])
    return t


BLOCKER_CASES: list[Any] = [
    ("template", lambda: ([one(template=True)], {}, None)),
    (
        "rdm-disk",
        lambda: ([one(disks=(disk(0, 10, vm="s"), disk(1, 10, vm="s", backing="rdm", rdm=True)))], {}, None),
    ),
    ("shared-disk", lambda: ([one(disks=(disk(0, 10, vm="s", shared=True),))], {}, None)),
    (
        "independent-disk",
        lambda: ([one(disks=(disk(0, 10, vm="s", disk_mode="independent_nonpersistent"),))], {}, None),
    ),
    ("pci-passthrough", lambda: ([one(pci_passthrough=("PCI device 0",))], {}, None)),
    ("unmapped-network", lambda: ([one(nics=(nic(0, network="Nope"),))], {}, None)),
    ("missing-network", lambda: ([one()], {"network_map": {"lab-pve": {"VM Network": "vmbr7"}}}, None)),
    ("unmapped-datastore", lambda: ([one(disks=(disk(0, 10, vm="s", datastore="Other"),))], {}, None)),
    ("missing-storage", lambda: ([one()], {"storage_map": {"lab-pve": {"*": ["local-lvm", "gone"]}}}, None)),
    (
        "missing-storage",
        lambda: (
            [one()],
            {"storage_map": {"lab-pve": {"*": "local-lvm"}}},
            _targets(
                lab_pve=lambda t: replace(
                    t,
                    storages=tuple(
                        replace(s, active=False) if s.name == "local-lvm" else s for s in t.storages
                    ),
                )
            ),
        ),
    ),
    (
        "missing-storage",
        lambda: (
            [one()],
            {"storage_map": {"lab-pve": {"*": "local"}}},
            _targets(
                lab_pve=lambda t: replace(
                    t,
                    storages=tuple(
                        replace(s, content=("iso",)) if s.name == "local" else s for s in t.storages
                    ),
                )
            ),
        ),
    ),
    (
        "name-collision",
        lambda: ([one()], {}, _targets(lab_pve=lambda t: replace(t, vms=(ExistingVm("SOLO", 101),)))),
    ),
    (
        "vmid-collision",
        lambda: (
            [one()],
            {"vmid": {"fixed": {"solo": 100}}},
            _targets(lab_pve=lambda t: replace(t, vms=(ExistingVm("x", 100),))),
        ),
    ),
    ("no-node-room", lambda: ([one(memory_mib=1024 * 1024)], {}, None)),
    ("no-node-room", lambda: ([one(cpu_sockets=8, cores_per_socket=8)], {}, None)),
    ("no-storage-room", lambda: ([one(disks=(disk(0, 3000, vm="s"),))], {}, None)),
    ("unknown-target", lambda: ([one()], {"targets": {"default": "lab-elsewhere"}}, None)),
    (
        "no-target",
        lambda: ([one()], {"targets": {"rules": [{"match": {"names": "zzz"}, "target": "lab-pve"}]}}, None),
    ),
    ("no-wave", lambda: ([one()], {"waves": [{"name": "a", "select": {"names": "zzz"}}]}, None)),
    ("too-many-disks", lambda: ([one(disks=tuple(disk(i, 1, vm="s") for i in range(7)), **WIN)], {}, None)),
    ("too-many-disks", lambda: ([one(disks=tuple(disk(i, 1, vm="s") for i in range(32)))], {}, None)),
    (
        "too-many-disks",
        lambda: (
            [one(disks=tuple(disk(i, 1, vm="s") for i in range(17)))],
            {"targets": {"default": "lab-xcp"}},
            None,
        ),
    ),
    (
        "too-many-nics",
        lambda: ([one(nics=tuple(nic(i) for i in range(8)))], {"targets": {"default": "lab-xcp"}}, None),
    ),
    (
        "vlan-on-xcpng",
        lambda: (
            [one()],
            {"targets": {"default": "lab-xcp"}, "network_map": {"lab-xcp": {"VM Network": "apps/20"}}},
            None,
        ),
    ),
    (
        "missing-template",
        lambda: (
            [one()],
            {"targets": {"default": "lab-xcp"}},
            _targets(lab_xcp=lambda t: replace(t, templates=t.templates[:1])),
        ),
    ),
    (
        "unknown-node",
        lambda: (
            [one()],
            {"targets": {"rules": [{"match": {"names": "*"}, "target": "lab-pve", "nodes": ["pve9"]}]}},
            None,
        ),
    ),
]


@pytest.mark.parametrize(
    ("code", "setup"), BLOCKER_CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(BLOCKER_CASES)]
)
def test_blockers(code: str, setup: Callable[[], tuple[list[Vm], dict[str, Any], Any]]) -> None:
    """Each blocker keeps the VM out of the plan, with its code, a message and a fix."""
    vms, over, targets = setup()
    plan = plan_of(*vms, snaps=targets, **over)
    assert code in codes(plan, vms[0].name)
    assert plan.vms == ()
    assert all(not w.vms for w in plan.waves)


def test_every_catalogued_issue_is_tested() -> None:
    """Each blocker and warning code in the planner's catalog has a case in the tables here."""
    assert {c for c, _ in BLOCKER_CASES} | {"vmid-exhausted"} == set(planner.BLOCKERS)
    assert {c for c, _ in WARNING_CASES} == set(planner.WARNINGS)


def test_planned_names_collide_case_insensitively() -> None:
    """Two VMs whose target names differ only in case: the first in name order keeps the name."""
    plan = plan_of(one("Web"), one("web", 901))
    assert planned(plan, "Web").name == "Web"
    assert codes(plan, "web") == {"name-collision"}


def test_pinned_vmid_twice_blocks_the_second() -> None:
    """Two VMs pinned to the same VMID: the one earlier in run order gets it."""
    plan = plan_of(one("a"), one("b", 901), vmid={"fixed": {"a": 150, "vm-901": 150}})
    assert planned(plan, "a").proxmox.vmid == 150
    assert codes(plan, "b") == {"vmid-collision"}


def test_exhausted_vmid_range_releases_the_capacity() -> None:
    """A VM blocked for want of a VMID gives its node memory and storage back."""
    plan = plan_of(one("a"), one("b", 901), vmid={"start": 100, "end": 101})
    assert planned(plan, "a").proxmox.vmid == 101  # 100 is legacy-app01's
    assert codes(plan, "b") == {"vmid-exhausted"}
    assert sum(n.vms for n in plan.nodes) == 1
    assert sum(s.bytes for s in plan.storages) == 10 * GiB


# -- warnings ------------------------------------------------------------------------------------

WARNING_CASES: list[Any] = [
    ("snapshots", lambda: (one(snapshots=(Snapshot("snapshot-1", "s", "s", "2025-01-01"),)), {})),
    ("powered-on-no-shutdown", lambda: (one(power_state="poweredOn"), {"options": {"shutdown": "never"}})),
    (
        "powered-on-require-off",
        lambda: (one(power_state="poweredOn"), {"options": {"shutdown": "require-off"}}),
    ),
    ("suspended", lambda: (one(power_state="suspended"), {})),
    ("tools-missing", lambda: (one(tools_status="toolsNotInstalled"), {})),
    ("dropped-devices", lambda: (one(cdroms=("CD/DVD drive 1",), usb=("USB 1",)), {})),
    ("no-virtio-drivers", lambda: (one(**WIN), {"options": {"windows_first_boot": "virtio"}})),
    ("tpm", lambda: (one(guest_id="windows11_64Guest", firmware="efi", secure_boot=True), {})),
    (
        "secure-boot-xcpng",
        lambda: (one(firmware="efi", secure_boot=True), {"targets": {"default": "lab-xcp"}}),
    ),
    ("template-fallback", lambda: (one(guest_id="rhel9_64Guest"), {"targets": {"default": "lab-xcp"}})),
    (
        "windows-xcp-disks",
        lambda: (
            one(disks=tuple(disk(i, 1, vm="s") for i in range(4)), **WIN),
            {"targets": {"default": "lab-xcp"}},
        ),
    ),
    ("no-disks", lambda: (one(disks=()), {})),
]


@pytest.mark.parametrize(("code", "setup"), WARNING_CASES, ids=[c for c, _ in WARNING_CASES])
def test_warnings(code: str, setup: Callable[[], tuple[Vm, dict[str, Any]]]) -> None:
    """Each warning is attached to the planned VM with a message and a hint."""
    v, over = setup()
    plan = plan_of(v, **over)
    assert code in warned(plan, v.name)
    assert all(w.message for w in planned(plan, v.name).warnings)


def test_a_plain_vm_has_no_warnings() -> None:
    """A powered-off VM with tools, no snapshots and no extra devices plans without warnings."""
    assert warned(plan_of(one()), "solo") == set()


def test_virtio_mode_uses_virtio_for_vms_with_drivers() -> None:
    """In virtio mode a Windows VM listed under virtio_drivers gets virtio; the others fall back to safe."""
    with_drivers = one("with", 901, custom_attributes=(("virtio", "yes"),), **WIN)
    plan = plan_of(
        with_drivers,
        one("without", 902, **WIN),
        options={"windows_first_boot": "virtio", "virtio_drivers": {"attributes": {"virtio": "yes"}}},
    )
    fast, safe = planned(plan, "with"), planned(plan, "without")
    assert (fast.disks[0].slot, fast.nics[0].model, dict(fast.proxmox.params)["scsihw"]) == (
        "scsi0",
        "virtio",
        "virtio-scsi-single",
    )
    assert (safe.disks[0].slot, safe.nics[0].model, "scsihw" in dict(safe.proxmox.params)) == (
        "sata0",
        "e1000e",
        False,
    )
    assert warned(plan, "with") == set() and warned(plan, "without") == {"no-virtio-drivers"}


# -- target configuration ---------------------------------------------------------------------


def test_proxmox_linux_config_is_complete_api_syntax() -> None:
    """A Linux BIOS VM becomes a complete POST /qemu call once the executor fills in the images."""
    web, *_ = lab_vms()
    v = planned(plan_of(web, storage_map={"lab-pve": {"LocalDS_0": "local-lvm"}}), "web-01")
    assert v.proxmox.api_params(v.disks, {"scsi0": "/var/tmp/migrate/web-01-disk0.raw"}) == {
        "vmid": "101",
        "name": "web-01",
        "description": "Migrated from vSphere by migrate.\nsource: lab-vc / DC0\noriginal name: web-01\n"
        "moref: vm-101\ninstance uuid: 50000000-0000-0000-0000-000000000101",
        "ostype": "l26",
        "machine": "pc",
        "bios": "seabios",
        "cpu": "x86-64-v2-AES",
        "sockets": "1",
        "cores": "2",
        "memory": "2048",
        "scsihw": "virtio-scsi-single",
        "net0": "virtio=00:50:56:01:00:01,bridge=vmbr0",
        "boot": "order=scsi0;net0",
        "agent": "enabled=1",
        "smbios1": "uuid=42000000-0000-0000-0000-000000000101",
        "tags": "migrate",
        "scsi0": "local-lvm:0,import-from=/var/tmp/migrate/web-01-disk0.raw,format=raw,discard=on,iothread=1",
    }
    (d,) = v.disks
    assert (d.descriptor, d.chain, d.method, d.datacenter, d.datastore, d.bootable) == (
        "[LocalDS_0] web-01/web-01-000001.vmdk",
        ("[LocalDS_0] web-01/web-01.vmdk", "[LocalDS_0] web-01/web-01-000001.vmdk"),
        "ssh-import",
        "DC0",
        "LocalDS_0",
        True,
    )


def test_proxmox_windows_efi_secure_boot_config() -> None:
    """Windows EFI with Secure Boot: OVMF on q35 with keys, SATA disks, e1000e, TPM for Windows 11."""
    _, win, *_ = lab_vms()
    win11 = replace(win, name="w11", moref="vm-111", guest_id="windows11_64Guest")
    plan = plan_of(win, win11, storage_map={"lab-pve": {"LocalDS_0": "local-lvm"}})
    p = dict(planned(plan, "win-app-01").proxmox.params)
    assert (p["ostype"], p["machine"], p["bios"], p["efidisk0"], p["net0"], p["boot"]) == (
        "win11",
        "q35",
        "ovmf",
        "local-lvm:1,format=raw,efitype=4m,pre-enrolled-keys=1",
        "e1000e=00:50:56:01:00:02,bridge=vmbr0",
        "order=sata0;net0",
    )
    assert "scsihw" not in p and "tpmstate0" not in p
    assert [d.slot for d in planned(plan, "win-app-01").disks] == ["sata0", "sata1"]
    assert dict(planned(plan, "w11").proxmox.params)["tpmstate0"] == "local-lvm:1,version=v2.0"


def test_efi_without_secure_boot_enrols_no_keys() -> None:
    """EFI with Secure Boot off gets an efidisk without pre-enrolled keys."""
    p = dict(planned(plan_of(one(firmware="efi")), "solo").proxmox.params)
    assert p["efidisk0"].endswith("pre-enrolled-keys=0") and p["machine"] == "q35"


def test_xcpng_windows_config() -> None:
    """On XCP-ng: template, VCPUs, equal memory limits, UEFI with Secure Boot and viridian, VBDs and VIFs."""
    _, win, *_ = lab_vms()
    v = planned(plan_of(win, targets={"default": "lab-xcp"}), "win-app-01")
    x = v.xcpng
    assert (x.template, x.name_label, x.vcpus_max, x.vcpus_at_startup) == (
        "Windows Server 2022 (64-bit)",
        "win-app-01",
        4,
        4,
    )
    assert {x.memory_static_min, x.memory_static_max, x.memory_dynamic_min, x.memory_dynamic_max} == {8 * GiB}
    assert (x.hvm_boot_policy, dict(x.hvm_boot_params)) == ("BIOS order", {"order": "cn", "firmware": "uefi"})
    assert dict(x.platform) == {"cores-per-socket": "2", "viridian": "true", "secureboot": "true"}
    assert [(d.slot, d.bootable, d.format, d.method) for d in v.disks] == [
        ("0", True, "vhd", "xapi-import-raw-vdi"),
        ("1", False, "vhd", "xapi-import-raw-vdi"),
    ]
    assert [(n.slot, n.network, n.mac) for n in v.nics] == [("0", XCP_NET, "00:50:56:01:00:02")]
    assert v.proxmox is None and v.node == "xcp-host-1"


def test_keep_mac_false_lets_the_target_choose() -> None:
    """With keep_mac off, net0 carries no MAC and the NIC plan says so."""
    v = planned(plan_of(one(), options={"keep_mac": False}), "solo")
    assert dict(v.proxmox.params)["net0"] == "virtio,bridge=vmbr0"
    assert v.nics[0].mac == ""


def test_disconnected_nic_starts_with_link_down() -> None:
    """A NIC not connected at power on on vSphere starts with link_down=1."""
    v = planned(plan_of(one(nics=(nic(0, start_connected=False),))), "solo")
    assert dict(v.proxmox.params)["net0"].endswith(",link_down=1") and not v.nics[0].connected


def test_boot_disk_is_first_in_controller_order() -> None:
    """Disks are ordered SCSI, SATA, NVMe, IDE, then bus/unit; the first becomes scsi0 and boots."""
    disks = (
        disk(0, 1, vm="s", controller="ide", key=3000),
        disk(1, 2, vm="s", controller="sata", key=16000),
        disk(2, 3, vm="s", controller="pvscsi", bus=1, unit=0, key=2016),
        disk(3, 4, vm="s", controller="pvscsi", bus=0, unit=3, key=2003),
    )
    v = planned(plan_of(one(disks=disks)), "solo")
    assert [(d.slot, d.source_key, d.bootable) for d in v.disks] == [
        ("scsi0", 2003, True),
        ("scsi1", 2016, False),
        ("scsi2", 16000, False),
        ("scsi3", 3000, False),
    ]


def test_vmids_follow_run_order_and_skip_used_ones() -> None:
    """VMIDs count up from the range start in wave order, skipping IDs the target already uses."""
    targets = _targets(lab_pve=lambda t: replace(t, vms=(ExistingVm("x", 201), ExistingVm("y", 203))))
    plan = plan_of(
        one("a"),
        one("b", 901),
        one("c", 902),
        snaps=targets,
        vmid={"start": 200, "end": 299},
        waves=[{"name": "first", "select": {"names": "c"}}, {"name": "rest"}],
    )
    assert [(v.name, v.proxmox.vmid) for v in plan.vms] == [("c", 200), ("a", 202), ("b", 204)]
    assert [w.vms for w in plan.waves] == [("vm-902",), ("vm-900", "vm-901")]


def test_non_ascii_names_are_sanitised_and_kept_in_the_description() -> None:
    """The Czech lab name becomes DNS-safe on Proxmox and stays verbatim on XCP-ng and in descriptions."""
    db = lab_vms()[2]
    pve = planned(plan_of(db), db.name)
    assert pve.name == "Zlutoucky-kun-db"
    assert "original name: Žluťoučký kůň / db" in dict(pve.proxmox.params)["description"]
    xcp = planned(build_plan(source(db), pb(targets={"default": "lab-xcp"}), lab_targets()), db.name)
    assert xcp.xcpng.name_label == "Žluťoučký kůň / db"


# -- placement ------------------------------------------------------------------------------------


def _pve(
    *nodes: Any, storages: tuple[Storage, ...] | None = None, networks: Any = None
) -> dict[str, TargetSnapshot]:
    names = tuple(n.name for n in nodes)
    storages = (
        storages
        if storages is not None
        else (
            *(
                Storage("local-lvm", "lvmthin", 10_000 * GiB, 9_000 * GiB, content=("images",), nodes=(n,))
                for n in names
            ),
            Storage(
                "nfs-shared", "nfs", 10_000 * GiB, 9_000 * GiB, shared=True, content=("images",), nodes=names
            ),
        )
    )
    return {"lab-pve": pve_target(nodes=nodes, storages=storages, networks=networks)}


def _node_of(plan: Plan) -> dict[str, str]:
    return {v.source.name: v.node for v in plan.vms}


def test_biggest_vm_is_placed_first_on_the_node_with_most_free_memory() -> None:
    """Placement goes biggest first, each VM to the node with most free memory left, ties by name."""
    snaps = _pve(node("n1", 64, 0), node("n2", 48, 0), node("n3", 48, 0))
    plan = plan_of(
        one("small", 901, memory_mib=8 * 1024),
        one("big", 902, memory_mib=32 * 1024),
        one("mid", 903, memory_mib=16 * 1024),
        snaps=snaps,
    )
    # big -> n1 (64 free, 32 left); mid -> n2 (48, tie with n3 broken by name); small -> n3 (48)
    assert _node_of(plan) == {"big": "n1", "mid": "n2", "small": "n3"}
    reason = planned(plan, "big").decision("node").reason
    assert reason == "n1: most free memory (64.0 GiB) among 3 nodes with enough of it"


def test_memory_overcommit_and_per_node_ratio() -> None:
    """A node's memory limit is total x ratio - used; a per-node ratio can make room."""
    snaps = _pve(node("n1", 16, 8), node("n2", 16, 8))
    v = one(memory_mib=12 * 1024)
    assert codes(plan_of(v, snaps=snaps), "solo") == {"no-node-room"}
    plan = plan_of(v, snaps=snaps, options={"node_overcommit": {"lab-pve/n2": {"memory": 1.5}}})
    assert _node_of(plan) == {"solo": "n2"}
    assert [(u.node, u.memory_ratio, u.memory_bytes) for u in plan.nodes] == [("n2", 1.5, 12 * GiB)]


def test_cpu_overcommit_sends_vms_to_a_node_with_cpu_room() -> None:
    """A node whose vCPU budget (cpus x ratio) is spent is skipped even with the most free memory."""
    snaps = _pve(node("n1", 64, 0, cpus=4), node("n2", 32, 0, cpus=8))
    plan = plan_of(
        one("a", 901, cores_per_socket=4, memory_mib=4096),
        one("b", 902, cores_per_socket=4),
        snaps=snaps,
        options={"overcommit": {"cpu": 1.0}},
    )
    assert _node_of(plan) == {"a": "n1", "b": "n2"}
    assert "1 with more free memory lack CPU or storage room" in planned(plan, "b").decision("node").reason


def test_headroom_decides_whether_a_disk_fits() -> None:
    """A disk fits only while the storage keeps the headroom percentage free."""
    storages = (Storage("s", "lvmthin", 100 * GiB, 30 * GiB, content=("images",)),)
    snaps = _pve(node("n1"), storages=storages)
    v = one(disks=(disk(0, 20, vm="s"),))
    over = {"storage_map": {"lab-pve": {"*": "s"}}}
    assert _node_of(plan_of(v, snaps=snaps, **over, options={"storage_headroom_percent": 10})) == {
        "solo": "n1"
    }
    blocked = plan_of(v, snaps=snaps, **over, options={"storage_headroom_percent": 15})
    assert codes(blocked, "solo") == {"no-storage-room"}
    assert "(usable: s@n1 15.0 GiB)" in blocked.blocked[0].blockers[0].message


def test_storage_policy_most_free_spreads_and_in_order_prefers() -> None:
    """most-free puts each disk on the storage with most room; in-order fills the first listed one."""
    storages = (
        Storage("fast", "lvmthin", 1000 * GiB, 500 * GiB, content=("images",)),
        Storage("big", "nfs", 5000 * GiB, 4000 * GiB, shared=True, content=("images",)),
    )
    snaps = _pve(node("n1"), storages=storages)
    v = one(disks=(disk(0, 50, vm="s"), disk(1, 50, vm="s")))
    over = {"storage_map": {"lab-pve": {"*": ["fast", "big"]}}}
    spread = planned(plan_of(v, snaps=snaps, **over), "solo")
    assert [(d.storage, d.format) for d in spread.disks] == [("big", "qcow2"), ("big", "qcow2")]
    ordered = planned(plan_of(v, snaps=snaps, **over, options={"storage_policy": "in-order"}), "solo")
    assert [(d.storage, d.format) for d in ordered.disks] == [("fast", "raw"), ("fast", "raw")]


def test_local_storages_count_per_node_and_shared_ones_once() -> None:
    """Two nodes' local-lvm are separate pools; a shared storage's space is used from every node."""
    storages = (
        Storage("local-lvm", "lvmthin", 100 * GiB, 50 * GiB, content=("images",), nodes=("n1",)),
        Storage("local-lvm", "lvmthin", 100 * GiB, 50 * GiB, content=("images",), nodes=("n2",)),
    )
    snaps = _pve(node("n1", 64, 0), node("n2", 64, 0), storages=storages)
    vms = [one(f"v{i}", 900 + i, disks=(disk(0, 30, vm=f"v{i}"),)) for i in range(3)]
    plan = plan_of(*vms, snaps=snaps, storage_map={"lab-pve": {"*": "local-lvm"}})
    assert sorted(_node_of(plan).values()) == ["n1", "n2"]
    assert [b.name for b in plan.blocked] == ["v2"] and codes(plan, "v2") == {"no-storage-room"}
    assert [(u.storage, u.node, u.bytes) for u in plan.storages] == [
        ("local-lvm", "n1", 30 * GiB),
        ("local-lvm", "n2", 30 * GiB),
    ]


def test_network_and_rule_pins_restrict_nodes() -> None:
    """A bridge present on one node only, or a rule's nodes, keeps the VM there."""
    nets = (TargetNetwork("vmbr0", "bridge"), TargetNetwork("vmbr2", "bridge", nodes=("n1",)))
    snaps = _pve(node("n1", 32, 0), node("n2", 64, 0), networks=nets)
    plan = plan_of(
        one("iso", 901, nics=(nic(0, network="Storage"),)),
        one("pinned", 902),
        one("free", 903),
        snaps=snaps,
        network_map={"lab-pve": {"VM Network": "vmbr0", "Storage": "vmbr2"}},
        targets={
            "rules": [{"match": {"names": "pinned"}, "target": "lab-pve", "nodes": ["n1"]}],
            "default": "lab-pve",
        },
    )
    assert _node_of(plan) == {"iso": "n1", "pinned": "n1", "free": "n2"}
    assert "allowed nodes" in planned(plan, "pinned").decision("node").reason


def test_offline_nodes_are_not_used() -> None:
    """An offline node takes no VMs, however much memory it reports free."""
    plan = plan_of(one(), snaps=_pve(node("n1", 256, 0, online=False), node("n2", 16, 0)))
    assert _node_of(plan) == {"solo": "n2"}


# -- determinism, purity, secrets ----------------------------------------------------------------


def _estate(n: int, seed: int) -> list[Vm]:
    rnd = random.Random(seed)
    return [
        one(
            f"vm{i:03d}",
            1000 + i,
            memory_mib=rnd.choice((1, 2, 4, 8)) * 1024,
            cores_per_socket=rnd.choice((1, 2, 4)),
            power_state=rnd.choice(("poweredOn", "poweredOff")),
            guest_id=rnd.choice(("rhel8_64Guest", "windows9Server64Guest", "debian11_64Guest")),
            disks=tuple(disk(d, rnd.choice((10, 20, 40)), vm=f"vm{i:03d}") for d in range(rnd.randint(1, 3))),
        )
        for i in range(n)
    ]


def _shuffled(snap: TargetSnapshot, rnd: random.Random) -> TargetSnapshot:
    def mix(items: tuple[Any, ...]) -> tuple[Any, ...]:
        out = list(items)
        rnd.shuffle(out)
        return tuple(out)

    return replace(
        snap,
        nodes=mix(snap.nodes),
        storages=mix(snap.storages),
        networks=mix(snap.networks),
        vms=mix(snap.vms),
        templates=mix(snap.templates),
    )


def test_same_inputs_give_identical_bytes_whatever_their_order() -> None:
    """Twice the same inputs, or the same inputs shuffled, give a byte-identical plan."""
    vms = [*lab_vms(), *_estate(150, 3)]
    playbook = pb(
        targets={"rules": [{"match": {"os": "windows"}, "target": "lab-xcp"}], "default": "lab-pve"},
        waves=[{"name": "w1", "concurrency": 2, "select": {"power_state": "poweredOff"}}, {"name": "w2"}],
    )
    first = dump_plan(build_plan(source(*vms), playbook, lab_targets()))
    assert dump_plan(build_plan(source(*vms), playbook, lab_targets())) == first
    rnd = random.Random(11)
    for _ in range(3):
        mixed = list(vms)
        rnd.shuffle(mixed)
        src = replace(source(), vms=tuple(mixed))
        targets = lab_targets()
        snaps = {name: _shuffled(targets[name], rnd) for name in sorted(targets, reverse=True)}
        assert dump_plan(build_plan(src, playbook, snaps)) == first


def test_secrets_never_reach_the_plan() -> None:
    """Annotations, attributes, snapshot notes, endpoints and target extras stay out of plan and reports."""
    secrets = [
        "hunter2-annotation",
        "s3cret-attribute",
        "snapshot-token-xyz",
        "pa55word-in-url",
        "PVEAuthCookie=TICKET",
        "xapi-session-OpaqueRef",
    ]
    v = one(
        annotation=f"root password: {secrets[0]}",
        custom_attributes=(("root-password", secrets[1]),),
        snapshots=(Snapshot("snapshot-1", "s", "s", "2025-01-01", description=secrets[2]),),
    )
    targets = lab_targets()
    targets["lab-pve"] = replace(
        targets["lab-pve"], endpoint=f"https://root:{secrets[3]}@pve:8006", extra=(("ticket", secrets[4]),)
    )
    targets["lab-xcp"] = replace(targets["lab-xcp"], extra=(("session", secrets[5]),))
    src = replace(source(v), endpoint=f"https://admin:{secrets[3]}@vc/sdk")
    plan = build_plan(src, pb(), targets)
    for text in (dump_plan(plan), render(plan, "md"), render(plan, "html")):
        for secret in secrets:
            assert secret not in text


def test_planning_modules_import_no_sdk() -> None:
    """The planning layer imports no SDK and nothing from migrate.connectors."""
    code = (
        "import sys, migrate.planner, migrate.plan, migrate.playbook, migrate.mapping, migrate.plan_render; "
        "print('\\n'.join(sys.modules))"
    )
    mods = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    bad = [
        m
        for m in mods
        if m.split(".")[0] in {"pyVmomi", "pyVim", "proxmoxer", "XenAPI", "paramiko", "requests"}
        or m.startswith("migrate.connectors")
    ]
    assert bad == []


def test_build_plan_reads_no_clock_files_or_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_plan runs with the clock, file opening and sockets all booby-trapped."""
    import builtins
    import socket
    import time

    def trap(*_: Any, **__: Any) -> Any:
        raise AssertionError("build_plan touched the outside world")

    src, targets, playbook = lab_source(), lab_targets(), pb()
    expected = dump_plan(build_plan(src, playbook, targets))
    for name in ("time", "time_ns", "monotonic", "perf_counter", "localtime", "gmtime"):
        monkeypatch.setattr(time, name, trap)
    monkeypatch.setattr(builtins, "open", trap)
    monkeypatch.setattr(socket, "socket", trap)
    monkeypatch.setattr(os, "urandom", trap)
    plan = build_plan(src, playbook, targets)
    monkeypatch.undo()
    assert dump_plan(plan) == expected


def test_build_plan_restores_the_garbage_collector() -> None:
    """Planning pauses the cyclic collector and leaves it as it found it, on or off."""
    import gc

    assert gc.isenabled()
    build_plan(lab_source(), pb(), lab_targets())
    assert gc.isenabled()
    gc.disable()
    try:
        build_plan(lab_source(), pb(), lab_targets())
        assert not gc.isenabled()
    finally:
        gc.enable()


# -- plan files -----------------------------------------------------------------------------------


def test_plan_file_round_trip(tmp_path: Path) -> None:
    """dump_plan then load_plan gives the same plan, with the content hash filled in."""
    plan = build_plan(lab_source(), pb(), lab_targets(), inventory_file="inv.yaml")
    path = tmp_path / "plan.yaml"
    path.write_text(dump_plan(plan), encoding="utf-8")
    loaded = load_plan(path)
    assert loaded.content_hash.startswith("sha256:") and len(loaded.content_hash) == 71
    assert loaded == replace(plan, content_hash=loaded.content_hash)
    assert loaded.inputs.inventory_file == "inv.yaml"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("memory: '2048'", "memory: '4096'", 1), r"hash mismatch: the plan was changed"),
        (lambda t: t.replace("schema: 1", "schema: 99", 1), r"plan schema 99 is not supported"),
        (lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("schema:")), r"plan schema None"),
        (lambda t: "- just\n- a list\n", r"not a plan file"),
        (lambda t: "schema: [unclosed\n", r"not a readable plan file"),
    ],
)
def test_bad_plan_files_are_refused(tmp_path: Path, edit: Callable[[str], str], message: str) -> None:
    """A plan edited by hand, of another schema or not a plan at all is refused with PlanError."""
    path = tmp_path / "plan.yaml"
    path.write_text(edit(dump_plan(build_plan(lab_source(), pb(), lab_targets()))), encoding="utf-8")
    with pytest.raises(PlanError, match=message) as info:
        load_plan(path)
    assert "migrate plan" in str(info.value) or "plan file" in str(info.value)


def test_plan_with_right_hash_but_wrong_shape_is_refused(tmp_path: Path) -> None:
    """Content that hashes right but is not a plan (e.g. written by another tool) is still refused."""
    import yaml

    data = {"schema": 1, "inputs": {"source": "x"}, "waves": "nope"}
    data["content_hash"] = sha256_of({k: v for k, v in data.items()})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=r"not a valid plan:\n.*\$\.inputs"):
        load_plan(path)


def test_missing_plan_file(tmp_path: Path) -> None:
    """A plan path that does not exist is a PlanError naming it."""
    with pytest.raises(PlanError, match=r"nope\.yaml: plan file not found"):
        load_plan(tmp_path / "nope.yaml")


# -- drift ----------------------------------------------------------------------------------------


def _drift_kinds(plan: Plan, vms: list[Vm], targets: dict[str, TargetSnapshot]) -> list[tuple[str, str]]:
    return [(i.kind, i.vm) for i in drift(plan, source(*vms), targets)]


def test_no_drift_against_the_same_world() -> None:
    """Checking a plan against the inputs it came from finds nothing."""
    vms, targets = list(lab_vms()), lab_targets()
    plan = build_plan(source(*vms), pb(), targets)
    assert drift(plan, source(*vms), targets) == []


def test_drift_in_the_source() -> None:
    """Changed hardware, a new snapshot, a new MAC, a power change and a vanished VM are all reported."""
    web, win, db, app, tmpl = lab_vms()
    plan = build_plan(source(web, win, db, app, tmpl), pb(), lab_targets())
    changed = [
        replace(web, disks=(replace(web.disks[0], path="[LocalDS_0] web-01/web-01-000002.vmdk"),)),
        replace(win, memory_mib=16384, cpu_sockets=4),
        replace(db, nics=(replace(db.nics[0], mac="00:50:56:ff:ff:ff"),)),
        replace(app, power_state="poweredOff"),
    ]
    items = drift(plan, source(*changed), lab_targets())
    assert sorted((i.kind, i.vm) for i in items) == [
        ("disks", "web-01"),
        ("hardware", "win-app-01"),
        ("nics", "Žluťoučký kůň / db"),
        ("power", "app-02"),
    ]
    hw = next(i for i in items if i.kind == "hardware")
    assert hw.message == "cpu_sockets 2 -> 4; memory_mib 8192 -> 16384"
    assert _drift_kinds(plan, [web, win, db], lab_targets()) == [("vm-missing", "app-02")]


def test_drift_spots_a_replaced_vm_behind_the_same_moref() -> None:
    """A VM re-registered under the planned moref (another instance UUID) is reported, nothing else."""
    web = lab_vms()[0]
    plan = build_plan(source(web), pb(), lab_targets())
    other = replace(web, instance_uuid="50000000-0000-0000-0000-00000000beef")
    assert [(i.kind, i.vm) for i in drift(plan, source(other), lab_targets())] == [("vm-replaced", "web-01")]


def test_drift_on_the_targets() -> None:
    """A taken name or VMID, lost memory or storage space, or a missing target are reported."""
    web = lab_vms()[0]
    plan = plan_of(web, storage_map={"lab-pve": {"LocalDS_0": "local-lvm"}})
    v = plan.vms[0]
    t = lab_targets()
    t["lab-pve"] = replace(
        t["lab-pve"], vms=(*t["lab-pve"].vms, ExistingVm("web-01", 999), ExistingVm("z", 101))
    )
    assert {(i.kind, i.vm) for i in drift(plan, source(web), t)} == {
        ("name-taken", "web-01"),
        ("vmid-taken", "web-01"),
    }
    t = lab_targets()
    t["lab-pve"] = replace(
        t["lab-pve"],
        nodes=tuple(replace(n, memory_used_bytes=n.memory_total_bytes) for n in t["lab-pve"].nodes),
        storages=tuple(replace(s, free_bytes=0) for s in t["lab-pve"].storages),
    )
    msgs = [i.message for i in drift(plan, source(web), t)]
    assert msgs == [
        f"node {v.node} has 0.0 GiB memory for the 2.0 GiB planned",
        f"storage local-lvm@{v.node} has 0.0 GiB usable (keeping 10% free) for the 16.0 GiB planned",
    ]
    assert _drift_kinds(plan, [web], {"lab-xcp": lab_targets()["lab-xcp"]}) == [("target-missing", "")]


# -- rendering --------------------------------------------------------------------------------------


def test_summary_counts_waves_targets_and_issues() -> None:
    """The summary gives VMs and GiB per wave and target, totals, blockers and warnings."""
    plan = build_plan(
        lab_source(),
        pb(targets={"rules": [{"match": {"os": "windows"}, "target": "lab-xcp"}], "default": "lab-pve"}),
        lab_targets(),
    )
    s = summarize(plan)
    assert [(r.wave, r.target, r.vms) for r in s.rows] == [("all", "lab-pve", 3), ("all", "lab-xcp", 1)]
    assert (s.total_vms, s.blocked_vms, round(s.total_gib)) == (4, 1, 16 + 160 + 120 + 16)
    assert [(b.vm, b.code) for b in s.blockers] == [("tmpl-rhel9", "template")]
    assert {(w.vm, w.code) for w in s.warnings} >= {("web-01", "snapshots"), ("web-01", "dropped-devices")}


def test_render_markdown_and_html() -> None:
    """Markdown and HTML name every VM, blocker and decision; HTML escapes what VM names contain."""
    evil = one("<script>alert(1)</script>", 950)
    plan = build_plan(source(*lab_vms(), evil), pb(), lab_targets())
    md, page = render(plan, "md"), render(plan, "html")
    for name in ("web-01", "win-app-01", "Žluťoučký kůň / db", "app-02", "tmpl-rhel9"):
        assert name in md and name in page
    assert "| web-01 | web-01 | lab-pve |" in md
    assert "tmpl-rhel9 is a template" in md and "(fix: convert it to a VM" in md
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert render(plan, "md") == md
    with pytest.raises(ValueError, match="use 'md' or 'html'"):
        render(plan, "pdf")  # type: ignore[arg-type]
