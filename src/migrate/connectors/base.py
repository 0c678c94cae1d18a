"""What the executor needs from a source (vSphere) and a target (Proxmox VE, XCP-ng).

The executor imports only this module; ``cli.py`` wires the concrete connectors in. The
types here are neutral, so each step is written once for both targets:

=================  ======================================  ======================================
step               Proxmox VE                              XCP-ng
=================  ======================================  ======================================
``prepare_disk``   a file path on the node (SSH/SFTP)      ``VDI.create`` on the SR
``receive_disk``   SFTP write at an offset (resumable)     HTTP PUT ``/import_raw_vdi`` (restart)
``create_vm``      ``POST /qemu`` with the VMID, waits     ``VM.clone`` of the template,
                   for the UPID                            ``VIF.create`` per NIC
``attach_disks``   ``import-from=<landing>`` per slot,     ``VBD.create`` per VDI
                   then the landing file is temporary
``start_vm``       ``/status/start`` (UPID)                ``VM.start``
=================  ======================================  ======================================

After a disk is sent, ``landing_digest`` reads back what landed so the transfer step can
compare it with the source's sha256: Proxmox VE runs ``sha256sum`` on the node; XCP-ng
answers None (a VDI cannot be read back cheaply), and the transfer is then unverified.

Two rules every connector keeps:

* **Faults are translated at the border.** Only ``TransientError`` (retrying may help:
  resets, timeouts, 5xx, a locked VM) and ``PermanentError`` subclasses leave a connector;
  the runner retries exactly the transient ones.
* **Everything created is findable again.** Each object a run creates carries the run's tag
  (``run_tag(run_id)``) and the intent's key (VM name, disk key), so that after a crash
  between a request and its answer ``find_vm``/``list_tagged`` tell what already exists.
  Before each create/import/start the step commits an ``Intent`` to the state store; a
  connector that learns an id along the way (a VMID it picked, a task UPID, a VDI uuid)
  reports it with ``intent.note()`` before waiting on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from migrate.model import Backing, TargetKind

PowerState = Literal["on", "off", "suspended", "unknown"]
# never: leave the source running (its disks are read crash-consistent); guest: ask the guest OS
# (VMware Tools) and wait; guest-then-force: hard power-off after the timeout; force: hard
# power-off at once; require-off: never touch the source, fail if it is on.
ShutdownPolicy = Literal["never", "guest", "guest-then-force", "force", "require-off"]
DiskFormat = Literal["raw", "qcow2", "vmdk", "vhd"]
ObjectKind = Literal["vm", "disk", "landing", "nic", "task", "other"]

_TAG_SAFE = re.compile(r"[^a-z0-9_.+-]")


def run_tag(run_id: str) -> str:
    """The tag put on everything a run creates; lower-case and Proxmox-tag-safe."""
    return "migrate-" + _TAG_SAFE.sub("-", run_id.lower())


# -- what to build --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One disk to move: where its bytes are on the source and where they land on the target."""

    key: str  # stable within the VM (the vSphere device key); names landings and transfers
    label: str
    size_bytes: int
    source_path: str  # "[datastore] folder/name.vmdk", top of the chain
    storage: str  # Proxmox storage id or XCP-ng SR (name or uuid)
    # Where the disk goes on the VM, in the target's own words: "scsi0", "sata1" (Proxmox),
    # "0", "1" (XCP-ng VBD userdevice). ``VmState.disk_slots`` reports the same strings.
    slot: str
    datacenter: str = ""
    datastore: str = ""
    source_backing: Backing = "flat"
    source_chain: tuple[str, ...] = ()  # descriptors from the base disk up to source_path
    landing_format: DiskFormat = "raw"  # the bytes sent to the target
    format: DiskFormat = "raw"  # what the target finally stores
    boot: bool = False
    drive: str = ""  # Proxmox: the planned drive value, "{import_from}" standing for the landing
    name: str = ""  # XCP-ng: the VDI's name label

    @property
    def needs_staging(self) -> bool:
        """A snapshot chain or a sparse extent cannot stream as raw bytes; it is exported first."""
        return self.source_backing != "flat" or len(self.source_chain) > 1


