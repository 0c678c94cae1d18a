"""The lab pool the XAPI fake starts with: a small, realistic XCP-ng 8.3 pool as plain data.

``SEED`` is the description tests compare against; ``build`` turns it into datamodel rows.
Seeded objects get uuids and references derived from their names, so two fakes started from
the same seed are identical.
"""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path
from typing import Any, Final

from migrate.lab.xapi_fake.store import Store

GiB: Final = 1024**3
TiB: Final = 1024**4
MiB: Final = 1024**2
_NS: Final = uuidlib.UUID("6f1c3a52-6b0e-4c55-9d43-2f1a8c0e7b10")

_LINUX_PLATFORM: Final = {
    "device-model": "qemu-upstream-compat",
    "viridian": "false",
    "nx": "true",
    "acpi": "1",
    "apic": "true",
    "pae": "true",
    "timeoffset": "0",
}
_WINDOWS_PLATFORM: Final = {
    "device-model": "qemu-upstream-uefi",
    "viridian": "true",
    "viridian_reference_tsc": "true",
    "viridian_time_ref_count": "true",
    "viridian_apic_assist": "true",
    "device_id": "0002",
    "nx": "true",
    "acpi": "1",
    "apic": "true",
    "pae": "true",
    "timeoffset": "0",
    "secureboot": "false",
}


def provision_xml(*disks: tuple[str, int]) -> str:
    """A template's ``other_config:disks``: what ``VM.provision`` creates (sr="" means the default SR)."""
    items = "".join(
        f'<disk device="{dev}" size="{size}" sr="" bootable="{str(dev == "0").lower()}" type="system"/>'
        for dev, size in disks
    )
    return f"<provision>{items}</provision>"


SEED: Final[dict[str, Any]] = {
    "pool": {"name_label": "lab-pool", "master": "xcp-host-1", "default_SR": "nfs-sr"},
    "software_version": {
        "product_brand": "XCP-ng",
        "product_version": "8.3.0",
        "platform_name": "XCP",
        "platform_version": "3.4.0",
        "xapi": "24.19",
        "xen": "4.17.5-3",
        "build_number": "cloud",
        "linux": "4.19.0+1",
    },
    "api_version": (2, 21),
    "hosts": [
        {
            "name_label": "xcp-host-1",
            "address": "192.0.2.21",
            "cpus": 16,
            "sockets": 2,
            "memory_total": 64 * GiB,
            "memory_free": 40 * GiB,
        },
        {
            "name_label": "xcp-host-2",
            "address": "192.0.2.22",
            "cpus": 8,
            "sockets": 1,
            "memory_total": 32 * GiB,
            "memory_free": 26 * GiB,
        },
    ],
    # Each network gets a PIF on every host: physical on ``device``, or a VLAN on top of it.
    "networks": [
        {
            "name_label": "Pool-wide network associated with eth0",
            "bridge": "xenbr0",
            "device": "eth0",
            "management": True,
        },
        {"name_label": "Pool-wide network associated with eth1", "bridge": "xenbr1", "device": "eth1"},
        {"name_label": "apps-vlan20", "bridge": "xapi1", "device": "eth1", "vlan": 20},
        {"name_label": "Host internal management network", "bridge": "xenapi", "internal": True},
    ],
    # ``physical_utilisation`` already counts the seeded VMs' disks.
    "srs": [
        {
            "name_label": "nfs-sr",
            "type": "nfs",
            "shared": True,
            "physical_size": 2 * TiB,
            "physical_utilisation": 600 * GiB,
            "content_type": "user",
        },
        {
            "name_label": "Local storage",
            "type": "lvm",
            "host": "xcp-host-1",
            "physical_size": 500 * GiB,
            "physical_utilisation": 120 * GiB,
            "content_type": "user",
        },
        {
            "name_label": "XCP-ng Tools",
            "type": "iso",
            "shared": True,
            "physical_size": 0,
            "physical_utilisation": 0,
            "content_type": "iso",
            "is_tools_sr": True,
        },
    ],
    "templates": [
        {
            "name_label": "Debian Bookworm 12",
            "memory": 2 * GiB,
            "vcpus": 1,
            "firmware": "bios",
            "linux": True,
            "disks": provision_xml(("0", 10 * GiB)),
        },
        {
            "name_label": "Rocky Linux 9",
            "memory": 2 * GiB,
            "vcpus": 1,
            "firmware": "bios",
            "linux": True,
            "disks": provision_xml(("0", 10 * GiB)),
        },
        {
            "name_label": "Windows Server 2022 (64-bit)",
            "memory": 4 * GiB,
            "vcpus": 2,
            "firmware": "uefi",
            "linux": False,
            "disks": provision_xml(("0", 32 * GiB)),
        },
        {
            "name_label": "Other install media",
            "memory": 1 * GiB,
            "vcpus": 1,
            "firmware": "bios",
            "linux": False,
            "disks": "",
        },
    ],
    "vms": [
        {
            "name_label": "legacy-app-01",
            "power_state": "Halted",
            "host": "",
            "memory": 2 * GiB,
            "vcpus": 2,
            "tags": ["prod"],
            "disks": [("nfs-sr", 20 * GiB)],
            "nics": [("Pool-wide network associated with eth0", "2a:6e:1f:00:00:01")],
        },
        {
            "name_label": "build-runner",
            "power_state": "Running",
            "host": "xcp-host-2",
            "memory": 4 * GiB,
            "vcpus": 4,
            "tags": [],
            "disks": [("Local storage", 40 * GiB)],
            "nics": [("apps-vlan20", "2a:6e:1f:00:00:02")],
        },
    ],
}


