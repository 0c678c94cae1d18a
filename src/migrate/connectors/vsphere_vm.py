"""One VirtualMachine's properties -> the model's Vm, Disk, Nic and Snapshot.

Runs while the answer streams in, so the bulky device list is reduced to model objects at
once. What only the whole answer can tell (folder path, host and cluster names, portgroup
names, custom attribute names) is kept as references in a ``VmDraft`` and resolved by
``vsphere_convert.build_inventory`` at the end.

Conventions: ``cdroms``/``floppies``/``usb``/``pci_passthrough`` hold ``"<label>"`` or
``"<label>: <image, device or id>"``; disks and NICs are sorted by device key; a disk's
``chain`` runs from the base disk to the current top; ``thin``/``eager_zero`` describe the
base disk (what a copy of the flattened disk should look like).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from migrate.connectors.vsphere_props import (
    DEVICES,
    IGNORED_DEVICES,
    RawObject,
    array,
    flag,
    integer,
    struct,
    text,
    timestamp,
    unescape,
)
from migrate.model import Backing, Controller, Disk, NicModel, Snapshot

CONTROLLERS: Final[Mapping[str, Controller]] = {
    "ParaVirtualSCSIController": "pvscsi",
    "VirtualLsiLogicController": "lsilogic",
    "VirtualLsiLogicSASController": "lsilogic-sas",
    "VirtualBusLogicController": "buslogic",
    "VirtualAHCIController": "sata",
    "VirtualIDEController": "ide",
    "VirtualNVMEController": "nvme",
}
NIC_MODELS: Final[Mapping[str, NicModel]] = {
    "VirtualVmxnet3": "vmxnet3",
    "VirtualVmxnet3Vrdma": "vmxnet3",
    "VirtualVmxnet2": "vmxnet2",
    "VirtualVmxnet": "vmxnet",
    "VirtualE1000": "e1000",
    "VirtualE1000e": "e1000e",
    "VirtualPCNet32": "pcnet32",
    "VirtualSriovEthernetCard": "sriov",
}
BACKINGS: Final[Mapping[str, Backing]] = {
    "VirtualDiskFlatVer1BackingInfo": "flat",
    "VirtualDiskFlatVer2BackingInfo": "flat",
    "VirtualDiskSparseVer1BackingInfo": "sparse",
    "VirtualDiskSparseVer2BackingInfo": "sparse",
    "VirtualDiskSeSparseBackingInfo": "sesparse",
    "VirtualDiskRawDiskMappingVer1BackingInfo": "rdm",
    "VirtualDiskRawDiskVer2BackingInfo": "rdm",
}
_POWER_STATES: Final = frozenset({"poweredOn", "poweredOff", "suspended"})

_Controllers = dict[int, tuple[Controller, int, bool]]


@dataclass(frozen=True, slots=True)
class VmDraft:
    """A converted VM minus what needs the rest of the inventory; see ``build_inventory``."""

    moref: str
    fields: dict[str, Any]  # Vm keyword arguments known from the VM alone
    parent: str  # folder moref ("" inside a vApp)
    vapp: str
    host: str
    pool: str
    disks: tuple[Disk, ...]  # datastore named from the path; corrected if the moref says otherwise
    disk_datastores: tuple[str, ...]
    nics: tuple[dict[str, Any], ...]  # Nic keyword arguments but ``network``
    nic_networks: tuple[tuple[str, str], ...]  # (moref or portgroup key, name to use if unresolved)
    custom: tuple[tuple[int, str], ...]  # (custom field key, value)


def _disk(device: dict[str, Any], controllers: _Controllers) -> tuple[Disk, str]:
    kind, bus, shared_bus = controllers.get(integer(device.get("controllerKey"), -1), ("unknown", 0, False))
    backing = struct(device.get("backing"))
    chain: list[str] = []
    node, base = backing, backing
    while node:
        chain.append(text(node.get("fileName")))
        base, node = node, struct(node.get("parent"))
    chain.reverse()
    path = chain[-1] if chain else ""
    backing_kind = BACKINGS.get(text(backing.get("_type")), "other")
    mode = text(backing.get("diskMode")) or "persistent"
    capacity = device.get("capacityInBytes")
    if capacity in (None, ""):  # only capacityInKB before vSphere 5.5
        capacity = integer(device.get("capacityInKB")) * 1024
    disk = Disk(
        key=integer(device.get("key")),
        label=text(struct(device.get("deviceInfo")).get("label")),
        controller=kind,
        bus=bus,
        unit=integer(device.get("unitNumber")),
        capacity_bytes=integer(capacity),
        datastore=path[1:].split("]", 1)[0] if path.startswith("[") else "",
        path=path,
        backing=backing_kind,
        thin=flag(base.get("thinProvisioned")),
        eager_zero=flag(base.get("eagerlyScrub")),
        disk_mode=mode,
        independent=mode.startswith("independent"),
        rdm=backing_kind == "rdm",
        shared=shared_bus or text(backing.get("sharing")) == "sharingMultiWriter",
        uuid=text(backing.get("uuid")),
        chain=tuple(chain),
    )
    return disk, text(backing.get("datastore"))


def _nic(device: dict[str, Any], model: NicModel) -> tuple[dict[str, Any], tuple[str, str]]:
    backing = struct(device.get("backing"))
    connectable = struct(device.get("connectable"))
    key = text(struct(backing.get("port")).get("portgroupKey"))
    if key:
        network = (key, key)
    elif backing.get("opaqueNetworkId"):
        network = (text(backing.get("opaqueNetworkId")), text(backing.get("opaqueNetworkId")))
    else:
        network = (text(backing.get("network")), unescape(text(backing.get("deviceName"))))
    args = {
        "key": integer(device.get("key")),
        "label": text(struct(device.get("deviceInfo")).get("label")),
        "model": model,
        "mac": text(device.get("macAddress")).lower(),
        "mac_manual": text(device.get("addressType")) == "manual",
        "distributed": bool(key),
        "portgroup_key": key,
        "connected": flag(connectable.get("connected")),
        "start_connected": flag(connectable.get("startConnected")) if connectable else True,
    }
    return args, network


def _describe(device: dict[str, Any]) -> str:
    label = text(struct(device.get("deviceInfo")).get("label"))
    backing = struct(device.get("backing"))
    what = text(backing.get("fileName")) or text(backing.get("deviceName")) or text(backing.get("id"))
    return f"{label}: {what}" if what else label


def _snapshots(nodes: Iterable[Any], prefix: str, out: list[Snapshot]) -> None:
    """Depth first, parents before children, siblings in the server's (creation) order."""
    for node in map(struct, nodes):
        name = text(node.get("name"))
        path = f"{prefix}/{name}" if prefix else name
        out.append(Snapshot(
            moref=text(node.get("snapshot")),
            name=name,
            path=path,
            created=timestamp(node.get("createTime")),
            description=text(node.get("description")),
            power_state=text(node.get("state")) or "poweredOff",
        ))  # fmt: skip
        _snapshots(array(node.get("childSnapshotList")), path, out)