@dataclass(frozen=True, slots=True)
class NicSpec:
    key: str
    mac: str  # "" lets the target generate one
    network: str  # Proxmox bridge/vnet or XCP-ng network (name or uuid)
    slot: str = ""  # Proxmox "net0"; XCP-ng VIF device "0"
    model: str = ""  # Proxmox NIC model; XCP-ng chooses by itself
    vlan: int | None = None


@dataclass(frozen=True, slots=True)
class VmSpec:
    """One VM to move, as both sides need it; ``executor.fromplan`` builds it from a VmPlan."""

    key: str  # unique in the plan: the source VM's moref
    name: str  # the name on the target
    source: str  # inventory name of the vSphere source
    source_moref: str
    target: str  # inventory name of the target
    target_kind: TargetKind
    source_name: str = ""
    datacenter: str = ""
    node: str = ""  # Proxmox node or XCP-ng host; "" lets XCP-ng choose
    vmid: int | None = None  # planned Proxmox VMID; None on XCP-ng
    template: str = ""  # XCP-ng template to clone
    # The target's own create settings as planned, in order: Proxmox ``POST /qemu`` params
    # (data disks excluded), or the XcpngConfig fields by XAPI name.
    settings: tuple[tuple[str, str], ...] = ()
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    power_on: bool = True  # start it on the target once built
    # The source VM's instance UUID as planned: the source connector refuses to touch a VM at
    # ``source_moref`` whose uuid differs. "" (plans made before it was recorded) skips the check.
    source_uuid: str = ""

    def setting(self, name: str) -> str | None:
        return dict(self.settings).get(name)


# -- what exists ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetVm:
    """A handle on a VM on the target (Proxmox: VMID; XCP-ng: VM uuid)."""

    target: str
    id: str
    name: str
    node: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VmState:
    power: PowerState
    disk_slots: tuple[str, ...] = ()  # slots with a disk attached, same words as DiskSpec.slot
    nic_macs: tuple[str, ...] = ()
    guest_agent: bool | None = None  # qemu-guest-agent / XCP-ng guest metrics; None: cannot tell
    locked: bool = False  # Proxmox config lock, XCP-ng blocked operation


@dataclass(frozen=True, slots=True)
class CreatedObject:
    """Something a run created on a target, so rollback can remove exactly that."""

    kind: ObjectKind
    id: str  # VMID, uuid, volume id or absolute path on the node
    target: str
    node: str = ""
    vm: str = ""  # VmSpec.key it belongs to
    # Landings a later step copies from (Proxmox import-from files) are removed once done.
    temporary: bool = False
    detail: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DiskLanding:
    """Where one disk's bytes are written on the target before or as it becomes the VM's disk."""

    disk_key: str
    target: str
    ref: str  # Proxmox: path on the node; XCP-ng: VDI uuid
    format: DiskFormat
    size_bytes: int
    node: str = ""
    resumable: bool = False  # can receive_disk continue at an offset after a break?
    temporary: bool = False  # removed once attached (Proxmox file) vs. becomes the disk (XCP-ng VDI)

    def as_object(self, vm: str) -> CreatedObject:
        return CreatedObject(
            kind="landing", id=self.ref, target=self.target, node=self.node, vm=vm, temporary=self.temporary
        )


@dataclass(frozen=True, slots=True)
class DatastoreFile:
    """A file of a source disk on a datastore (descriptor or extent), with its size in bytes."""

    path: str  # "[datastore] folder/name-flat.vmdk"
    size_bytes: int
    datacenter: str = ""


