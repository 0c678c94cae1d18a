"""The discovery query (which types, which property paths) and the shape of its answer.

Both retrieval paths (the streaming SOAP parser in ``vsphere_fast`` and plain pyvmomi in
``vsphere_pyvmomi``) yield the same ``RawObject`` stream: per managed object its WSDL type,
its moref and its properties as plain Python values. Data objects are dicts whose ``_type``
is the WSDL type name (``None`` where the XML does not say and nothing depends on it);
references are moref strings; arrays are lists. Scalars arrive as text from XML and typed
from pyvmomi: the readers below accept both, so one converter serves both paths and their
results can be compared for identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

DEVICES: Final = "config.hardware.device"

# One ContainerView over these types; subtypes (ClusterComputeResource, VirtualApp,
# DistributedVirtualPortgroup, OpaqueNetwork, VmwareDistributedVirtualSwitch) come with them.
VIEW_TYPES: Final = (
    "Folder", "Datacenter", "ComputeResource", "HostSystem", "ResourcePool", "VirtualMachine",
    "Datastore", "Network", "DistributedVirtualSwitch",
)  # fmt: skip

# Each path is asked for under one type of its subtype chain only: vCenter may return a
# property twice when a type and its subtype both name it.
PROPERTIES: Final[Mapping[str, tuple[str, ...]]] = {
    "Folder": ("name", "parent"),
    "Datacenter": ("name", "parent"),
    "ComputeResource": ("name", "parent", "host"),
    "HostSystem": (
        "name", "parent", "summary.hardware.numCpuCores", "summary.hardware.memorySize",
        "summary.config.product.version", "runtime.connectionState", "runtime.powerState",
    ),
    "ResourcePool": ("name", "parent"),
    "VirtualApp": ("parentFolder",),
    "VirtualMachine": (
        "name", "parent", "parentVApp", "resourcePool", "runtime.host", "runtime.powerState",
        "config.instanceUuid", "config.uuid", "config.template", "config.version", "config.guestId",
        "config.guestFullName", "config.firmware", "config.bootOptions.efiSecureBootEnabled",
        "config.hardware.numCPU", "config.hardware.numCoresPerSocket", "config.hardware.memoryMB",
        DEVICES, "config.annotation", "config.files.vmPathName", "guest.toolsRunningStatus",
        "snapshot", "customValue",
    ),
    "Datastore": (
        "name", "parent", "summary.type", "summary.capacity", "summary.freeSpace", "summary.url",
        "summary.accessible",
    ),
    "Network": ("name", "parent"),
    "DistributedVirtualPortgroup": (
        "key", "config.distributedVirtualSwitch", "config.defaultPortConfig", "config.uplink",
    ),
    "DistributedVirtualSwitch": ("name", "uuid"),
    # Not in the view: asked for by its own ObjectSpec in the same request.
    "CustomFieldsManager": ("field",),
}  # fmt: skip

# Child elements that are arrays in the schema, so a list even when they occur once.
LIST_FIELDS: Final = frozenset({"rootSnapshotList", "childSnapshotList", "device", "iofilter"})

# Devices the model has no place for; the streaming parser skips them unread.
IGNORED_DEVICES: Final = frozenset({
    "VirtualPS2Controller", "VirtualPCIController", "VirtualSIOController", "VirtualKeyboard",
    "VirtualPointingDevice", "VirtualMachineVideoCard", "VirtualMachineVMCIDevice", "VirtualMachineVMIROM",
    "VirtualUSBController", "VirtualUSBXHCIController", "VirtualSerialPort", "VirtualParallelPort",
    "VirtualTPM", "VirtualWDT", "VirtualPrecisionClock", "VirtualSoundBlaster16", "VirtualEnsoniq1371",
    "VirtualHdAudioCard", "VirtualNVDIMMController", "VirtualNVDIMM",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class RawObject:
    """One ObjectContent: a managed object's WSDL type, its moref and the properties asked for."""

    type: str
    moref: str
    props: dict[str, Any]


# -- readers: XML text or pyvmomi's typed values, same result ----------------------------------

_ESCAPED = re.compile(r"%(25|2[fF]|5[cC])")
_UNESCAPED = {"25": "%", "2f": "/", "2F": "/", "5c": "\\", "5C": "\\"}


def unescape(name: str) -> str:
    """Undo vSphere's escaping of '%', '/' and '\\' in entity names (a no-op on vcsim's raw names)."""
    return _ESCAPED.sub(lambda m: _UNESCAPED[m.group(1)], name) if "%" in name else name


def text(value: Any) -> str:
    return "" if value is None else str(value)


def integer(value: Any, default: int = 0) -> int:
    return default if value is None or value == "" else int(value)


def flag(value: Any) -> bool:
    return value is True or value == "true" or value == "1"


def struct(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def array(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return value if isinstance(value, list) else [value]


_ISO = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?$")


def timestamp(value: Any) -> str:
    """An xsd:dateTime as ISO 8601 UTC ending in Z, microseconds truncated as pyvmomi does."""
    if isinstance(value, datetime):
        moment = value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
    else:
        match = _ISO.match(text(value).strip())
        if not match:
            return text(value)
        base, fraction, zone = match.groups()
        moment = datetime.fromisoformat(base).replace(microsecond=int((fraction or "0")[:6].ljust(6, "0")))
        if zone and zone != "Z":
            offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[-2:]))
            moment = moment - offset if zone[0] == "+" else moment + offset
    return moment.isoformat() + "Z"