def _uuid(kind: str, name: str) -> str:
    return str(uuidlib.uuid5(_NS, f"{kind}/{name}"))


def _ref(kind: str, name: str) -> str:
    return "OpaqueRef:" + str(uuidlib.uuid5(_NS, f"ref/{kind}/{name}"))


def _mac(*parts: str) -> str:
    digest = uuidlib.uuid5(_NS, "mac/" + "/".join(parts)).bytes
    return "2a:" + ":".join(f"{b:02x}" for b in digest[:5])


class _Builder:
    def __init__(self, store: Store, vdi_dir: Path) -> None:
        self.store = store
        self.vdi_dir = vdi_dir

    def add(self, cls: str, key: str, **values: Any) -> str:
        values.setdefault("uuid", _uuid(cls, key))
        return self.store.create(cls, values, ref=_ref(cls, key))

    def vdi(self, sr: str, key: str, size: int, name: str) -> str:
        ref = self.add(
            "VDI",
            key,
            name_label=name,
            SR=sr,
            virtual_size=size,
            type="system",
            physical_utilisation=size,
            location=_uuid("VDI", key),
        )
        path = self.vdi_dir / f"{_uuid('VDI', key)}.raw"
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: a seeded disk costs no space
        return ref


def build(store: Store, vdi_dir: Path, seed: dict[str, Any] | None = None) -> None:
    """Fill an empty store with ``seed`` (default ``SEED``); VDI files go to ``vdi_dir``."""
    seed = seed or SEED
    b = _Builder(store, vdi_dir)
    sw = dict(seed["software_version"])
    hosts: dict[str, str] = {}
    for h in seed["hosts"]:
        name = h["name_label"]
        metrics = b.add(
            "host_metrics",
            name,
            memory_total=h["memory_total"],
            memory_free=h["memory_free"],
            live=True,
            last_updated="20250101T00:00:00Z",
        )
        ref = b.add(
            "host",
            name,
            name_label=name,
            hostname=name,
            address=h["address"],
            enabled=True,
            software_version=dict(sw, hostname=name),
            API_version_major=seed["api_version"][0],
            API_version_minor=seed["api_version"][1],
            API_version_vendor="XenSource",
            metrics=metrics,
            edition="xcp-ng",
            sched_policy="credit",
            cpu_info={
                "cpu_count": str(h["cpus"]),
                "socket_count": str(h["sockets"]),
                "vendor": "GenuineIntel",
                "speed": "2394.374",
                "modelname": "Intel(R) Xeon(R) Silver 4214R CPU @ 2.40GHz",
            },
            capabilities=["xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_64"],
        )
        for i in range(h["cpus"]):
            b.add("host_cpu", f"{name}/{i}", host=ref, number=i, vendor="GenuineIntel", speed=2394)
        dom0 = b.add(
            "VM",
            f"dom0/{name}",
            name_label=f"Control domain on host: {name}",
            is_control_domain=True,
            power_state="Running",
            resident_on=ref,
            domid=0,
            memory_static_max=4 * GiB,
            memory_dynamic_max=4 * GiB,
            memory_dynamic_min=4 * GiB,
            memory_target=4 * GiB,
            VCPUs_max=h["cpus"],
            VCPUs_at_startup=h["cpus"],
            domain_type="pv",
        )
        b.store.set("host", ref, "control_domain", dom0)
        hosts[name] = ref
    networks: dict[str, str] = {}
    for n in seed["networks"]:
        other = (
            {"is_guest_installer_network": "true", "is_host_internal_management_network": "true"}
            if n.get("internal")
            else {}
        )
        net = b.add(
            "network",
            n["name_label"],
            name_label=n["name_label"],
            bridge=n["bridge"],
            MTU=1500,
            other_config=other,
            managed=True,
        )
        networks[n["name_label"]] = net
    for hname, host in hosts.items():
        physical: dict[str, str] = {}
        for n in seed["networks"]:
            if n.get("internal") or "vlan" in n:
                continue
            dev = n["device"]
            physical[dev] = b.add(
                "PIF",
                f"{hname}/{dev}",
                device=dev,
                network=networks[n["name_label"]],
                host=host,
                MAC=_mac(hname, dev),
                MTU=1500,
                VLAN=-1,
                physical=True,
                currently_attached=True,
                management=bool(n.get("management")),
                ip_configuration_mode="DHCP" if n.get("management") else "None",
                managed=True,
            )
        for n in seed["networks"]:
            if "vlan" not in n:
                continue
            key = f"{hname}/{n['device']}.{n['vlan']}"
            pif = b.add(
                "PIF",
                key,
                device=n["device"],
                network=networks[n["name_label"]],
                host=host,
                MAC=_mac(hname, n["device"]),
                MTU=1500,
                VLAN=n["vlan"],
                physical=False,
                currently_attached=True,
                managed=True,
            )
            vlan = b.add("VLAN", key, tagged_PIF=physical[n["device"]], untagged_PIF=pif, tag=n["vlan"])
            b.store.set("PIF", pif, "VLAN_master_of", vlan)
    srs: dict[str, str] = {}
    for s in seed["srs"]:
        name = s["name_label"]
        sr = b.add(
            "SR",
            name,
            name_label=name,
            type=s["type"],
            shared=s.get("shared", False),
            physical_size=s["physical_size"],
            physical_utilisation=s["physical_utilisation"],
            virtual_allocation=s["physical_utilisation"],
            content_type=s["content_type"],
            is_tools_sr=s.get("is_tools_sr", False),
        )
        on = list(hosts) if s.get("shared") else [s["host"]]
        for hname in on:
            b.add(
                "PBD",
                f"{name}/{hname}",
                host=hosts[hname],
                SR=sr,
                currently_attached=True,
                device_config={"location": f"/srv/{name}"} if s["type"] != "lvm" else {"device": "/dev/sdb"},
            )
        srs[name] = sr
    pool = seed["pool"]
    b.add(
        "pool",
        pool["name_label"],
        name_label=pool["name_label"],
        master=hosts[pool["master"]],
        default_SR=srs[pool["default_SR"]],
        suspend_image_SR=srs[pool["default_SR"]],
        crash_dump_SR=srs[pool["default_SR"]],
        ha_allow_overcommit=False,
    )
    for t in seed["templates"]:
        _template(b, t)
    for v in seed["vms"]:
        _vm(b, v, hosts, srs, networks)


