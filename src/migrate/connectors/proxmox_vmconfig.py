"""A Proxmox VE VM's configuration as migrate writes and reads it: pure functions, no I/O.

What ``POST /nodes/{node}/qemu`` gets is the plan's settings (``VmSpec.settings``) with three
changes: the run's tag joins the tags, the description says which run made the VM, and the
boot order names only devices that exist at creation (the data disks come later, by import;
``boot_with`` puts the boot disk back in front when it arrives). Landing files are named so
that the run's tag ends the name: ``<vm>-<disk key>-<run tag>.raw``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from migrate.connectors.base import DiskSpec, NicSpec, VmSpec

# Keys of a PVE config that hold a disk (a CD-ROM too, told apart by media=cdrom).
DISK_KEY: Final = re.compile(r"^(?:(?:scsi|virtio|sata|ide)\d+|efidisk0|tpmstate0)$")
DEVICE_KEY: Final = re.compile(r"^(?:scsi|virtio|sata|ide|net|usb|hostpci)\d+$|^efidisk0$|^tpmstate0$")
_MAC: Final = re.compile(r"^[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}$")
# PVE's SAFE_CHAR_CLASS_RE for volume names under import/.
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._+=-]+")
LANDING_SUFFIX: Final = ".raw"
MAX_NAME: Final = 64


def split_tags(text: str | None) -> tuple[str, ...]:
    """PVE tags as a sorted tuple; PVE separates them with ';' (older versions ',' or ' ')."""
    return tuple(sorted({t for t in re.split(r"[;, ]+", (text or "").lower()) if t}))


def _net(nic: NicSpec) -> str:
    head = f"{nic.model or 'virtio'}={nic.mac.upper()}" if nic.mac else (nic.model or "virtio")
    parts = [head, f"bridge={nic.network}"]
    if nic.vlan is not None:
        parts.append(f"tag={nic.vlan}")
    return ",".join(parts)


def description(planned: str | None, vm: VmSpec, run_id: str) -> str:
    lines = [planned.rstrip()] if planned else [f"Migrated from vSphere by migrate ({vm.source})."]
    if vm.source_moref and vm.source_moref not in lines[0]:
        lines.append(f"moref: {vm.source_moref}")
    lines.append(f"migrate run: {run_id}")
    return "\n".join(lines)


def moref_of(text: str | None) -> str:
    """The source moref a description written by ``description`` names, or ""."""
    found = re.search(r"^moref: (\S+)$", text or "", re.M)
    return found.group(1) if found else ""


def boot_devices(value: str | None) -> list[str] | None:
    """The devices of an ``order=`` boot value; None for anything else (legacy 'cdn' forms)."""
    if not value or not value.startswith("order="):
        return None
    return [d for d in value[len("order=") :].split(";") if d]


def create_params(vm: VmSpec, tag: str, run_id: str) -> dict[str, str]:
    """The ``POST /qemu`` parameters (vmid excluded) for ``vm``, tagged with ``tag``."""
    params = dict(vm.settings)
    data_slots = {d.slot for d in vm.disks}
    # The plan keeps data disks out of the settings; if one slipped in, the import adds it later.
    for key in data_slots & set(params):
        del params[key]
    params["name"] = vm.name
    for nic in vm.nics:
        if nic.slot and nic.slot not in params:
            params[nic.slot] = _net(nic)
    params["tags"] = ";".join(sorted({*split_tags(params.get("tags")), "migrate", tag}))
    params["description"] = description(params.get("description"), vm, run_id)
    order = boot_devices(params.get("boot"))
    if order is not None:
        # PVE refuses a boot order naming a device the VM lacks when the config changes;
        # the disks arrive later, and ``boot_with`` puts the boot disk first then.
        present = [d for d in order if d in params and DEVICE_KEY.match(d)]
        if present:
            params["boot"] = "order=" + ";".join(present)
        else:
            del params["boot"]
    return params


def boot_with(current: str | None, slot: str) -> str:
    """The boot order once ``slot`` (the VM's boot disk) is attached: it first, the rest kept."""
    rest = [d for d in boot_devices(current) or [] if d != slot]
    return "order=" + ";".join([slot, *rest])


def drive_value(disk: DiskSpec, volid: str) -> str:
    """The config value importing ``volid`` into ``disk.slot``, as the plan drew it."""
    if disk.drive:
        return disk.drive.replace("{import_from}", volid)
    return f"{disk.storage}:0,import-from={volid},format={disk.format}"


def is_cdrom(value: str) -> bool:
    parts = value.split(",")
    return "media=cdrom" in parts or parts[0] in ("cdrom", "none")


def disk_slots(config: Mapping[str, str]) -> tuple[str, ...]:
    """Slots holding a disk (CD-ROMs and empty drives are not disks)."""
    return tuple(sorted(k for k, v in config.items() if DISK_KEY.match(k) and not is_cdrom(str(v))))


def nic_macs(config: Mapping[str, str]) -> tuple[str, ...]:
    """MAC addresses of the netN entries ("virtio=BC:24:11:..,bridge=vmbr0"), lower-case."""
    macs = []
    for key, value in sorted(config.items()):
        if not re.fullmatch(r"net\d+", key):
            continue
        for part in str(value).split(","):
            name, _, mac = part.partition("=")
            if _MAC.match(mac) and name not in ("bridge", "tag", "firewall"):
                macs.append(mac.lower())
                break
    return tuple(macs)


def volume_of(value: str) -> str:
    """The volume id of a drive value ("local-lvm:vm-101-disk-0,size=3M" -> "local-lvm:vm-101-disk-0")."""
    return value.split(",", 1)[0]


def landing_filename(vm_name: str, disk_key: str, tag: str) -> str:
    """``<vm>-<disk key>-<run tag>.raw``, in the characters PVE accepts under import/."""
    head = _UNSAFE.sub("-", f"{vm_name}-{disk_key}").strip("-")[:MAX_NAME] or "disk"
    return f"{head}-{tag}{LANDING_SUFFIX}"


def landing_parts(filename: str, tag: str) -> tuple[str, str] | None:
    """(vm name, disk key) of a landing file of the run tagged ``tag``, or None if it is not one."""
    suffix = f"-{tag}{LANDING_SUFFIX}"
    if not filename.endswith(suffix) or "/" in filename:
        return None
    vm_name, _, disk_key = filename[: -len(suffix)].rpartition("-")
    return (vm_name, disk_key) if vm_name and disk_key else None


def is_landing_path(path: str) -> bool:
    """A path migrate could have made a landing at: <storage>/import/<...>-migrate-<run>.raw."""
    parent, _, name = path.rpartition("/")
    return (
        path.startswith("/")
        and parent.endswith("/import")
        and name.endswith(LANDING_SUFFIX)
        and "-migrate-" in name
        and not _UNSAFE.search(name)
        and ".." not in path.split("/")
    )
