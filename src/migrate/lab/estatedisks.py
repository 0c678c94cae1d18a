"""Every byte the estate puts on the datastore, planned before anything is uploaded.

For each VM: its folder (named after the escaped inventory name, as vCenter does), and per
disk the descriptor and flat extent of the base and, per snapshot, a vmfsSparse delta. The
plan knows the sha256 of each file and of what the guest sees once the deltas are applied,
which is what a migrated disk must hash to.

What each snapshot's delta changes (deterministic from the VM's tag and the level):
  * 64 KiB of the data region rewritten, 4 KiB of it zeroed (a zero grain must hide the base),
  * 8 KiB written into a hole,
  * on the boot disk, at the last level: the boot code now prints the VM's own line. The base
    prints "<tag>.pre-snapshot", so a migration that drops the delta boots and says so.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from migrate.lab import bootcode, bootdisk, vmdkfiles
from migrate.lab.bootdisk import MIB, SECTOR, BootDisk, Chunk, Layout
from migrate.lab.estate import DiskSpec, VmSpec

PRE_SNAPSHOT = ".pre-snapshot"
# What vcsim 0.24 needs to attach an existing disk: "<name>-flat.vmdk" beside "<name>.vmdk",
# even when the disk is a delta. A zero-length stand-in is uploaded, then deleted.
PLACEHOLDER_SUFFIX = "-flat.vmdk"


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """A file to put on the datastore: ``path`` is relative to the datastore root."""

    path: str
    content: Layout | bytes

    @property
    def size(self) -> int:
        return self.content.size if isinstance(self.content, Layout) else len(self.content)

    def sha256(self) -> str:
        if isinstance(self.content, Layout):
            return self.content.sha256()
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class PlannedDisk:
    spec: DiskSpec
    index: int  # 0-based position in the VM's disk list
    base: BootDisk
    deltas: tuple[tuple[Chunk, ...], ...]  # writes of snapshot level 1..n
    consolidated: Layout
    serial_line: str | None
    base_serial_line: str | None
    chain: tuple[str, ...]  # descriptor paths (relative), base first
    files: tuple[PlannedFile, ...]
    placeholder: str | None  # relative path of the stand-in vcsim needs, if any
    uuid: str  # the disk's UUID as vSphere shows it (ddb.uuid of the base)

    @property
    def descriptor(self) -> str:
        return self.chain[-1]

    @property
    def capacity(self) -> int:
        return self.base.size

    @cached_property
    def sha256(self) -> str:
        return self.consolidated.sha256()

    @cached_property
    def base_sha256(self) -> str:
        return self.base.layout.sha256()


@dataclass(frozen=True, slots=True)
class PlannedVm:
    spec: VmSpec
    directory: str  # datastore folder, relative
    disks: tuple[PlannedDisk, ...]

    @property
    def vmx(self) -> str:
        return f"{self.directory}/{self.spec.inventory_name}.vmx"

    @property
    def serial_line(self) -> str | None:
        return next((d.serial_line for d in self.disks if d.spec.boot), None)


def disk_stem(directory: str, index: int) -> str:
    """ESXi's names: the first disk is <vm>.vmdk, the next <vm>_1.vmdk, <vm>_2.vmdk..."""
    name = directory if index == 0 else f"{directory}_{index}"
    return f"{directory}/{name}"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _hw_version(vm: VmSpec) -> int:
    return int(vm.hw_version.removeprefix("vmx-"))


