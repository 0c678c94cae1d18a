"""Human views of the inventory model (rich renderables). Pure: builds tables, prints nothing."""

from __future__ import annotations

from rich.table import Table

from migrate.model import SourceInventory, Vm
from migrate.plan import Plan
from migrate.plan_render import summarize
from migrate.units import human_bytes


def _disks(vm: Vm) -> str:
    return " + ".join(human_bytes(d.capacity_bytes) for d in vm.disks) or "-"


def inventory_table(inventory: SourceInventory) -> Table:
    table = Table(
        title=f"{inventory.source} ({inventory.endpoint}, API {inventory.api_version}): "
        f"{len(inventory.vms)} VMs, {len(inventory.hosts)} hosts, {len(inventory.datastores)} datastores",
        title_justify="left",
    )
    for column in ("VM", "power", "guest", "fw", "vCPU", "MiB", "disks", "NICs", "folder", "notes"):
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


def plan_tables(plan: Plan) -> list[Table]:
    """What `migrate plan` and `migrate run` show: VMs per wave and target, then blockers and warnings."""
    summary = summarize(plan)
    waves = Table(
        title=f"plan {summary.playbook} ({summary.content_hash[:12]}): {summary.total_vms} VMs, "
        f"{human_bytes(summary.total_disk_bytes)}, {summary.blocked_vms} blocked",
        title_justify="left",
    )
    for column in ("wave", "concurrency", "target", "VMs", "disks", "memory MiB"):
        waves.add_column(
            column, justify="right" if column in ("concurrency", "VMs", "disks", "memory MiB") else "left"
        )
    for row in summary.rows:
        waves.add_row(
            row.wave,
            str(row.concurrency),
            row.target or "-",
            str(row.vms),
            human_bytes(row.disk_bytes),
            str(row.memory_mib),
        )
    tables = [waves]
    for title, rows, style in (
        ("blocked", summary.blockers, "red"),
        ("warnings", summary.warnings, "yellow"),
    ):
        if not rows:
            continue
        table = Table(title=f"[{style}]{title}[/]", title_justify="left")
        for column in ("VM", "code", "why", "fix"):
            table.add_column(column, overflow="fold")
        for issue in rows:
            table.add_row(issue.vm, issue.code, issue.message, issue.hint)
        tables.append(table)
    return tables
