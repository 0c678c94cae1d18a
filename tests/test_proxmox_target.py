"""ProxmoxExecTarget against the lab (fakepve + sshd): landings, VMs, imports, faults, cleanup."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fake_target import FakeSource, World
from migrate import mapping
from migrate.connectors.base import (
    CreatedObject,
    DiskLanding,
    DiskSpec,
    Intent,
    NicSpec,
    Target,
    VmSpec,
    run_tag,
)
from migrate.connectors.proxmox_target import ProxmoxExecTarget
from migrate.errors import NotFoundError, PermanentError, TransientError
from migrate.executor.runner import RetryPolicy, Runner, Wave, Work
from migrate.executor.state import StateStore
from migrate.executor.steps import STEPS, Noop, Options, Outcome, Sent, Services, StepContext
from migrate.inventory import ProxmoxSpec
from migrate.lab.certs import make_certs
from migrate.lab.pve import RunningPve, start_pve
from migrate.lab.sshd import RunningSshd, start_sshd

KiB, MiB = 1024, 1024 * 1024
SIZE = 6 * MiB
MAC = "BC:24:11:AA:BB:01"


@dataclass
class Lab:
    pve: RunningPve
    sshd: RunningSshd
    spec: ProxmoxSpec
    image: Path  # a raw disk image with data and zero regions


def _image_bytes() -> bytes:
    """6 MiB: data, a zero gap, data at an unaligned offset, zeros, a data tail."""
    rnd = hashlib.sha256(b"seed").digest() * (MiB // 32)
    out = bytearray(SIZE)
    out[0:MiB] = rnd
    out[3 * MiB + 5 : 3 * MiB + 5 + 200 * KiB] = rnd[: 200 * KiB]
    out[SIZE - 4 * KiB :] = rnd[: 4 * KiB]
    return bytes(out)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("pvetarget")
    sshd = start_sshd(work / "sshd")
    try:
        pve = start_pve(work / "lab", make_certs(work / "certs"))
    except BaseException:
        sshd.stop()
        raise
    image = work / "disk.raw"
    image.write_bytes(_image_bytes())
    try:
        yield Lab(pve, sshd, ProxmoxSpec.model_validate(pve.inventory_entry(sshd)), image)
    finally:
        pve.stop()
        sshd.stop()


@pytest.fixture
def target(lab: Lab) -> Iterator[ProxmoxExecTarget]:
    lab.pve.control("clear_failures")
    with ProxmoxExecTarget("lab", lab.spec) as made:
        yield made


class Notes:
    """An intent's notes, in the order the connector made them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def intent(self, run: str, kind: str, key: str) -> Intent:
        return Intent(run, f"vm-{key}", kind, key, note=lambda k, v: self.items.append((k, v)))

    def get(self, name: str) -> str:
        return dict(self.items)[name]


def _disk(storage: str = "local-lvm", slot: str = "scsi0") -> DiskSpec:
    return DiskSpec(
        key="2000", label="Hard disk 1", size_bytes=SIZE, source_path="[ds1] web/web.vmdk", storage=storage,
        slot=slot, format="raw", boot=True,
        drive=f"{storage}:0,import-from={{import_from}},{mapping.drive_options('scsi', 'raw')}",
    )  # fmt: skip


def _vm(
    name: str, *, vmid: int | None = None, node: str = "pve2", disks: tuple[DiskSpec, ...] = ()
) -> VmSpec:
    """A VM the way the planner draws an EFI Linux guest for Proxmox (settings without data disks)."""
    settings = (
        ("name", name),
        ("description", f"Migrated from vSphere by migrate.\nsource: vc1 / dc1\noriginal name: {name}\n"
                        f"moref: vm-{name}\ninstance uuid: 5000"),
        ("ostype", "l26"), ("machine", mapping.proxmox_machine("efi")[0]), ("bios", "ovmf"),
        ("efidisk0", mapping.proxmox_efidisk("local-lvm", "raw", False)),
        ("cpu", "x86-64-v2-AES"), ("sockets", "1"), ("cores", "2"), ("memory", "2048"),
        ("scsihw", "virtio-scsi-single"), ("net0", mapping.pve_net("virtio", MAC, "vmbr0", None, True)),
        ("boot", "order=scsi0;net0"), ("agent", "enabled=1"), ("tags", "migrate"),
    )  # fmt: skip
    return VmSpec(
        key=f"vm-{name}", name=name, source="vc1", source_moref=f"vm-{name}", target="lab",
        target_kind="proxmox", node=node, vmid=vmid, settings=settings, disks=disks,
        nics=(NicSpec("4000", MAC, "vmbr0", "net0", "virtio"),),
    )  # fmt: skip