def _sector_diff(old: Layout, new: Layout) -> list[Chunk]:
    """Sectors where ``new`` differs from ``old`` (both the same size), as write chunks."""
    spans = sorted(
        (c.offset // SECTOR * SECTOR, -(-c.end // SECTOR) * SECTOR) for c in (*old.chunks, *new.chunks)
    )
    writes: list[Chunk] = []
    seen = 0
    for lo, hi in spans:
        lo = max(lo, seen)
        for at in range(lo, hi, SECTOR):
            data = new.read(at, SECTOR)
            if data != old.read(at, SECTOR):
                if writes and writes[-1].end == at:
                    writes[-1] = Chunk(writes[-1].offset, writes[-1].data + data)
                else:
                    writes.append(Chunk(at, data))
        seen = max(seen, hi)
    return writes


def _delta_writes(tag: str, disk: BootDisk, level: int) -> list[Chunk]:
    start, length = disk.data_region
    seed = f"{tag}/{disk.tag}/snapshot-{level}"
    rewrite_at = start + min(length // 2, 64 * 1024 * level)
    rewrite = bytearray(bootdisk.pseudo_random(seed, "rewrite", 64 * 1024))
    rewrite[8192:12288] = bytes(4096)  # zeros over data: the delta must win over the base
    hole_at = disk.size // 8 * 3 // MIB * MIB + 4096 * level
    return [Chunk(rewrite_at, bytes(rewrite)), Chunk(hole_at, bootdisk.pseudo_random(seed, "hole", 8192))]


def plan_disk(vm: VmSpec, index: int, directory: str) -> PlannedDisk:
    spec = vm.disks[index]
    levels = len(vm.snapshots)
    kind: bootdisk.DiskKind = vm.firmware if spec.boot else "data"
    disk_tag = vm.tag if index == 0 else f"{vm.tag}_{index}"
    final_line_tag = vm.tag
    base = bootdisk.build(kind, disk_tag, spec.size_mib, data_kib=spec.data_kib,
                          message_tag=final_line_tag + (PRE_SNAPSHOT if levels and spec.boot else ""))
    deltas: list[tuple[Chunk, ...]] = []
    current = base.layout
    for level in range(1, levels + 1):
        writes: list[Chunk] = _delta_writes(vm.tag, base, level)
        if spec.boot and level == levels:
            final = bootdisk.build(kind, disk_tag, spec.size_mib, data_kib=spec.data_kib,
                                   message_tag=final_line_tag)
            writes += _sector_diff(base.layout, final.layout)
        writes.sort(key=lambda c: c.offset)
        deltas.append(tuple(writes))
        current = current.overlay(writes)

    stem = disk_stem(directory, index)
    ids = vmdkfiles.DiskIds.from_seed(f"{vm.tag}/{index}")
    flat = f"{stem}-flat.vmdk"
    files = [
        PlannedFile(f"{stem}.vmdk", vmdkfiles.flat_descriptor(
            extent_name=_basename(flat), capacity=base.size, ids=ids, controller=spec.controller,
            create_type=spec.create_type, thin=spec.thin, hw_version=_hw_version(vm))),
        PlannedFile(flat, base.layout),
    ]
    chain = [f"{stem}.vmdk"]
    parent_cid = ids.cid
    for level, delta in enumerate(deltas, start=1):
        delta_stem = f"{stem}-{level:06d}"
        delta_ids = vmdkfiles.DiskIds.from_seed(f"{vm.tag}/{index}/{level}")
        files.append(PlannedFile(f"{delta_stem}.vmdk", vmdkfiles.delta_descriptor(
            extent_name=_basename(f"{delta_stem}-delta.vmdk"), capacity=base.size, ids=delta_ids,
            parent_cid=parent_cid, parent_name=_basename(chain[-1]))))
        files.append(PlannedFile(f"{delta_stem}-delta.vmdk",
                                 vmdkfiles.cowd_delta(base.size, delta, parent_name=_basename(chain[-1]))))
        chain.append(f"{delta_stem}.vmdk")
        parent_cid = delta_ids.cid

    placeholder = chain[-1].removesuffix(".vmdk") + PLACEHOLDER_SUFFIX if deltas else None
    return PlannedDisk(
        spec=spec,
        index=index,
        base=base,
        deltas=tuple(deltas),
        consolidated=current,
        serial_line=bootcode.serial_line(final_line_tag) if spec.boot else None,
        base_serial_line=base.serial_line if levels and spec.boot else None,
        chain=tuple(chain),
        files=tuple(files),
        placeholder=placeholder,
        uuid=ids.vsphere_uuid,
    )


def plan_vm(vm: VmSpec) -> PlannedVm:
    """Everything VM ``vm`` puts on the datastore."""
    directory = vm.inventory_name
    return PlannedVm(vm, directory, tuple(plan_disk(vm, i, directory) for i in range(len(vm.disks))))


def iso_placeholder(path: str) -> bytes:
    """Stand-in content for an ISO on the datastore: a marker, then zeros to 64 KiB."""
    return f"MIGRATE-LAB placeholder for {path}; not an ISO 9660 image\n".encode().ljust(64 * 1024, b"\0")