def vm_draft(raw: RawObject) -> VmDraft:
    p = raw.props
    devices = [d for d in array(p.get(DEVICES))
               if isinstance(d, dict) and d.get("_type") not in IGNORED_DEVICES]
    controllers: _Controllers = {}
    for device in devices:
        kind = CONTROLLERS.get(device["_type"])
        if kind is not None:
            sharing = text(device.get("sharedBus"))
            controllers[integer(device.get("key"))] = (
                kind, integer(device.get("busNumber")), sharing not in ("", "noSharing"))
    disks: list[tuple[Disk, str]] = []
    nics: list[tuple[dict[str, Any], tuple[str, str]]] = []
    others: dict[str, list[str]] = {"VirtualCdrom": [], "VirtualFloppy": [], "VirtualUSB": [],
                                    "VirtualPCIPassthrough": []}
    for device in devices:
        kind_name = device["_type"]
        model = NIC_MODELS.get(kind_name)
        if kind_name == "VirtualDisk":
            disks.append(_disk(device, controllers))
        elif model is not None or "macAddress" in device:
            nics.append(_nic(device, model or "unknown"))
        elif kind_name in others:
            others[kind_name].append(_describe(device))
    disks.sort(key=lambda d: d[0].key)
    nics.sort(key=lambda n: n[0]["key"])
    snapshots: list[Snapshot] = []
    _snapshots(array(struct(p.get("snapshot")).get("rootSnapshotList")), "", snapshots)
    cpus = integer(p.get("config.hardware.numCPU"), 1)
    cores = integer(p.get("config.hardware.numCoresPerSocket"), 1) or 1
    power = text(p.get("runtime.powerState"))
    fields = {
        "name": unescape(text(p.get("name"))),
        "instance_uuid": text(p.get("config.instanceUuid")),
        "bios_uuid": text(p.get("config.uuid")),
        "power_state": power if power in _POWER_STATES else "poweredOff",
        "template": flag(p.get("config.template")),
        "hw_version": text(p.get("config.version")),
        "guest_id": text(p.get("config.guestId")),
        "guest_full_name": text(p.get("config.guestFullName")),
        "tools_status": text(p.get("guest.toolsRunningStatus")),
        "firmware": "efi" if text(p.get("config.firmware")) == "efi" else "bios",
        "secure_boot": flag(p.get("config.bootOptions.efiSecureBootEnabled")),
        "cpu_sockets": max(cpus // cores, 1),
        "cores_per_socket": cores,
        "memory_mib": integer(p.get("config.hardware.memoryMB")),
        "cdroms": tuple(others["VirtualCdrom"]),
        "floppies": tuple(others["VirtualFloppy"]),
        "usb": tuple(others["VirtualUSB"]),
        "pci_passthrough": tuple(others["VirtualPCIPassthrough"]),
        "snapshots": tuple(snapshots),
        "annotation": text(p.get("config.annotation")),
        "vmx_path": text(p.get("config.files.vmPathName")),
    }
    return VmDraft(
        moref=raw.moref,
        fields=fields,
        parent=text(p.get("parent")),
        vapp=text(p.get("parentVApp")),
        host=text(p.get("runtime.host")),
        pool=text(p.get("resourcePool")),
        disks=tuple(d for d, _ in disks),
        disk_datastores=tuple(ref for _, ref in disks),
        nics=tuple(n for n, _ in nics),
        nic_networks=tuple(ref for _, ref in nics),
        custom=tuple((integer(v.get("key")), text(v.get("value")))
                     for v in map(struct, array(p.get("customValue"))) if v),
    )