def _send(
    target: ProxmoxExecTarget, landing: DiskLanding, data: bytes, offset: int = 0, chunk: int = 300_000
) -> int:
    sink = target.receive_disk(landing, offset)
    for start in range(offset, len(data), chunk):
        sink.write(data[start : start + chunk])
    sink.close()
    return sink.bytes_sent


def _land(target: ProxmoxExecTarget, lab: Lab, vm: VmSpec, run: str) -> DiskLanding:
    landing = target.prepare_disk(vm, vm.disks[0], Notes().intent(run, "prepare_disk", "2000"))
    _send(target, landing, lab.image.read_bytes())
    return landing


def _config(lab: Lab, vmid: int) -> dict[str, str]:
    return next(v["config"] for v in lab.pve.state()["vms"] if v["vmid"] == vmid)


def _assert_same_image(image: Path, volume: Path) -> None:
    """qemu-img reads the same guest content from both (it would name the first differing offset)."""
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), str(volume)],
                             capture_output=True, text=True)  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr


def _non_zero_blocks(data: bytes, block: int = 64 * KiB) -> int:
    return sum(
        len(data[i : i + block]) for i in range(0, len(data), block) if data[i : i + block].count(0) != block
    )


# -- landings ---------------------------------------------------------------------------------


def test_is_a_target(target: ProxmoxExecTarget) -> None:
    """The class satisfies the executor's Target protocol."""
    assert isinstance(target, Target) and (target.name, target.kind) == ("lab", "proxmox")


def test_landing_is_sparse_exact_and_reused(target: ProxmoxExecTarget, lab: Lab) -> None:
    """A landing is a sparse raw file on the node with the image's exact bytes; zero blocks never cross."""
    vm, notes = _vm("land01", disks=(_disk(),)), Notes()
    landing = target.prepare_disk(vm, vm.disks[0], notes.intent("t-land", "prepare_disk", "2000"))
    path = Path(landing.ref)
    assert path == lab.pve.node_root / f"var/lib/vz/import/land01-2000-{run_tag('t-land')}.raw"
    assert notes.get("landing") == landing.ref
    assert (landing.node, landing.size_bytes, landing.resumable, landing.temporary) == (
        "pve2",
        SIZE,
        True,
        True,
    )
    assert path.stat().st_size == SIZE and path.stat().st_blocks == 0  # full size, nothing allocated yet
    data = lab.image.read_bytes()
    sent = _send(target, landing, data)
    assert sent == _non_zero_blocks(data) < SIZE // 2
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert path.stat().st_blocks * 512 <= sent + 256 * KiB  # the zero regions are holes
    again = target.prepare_disk(vm, vm.disks[0], notes.intent("t-land", "prepare_disk", "2000"))
    assert again == landing and path.read_bytes() == data  # found, not made anew
    listed = [o for o in target.list_tagged("t-land") if o.kind == "landing"]
    assert [(o.id, o.temporary, dict(o.detail)) for o in listed] == [
        (landing.ref, True, {"vm_name": "land01", "disk": "2000"})]  # fmt: skip
    assert target.list_tagged("t-other") == ()


def test_landing_resumes_only_from_durable_bytes(target: ProxmoxExecTarget, lab: Lab) -> None:
    """After an abort the landing continues from its flushed length; an offset beyond it is refused."""
    vm = _vm("resume01", disks=(_disk(),))
    landing = target.prepare_disk(vm, vm.disks[0], Notes().intent("t-res", "prepare_disk", "2000"))
    data = lab.image.read_bytes()
    sink = target.receive_disk(landing, 0)
    sink.write(data[: 3 * MiB + 100])
    durable = sink.flush()
    sink.write(data[3 * MiB + 100 : 4 * MiB])  # sent, never flushed: a crash here loses it
    sink.abort()
    assert durable == 3 * MiB + 100
    with pytest.raises(PermanentError, match="less than the 4194304 the transfer record claims") as info:
        target.receive_disk(landing, 4 * MiB)
    assert info.value.hint and "roll this VM back" in info.value.hint
    _send(target, landing, data, offset=durable, chunk=4099)  # small writes are gathered into records
    assert Path(landing.ref).read_bytes() == data


