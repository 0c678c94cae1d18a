"""Synthetic inventories and target snapshots for the planner tests: no servers needed.

``lab_source()`` and ``lab_targets()`` mirror the lab estate (web-01, win-app-01, the
three-disk Czech-named db VM, app-02, tmpl-rhel9; lab-pve and lab-xcp) so the sample
playbooks can be planned against it in tests.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from migrate.model import (
    Datastore,
    Disk,
    ExistingVm,
    Network,
    Nic,
    Snapshot,
    SourceInventory,
    Storage,
    TargetNetwork,
    TargetNode,
    TargetSnapshot,
    TargetTemplate,
    Vm,
)

GiB = 1 << 30
DS = "LocalDS_0"


def disk(
    n: int = 0, gib: int = 16, *, vm: str = "vm", datastore: str = DS, controller: Any = "pvscsi", **kw: Any
) -> Disk:
    path = f"[{datastore}] {vm}/{vm}{'' if n == 0 else f'_{n}'}.vmdk"
    base: dict[str, Any] = dict(
        key=2000 + n,
        label=f"Hard disk {n + 1}",
        controller=controller,
        bus=0,
        unit=n,
        capacity_bytes=gib * GiB,
        datastore=datastore,
        path=path,
        thin=True,
        uuid=f"6000C29{n:01d}-0000-0000-0000-00000000000{n}",
        chain=(path,),
    )
    base.update(kw)
    return Disk(**base)


def nic(n: int = 0, *, network: str = "VM Network", model: Any = "vmxnet3", mac: str = "", **kw: Any) -> Nic:
    base: dict[str, Any] = dict(
        key=4000 + n,
        label=f"Network adapter {n + 1}",
        model=model,
        mac=mac or f"00:50:56:00:00:{n + 1:02x}",
        mac_manual=False,
        network=network,
        connected=True,
        start_connected=True,
    )
    base.update(kw)
    return Nic(**base)


def vm(name: str, moref: str, **kw: Any) -> Vm:
    base: dict[str, Any] = dict(
        moref=moref,
        name=name,
        instance_uuid=f"50000000-0000-0000-0000-{int(moref.split('-')[-1]):012d}",
        bios_uuid=f"42000000-0000-0000-0000-{int(moref.split('-')[-1]):012d}",
        folder="DC0/vm",
        datacenter="DC0",
        cluster="DC0_C0",
        host="DC0_C0_H0",
        resource_pool="Resources",
        power_state="poweredOff",
        template=False,
        hw_version="vmx-19",
        guest_id="rhel9_64Guest",
        guest_full_name="Red Hat Enterprise Linux 9 (64-bit)",
        tools_status="guestToolsRunning",
        firmware="bios",
        secure_boot=False,
        cpu_sockets=1,
        cores_per_socket=2,
        memory_mib=2048,
        disks=(disk(vm=name),),
        nics=(nic(mac=f"00:50:56:01:00:{int(moref.split('-')[-1]) % 256:02x}"),),
    )
    base.update(kw)
    return Vm(**base)


def source(*vms: Vm, name: str = "lab-vc") -> SourceInventory:
    return SourceInventory(
        source=name,
        endpoint="https://127.0.0.1:8989/sdk",
        api_version="8.0.2.0",
        instance_uuid="vc-uuid-1",
        vms=tuple(sorted(vms, key=lambda v: (v.name, v.moref))),
        datastores=(Datastore("datastore-1", DS, "VMFS", 2000 * GiB, 1500 * GiB, datacenter="DC0"),),
        networks=(
            Network("network-1", "VM Network", "standard"),
            Network("dvportgroup-1", "DC0_DVPG0", "distributed", vlan=20, switch="DC0_DVS"),
        ),
    )


def node(name: str, mem_gib: int = 64, used_gib: int = 8, cpus: int = 16, **kw: Any) -> TargetNode:
    return TargetNode(name, cpus, mem_gib * GiB, used_gib * GiB, **kw)


def pve_target(
    name: str = "lab-pve",
    *,
    nodes: tuple[TargetNode, ...] | None = None,
    storages: tuple[Storage, ...] | None = None,
    vms: tuple[ExistingVm, ...] = (),
    networks: tuple[TargetNetwork, ...] | None = None,
) -> TargetSnapshot:
    # As migrate.lab.pve seeds it.
    nodes = nodes if nodes is not None else (node("pve1", 128, 24, cpus=32), node("pve2", 128, 40, cpus=32))
    names = tuple(n.name for n in nodes)
    storages = (
        storages
        if storages is not None
        else (
            *(
                Storage(
                    "local",
                    "dir",
                    100 * GiB,
                    80 * GiB,
                    content=("backup", "images", "import", "iso", "vztmpl"),
                    nodes=(n,),
                )
                for n in names
            ),
            *(
                Storage(
                    "local-lvm", "lvmthin", 400 * GiB, 350 * GiB, content=("images", "rootdir"), nodes=(n,)
                )
                for n in names
            ),
            Storage(
                "nfs-shared",
                "nfs",
                2048 * GiB,
                1536 * GiB,
                shared=True,
                content=("images", "import", "iso"),
                nodes=names,
            ),
        )
    )
    networks = (
        networks
        if networks is not None
        else (
            TargetNetwork("vmbr0", "bridge", nodes=names),
            TargetNetwork("vmbr1", "bridge", nodes=names, vlan_aware=True),
            TargetNetwork("vmbr2", "bridge", nodes=("pve1",)),
        )
    )
    return TargetSnapshot(
        name=name,
        kind="proxmox",
        endpoint="https://127.0.0.1:8006",
        version="8.4.1",
        nodes=nodes,
        storages=storages,
        networks=networks,
        vms=vms,
        next_vmid=100,
    )


# As migrate.lab.xapi_fake seeds it.
XCP_TEMPLATES = ("Debian Bookworm 12", "Rocky Linux 9", "Windows Server 2022 (64-bit)", "Other install media")


def xcp_target(
    name: str = "lab-xcp",
    *,
    nodes: tuple[TargetNode, ...] | None = None,
    storages: tuple[Storage, ...] | None = None,
    vms: tuple[ExistingVm, ...] = (),
    templates: tuple[str, ...] = XCP_TEMPLATES,
) -> TargetSnapshot:
    nodes = (
        nodes
        if nodes is not None
        else (node("xcp-host-1", 64, 24, cpus=16), node("xcp-host-2", 32, 6, cpus=8))
    )
    storages = (
        storages
        if storages is not None
        else (
            Storage("Local storage", "lvm", 500 * GiB, 380 * GiB, nodes=("xcp-host-1",), uuid="sr-local"),
            Storage("nfs-sr", "nfs", 2048 * GiB, 1448 * GiB, shared=True, uuid="sr-nfs"),
        )
    )
    networks = (
        TargetNetwork("Pool-wide network associated with eth0", "xapi", uuid="net-0"),
        TargetNetwork("Pool-wide network associated with eth1", "xapi", uuid="net-1"),
        TargetNetwork("apps-vlan20", "xapi", vlan=20, uuid="net-2"),
    )
    return TargetSnapshot(
        name=name,
        kind="xcpng",
        endpoint="https://127.0.0.1:8443",
        version="8.3.0",
        nodes=nodes,
        storages=storages,
        networks=networks,
        vms=vms,
        templates=tuple(TargetTemplate(t, f"tpl-{i}") for i, t in enumerate(templates)),
    )


def lab_vms() -> tuple[Vm, ...]:
    """The lab estate as the vSphere helper seeds it (see migrate.lab)."""
    web = vm(
        "web-01",
        "vm-101",
        guest_id="rhel9_64Guest",
        memory_mib=2048,
        disks=(
            disk(
                0,
                16,
                vm="web-01",
                path="[LocalDS_0] web-01/web-01-000001.vmdk",
                chain=("[LocalDS_0] web-01/web-01.vmdk", "[LocalDS_0] web-01/web-01-000001.vmdk"),
            ),
        ),
        nics=(nic(0, model="vmxnet3", mac="00:50:56:01:00:01"),),
        snapshots=(Snapshot("snapshot-1", "before-migration", "before-migration", "2025-01-01T00:00:00Z"),),
        cdroms=("CD/DVD drive 1",),
    )
    win = vm(
        "win-app-01",
        "vm-102",
        guest_id="windows2019srvNext_64Guest",
        guest_full_name="Microsoft Windows Server 2022 (64-bit)",
        firmware="efi",
        secure_boot=True,
        cpu_sockets=2,
        cores_per_socket=2,
        memory_mib=8192,
        disks=(
            disk(0, 60, vm="win-app-01", controller="lsilogic-sas"),
            disk(1, 100, vm="win-app-01", controller="lsilogic-sas"),
        ),
        nics=(nic(0, model="e1000e", mac="00:50:56:01:00:02"),),
    )
    db = vm(
        "Žluťoučký kůň / db",
        "vm-103",
        guest_id="debian12_64Guest",
        guest_full_name="Debian GNU/Linux 12 (64-bit)",
        memory_mib=4096,
        cores_per_socket=4,
        disks=tuple(disk(i, g, vm="db") for i, g in enumerate((20, 50, 50))),
        nics=(
            nic(
                0,
                network="DC0_DVPG0",
                mac="00:50:56:01:00:03",
                distributed=True,
                portgroup_key="dvportgroup-1",
            ),
        ),
    )
    app = vm(
        "app-02",
        "vm-104",
        guest_id="ubuntu64Guest",
        guest_full_name="Ubuntu Linux (64-bit)",
        power_state="poweredOn",
        memory_mib=1024,
        cores_per_socket=1,
        nics=(nic(0, mac="00:50:56:01:00:04"),),
    )
    tmpl = vm("tmpl-rhel9", "vm-105", template=True, tools_status="guestToolsNotRunning")
    return (web, win, db, app, tmpl)


def lab_source() -> SourceInventory:
    return source(*lab_vms())


def lab_targets() -> dict[str, TargetSnapshot]:
    pve = pve_target(vms=(ExistingVm("legacy-app01", 100, "pve1"),))
    xcp = xcp_target(vms=(ExistingVm("legacy-app-01", None, "", "vm-uuid-1"), ExistingVm("build-runner")))
    return {"lab-pve": pve, "lab-xcp": xcp}


def renamed(v: Vm, name: str, moref: str) -> Vm:
    return replace(v, name=name, moref=moref)
