"""In-memory source, target and disk mover for the pure executor tests (STYLE.md, point 14).

They keep the promises of ``connectors/base.py`` the way the real connectors must: every
object carries the run's tag and is found again after a crash, repeated calls do not
duplicate, faults are ``TransientError``/``PermanentError``. With ``root`` set, the world is
also written to disk after every change, so a test can ``kill -9`` a run in a child process
and resume it in another against the same "real state".

``hook(method, phase, info)`` runs before (``phase="before"``) and after (``"after"``) each
effect, which lets a test check the state store at that instant, inject a fault, or park the
process there to be killed. ``fail(method, *errors)`` queues faults for the next calls, and
``corrupt(disk_key, offset)`` makes the next landing of that disk hold one wrong byte.

An XCP-ng-shaped target takes ``vhd`` landings as xapi does: the VHD file is decoded to raw
on ``close``, so what the guest would read is always the raw disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrate.connectors.base import (
    CreatedObject,
    DatastoreFile,
    DiskLanding,
    DiskReader,
    DiskSink,
    DiskSpec,
    Intent,
    PowerState,
    ShutdownPolicy,
    TargetVm,
    VmSpec,
    VmState,
    run_tag,
)
from migrate.errors import PermanentError
from migrate.executor.steps import Changed, Noop, Outcome, Sent, StepContext
from migrate.lab.xapi_fake import vhd
from migrate.lab.xapi_fake.rawfile import SparseWriter
from migrate.model import TargetKind

Hook = Callable[[str, str, dict[str, Any]], None]


def disk_bytes(path: str, size: int) -> bytes:
    """Deterministic, incompressible content for a source disk file."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{path}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@dataclass
