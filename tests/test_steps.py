"""The real step table against the in-memory fake target: bytes land, intents first, crashes reconciled."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_target import FakeMover, FakeSource, FakeTarget, Hook, World, disk_bytes
from migrate.connectors.base import DiskSpec, NicSpec, VmSpec, run_tag
from migrate.errors import TransientError
from migrate.executor.runner import RetryPolicy, Runner, RunSummary, Wave, Work
from migrate.executor.state import StateStore
from migrate.executor.steps import STEPS, Options, Services, StepName, applicable

TESTS = Path(__file__).parent
CHILD = (
    f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_steps; test_steps.child_main(*sys.argv[1:])"
)


def spec(key: str, name: str, *, vmid: int | None = None, disks: int = 2, chain: bool = False) -> VmSpec:
    return VmSpec(
        key=key,
        name=name,
        source="vc1",
        source_moref=key,
        source_name=name,
        target="pve1",
        target_kind="proxmox",
        vmid=vmid,
        disks=tuple(
            DiskSpec(
                key=str(2000 + i),
                label=f"Hard disk {i + 1}",
                size_bytes=200_000 + 1000 * i,  # not a multiple of the chunk size
                source_path=f"[ds1] {name}/{name}_{i}.vmdk",
                storage="local-lvm",
                slot=f"scsi{i}",
                source_chain=(f"[ds1] {name}/{name}_{i}.vmdk", f"[ds1] {name}/{name}_{i}-000001.vmdk")
                if chain
                else (),
            )
            for i in range(disks)
        ),
        nics=(NicSpec("4000", f"00:50:56:AA:00:{len(name):02x}", "vmbr0", "net0", "virtio"),),
    )


WEB = spec("vm-10", "web", vmid=110)
DB = spec("vm-11", "db", chain=True)
PLAN = Work("sha256:steps", (Wave(0, 2, (WEB, DB)),))
# The crash tests run one VM at a time, so the moment of the kill is the same every time.
SERIAL = Work("sha256:serial", (Wave(0, 1, (WEB, DB)),))
EFFECT = {
    "power_off": "power_off:",
    "prepare_disk": "prepare_disk:",
    "create_vm": "create_vm:",
    "attach_disks": "attach:",
    "start_vm": "start:",
}


def wire(
    world: World, *, hook: Hook | None = None, kind: str = "proxmox", resumable: bool = True
) -> tuple[Services, FakeSource, FakeTarget, FakeMover]:
    source = FakeSource(world, hook=hook)
    target = FakeTarget(world, kind=kind, hook=hook, resumable=resumable)  # type: ignore[arg-type]
    mover = FakeMover(source, target)
    return Services(source, target, mover), source, target, mover


def run(store: StateStore, services: Services, plan: Work[VmSpec] = PLAN, **kw: Any) -> RunSummary:
    kw.setdefault("sleep", lambda _s: None)
    return Runner(store, STEPS, lambda _vm: services, **kw).run(plan)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state") as s:
        yield s


def assert_migrated(world: World, target: FakeTarget, run_id: str, *vms: VmSpec) -> None:
    for vm in vms:
        (made,) = target.find_vm(name=vm.name, tag=run_tag(run_id))
        record = world.vms[made.id]
        assert record["power"] == "on" and world.source_power[vm.source_moref] == "off"
        assert sorted(record["disks"]) == [d.slot for d in vm.disks]
        for disk in vm.disks:
            assert target.disk_sha256(vm.name, disk.slot) == sha(
                disk_bytes(disk.source_path, disk.size_bytes)
            )
        assert record["macs"] == [n.mac.lower() for n in vm.nics]


def test_full_migration_lands_the_source_bytes_and_a_second_run_touches_nothing(store: StateStore) -> None:
    """Both VMs end up built, started, with each disk's bytes equal to the source's; rerun makes no call."""
    world = World()
    services, source, target, _ = wire(world)
    summary = run(store, services)
    assert summary.exit_code == 0
    assert_migrated(world, target, summary.run_id, WEB, DB)
    assert world.vms["110"]["name"] == "web"  # the planned VMID was used
    assert world.landings == {}  # Proxmox landings are temporary: removed in the done step
    assert all(r.obj.kind != "landing" for r in store.objects(summary.run_id))
    assert {r.obj.kind for r in store.objects(summary.run_id, removed=True)} == {"vm", "disk", "landing"}
    for vm in (WEB, DB):
        for disk in vm.disks:
            row = store.transfer(summary.run_id, vm.key, disk.key)
            assert row is not None and row.complete
            assert (row.bytes_done, row.sha256) == (
                disk.size_bytes,
                sha(disk_bytes(disk.source_path, disk.size_bytes)),
            )
    # Export and convert apply only to the VM with a snapshot chain.
    assert store.step(summary.run_id, WEB.key, "export") is None
    assert store.step(summary.run_id, DB.key, "convert").status == "done"
    assert all(s.status in ("done", "noop") for s in store.steps(summary.run_id))
    assert all(i.status == "done" for i in store.intents(summary.run_id))

    source.faults.calls.clear()
    target.faults.calls.clear()
    again = run(store, services)
    assert [v.executed for v in again.vms] == [0, 0]
    assert source.faults.calls == [] and target.faults.calls == []


def test_xcpng_shaped_target_keeps_the_landing_as_the_disk(store: StateStore) -> None:
    """When the landing becomes the disk (an XCP-ng VDI), nothing is removed and done is a noop."""
    world = World()
    services, _, target, _ = wire(world, kind="xcpng")
    summary = run(store, services)
    assert summary.exit_code == 0
    assert_migrated(world, target, summary.run_id, WEB, DB)
    assert len(world.landings) == 4 and world.volumes == {}
    assert store.step(summary.run_id, WEB.key, "done").status == "noop"


def test_intents_are_committed_before_each_request(store: StateStore) -> None:
    """At the moment a create/import/start/power-off reaches a system, its open intent is already on disk."""
    seen: list[tuple[str, str]] = []
    kinds = {
        "power_off": "power_off",
        "prepare_disk": "prepare_disk",
        "create_vm": "create_vm",
        "attach_disks": "attach_disks",
        "start_vm": "start_vm",
    }

    def check(method: str, phase: str, info: dict[str, Any]) -> None:
        if phase != "before" or method not in kinds:
            return
        other = sqlite3.connect(store.path)  # a separate connection sees only committed rows
        rows = other.execute("SELECT kind, key FROM intents WHERE status = 'open'").fetchall()
        other.close()
        assert (kinds[method], info["key"]) in rows, f"no open intent for {method} {info['key']}: {rows}"
        seen.append((method, info["key"]))

    world = World()
    services, _, _, _ = wire(world, hook=check)
    summary = run(store, services)
    assert summary.exit_code == 0
    assert {m for m, _ in seen} == set(kinds)
    assert len(seen) == 2 + 4 + 2 + 2 + 2  # per VM: power off, 2 landings, create, attach, start
    notes = {i.kind: i.notes for i in store.intents(summary.run_id, WEB.key)}
    assert notes["create_vm"] == {"vmid": "110"}
    assert notes["prepare_disk"]["landing"].startswith("/var/lib/vz/import/" + run_tag(summary.run_id))


def child_main(state_dir: str, world_dir: str, method: str, phase: str, marker: str, resumable: str) -> None:
    """Entry point of the child process the crash tests kill: park at (method, phase) once."""

    def park(m: str, p: str, info: dict[str, Any]) -> None:
        if (m, p) == (method, phase) and (m != "sink_write" or info["offset"] >= 120_000):
            Path(marker).write_text(str(os.getpid()))
            time.sleep(120)

    world = World.open(Path(world_dir))
    services, _, _, _ = wire(world, hook=park, resumable=resumable == "1")
    with StateStore(Path(state_dir)) as store:
        run(store, services, SERIAL)


def run_child_and_kill(tmp_path: Path, method: str, phase: str, resumable: bool = True) -> None:
    marker = tmp_path / "parked"
    args = [
        str(tmp_path / "state"),
        str(tmp_path / "world"),
        method,
        phase,
        str(marker),
        "1" if resumable else "0",
    ]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "child never reached the crash point"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        if child.stderr is not None:
            child.stderr.close()


@pytest.mark.parametrize("method", list(EFFECT))
def test_kill_9_between_request_and_answer_is_reconciled(tmp_path: Path, method: str) -> None:
    """Killed after a system acted but before the step heard back, the resumed run finds it: no duplicate."""
    run_child_and_kill(tmp_path, method, "after")
    world = World.open(tmp_path / "world")
    assert [k for k in world.effects if k.startswith(EFFECT[method])] != []
    services, _, target, _ = wire(world)
    with StateStore(tmp_path / "state") as store:
        (open_intent,) = store.intents(store.runs()[0].id, status="open")
        assert open_intent.kind == method
        summary = run(store, services, SERIAL)
        assert (summary.resumed, summary.exit_code) == (True, 0)
        assert_migrated(world, target, summary.run_id, WEB, DB)
        assert all(count == 1 for count in world.effects.values()), world.effects
        assert store.intents(summary.run_id, status="open") == ()
        assert [i.status for i in store.intents(summary.run_id) if i.id == open_intent.id] == ["done"]
        vm_objects = sorted(
            r.obj.id for r in store.objects(summary.run_id, removed=True) if r.obj.kind == "vm"
        )
        assert len(vm_objects) == 2
        assert vm_objects == sorted(v.id for v in target.list_tagged(summary.run_id) if v.kind == "vm")


@pytest.mark.parametrize("resumable", [True, False])
def test_transfer_killed_mid_disk_continues_or_restarts(tmp_path: Path, resumable: bool) -> None:
    """A transfer killed half-way continues at the recorded offset, or restarts at 0 if the landing cannot."""
    run_child_and_kill(tmp_path, "sink_write", "after", resumable)
    world = World.open(tmp_path / "world")
    services, _, target, mover = wire(world, resumable=resumable)
    with StateStore(tmp_path / "state") as store:
        run_id = store.runs()[0].id
        pairs = [(vm.key, d.key) for vm in (WEB, DB) for d in vm.disks]
        cut = [t for vm, disk in pairs if (t := store.transfer(run_id, vm, disk)) and not t.complete]
        assert len(cut) == 1 and cut[0].bytes_done >= 64 << 10
        summary = run(store, services, SERIAL)
        assert summary.exit_code == 0
        assert_migrated(world, target, summary.run_id, WEB, DB)
        step = store.step(run_id, cut[0].vm, "transfer")
        assert step is not None and step.attempt == 2
        resumed_from = step.detail["disks"][cut[0].disk]["from"]
        rest = sum(
            d.size_bytes for vm in (WEB, DB) for d in vm.disks if (vm.key, d.key) != (cut[0].vm, cut[0].disk)
        )
        if resumable:
            assert resumed_from == cut[0].bytes_done
            assert mover.sent_bytes == rest + cut[0].total_bytes - cut[0].bytes_done
        else:
            assert resumed_from == 0 and mover.sent_bytes == rest + cut[0].total_bytes


def test_preflight_refuses_a_foreign_vm_with_the_same_name(store: StateStore) -> None:
    """A VM not made by this run with the planned name fails preflight; the other VM still moves."""
    world = World()
    services, _, target, _ = wire(world)
    target.add_foreign_vm("db", 900)
    summary = run(store, services)
    assert [(v.key, v.status, v.failed_step) for v in summary.vms] == [
        (WEB.key, "done", None),
        (DB.key, "failed", "preflight"),
    ]
    assert "pve1 already has 'db' (900), which clashes with 'db'" in (summary.failed[0].error or "")
    assert "migrate never overwrites a VM" in (summary.failed[0].error or "")
    assert not any(DB.key in k for k in world.effects) and world.source_power.get(DB.key) is None


def test_a_taken_vmid_moves_to_a_free_one(store: StateStore) -> None:
    """A planned VMID another VM took since planning is left alone; the VM gets a free VMID instead."""
    world = World()
    services, _, target, _ = wire(world)
    target.add_foreign_vm("legacy", 110)
    summary = run(store, services)
    assert summary.exit_code == 0
    legacy = {"name": "legacy", "node": "n1", "tags": [], "power": "on", "disks": {}, "macs": []}
    assert world.vms["110"] == legacy
    web = [vmid for vmid, rec in world.vms.items() if rec["name"] == WEB.name]
    assert web and web != ["110"]
    notes = [i.notes for i in store.intents(summary.run_id) if i.kind == "create_vm" and i.vm == WEB.key]
    assert notes and notes[-1]["vmid"] == web[0]


def test_shutdown_policies_never_and_require_off(store: StateStore) -> None:
    """Policy never skips the shutdown step and leaves the source on; require-off refuses a running source."""
    world = World()
    services, _, _, _ = wire(world)
    summary = run(store, services, options=Options(shutdown="never"))
    assert summary.exit_code == 0 and world.source_power == {}
    assert store.step(summary.run_id, WEB.key, "shutdown_source") is None
    assert StepName.SHUTDOWN_SOURCE not in [s.name for s in applicable(STEPS, WEB, Options(shutdown="never"))]

    other = Work("sha256:other", PLAN.waves)
    world2 = World(source_power={DB.key: "off"})
    services2, _, _, _ = wire(world2)
    summary2 = Runner(store, STEPS, lambda _vm: services2, options=Options(shutdown="require-off")).run(other)
    assert [(v.key, v.status) for v in summary2.vms] == [(WEB.key, "failed"), (DB.key, "done")]
    assert "is on and the shutdown policy is require-off" in (summary2.vms[0].error or "")
    assert store.step(summary2.run_id, DB.key, "shutdown_source").status == "noop"


def test_verify_fails_a_vm_that_is_not_as_planned(store: StateStore) -> None:
    """If a disk is missing when verify looks, the VM fails at verify with the slot named."""
    world = World()

    def lose_disk(method: str, phase: str, info: dict[str, Any]) -> None:
        if (method, phase) == ("start_vm", "after"):
            world.vms[info["key"]]["disks"].pop("scsi1", None)

    services, _, _, _ = wire(world, hook=lose_disk)
    summary = run(store, services)
    assert {(v.failed_step, v.status) for v in summary.vms} == {("verify", "failed")}
    assert "disks missing at scsi1" in (summary.vms[0].error or "")


def test_transient_target_fault_in_a_real_step_is_retried_without_duplicates(store: StateStore) -> None:
    """A TransientError from create_vm is retried; exactly one VM is created per spec."""
    world = World()
    services, _, target, _ = wire(world)
    target.fail("create_vm", TransientError("pve1: 595 connection timed out"), TransientError("again"))
    summary = run(store, services, retry=RetryPolicy(attempts=3, first_delay_s=0, jitter_s=0))
    assert summary.exit_code == 0
    assert world.effects["create_vm:web"] == 1 and world.effects["create_vm:db"] == 1
    # The two faults go to whichever VM asks first; VMs run concurrently, so 1+3 or 2+2 attempts.
    attempts = sorted(store.step(summary.run_id, vm.key, "create_vm").attempt for vm in (WEB, DB))
    assert attempts in ([1, 3], [2, 2])


def _plan() -> Any:
    from migrate import plan as p

    def facts(moref: str, name: str) -> p.SourceFacts:
        return p.SourceFacts(
            moref=moref,
            name=name,
            datacenter="dc1",
            folder="/dc1/vm",
            cluster="c1",
            host="esx1",
            power_state="poweredOn",
            template=False,
            guest_id="debian12_64Guest",
            tools_status="toolsOk",
            firmware="efi",
            secure_boot=False,
            cpu_sockets=1,
            cores_per_socket=2,
            memory_mib=2048,
            disks=(),
            nics=(),
            fingerprint="sha256:f",
        )

    def disk(slot: str, fmt: str, **kw: Any) -> p.DiskPlan:
        return p.DiskPlan(
            source_key=2000,
            label="Hard disk 1",
            datacenter="dc1",
            datastore="ds1",
            descriptor="[ds1] web/web-000001.vmdk",
            chain=("[ds1] web/web.vmdk", "[ds1] web/web-000001.vmdk"),
            capacity_bytes=8 << 30,
            storage="local-lvm",
            format=fmt,
            slot=slot,
            bootable=True,
            **kw,
        )

    nic = p.NicPlan(
        source_key=4000,
        label="Network adapter 1",
        source_network="VM Network",
        mac="00:50:56:01:02:03",
        slot="net0",
        network="vmbr0",
        vlan=20,
        model="virtio",
    )
    web = p.VmPlan(
        key="vm-42",
        name="web",
        wave="first",
        target="pve1",
        kind="proxmox",
        node="n1",
        source=facts("vm-42", "web"),
        disks=(disk("scsi0", "raw", method="ssh-import", drive="{import_from},discard=on"),),
        nics=(nic,),
        decisions=(),
        proxmox=p.ProxmoxConfig(vmid=120, params=(("name", "web"), ("cores", "2"))),
    )
    db = p.VmPlan(
        key="vm-43",
        name="db",
        wave="second",
        target="xcp1",
        kind="xcpng",
        node="",
        source=facts("vm-43", "db"),
        disks=(disk("0", "vpc", method="xapi-import-raw-vdi", vdi_name="db disk 1"),),
        nics=(),
        decisions=(),
        xcpng=p.XcpngConfig(
            template="Debian Bookworm 12",
            name_label="db",
            name_description="",
            vcpus_max=2,
            vcpus_at_startup=2,
            memory_static_min=1 << 30,
            memory_static_max=2 << 30,
            memory_dynamic_min=1 << 30,
            memory_dynamic_max=2 << 30,
            hvm_boot_policy="BIOS order",
            hvm_boot_params=(("order", "cd"),),
            platform=(("secureboot", "false"),),
        ),
    )
    raw = p.Plan(
        schema=p.SCHEMA_VERSION,
        inputs=p.Inputs("vc1", "sha256:s", "mixed", "playbooks/mixed.yaml", "sha256:p"),
        targets=(),
        options=p.RunOptions(shutdown="guest", start_after=True, verify="boot", keep_mac=True),
        waves=(p.WavePlan("first", 3, ("vm-42",)), p.WavePlan("second", 1, ("vm-43",))),
        vms=(web, db),
        blocked=(),
    )
    return p.loads_plan(p.dump_plan(raw))


def test_work_from_plan_reshapes_a_plan_file_without_inventing() -> None:
    """A loaded plan becomes waves (file order, concurrency kept) of VmSpecs with the planned settings."""
    from migrate.executor.fromplan import options_from_plan, work_from_plan

    plan = _plan()
    work = work_from_plan(plan)
    assert work.plan_hash == plan.content_hash and plan.content_hash.startswith("sha256:")
    assert [(w.index, w.concurrency, [v.key for v in w.vms]) for w in work.waves] == [
        (0, 3, ["vm-42"]),
        (1, 1, ["vm-43"]),
    ]
    web, db = work.waves[0].vms[0], work.waves[1].vms[0]
    assert (web.name, web.target_kind, web.vmid, web.node, web.settings) == (
        "web",
        "proxmox",
        120,
        "n1",
        (("name", "web"), ("cores", "2")),
    )
    (disk,) = web.disks
    assert (disk.key, disk.slot, disk.size_bytes, disk.drive, disk.needs_staging) == (
        "2000",
        "scsi0",
        8 << 30,
        "{import_from},discard=on",
        True,
    )
    assert web.nics == (NicSpec("4000", "00:50:56:01:02:03", "vmbr0", "net0", "virtio", 20),)
    assert (db.vmid, db.template, db.disks[0].format, db.disks[0].name) == (
        None,
        "Debian Bookworm 12",
        "vhd",
        "db disk 1",
    )
    assert db.setting("vcpus_max") == "2" and db.setting("platform:secureboot") == "false"
    assert options_from_plan(plan) == Options(shutdown="guest", start=True, verify="boot")
    assert StepName.EXPORT in [s.name for s in applicable(STEPS, web, options_from_plan(plan))]