@dataclass(frozen=True, slots=True)
class Intent:
    """A request about to be sent, committed to the state store first so a crash can be reconciled."""

    run_id: str
    vm: str
    kind: str  # "create_vm", "prepare_disk", "attach_disk", "start_vm", "power_off"...
    key: str  # what finds the result again: VM name, disk key, VMID
    id: int = 0  # row id in the state store
    # Connectors call note("vmid", "105") / note("task", upid) as soon as they know it.
    note: Callable[[str, str], None] = field(default=lambda _k, _v: None, compare=False, repr=False)

    @property
    def tag(self) -> str:
        return run_tag(self.run_id)


# -- byte streams ---------------------------------------------------------------------------


class DiskReader(Protocol):
    """Bytes of a datastore file from an offset; ``read`` returns b"" at the end."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class DiskSink(Protocol):
    """Bytes into a landing. ``close`` completes it (and raises if the target refused); ``abort`` drops it."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> int:
        """Make what was written durable; return the offset a resume may safely start from."""
        ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


# -- the two sides --------------------------------------------------------------------------


@runtime_checkable
class Source(Protocol):
    """A vSphere source: power state, power off, and reading disk files off the datastores."""

    @property
    def name(self) -> str: ...

    def power_state(self, vm: VmSpec) -> PowerState: ...

    def power_off(self, vm: VmSpec, policy: ShutdownPolicy, timeout_s: float) -> PowerState:
        """Power the VM off as the policy says; return the state reached (raise if the policy forbids)."""
        ...

    def disk_files(self, vm: VmSpec, disk: DiskSpec) -> tuple[DatastoreFile, ...]:
        """The files to read for ``disk``: the flat extent alone, or descriptors and extents of the chain."""
        ...

    def open_file(self, file: DatastoreFile, offset: int = 0) -> DiskReader: ...


@runtime_checkable
class Target(Protocol):
    """A Proxmox VE cluster or an XCP-ng pool. Every call is safe to repeat after a crash."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> TargetKind: ...

    def find_vm(
        self, *, name: str | None = None, vmid: int | None = None, tag: str | None = None
    ) -> tuple[TargetVm, ...]:
        """VMs matching all the given filters."""
        ...

    def prepare_disk(self, vm: VmSpec, disk: DiskSpec, intent: Intent) -> DiskLanding:
        """Make (or find, if this run made it already) the landing for ``disk``."""
        ...

    def receive_disk(self, landing: DiskLanding, offset: int = 0, *, length: int | None = None) -> DiskSink:
        """A sink writing into ``landing`` from ``offset`` (0 unless ``landing.resumable``).

        ``length`` is how many bytes will be written in all when that is not the disk's size:
        a ``vhd`` landing takes a VHD file, whose size only the sender knows. A raw landing
        takes exactly ``landing.size_bytes`` and refuses any other length.
        """
        ...

    def landing_digest(self, landing: DiskLanding) -> str | None:
        """sha256 (hex) of the guest-visible bytes in ``landing``, or None when the target cannot tell."""
        ...

    def create_vm(self, vm: VmSpec, intent: Intent) -> tuple[TargetVm, tuple[CreatedObject, ...]]:
        """Create the VM without disks (NICs included), tagged ``intent.tag``; uses ``vm.vmid`` if set."""
        ...

    def attach_disks(
        self, vm: TargetVm, disks: Sequence[tuple[DiskSpec, DiskLanding]], intent: Intent
    ) -> tuple[CreatedObject, ...]:
        """Attach each landing at its slot (Proxmox imports it there); slots already filled are left alone."""
        ...

    def start_vm(self, vm: TargetVm, intent: Intent) -> None: ...

    def vm_state(self, vm: TargetVm) -> VmState: ...

    def remove(self, objects: Sequence[CreatedObject]) -> None:
        """Delete these objects (VM last); objects already gone are not an error."""
        ...

    def list_tagged(self, run_id: str) -> tuple[CreatedObject, ...]:
        """Every object on the target carrying the run's tag: what rollback and reconciliation see."""
        ...