def _template(b: _Builder, t: dict[str, Any]) -> None:
    name = t["name_label"]
    other = {"default_template": "true", "base_template_name": name, "install-methods": "cdrom"}
    if t["linux"]:
        other |= {"linux_template": "true", "install-methods": "cdrom,nfs,http,ftp"}
    if t["disks"]:
        other["disks"] = t["disks"]
    b.add(
        "VM",
        f"template/{name}",
        name_label=name,
        name_description=f"Template which allows VM installation from install media ({name})",
        is_a_template=True,
        is_default_template=True,
        power_state="Halted",
        memory_static_max=t["memory"],
        memory_dynamic_max=t["memory"],
        memory_dynamic_min=t["memory"],
        memory_static_min=256 * MiB,
        memory_target=t["memory"],
        VCPUs_max=t["vcpus"],
        VCPUs_at_startup=t["vcpus"],
        HVM_boot_policy="BIOS order",
        HVM_boot_params={"order": "cdn" if t["linux"] else "dc", "firmware": t["firmware"]},
        platform=dict(_LINUX_PLATFORM if t["linux"] else _WINDOWS_PLATFORM),
        other_config=other,
        domain_type="hvm",
        user_version=1,
        actions_after_shutdown="destroy",
        actions_after_reboot="restart",
        actions_after_crash="restart",
        recommendations='<restrictions><restriction field="memory-static-max" '
        f'max="{1024 * GiB}"/><restriction field="vcpus-max" max="32"/></restrictions>',
    )


