"""Human views of the inventory model (rich renderables). Pure: builds tables, prints nothing."""

from __future__ import annotations

from rich.table import Table

from migrate.model import SourceInventory, Vm

GIB = 1024**3


def _disks(vm: Vm) -> str:
    return " + ".join(f"{d.capacity_bytes / GIB:g}" for d in vm.disks) or "-"


def inventory_table(inventory: SourceInventory) -> Table:
    table = Table(
        title=f"{inventory.source} ({inventory.endpoint}, API {inventory.api_version}): "
        f"{len(inventory.vms)} VMs, {len(inventory.hosts)} hosts, {len(inventory.datastores)} datastores",
        title_justify="left",
    )
    for column in ("VM", "power", "guest", "fw", "vCPU", "MiB", "disks GiB", "NICs", "folder", "notes"):
        table.add_column(column, overflow="fold")
    for vm in inventory.vms:
        notes = []
        if vm.template:
            notes.append("template")
        if vm.snapshots:
            notes.append(f"{len(vm.snapshots)} snapshot(s)")
        if vm.pci_passthrough:
            notes.append("PCI passthrough")
        if any(d.rdm or d.shared or d.independent for d in vm.disks):
            notes.append("RDM/shared/independent disk")
        table.add_row(
            vm.name,
            vm.power_state.removeprefix("powered"),
            vm.guest_id,
            vm.firmware + (" SB" if vm.secure_boot else ""),
            f"{vm.cpu_sockets}x{vm.cores_per_socket}",
            str(vm.memory_mib),
            _disks(vm),
            ", ".join(f"{n.model}@{n.network}" for n in vm.nics) or "-",
            vm.folder,
            ", ".join(notes),
        )
    return table