def test_sink_refuses_more_or_fewer_bytes_than_the_disk(target: ProxmoxExecTarget) -> None:
    """Writing past the disk's size, or closing before its end, is a PermanentError."""
    vm = _vm("short01", disks=(_disk(),))
    landing = target.prepare_disk(vm, vm.disks[0], Notes().intent("t-short", "prepare_disk", "2000"))
    sink = target.receive_disk(landing, 0)
    sink.write(bytes(SIZE - 10))
    with pytest.raises(PermanentError, match="more than the disk's"):
        sink.write(b"x" * 11)
    sink.write(b"x" * 5)
    with pytest.raises(PermanentError, match=f"closed after {SIZE - 5} of {SIZE} bytes"):
        sink.close()
    assert sink.bytes_sent == 5 and Path(landing.ref).read_bytes()[SIZE - 10 :] == b"x" * 5 + bytes(5)


# -- VMs --------------------------------------------------------------------------------------


def test_create_attach_start_and_remove(target: ProxmoxExecTarget, lab: Lab) -> None:
    """Create (EFI, no data disk), import the landing into scsi0, start; then remove exactly what was made."""
    run = "t-life"
    vm = _vm("web01", vmid=120, disks=(_disk(),))
    landing = _land(target, lab, vm, run)
    notes = Notes()
    made, objects = target.create_vm(vm, notes.intent(run, "create_vm", vm.name))
    assert (made.id, made.node, made.name) == ("120", "pve2", "web01") and run_tag(run) in made.tags
    assert [k for k, _ in notes.items] == ["vmid", "task"] and notes.get("task").startswith("UPID:pve2:")
    config = _config(lab, 120)
    assert config["efidisk0"].startswith("local-lvm:vm-120-disk-0,") and "scsi0" not in config
    assert (config["boot"], config["tags"]) == ("order=net0", f"migrate;{run_tag(run)}")
    assert "moref: vm-web01" in config["description"] and f"migrate run: {run}" in config["description"]
    assert [(o.kind, o.id, dict(o.detail)["tag"]) for o in objects] == [("vm", "120", run_tag(run))]

    disks = target.attach_disks(made, [(vm.disks[0], landing)], notes.intent(run, "attach_disks", "120"))
    config = _config(lab, 120)
    assert config["scsi0"] == "local-lvm:vm-120-disk-1,discard=on,iothread=1,size=6M"
    assert config["boot"] == "order=scsi0;net0"
    assert [(d.kind, d.id, dict(d.detail)["slot"]) for d in disks] == [
        ("disk", "local-lvm:vm-120-disk-1", "scsi0")
    ]
    volume = lab.pve.node_root / "dev/pve/vm-120-disk-1"
    _assert_same_image(lab.image, volume)
    assert not Path(landing.ref).exists()  # the landing was temporary
    lab.pve.control("requests", clear=True)
    assert target.attach_disks(made, [(vm.disks[0], landing)], notes.intent(run, "attach_disks", "120")) == ()
    assert not [p for m, p in lab.pve.control("requests") if m == "POST"]  # a filled slot is left alone

    target.start_vm(made, notes.intent(run, "start_vm", "120"))
    target.start_vm(made, notes.intent(run, "start_vm", "120"))  # already running: nothing to do
    state = target.vm_state(made)
    agent = (
        False if "VM.GuestAgent.Audit" in lab.pve.seed.privileges else None
    )  # the lab grants no agent read
    assert (state.power, state.disk_slots, state.nic_macs, state.locked, state.guest_agent) == (
        "on", ("efidisk0", "scsi0"), (MAC.lower(),), False, agent)  # fmt: skip

    tagged = target.list_tagged(run)
    assert [(o.kind, o.id, o.vm) for o in tagged] == [("vm", "120", "vm-web01")]
    legacy = _config(lab, 100)
    target.remove([landing.as_object(vm.key), *objects, *disks])
    assert target.find_vm(vmid=120) == () and target.list_tagged(run) == ()
    assert not volume.exists() and "vm-120-disk-1" not in lab.pve.state()["storages"]["local-lvm"]["volumes"]
    assert _config(lab, 100) == legacy
    target.remove([landing.as_object(vm.key), *objects, *disks])  # all gone already: fine


