"""PipelineMover under the real step table: VHD landings carry only the allocated blocks of flat disks
and snapshot chains (in-memory target), and a landing that differs from the source fails its VM and is
sent again from byte 0 on resume (in-memory target, and Proxmox VE's node in the lab)."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_target import FakeSource, FakeTarget, World, disk_bytes
from migrate.connectors.base import DatastoreFile, DiskLanding, DiskSpec, NicSpec, Target, VmSpec, run_tag
from migrate.connectors.proxmox_target import ProxmoxExecTarget
from migrate.executor.diskmover import PipelineMover
from migrate.executor.fromplan import work_from_plan
from migrate.executor.runner import RetryPolicy, Runner, RunSummary, Wave, Work
from migrate.executor.state import StateStore
from migrate.executor.steps import STEPS, Options, Outcome, Sent, Services, StepContext
from migrate.inventory import ProxmoxSpec
from migrate.lab.certs import make_certs
from migrate.lab.pve import RunningPve, start_pve
from migrate.lab.sshd import start_sshd
from migrate.model import TargetKind
from migrate.plan import load_plan

KiB, MiB = 1024, 1 << 20
SIZE = 24 * MiB
VHD_BLOCK = 2 * MiB  # qemu's dynamic VHD block size
GOLDEN = Path(__file__).parent / "planner_cases" / "mixed-waves-pve-xcp" / "plan.yaml"


def sparse_bytes(path: str, size: int) -> bytes:
    """A real disk's shape: 1 MiB of data at the start, a 4 KiB island mid-disk, 512 KiB at the end."""
    noise = disk_bytes(path, 2 * MiB)
    data = bytearray(size)
    data[:MiB] = noise[:MiB]
    data[size // 2 + 4 * KiB : size // 2 + 8 * KiB] = noise[MiB : MiB + 4 * KiB]
    data[size - 512 * KiB :] = noise[MiB : MiB + 512 * KiB]
    return bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vm_spec(
    kind: TargetKind, landing: str = "raw", chain: tuple[str, ...] = (), *, name: str = "app", node: str = ""
) -> VmSpec:
    path = chain[-1] if chain else f"[ds1] {name}/{name}.vmdk"
    proxmox = kind == "proxmox"
    disk = DiskSpec(
        key="2000", label="Hard disk 1", size_bytes=SIZE, source_path=path,
        storage="local-lvm" if proxmox else "sr1", slot="scsi0" if proxmox else "0", source_chain=chain,
        landing_format=landing, format=landing,  # type: ignore[arg-type]
    )  # fmt: skip
    return VmSpec(
        key="vm-7", name=name, source="vc1", source_moref="vm-7", target="t1", target_kind=kind,
        node=node, vmid=107 if proxmox else None, disks=(disk,),
        settings=(("memory", "512"), ("cores", "1")) if proxmox else (),
        nics=(NicSpec("4000", "00:50:56:AA:00:07", "vmbr0", "net0" if proxmox else "0", "virtio"),),
    )  # fmt: skip


class Lengths:
    """A fake-target hook that records each receive_disk's announced length."""

    def __init__(self) -> None:
        self.seen: list[int | None] = []

    def __call__(self, method: str, phase: str, info: dict[str, Any]) -> None:
        if method == "receive_disk" and phase == "before":
            self.seen.append(info["length"])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state") as s:
        yield s


def run(store: StateStore, services: Services, vm: VmSpec, staging: Path) -> RunSummary:
    options = Options(shutdown="force", verify="running", staging_dir=staging)
    retry = RetryPolicy(attempts=1, first_delay_s=0, jitter_s=0)
    runner = Runner(store, STEPS, lambda _vm: services, options=options, retry=retry, sleep=lambda _s: None)
    return runner.run(Work("sha256:mover", (Wave(0, 1, (vm,)),)))


def transfer_detail(store: StateStore, run_id: str, vm: VmSpec) -> dict[str, Any]:
    step = store.step(run_id, vm.key, "transfer")
    assert step is not None
    detail: dict[str, Any] = step.detail["disks"][vm.disks[0].key]
    return detail


def test_fromplan_lands_vhd_only_on_xcpng() -> None:
    """The golden mixed plan: XCP-ng disks planned as vhd land as vhd; Proxmox disks (qcow2) land raw."""
    specs = [vm for wave in work_from_plan(load_plan(GOLDEN)).waves for vm in wave.vms]
    pairs = {(vm.target_kind, d.format, d.landing_format) for vm in specs for d in vm.disks}
    assert pairs == {("proxmox", "qcow2", "raw"), ("xcpng", "vhd", "vhd")}


def test_flat_disk_crosses_as_a_dynamic_vhd(store: StateStore, tmp_path: Path) -> None:
    """A sparse flat disk goes up as a VHD a fraction of its size; the VDI reads as the source's raw bytes."""
    world, lengths = World(), Lengths()
    source = FakeSource(world, content=sparse_bytes)
    target = FakeTarget(world, "xcp1", kind="xcpng", hook=lengths, digests=False)  # XCP-ng cannot read back
    staging = tmp_path / "staging"
    vm = vm_spec("xcpng", "vhd")
    summary = run(store, Services(source, target, PipelineMover(staging)), vm, staging)
    assert summary.exit_code == 0, summary
    want = sha(sparse_bytes(vm.disks[0].source_path, SIZE))
    assert target.disk_sha256("app", "0") == want
    (length,) = lengths.seen
    # Three of the twelve 2 MiB VHD blocks hold data (start, island, end): only those travel.
    assert length is not None and 3 * VHD_BLOCK < length < 4 * VHD_BLOCK
    detail = transfer_detail(store, summary.run_id, vm)
    assert (detail["sha256"], detail["bytes"], detail["from"], detail["verified"]) == (want, SIZE, 0, False)
    row = store.transfer(summary.run_id, vm.key, "2000")
    assert row is not None and row.complete and row.sha256 == want
    assert list(staging.iterdir()) == []  # the staged VHD (and its folder) is gone once uploaded


def _chain(folder: Path) -> tuple[bytes, dict[str, bytes]]:
    """A base disk with a snapshot on top, as qemu writes VMDKs; returns (guest bytes, files by name)."""
    folder.mkdir()

    def qemu(*argv: str) -> None:
        subprocess.run(argv, cwd=folder, check=True, capture_output=True)

    qemu("qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "base.vmdk", str(SIZE))
    qemu("qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 20M 64k", "base.vmdk")
    qemu("qemu-img", "create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
         "-b", "base.vmdk", "-F", "vmdk", "app-000001.vmdk")  # fmt: skip
    qemu("qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 512k 64k", "-c", "write -z 20M 64k", "app-000001.vmdk")
    qemu("qemu-img", "convert", "-f", "vmdk", "-O", "raw", "app-000001.vmdk", "guest.raw")
    guest = (folder / "guest.raw").read_bytes()
    names = ("base.vmdk", "base-flat.vmdk", "app-000001.vmdk", "app-000001-s001.vmdk")
    return guest, {name: (folder / name).read_bytes() for name in names}


class ChainSource(FakeSource):
    """The fake source, with a real VMDK snapshot chain as the disk's files."""

    def __init__(self, world: World, files: dict[str, bytes]) -> None:
        super().__init__(world, content=lambda path, _size: files[path.rsplit("/", 1)[-1]])
        self.files = files

    def disk_files(self, vm: VmSpec, disk: DiskSpec) -> tuple[DatastoreFile, ...]:
        return tuple(DatastoreFile(f"[ds1] app/{n}", len(b), vm.datacenter) for n, b in self.files.items())


def test_snapshot_chain_is_consolidated_then_sent_as_vhd(store: StateStore, tmp_path: Path) -> None:
    """A chain is staged, consolidated and sent as a VHD; the landing, verified, holds the guest's view."""
    guest, files = _chain(tmp_path / "chain")
    assert len(guest) == SIZE and guest[512 * KiB] == 0x5A and guest[20 * MiB] == 0  # the snapshot's view
    world, lengths = World(), Lengths()
    target = FakeTarget(world, "xcp1", kind="xcpng", hook=lengths)
    staging = tmp_path / "staging"
    vm = vm_spec("xcpng", "vhd", chain=("[ds1] app/base.vmdk", "[ds1] app/app-000001.vmdk"))
    summary = run(store, Services(ChainSource(world, files), target, PipelineMover(staging)), vm, staging)
    assert summary.exit_code == 0, summary
    assert target.disk_sha256("app", "0") == sha(guest)
    detail = transfer_detail(store, summary.run_id, vm)
    assert (detail["sha256"], detail["verified"]) == (sha(guest), True)
    (length,) = lengths.seen
    assert length is not None and VHD_BLOCK < length < 2 * VHD_BLOCK  # all the data is in the first block
    assert store.step(summary.run_id, vm.key, "convert").status == "done"  # type: ignore[union-attr]
    # The VM is done: its staged chain and consolidated image are gone, and the step says how much.
    assert list(staging.iterdir()) == []
    done = store.step(summary.run_id, vm.key, "done")
    assert done is not None and done.detail["staging_bytes_freed"] > SIZE // 2


def test_a_damaged_landing_fails_the_vm_and_resume_sends_it_again(store: StateStore, tmp_path: Path) -> None:
    """One wrong byte on the target: the transfer fails naming both digests, is reset, and resume resends."""
    world = World()
    source = FakeSource(world, content=sparse_bytes)
    target = FakeTarget(world, "pve1", kind="proxmox")
    target.corrupt("2000", 123_457)
    vm = vm_spec("proxmox")
    want = sha(sparse_bytes(vm.disks[0].source_path, SIZE))
    services = Services(source, target, PipelineMover(tmp_path / "staging"))
    first = run(store, services, vm, tmp_path / "staging")
    assert [(v.status, v.failed_step) for v in first.vms] == [("failed", "transfer")]
    error = first.vms[0].error or ""
    assert f"but the source's is {want}" in error and "disk 'Hard disk 1' of 'app' landed on pve1" in error
    broken = sha(bytes(world.data[next(iter(world.landings))]))
    assert broken != want and f"with sha256 {broken}" in error
    assert "resume the run: the disk is sent again from its first byte" in error
    row = store.transfer(first.run_id, vm.key, "2000")
    assert row is not None and (row.complete, row.bytes_done, row.sha256) == (False, 0, None)
    assert target.find_vm(name="app", tag=run_tag(first.run_id)) == ()  # nothing built on a bad disk

    resumed = run(store, services, vm, tmp_path / "staging")
    assert (resumed.run_id, resumed.exit_code) == (first.run_id, 0)
    assert target.disk_sha256("app", "scsi0") == want
    detail = transfer_detail(store, first.run_id, vm)
    assert (detail["from"], detail["sha256"], detail["verified"]) == (0, want, True)


# -- Proxmox VE in the lab: the digest is computed on the node ----------------------------------


class DamagingMover:
    """The pipeline, then one byte of the first landing inverted on the node, as failing storage would."""

    def __init__(self, inner: PipelineMover) -> None:
        self.inner = inner
        self.damaged: list[str] = []

    def export(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        return self.inner.export(ctx, disk)

    def convert(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        return self.inner.convert(ctx, disk)

    def release(self, ctx: StepContext[VmSpec]) -> int:
        return self.inner.release(ctx)

    def send(self, ctx: StepContext[VmSpec], disk: DiskSpec, landing: DiskLanding, offset: int) -> Sent:
        sent = self.inner.send(ctx, disk, landing, offset)
        if not self.damaged:
            with open(landing.ref, "r+b") as file:  # the lab node's file system is this machine's
                file.seek(100)
                byte = file.read(1)
                file.seek(100)
                file.write(bytes([byte[0] ^ 0xFF]))
            self.damaged.append(landing.ref)
        return sent


@pytest.fixture(scope="module")
def pve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningPve, ProxmoxSpec]]:
    work = tmp_path_factory.mktemp("mover-pve")
    sshd = start_sshd(work / "sshd")
    try:
        lab = start_pve(work / "lab", make_certs(work / "certs"))
    except BaseException:
        sshd.stop()
        raise
    try:
        yield lab, ProxmoxSpec.model_validate(lab.inventory_entry(sshd))
    finally:
        lab.stop()
        sshd.stop()


def test_proxmox_landing_is_checked_on_the_node(
    pve: tuple[RunningPve, ProxmoxSpec], store: StateStore, tmp_path: Path
) -> None:
    """sha256sum on the node catches a landing damaged there; resume sends it again and the disk is right."""
    lab, spec = pve
    world = World()
    source = FakeSource(world, content=sparse_bytes)
    vm = vm_spec("proxmox", name="verify01", node="pve1")
    want = sha(sparse_bytes(vm.disks[0].source_path, SIZE))
    with ProxmoxExecTarget("lab", spec) as target:
        assert isinstance(target, Target)
        mover = DamagingMover(PipelineMover(tmp_path / "staging"))
        first = run(store, Services(source, target, mover), vm, tmp_path / "staging")
        assert [(v.status, v.failed_step) for v in first.vms] == [("failed", "transfer")]
        error = first.vms[0].error or ""
        assert f"but the source's is {want}" in error and mover.damaged[0] in error
        row = store.transfer(first.run_id, vm.key, "2000")
        assert row is not None and (row.complete, row.bytes_done) == (False, 0)

        staging = tmp_path / "staging"
        again = run(store, Services(source, target, PipelineMover(staging)), vm, staging)
        assert (again.run_id, again.exit_code) == (first.run_id, 0)
        detail = transfer_detail(store, first.run_id, vm)
        assert (detail["from"], detail["sha256"], detail["verified"]) == (0, want, True)
        (made,) = target.find_vm(name="verify01", tag=run_tag(first.run_id))
        volume = next(v for v in lab.state()["vms"] if v["vmid"] == int(made.id))["config"]["scsi0"]
        image = lab.node_root / "dev/pve" / volume.split(",", 1)[0].split(":", 1)[1]
        assert sha(image.read_bytes()) == want
        target.remove(target.list_tagged(first.run_id))
