"""The XAPI fake's guests really boot: ``VM.start`` boots the VM's boot disk (see ``guestboot``).

The boot disk is the VM's bootable ``Disk`` VBD with the lowest userdevice (or, if none is
marked bootable, the lowest one), its bytes the VDI's raw file; ``HVM_boot_params:firmware``
``uefi`` boots it with OVMF, anything else with SeaBIOS. Once the guest printed its boot line
(``MIGRATE-LAB-BOOT-OK <ascii tag of name_label>``, or the tag set with the ``boot_expect``
control action), the VM gets a ``VM_guest_metrics`` object filled as XCP-ng's guest tools
fill it, as xapi does when a guest's tools first report; a halt destroys it, as xapi's
power-state reset does. A VM whose disk does not boot keeps ``guest_metrics`` NULL.

Handlers call ``start``, ``halt`` and ``destroy`` with the store's lock held; the guest's
watcher thread takes that lock before it touches the VM.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from migrate.lab.bootcode import ascii_tag, serial_line
from migrate.lab.guestboot import Firmware, GuestBoots, GuestDisk
from migrate.lab.xapi_fake.datamodel import NULL_REF
from migrate.lab.xapi_fake.dispatch import Xapi, now
from migrate.lab.xapi_fake.store import Store

ACTIONS = ("serial", "guests", "boot_expect", "guests_set")
# The guest tools' version as xe-guest-utilities 7.x reports it in PV_drivers_version.
_TOOLS_VERSION = {"major": "7", "minor": "30", "micro": "0", "build": "1"}
# Features the Linux guest tools advertise under "other".
_TOOLS_FEATURES = {
    "feature-shutdown": "1",
    "feature-poweroff": "1",
    "feature-reboot": "1",
    "feature-suspend": "1",
    "feature-vcpu-hotplug": "1",
    "has-vendor-device": "0",
    "platform-feature-multiprocessor-suspend": "1",
}


@dataclass
class _Guests:
    boots: GuestBoots
    expect: dict[str, str] = field(default_factory=dict)  # VM uuid -> boot line, when not its name's


_REGISTRY: weakref.WeakKeyDictionary[Store, _Guests] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _guests(x: Xapi) -> _Guests:
    with _REGISTRY_LOCK:
        found = _REGISTRY.get(x.store)
        if found is None:
            owner = weakref.ref(x)  # the watcher threads must not keep a stopped fake alive
            boots = GuestBoots(
                lambda key, generation: _booted(owner, key, generation), workdir=x.vdi_dir.parent / "guests"
            )
            found = _Guests(boots)
            _REGISTRY[x.store] = found
        return found


# -- what the VM handlers call ----------------------------------------------------------------


def start(x: Xapi, vm: str) -> None:
    """The VM just became Running: boot its disk."""
    guests = _guests(x)
    row = x.store.row("VM", vm)
    _drop_metrics(x, row)
    found = _boot_disk(x, vm, row, guests)
    if isinstance(found, str):
        guests.boots.fail(vm, found)
    else:
        guests.boots.boot(vm, found)


def halt(x: Xapi, vm: str) -> None:
    """The VM just halted: its QEMU goes, and with it what the guest's tools reported."""
    with _REGISTRY_LOCK:
        guests = _REGISTRY.get(x.store)
    if guests is not None:
        guests.boots.stop(vm)
    _drop_metrics(x, x.store.row("VM", vm))


def destroy(x: Xapi, vm: str) -> None:
    """The VM is about to be destroyed: forget its guest."""
    with _REGISTRY_LOCK:
        guests = _REGISTRY.get(x.store)
    if guests is not None:
        guests.boots.forget(vm)
    _drop_metrics(x, x.store.row("VM", vm))


def close(x: Xapi) -> None:
    """The fake stops: kill every guest's QEMU."""
    with _REGISTRY_LOCK:
        guests = _REGISTRY.pop(x.store, None)
    if guests is not None:
        guests.boots.close()


# -- the boot ---------------------------------------------------------------------------------


