"""The inventory model: what a source (vSphere) and a target (Proxmox VE, XCP-ng) look like.

Frozen, slotted, typed dataclasses, built only by connectors and the JSON loader. Nothing
here does I/O. Collections are tuples sorted in a stable order, so two discoveries of the
same estate compare equal and serialise to the same bytes. Sizes are bytes or MiB as the
field name says; enum-like fields hold vSphere's own words where a vSphere field is meant
(``poweredOn``, ``guestToolsRunning``) so nothing is lost in translation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic

# -- source: vSphere ------------------------------------------------------------------------

Controller = Literal["pvscsi", "lsilogic", "lsilogic-sas", "buslogic", "sata", "ide", "nvme", "unknown"]
NicModel = Literal["vmxnet3", "vmxnet2", "vmxnet", "e1000", "e1000e", "pcnet32", "sriov", "unknown"]
Backing = Literal["flat", "sparse", "sesparse", "rdm", "other"]
Firmware = Literal["bios", "efi"]


@dataclass(frozen=True, slots=True)
class Disk:
    """One virtual disk as the guest sees it, and where its bytes live."""

    key: int
    label: str
    controller: Controller
    bus: int
    unit: int
    capacity_bytes: int
    datastore: str
    # "[datastore] folder/name.vmdk" of the disk's current backing (the top of the chain).
    path: str
    backing: Backing = "flat"
    thin: bool = False
    eager_zero: bool = False
    disk_mode: str = "persistent"
    independent: bool = False
    rdm: bool = False
    shared: bool = False
    uuid: str = ""
    # Descriptor paths from the base disk up to ``path``; length 1 when there are no snapshots.
    chain: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Nic:
    key: int
    label: str
    model: NicModel
    mac: str
    mac_manual: bool
    network: str
    distributed: bool = False
    portgroup_key: str = ""
    connected: bool = False
    start_connected: bool = True


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot in the tree; ``path`` is its place from the root, names joined by '/'."""

    moref: str
    name: str
    path: str
    created: str
    description: str = ""
    power_state: str = "poweredOff"


@dataclass(frozen=True, slots=True)
class Vm:
    moref: str
    name: str
    instance_uuid: str
    bios_uuid: str
    folder: str
    datacenter: str
    cluster: str
    host: str
    resource_pool: str
    power_state: Literal["poweredOn", "poweredOff", "suspended"]
    template: bool
    hw_version: str
    guest_id: str
    guest_full_name: str
    tools_status: str
    firmware: Firmware
    secure_boot: bool
    cpu_sockets: int
    cores_per_socket: int
    memory_mib: int
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    cdroms: tuple[str, ...] = ()
    floppies: tuple[str, ...] = ()
    usb: tuple[str, ...] = ()
    pci_passthrough: tuple[str, ...] = ()
    snapshots: tuple[Snapshot, ...] = ()
    annotation: str = ""
    # Sorted (name, value) pairs of vCenter custom attributes.
    custom_attributes: tuple[tuple[str, str], ...] = ()
    vmx_path: str = ""

    @property
    def vcpus(self) -> int:
        return self.cpu_sockets * self.cores_per_socket

    @property
    def provisioned_bytes(self) -> int:
        return sum(d.capacity_bytes for d in self.disks)

    def attribute(self, name: str) -> str | None:
        return dict(self.custom_attributes).get(name)


@dataclass(frozen=True, slots=True)
class Host:
    moref: str
    name: str
    datacenter: str
    cluster: str
    cpu_cores: int
    memory_bytes: int
    version: str = ""
    connection_state: str = "connected"
    power_state: str = "poweredOn"


@dataclass(frozen=True, slots=True)
class Cluster:
    moref: str
    name: str
    datacenter: str
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Datastore:
    moref: str
    name: str
    type: str
    capacity_bytes: int
    free_bytes: int
    url: str = ""
    accessible: bool = True
    datacenter: str = ""