def test_create_after_a_lost_answer_adopts(lab: Lab) -> None:
    """A create whose task could not be followed is found by name and tag, never made twice."""
    run = "t-lost"
    vm = _vm("lost01")
    lab.pve.control("clear_failures")
    lab.pve.control("requests", clear=True)
    lab.pve.control("fail", method="GET", suffix="/status", status=503, message="Service Unavailable")
    try:
        with ProxmoxExecTarget("lab", lab.spec, task_timeout=0.5) as first:
            made, _ = first.create_vm(vm, Notes().intent(run, "create_vm", vm.name))
    finally:
        lab.pve.control("clear_failures")
    with ProxmoxExecTarget("lab", lab.spec) as second:  # as after a crash: a new process
        again, objects = second.create_vm(vm, Notes().intent(run, "create_vm", vm.name))
        assert again == made and [o.id for o in objects] == [made.id]
        assert second.find_vm(name="lost01") == (made,)
    creates = [p for m, p in lab.pve.control("requests") if m == "POST" and p.endswith("/qemu")]
    assert len(creates) == 1


def test_taken_vmid_gives_way_and_the_other_vm_is_untouched(target: ProxmoxExecTarget, lab: Lab) -> None:
    """The planned VMID 100 belongs to a VM we did not make: the next free VMID is noted, then used."""
    before = _config(lab, 100)
    notes = Notes()
    made, _ = target.create_vm(_vm("clash01", vmid=100), notes.intent("t-clash", "create_vm", "clash01"))
    assert made.id != "100" and notes.items[0] == ("vmid", made.id) and notes.items[1][0] == "task"
    assert _config(lab, 100) == before
    assert target.find_vm(vmid=100)[0].name == "legacy-app01"
    assert target.find_vm(name="clash01", tag=run_tag("t-clash")) == (made,)


def test_remove_refuses_a_vm_we_did_not_make(target: ProxmoxExecTarget, lab: Lab) -> None:
    """Asked to remove VM 100 (no run tag), remove raises and the VM stays."""
    before = _config(lab, 100)
    with pytest.raises(PermanentError, match="lacks a migrate run tag"):
        target.remove([CreatedObject("vm", "100", "lab", "pve1")])
    assert _config(lab, 100) == before


def test_one_instance_serves_parallel_workers(target: ProxmoxExecTarget) -> None:
    """Four threads create VMs without planned VMIDs through one instance: four VMs, four distinct VMIDs."""
    names = [f"par{i:02d}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        made = list(
            pool.map(lambda n: target.create_vm(_vm(n), Notes().intent("t-par", "create_vm", n))[0], names)
        )
    assert [m.name for m in made] == names and len({m.id for m in made}) == 4
    assert sorted(v.name for v in target.find_vm(tag=run_tag("t-par"))) == names
    target.remove(target.list_tagged("t-par"))
    assert target.find_vm(tag=run_tag("t-par")) == ()


# -- faults -----------------------------------------------------------------------------------


def test_faults_are_transient_or_permanent(target: ProxmoxExecTarget, lab: Lab) -> None:
    """A locked VM and a dropped connection are transient; a failing start task and a lost landing are not."""
    run = "t-fault"
    vm = _vm("fault01", node="pve1", disks=(_disk(),))
    landing = _land(target, lab, vm, run)
    made, _ = target.create_vm(vm, Notes().intent(run, "create_vm", vm.name))
    vmid = int(made.id)
    lab.pve.control("lock_vm", vmid=vmid, lock="backup")
    try:
        assert target.vm_state(made).locked
        with pytest.raises(TransientError, match=r"locked \(backup\)"):
            target.attach_disks(made, [(vm.disks[0], landing)], Notes().intent(run, "attach_disks", made.id))
        with pytest.raises(TransientError, match="locked"):
            target.start_vm(made, Notes().intent(run, "start_vm", made.id))
    finally:
        lab.pve.control("unlock_vm", vmid=vmid)
    assert Path(landing.ref).exists() and "scsi0" not in _config(lab, vmid)

    lab.pve.control("flaky_network", drop_rate=1.0, seed=3)
    try:
        with pytest.raises(TransientError, match="broke"):
            target.find_vm(name="fault01")
    finally:
        lab.pve.control("flaky_network", drop_rate=0.0)

    lab.pve.control("vm_set", vmid=vmid, start_error="kvm: cannot open disk image")
    with pytest.raises(PermanentError, match="cannot open disk image") as info:
        target.start_vm(made, Notes().intent(run, "start_vm", made.id))
    assert not isinstance(info.value, TransientError) and "TASK ERROR" in str(info.value)

    os.unlink(landing.ref)
    with pytest.raises(NotFoundError, match="does not exist"):
        target.attach_disks(made, [(vm.disks[0], landing)], Notes().intent(run, "attach_disks", made.id))
    target.remove(target.list_tagged(run))
    assert target.find_vm(name="fault01") == ()