def _vm(
    b: _Builder, v: dict[str, Any], hosts: dict[str, str], srs: dict[str, str], networks: dict[str, str]
) -> None:
    name = v["name_label"]
    running = v["power_state"] == "Running"
    metrics = b.add(
        "VM_metrics",
        name,
        memory_actual=v["memory"] if running else 0,
        VCPUs_number=v["vcpus"] if running else 0,
    )
    vm = b.add(
        "VM",
        name,
        name_label=name,
        power_state=v["power_state"],
        tags=list(v["tags"]),
        resident_on=hosts[v["host"]] if running else "OpaqueRef:NULL",
        domid=7 if running else -1,
        memory_static_max=v["memory"],
        memory_dynamic_max=v["memory"],
        memory_dynamic_min=v["memory"],
        memory_static_min=256 * MiB,
        memory_target=v["memory"],
        VCPUs_max=v["vcpus"],
        VCPUs_at_startup=v["vcpus"],
        HVM_boot_policy="BIOS order",
        HVM_boot_params={"order": "c"},
        platform=dict(_LINUX_PLATFORM),
        domain_type="hvm",
        metrics=metrics,
        user_version=1,
        actions_after_shutdown="destroy",
        actions_after_reboot="restart",
        actions_after_crash="restart",
    )
    for i, (sr, size) in enumerate(v["disks"]):
        vdi = b.vdi(srs[sr], f"{name}/{i}", size, f"{name} {i}")
        b.add(
            "VBD",
            f"{name}/{i}",
            VM=vm,
            VDI=vdi,
            userdevice=str(i),
            device=f"xvd{'abcdefgh'[i]}",
            bootable=i == 0,
            mode="RW",
            type="Disk",
            currently_attached=running,
        )
    for i, (net, mac) in enumerate(v["nics"]):
        b.add(
            "VIF",
            f"{name}/{i}",
            VM=vm,
            network=networks[net],
            device=str(i),
            MAC=mac,
            MTU=1500,
            currently_attached=running,
        )