def _boot_disk(x: Xapi, vm: str, row: dict[str, Any], guests: _Guests) -> GuestDisk | str:
    vbds = [x.store.row("VBD", b) for b in x.store.pointing_at("VBD", "VM", vm)]
    disks = sorted(
        (v for v in vbds if v["type"] == "Disk" and not v["empty"] and v["VDI"] != NULL_REF),
        key=lambda v: (0, int(v["userdevice"])) if v["userdevice"].isdigit() else (1, 0),
    )
    if not disks:
        return "no disk to boot from: the VM has no VBD of type Disk with a VDI"
    chosen = next((v for v in disks if v["bootable"]), disks[0])
    vdi = x.store.row("VDI", chosen["VDI"])
    path = x.vdi_dir / f"{vdi['uuid']}.raw"
    if not path.is_file():
        return f"VBD {chosen['userdevice']}: the lab holds no bytes for VDI {vdi['uuid']} ({path} is missing)"
    firmware: Firmware = "efi" if row["HVM_boot_params"].get("firmware") == "uefi" else "bios"
    expect = guests.expect.get(row["uuid"]) or serial_line(ascii_tag(row["name_label"]))
    return GuestDisk(path, "raw", firmware, expect)


def _booted(owner: weakref.ref[Xapi], vm: str, generation: int) -> None:
    """From the guest's watcher thread: the boot line appeared, so the guest's tools report."""
    x = owner()
    if x is None:
        return
    with x.store.lock:
        if not x.store.exists("VM", vm):
            return
        row = x.store.row("VM", vm)
        if row["power_state"] != "Running" or not _guests(x).boots.is_current(vm, generation):
            return  # halted or started again meanwhile
        _drop_metrics(x, row)
        status = _guests(x).boots.status(vm)
        metrics = _metrics(x, vm, row, status.expect if status else "")
        row["guest_metrics"] = x.store.create("VM_guest_metrics", metrics)


def _metrics(x: Xapi, vm: str, row: dict[str, Any], line: str) -> dict[str, Any]:
    networks: dict[str, str] = {}
    for vif in x.store.pointing_at("VIF", "VM", vm):
        device = x.store.row("VIF", vif)["device"]
        # A documentation address (TEST-NET-2), one per domain and device.
        ip = f"198.51.100.{(max(row['domid'], 0) * 8 + int(device or 0)) % 250 + 2}"
        networks |= {f"{device}/ip": ip, f"{device}/ipv4/0": ip}
    return {
        "os_version": {
            "name": f"migrate lab guest ({line})",
            "distro": "migrate-lab",
            "major": "1",
            "minor": "0",
            "uname": "bootcode",
        },
        "PV_drivers_version": dict(_TOOLS_VERSION),
        "PV_drivers_up_to_date": True,
        "PV_drivers_detected": True,
        "networks": networks,
        "other": dict(_TOOLS_FEATURES),
        "last_updated": now(),
        "live": True,
        "can_use_hotplug_vbd": "yes",
        "can_use_hotplug_vif": "yes",
    }


def _drop_metrics(x: Xapi, row: dict[str, Any]) -> None:
    gm = row["guest_metrics"]
    if gm != NULL_REF and x.store.exists("VM_guest_metrics", gm):
        x.store.destroy("VM_guest_metrics", gm)
    row["guest_metrics"] = NULL_REF


# -- the lab's control endpoint ---------------------------------------------------------------


def control(x: Xapi, action: str, params: dict[str, Any]) -> Any:
    """serial (vm: uuid, name_label or ref), guests, boot_expect (vm, tag; no tag: the name's
    again), guests_set (timeout: seconds a guest has to print its line)."""
    guests = _guests(x)
    if action == "guests":
        with x.store.lock:
            names = {ref: x.store.row("VM", ref)["name_label"] for ref in guests.boots.names()
                     if x.store.exists("VM", ref)}  # fmt: skip
        return {names.get(ref, ref): s.as_dict() for ref, s in guests.boots.statuses().items()}
    if action == "guests_set":
        unknown = set(params) - {"timeout"}
        if unknown:
            raise ValueError(f"cannot set {sorted(unknown)}; known: timeout")
        guests.boots.timeout = float(params["timeout"])
        return None
    with x.store.lock:
        vm = _find_vm(x, str(params["vm"]))
        uuid = x.store.row("VM", vm)["uuid"]
    if action == "serial":
        found = guests.boots.status(vm)
        return found.as_dict() if found else None
    if action == "boot_expect":
        if params.get("tag") is None:
            guests.expect.pop(uuid, None)
            return None
        guests.expect[uuid] = serial_line(str(params["tag"]))
        return guests.expect[uuid]
    raise ValueError(f"unknown guest action {action!r}; known: {', '.join(ACTIONS)}")


def _find_vm(x: Xapi, key: str) -> str:
    if x.store.exists("VM", key):
        return key
    found = [ref for ref, row in x.store.items("VM") if key in (row["uuid"], row["name_label"])]
    if len(found) != 1:
        raise ValueError(f"{len(found)} VMs have the uuid or name {key!r}; give one VM's uuid")
    return found[0]