def test_a_vmid_reused_by_someone_else_is_not_touched(target: ProxmoxExecTarget, lab: Lab) -> None:
    """A handle whose VMID now holds a VM without our tag is refused by every VM operation."""
    made, objects = target.create_vm(_vm("gone01"), Notes().intent("t-gone", "create_vm", "gone01"))
    target.remove(objects)
    with ProxmoxExecTarget("lab", lab.spec) as someone:  # someone creates a VM at the freed VMID
        someone.session().create_vm("pve2", int(made.id), {"name": "someone-else", "memory": 512})
    intent = Notes().intent("t-gone", "x", made.id)
    calls = (
        lambda: target.vm_state(made),
        lambda: target.start_vm(made, intent),
        lambda: target.attach_disks(made, [], intent),
    )
    for call in calls:
        with pytest.raises(PermanentError, match="now holds 'someone-else'"):
            call()
    (theirs,) = [v for v in lab.pve.state()["vms"] if v["vmid"] == int(made.id)]
    assert (theirs["name"], theirs["status"]) == ("someone-else", "stopped")


# -- the executor's steps, unchanged, against Proxmox VE ----------------------------------------


class ImageMover:
    """The disk pipeline's part, for these tests: streams a local image and reports only durable bytes."""

    def __init__(self, target: ProxmoxExecTarget, image: Path, break_at: int | None = None) -> None:
        self.target, self.image, self.break_at = target, image, break_at
        self.offsets: list[int] = []

    def export(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        return Noop("flat disk")

    def convert(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        return Noop("flat disk")

    def release(self, ctx: StepContext[VmSpec]) -> int:
        return 0  # nothing staged: the image streams from where it is

    def send(self, ctx: StepContext[VmSpec], disk: DiskSpec, landing: DiskLanding, offset: int) -> Sent:
        data = self.image.read_bytes()
        self.offsets.append(offset)
        sink = self.target.receive_disk(landing, offset)
        try:
            for start in range(offset, len(data), MiB):
                sink.write(data[start : start + MiB])
                if self.break_at is not None and start + MiB > self.break_at:
                    self.break_at = None
                    raise TransientError("the datastore connection broke")
                if (start + MiB) % (3 * MiB) == 0:  # a checkpoint: durable, then recorded
                    ctx.journal.transfer_progress(disk.key, sink.flush())
            sink.close()
        except BaseException:
            sink.abort()
            raise
        return Sent(len(data), hashlib.sha256(data).hexdigest())


def test_executor_steps_migrate_onto_proxmox_and_resume(
    target: ProxmoxExecTarget, lab: Lab, tmp_path: Path
) -> None:
    """The runner's steps build the VM; a broken transfer and a locked VM are retried; a rerun is a noop."""
    vm = _vm("e2e01", vmid=130, disks=(_disk(),))
    mover = ImageMover(target, lab.image, break_at=3 * MiB + 1)
    services = Services(FakeSource(World()), target, mover)
    plan = Work("sha256:e2e", (Wave(0, 1, (vm,)),))
    # One config change answered "locked", as while a backup runs: the attach step is retried.
    locked = {"status": 500, "message": "VM is locked (backup)", "times": 1}
    lab.pve.control("fail", method="POST", suffix="/qemu/130/config", **locked)
    options = Options(shutdown="force", verify="running")
    retry = RetryPolicy(attempts=3, first_delay_s=0, jitter_s=0)
    with StateStore(tmp_path / "state") as store:
        summary = Runner(store, STEPS, lambda _vm: services, options=options, retry=retry).run(plan)
        assert (summary.exit_code, summary.vms[0].status) == (0, "done"), summary
        assert mover.offsets == [0, 3 * MiB]  # the retried transfer continued from the durable bytes
        assert [s.attempt for s in store.steps(summary.run_id) if s.step == "attach_disks"] == [2]
        made = target.find_vm(name="e2e01", tag=run_tag(summary.run_id))
        assert [m.id for m in made] == ["130"] and target.vm_state(made[0]).power == "on"
        volume = lab.pve.node_root / "dev/pve/vm-130-disk-1"
        _assert_same_image(lab.image, volume)
        assert not list((lab.pve.node_root / "var/lib/vz/import").glob("e2e01-*"))  # landing, sidecar gone
        lab.pve.control("requests", clear=True)
        again = Runner(store, STEPS, lambda _vm: services, options=options, retry=retry).run(plan)
        assert again.exit_code == 0 and lab.pve.control("requests") == []
    target.remove(target.list_tagged(summary.run_id))