class World:
    """Everything the fakes know, optionally mirrored to ``root`` after each change."""

    root: Path | None = None
    source_power: dict[str, str] = field(default_factory=dict)  # moref -> on/off
    vms: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # id -> {name, node, tags, power, disks, macs}
    landings: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # ref -> {vm, disk, tag, size, complete}
    volumes: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # volume id -> {vm_id, slot, tag, sha256}
    effects: dict[str, int] = field(default_factory=dict)  # "create_vm:web" -> times really done
    next_vmid: int = 100
    data: dict[str, bytearray] = field(default_factory=dict)  # landing ref -> bytes

    @classmethod
    def open(cls, root: Path | None) -> World:
        world = cls(root=root)
        if root is not None and (root / "world.json").exists():
            state = json.loads((root / "world.json").read_text())
            world.source_power = state["source_power"]
            world.vms = state["vms"]
            world.landings = state["landings"]
            world.volumes = state["volumes"]
            world.effects = state["effects"]
            world.next_vmid = state["next_vmid"]
            for ref in world.landings:
                blob = root / _blob_name(ref)
                world.data[ref] = bytearray(blob.read_bytes() if blob.exists() else b"")
        return world

    def effect(self, name: str) -> None:
        self.effects[name] = self.effects.get(name, 0) + 1

    def save(self) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        state = {
            "source_power": self.source_power,
            "vms": self.vms,
            "landings": self.landings,
            "volumes": self.volumes,
            "effects": self.effects,
            "next_vmid": self.next_vmid,
        }
        tmp = self.root / "world.json.tmp"
        tmp.write_text(json.dumps(state, sort_keys=True))
        os.replace(tmp, self.root / "world.json")

    def write_blob(self, ref: str, offset: int, data: bytes) -> None:
        buf = self.data.setdefault(ref, bytearray())
        if len(buf) < offset:
            raise AssertionError(f"write at {offset} past the end {len(buf)} of {ref}")
        buf[offset : offset + len(data)] = data
        if self.root is not None:
            fd = os.open(self.root / _blob_name(ref), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

    def replace_blob(self, ref: str, data: bytes) -> None:
        self.data[ref] = bytearray(data)
        if self.root is not None:
            (self.root / _blob_name(ref)).write_bytes(data)

    def truncate(self, ref: str, size: int) -> None:
        del self.data.setdefault(ref, bytearray())[size:]
        self.landings[ref]["written"] = size
        if self.root is not None:
            blob = self.root / _blob_name(ref)
            if blob.exists():
                os.truncate(blob, size)
        self.save()


def _blob_name(ref: str) -> str:
    return hashlib.sha256(ref.encode()).hexdigest()[:16] + ".bin"


class _Faults:
    def __init__(self, hook: Hook | None) -> None:
        self.hook = hook
        self.queued: dict[str, list[BaseException]] = {}
        self.calls: list[tuple[str, str]] = []

    def fail(self, method: str, *errors: BaseException) -> None:
        self.queued.setdefault(method, []).extend(errors)

    def enter(self, method: str, key: str, info: dict[str, Any] | None = None) -> None:
        self.calls.append((method, key))
        queued = self.queued.get(method)
        if queued:
            raise queued.pop(0)
        if self.hook is not None:
            self.hook(method, "before", {"key": key, **(info or {})})

    def leave(self, method: str, key: str, info: dict[str, Any] | None = None) -> None:
        if self.hook is not None:
            self.hook(method, "after", {"key": key, **(info or {})})


class FakeSource:
    """A vSphere stand-in: power states and deterministic disk files (``content(path, size)``)."""

    def __init__(
        self,
        world: World,
        name: str = "vc1",
        hook: Hook | None = None,
        content: Callable[[str, int], bytes] = disk_bytes,
    ) -> None:
        self.world = world
        self._name = name
        self.faults = _Faults(hook)
        self.content = content

    @property
    def name(self) -> str:
        return self._name

    def fail(self, method: str, *errors: BaseException) -> None:
        self.faults.fail(method, *errors)

    def power_state(self, vm: VmSpec) -> PowerState:
        self.faults.enter("power_state", vm.source_moref)
        return "on" if self.world.source_power.get(vm.source_moref, "on") == "on" else "off"

    def power_off(self, vm: VmSpec, policy: ShutdownPolicy, timeout_s: float) -> PowerState:
        self.faults.enter("power_off", vm.source_moref, {"policy": policy})
        if self.world.source_power.get(vm.source_moref, "on") == "on":
            self.world.source_power[vm.source_moref] = "off"
            self.world.effect(f"power_off:{vm.source_moref}")
            self.world.save()
        self.faults.leave("power_off", vm.source_moref)
        return "off"

    def disk_files(self, vm: VmSpec, disk: DiskSpec) -> tuple[DatastoreFile, ...]:
        return (DatastoreFile(disk.source_path, disk.size_bytes, vm.datacenter),)

    def open_file(self, file: DatastoreFile, offset: int = 0) -> DiskReader:
        self.faults.enter("open_file", file.path, {"offset": offset})
        stream = io.BytesIO(self.content(file.path, file.size_bytes))
        stream.seek(offset)
        return stream


class _Sink:
    def __init__(self, target: FakeTarget, landing: DiskLanding, offset: int, length: int) -> None:
        self._target = target
        self._landing = landing
        self.position = offset
        self.length = length  # bytes announced: the disk's size, or a VHD file's

    def write(self, data: bytes, /) -> int:
        target = self._target
        target.faults.enter("sink_write", self._landing.ref, {"offset": self.position, "size": len(data)})
        if self.position + len(data) > self.length:
            raise PermanentError(f"landing {self._landing.ref}: more than the announced {self.length} bytes")
        target.world.write_blob(self._landing.ref, self.position, data)
        self.position += len(data)
        target.world.landings[self._landing.ref]["written"] = self.position
        target.world.save()
        target.faults.leave("sink_write", self._landing.ref, {"offset": self.position})
        return len(data)

    def flush(self) -> int:
        return self.position

    def close(self) -> None:
        target, ref = self._target, self._landing.ref
        world = target.world
        if self.position != self.length:
            raise PermanentError(f"landing {ref} closed after {self.position} of {self.length} bytes")
        if self._landing.format == "vhd":
            world.replace_blob(ref, _decode_vhd(bytes(world.data[ref]), self._landing.size_bytes))
        at = target.corruptions.pop(self._landing.disk_key, None)
        if at is not None:
            broken = bytearray(world.data[ref])
            broken[at] ^= 0xFF
            world.replace_blob(ref, bytes(broken))
        world.landings[ref]["complete"] = True
        world.save()

    def abort(self) -> None:
        pass


def _decode_vhd(data: bytes, size: int) -> bytes:
    """The raw disk a VHD file holds, decoded by the XAPI fake's importer."""
    out = io.BytesIO(bytes(size))
    view = memoryview(data)
    pos = [0]

    def read(n: int) -> bytes:
        chunk = bytes(view[pos[0] : pos[0] + n])
        pos[0] += len(chunk)
        return chunk

    vhd.decode(read, len(data), SparseWriter(out, size))
    return out.getvalue()


class FakeTarget:
    """A Proxmox- or XCP-ng-shaped target, with the promises of connectors/base.py."""

    def __init__(
        self,
        world: World,
        name: str = "pve1",
        *,
        kind: TargetKind = "proxmox",
        hook: Hook | None = None,
        resumable: bool = True,
        digests: bool = True,
    ) -> None:
        self.world = world
        self._name = name
        self._kind: TargetKind = kind
        self.faults = _Faults(hook)
        self.resumable = resumable
        self.digests = digests  # False: landing_digest answers None, as XCP-ng does
        self.corruptions: dict[str, int] = {}  # disk key -> offset of the byte the next landing gets wrong

    def corrupt(self, disk_key: str, offset: int) -> None:
        """The next landing of ``disk_key`` to complete holds the byte at ``offset`` inverted."""
        self.corruptions[disk_key] = offset

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> TargetKind:
        return self._kind

    def fail(self, method: str, *errors: BaseException) -> None:
        self.faults.fail(method, *errors)

    def add_foreign_vm(self, name: str, vmid: int) -> None:
        """A VM that exists on the target but was not made by migrate."""
        self.world.vms[str(vmid)] = {
            "name": name,
            "node": "n1",
            "tags": [],
            "power": "on",
            "disks": {},
            "macs": [],
        }
        self.world.save()

    def _handle(self, vm_id: str) -> TargetVm:
        vm = self.world.vms[vm_id]
        return TargetVm(self._name, vm_id, vm["name"], vm["node"], tuple(vm["tags"]))

    def find_vm(
        self, *, name: str | None = None, vmid: int | None = None, tag: str | None = None
    ) -> tuple[TargetVm, ...]:
        self.faults.enter("find_vm", name or str(vmid))
        return tuple(
            self._handle(vm_id)
            for vm_id, vm in sorted(self.world.vms.items())
            if (name is None or vm["name"] == name)
            and (vmid is None or vm_id == str(vmid))
            and (tag is None or tag in vm["tags"])
        )

    def prepare_disk(self, vm: VmSpec, disk: DiskSpec, intent: Intent) -> DiskLanding:
        self.faults.enter("prepare_disk", disk.key, {"intent": intent})
        ref = f"/var/lib/vz/import/{intent.tag}-{vm.key}-{disk.key}.raw"
        temporary = self._kind == "proxmox"
        if ref not in self.world.landings:
            self.world.landings[ref] = {
                "vm": vm.key,
                "disk": disk.key,
                "tag": intent.tag,
                "size": disk.size_bytes,
                "written": 0,
                "complete": False,
                "temporary": temporary,
            }
            self.world.data[ref] = bytearray()
            self.world.effect(f"prepare_disk:{vm.key}:{disk.key}")
            self.world.save()
        intent.note("landing", ref)
        self.faults.leave("prepare_disk", disk.key)
        # XCP-ng imports a VHD as sent; Proxmox's import-from reads the raw landing.
        fmt = disk.landing_format if self._kind == "xcpng" and disk.landing_format == "vhd" else "raw"
        resumable = self.resumable and fmt == "raw"
        return DiskLanding(disk.key, self._name, ref, fmt, disk.size_bytes, "n1", resumable, temporary)

    def receive_disk(self, landing: DiskLanding, offset: int = 0, *, length: int | None = None) -> DiskSink:
        self.faults.enter("receive_disk", landing.ref, {"offset": offset, "length": length})
        if offset and not landing.resumable:
            raise PermanentError(f"landing {landing.ref} cannot continue at an offset")
        if landing.format != "vhd" and length not in (None, landing.size_bytes):
            raise PermanentError(f"raw landing {landing.ref} takes {landing.size_bytes} bytes, not {length}")
        meta = self.world.landings[landing.ref]
        if offset > meta["written"]:
            raise PermanentError(
                f"landing {landing.ref} has {meta['written']} bytes, cannot continue at {offset}"
            )
        self.world.truncate(landing.ref, offset)
        return _Sink(self, landing, offset, landing.size_bytes if length is None else length)

    def landing_digest(self, landing: DiskLanding) -> str | None:
        self.faults.enter("landing_digest", landing.ref)
        if not self.digests:
            return None
        return hashlib.sha256(bytes(self.world.data[landing.ref])).hexdigest()

    def create_vm(self, vm: VmSpec, intent: Intent) -> tuple[TargetVm, tuple[CreatedObject, ...]]:
        self.faults.enter("create_vm", vm.name, {"intent": intent})
        vmid = vm.vmid if vm.vmid is not None else self.world.next_vmid
        while str(vmid) in self.world.vms:  # someone else's VM: never touched, the next free VMID is used
            vmid = max(vmid + 1, self.world.next_vmid)
        intent.note("vmid", str(vmid))
        self.world.next_vmid = max(self.world.next_vmid, vmid + 1)
        self.world.vms[str(vmid)] = {
            "name": vm.name,
            "node": vm.node or "n1",
            "tags": [intent.tag],
            "power": "off",
            "disks": {},
            "macs": [n.mac.lower() for n in vm.nics],
        }
        self.world.effect(f"create_vm:{vm.name}")
        self.world.save()
        self.faults.leave("create_vm", vm.name, {"vmid": vmid})
        return self._handle(str(vmid)), ()

    def attach_disks(
        self, vm: TargetVm, disks: Sequence[tuple[DiskSpec, DiskLanding]], intent: Intent
    ) -> tuple[CreatedObject, ...]:
        self.faults.enter("attach_disks", vm.id, {"intent": intent})
        made = []
        record = self.world.vms[vm.id]
        for disk, landing in disks:
            if disk.slot in record["disks"]:
                continue
            meta = self.world.landings.get(landing.ref)
            if meta is None or not meta["complete"]:
                raise PermanentError(f"landing {landing.ref} is missing or incomplete")
            if landing.temporary:  # Proxmox: import-from copies the landing into a new volume
                volume = f"local-lvm:vm-{vm.id}-disk-{len(record['disks'])}"
                sha = hashlib.sha256(bytes(self.world.data[landing.ref])).hexdigest()
                self.world.volumes[volume] = {
                    "vm_id": vm.id,
                    "slot": disk.slot,
                    "tag": intent.tag,
                    "sha256": sha,
                }
                made.append(CreatedObject("disk", volume, self._name, record["node"], intent.vm))
            else:
                volume = landing.ref
            record["disks"][disk.slot] = volume
            self.world.effect(f"attach:{vm.id}:{disk.slot}")
            self.world.save()
        self.faults.leave("attach_disks", vm.id)
        return tuple(made)

    def start_vm(self, vm: TargetVm, intent: Intent) -> None:
        self.faults.enter("start_vm", vm.id, {"intent": intent})
        record = self.world.vms[vm.id]
        if record["power"] != "on":
            record["power"] = "on"
            self.world.effect(f"start:{vm.id}")
            self.world.save()
        self.faults.leave("start_vm", vm.id)

    def vm_state(self, vm: TargetVm) -> VmState:
        self.faults.enter("vm_state", vm.id)
        record = self.world.vms[vm.id]
        return VmState(
            power="on" if record["power"] == "on" else "off",
            disk_slots=tuple(sorted(record["disks"])),
            nic_macs=tuple(record["macs"]),
            guest_agent=record["power"] == "on",
        )

    def remove(self, objects: Sequence[CreatedObject]) -> None:
        self.faults.enter("remove", ",".join(o.id for o in objects))
        for obj in sorted(objects, key=lambda o: o.kind == "vm"):
            if obj.kind == "landing":
                self.world.landings.pop(obj.id, None)
                self.world.data.pop(obj.id, None)
            elif obj.kind == "disk":
                self.world.volumes.pop(obj.id, None)
            elif obj.kind == "vm":
                self.world.vms.pop(obj.id, None)
            self.world.effect(f"remove:{obj.id}")
        self.world.save()

    def list_tagged(self, run_id: str) -> tuple[CreatedObject, ...]:
        tag = run_tag(run_id)
        out = [
            CreatedObject("vm", i, self._name, v["node"])
            for i, v in self.world.vms.items()
            if tag in v["tags"]
        ]
        out += [
            CreatedObject("landing", ref, self._name, "n1", meta["vm"], meta["temporary"])
            for ref, meta in self.world.landings.items()
            if meta["tag"] == tag
        ]
        out += [
            CreatedObject("disk", vol, self._name)
            for vol, meta in self.world.volumes.items()
            if meta["tag"] == tag
        ]
        return tuple(out)

    def disk_sha256(self, vm_name: str, slot: str) -> str:
        """What the guest would read at ``slot``: the imported volume's or the landing's sha256."""
        vm = next(v for v in self.world.vms.values() if v["name"] == vm_name)
        ref = vm["disks"][slot]
        if ref in self.world.volumes:
            return str(self.world.volumes[ref]["sha256"])
        return hashlib.sha256(bytes(self.world.data[ref])).hexdigest()


class FakeMover:
    """The disk pipeline's stand-in: stages nothing real, streams source bytes into the sink."""

    def __init__(self, source: FakeSource, target: FakeTarget, chunk: int = 64 << 10) -> None:
        self.source = source
        self.target = target
        self.chunk = chunk
        self.staged: dict[str, set[str]] = {"export": set(), "convert": set()}
        self.sent_bytes = 0  # bytes actually written to sinks in this process

    def _stage(self, kind: str, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        key = f"{ctx.vm.key}/{disk.key}"
        if key in self.staged[kind]:
            return Noop(f"{disk.label} already {kind}ed")
        self.staged[kind].add(key)
        return Changed({"disk": disk.key})

    def export(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        return self._stage("export", ctx, disk)

    def convert(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        return self._stage("convert", ctx, disk)

    def release(self, ctx: StepContext[VmSpec]) -> int:
        """Forget this VM's staged disks, as the real mover deletes their files."""
        keys = {f"{ctx.vm.key}/{disk.key}" for disk in ctx.vm.disks}
        freed = sum(len(self.staged[kind] & keys) for kind in self.staged)
        for kind in self.staged:
            self.staged[kind] -= keys
        return freed

    def send(self, ctx: StepContext[VmSpec], disk: DiskSpec, landing: DiskLanding, offset: int) -> Sent:
        (file,) = self.source.disk_files(ctx.vm, disk)
        digest = hashlib.sha256()
        # The hash of what already landed cannot be saved mid-way: read that prefix again.
        prefix = self.source.open_file(file, 0).read(offset)
        digest.update(prefix)
        reader = self.source.open_file(file, offset)
        sink = self.target.receive_disk(landing, offset)
        done = offset
        while chunk := reader.read(self.chunk):
            sink.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            self.sent_bytes += len(chunk)
            ctx.journal.transfer_progress(disk.key, sink.flush())
        sink.close()
        return Sent(done, digest.hexdigest())