@dataclass(frozen=True, slots=True)
class Network:
    moref: str
    name: str
    kind: Literal["standard", "distributed", "opaque", "uplink"]
    vlan: int | None = None
    switch: str = ""


@dataclass(frozen=True, slots=True)
class SourceInventory:
    """Everything discovered on one vCenter or ESXi, sorted by name then moref."""

    source: str
    endpoint: str
    api_version: str
    instance_uuid: str = ""
    vms: tuple[Vm, ...] = ()
    hosts: tuple[Host, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    datastores: tuple[Datastore, ...] = ()
    networks: tuple[Network, ...] = ()

    def vm(self, name: str) -> Vm | None:
        return next((v for v in self.vms if v.name == name), None)


# -- targets: Proxmox VE and XCP-ng ---------------------------------------------------------

TargetKind = Literal["proxmox", "xcpng"]


@dataclass(frozen=True, slots=True)
class TargetNode:
    """A Proxmox node or an XCP-ng host: where a VM can run."""

    name: str
    cpus: int
    memory_total_bytes: int
    memory_used_bytes: int
    online: bool = True
    # Overcommit limits are playbook policy, not discovery; see planner.

    @property
    def memory_free_bytes(self) -> int:
        return self.memory_total_bytes - self.memory_used_bytes


@dataclass(frozen=True, slots=True)
class Storage:
    """A Proxmox storage (per node, or shared) or an XCP-ng SR."""

    name: str
    type: str  # dir, nfs, lvmthin, zfspool, rbd, ... ; SR type for XCP-ng (lvm, ext, nfs, ...)
    total_bytes: int
    free_bytes: int
    shared: bool = False
    content: tuple[str, ...] = ()
    # Nodes that see this storage; empty means every node.
    nodes: tuple[str, ...] = ()
    active: bool = True
    uuid: str = ""


@dataclass(frozen=True, slots=True)
class TargetNetwork:
    """A Proxmox bridge or SDN vnet, or an XCP-ng network."""

    name: str
    kind: str  # bridge | vnet | xapi
    nodes: tuple[str, ...] = ()
    vlan: int | None = None
    vlan_aware: bool = False
    uuid: str = ""


@dataclass(frozen=True, slots=True)
class ExistingVm:
    """A VM already on the target; migrate never overwrites one."""

    name: str
    vmid: int | None = None
    node: str = ""
    uuid: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TargetTemplate:
    """An XCP-ng VM template the planner may clone from."""

    name: str
    uuid: str = ""


@dataclass(frozen=True, slots=True)
class TargetSnapshot:
    """A read-only picture of one target at planning time."""

    name: str
    kind: TargetKind
    endpoint: str
    version: str
    nodes: tuple[TargetNode, ...] = ()
    storages: tuple[Storage, ...] = ()
    networks: tuple[TargetNetwork, ...] = ()
    vms: tuple[ExistingVm, ...] = ()
    templates: tuple[TargetTemplate, ...] = ()
    next_vmid: int | None = None
    pool: str = ""
    extra: tuple[tuple[str, str], ...] = field(default=())


# -- JSON round trip ------------------------------------------------------------------------

_source_adapter: pydantic.TypeAdapter[SourceInventory] = pydantic.TypeAdapter(SourceInventory)
_target_adapter: pydantic.TypeAdapter[TargetSnapshot] = pydantic.TypeAdapter(TargetSnapshot)


def source_to_dict(inventory: SourceInventory) -> dict[str, Any]:
    return _source_adapter.dump_python(inventory, mode="json")  # type: ignore[no-any-return]


def source_from_dict(data: Any) -> SourceInventory:
    return _source_adapter.validate_python(data)


def target_to_dict(snapshot: TargetSnapshot) -> dict[str, Any]:
    return _target_adapter.dump_python(snapshot, mode="json")  # type: ignore[no-any-return]


def target_from_dict(data: Any) -> TargetSnapshot:
    return _target_adapter.validate_python(data)
