"""A loaded plan, as the runner and the steps take it: waves of ``VmSpec`` and run ``Options``.

The plan file stays the single source of what runs; this only re-shapes it (wave names
become indices in file order, target configs become ordered settings) and invents nothing.
"""

from __future__ import annotations

import dataclasses
from typing import get_args

from migrate.connectors.base import DiskFormat, DiskSpec, NicSpec, ShutdownPolicy, VmSpec
from migrate.errors import PlanError
from migrate.executor.runner import Wave, Work
from migrate.executor.steps import Options, Verify
from migrate.model import TargetKind
from migrate.plan import DiskPlan, NicPlan, Plan, VmPlan

_FORMATS: dict[str, DiskFormat] = {"raw": "raw", "qcow2": "qcow2", "vpc": "vhd", "vhd": "vhd", "vmdk": "vmdk"}


def _landing_format(kind: TargetKind, fmt: DiskFormat) -> DiskFormat:
    """Proxmox's import converts from raw; XCP-ng takes a dynamic VHD, so only allocated blocks travel."""
    return "vhd" if kind == "xcpng" and fmt == "vhd" else "raw"


def _disk(disk: DiskPlan, kind: TargetKind) -> DiskSpec:
    fmt = _FORMATS.get(disk.format)
    if fmt is None:
        raise PlanError(
            f"disk {disk.label!r}: format {disk.format!r} is not one the executor can write",
            hint="re-run migrate plan with this version of migrate",
        )
    return DiskSpec(
        key=str(disk.source_key),
        label=disk.label,
        size_bytes=disk.capacity_bytes,
        source_path=disk.descriptor,
        storage=disk.storage,
        slot=disk.slot,
        datacenter=disk.datacenter,
        datastore=disk.datastore,
        source_chain=disk.chain,
        landing_format=_landing_format(kind, fmt),
        format=fmt,
        boot=disk.bootable,
        drive=disk.drive,
        name=disk.vdi_name,
    )


def _nic(nic: NicPlan) -> NicSpec:
    return NicSpec(
        key=str(nic.source_key),
        mac=nic.mac,
        network=nic.network,
        slot=nic.slot,
        model=nic.model,
        vlan=nic.vlan,
    )


def _settings(vm: VmPlan) -> tuple[tuple[str, str], ...]:
    if vm.proxmox is not None:
        return vm.proxmox.params
    if vm.xcpng is not None:
        out: list[tuple[str, str]] = []
        for f in dataclasses.fields(vm.xcpng):
            value = getattr(vm.xcpng, f.name)
            if isinstance(value, tuple):
                out.extend((f"{f.name}:{k}", v) for k, v in value)
            else:
                out.append((f.name, str(value)))
        return tuple(out)
    return ()


def vm_spec(plan: Plan, vm: VmPlan) -> VmSpec:
    return VmSpec(
        key=vm.key,
        name=vm.name,
        source=plan.inputs.source,
        source_moref=vm.source.moref,
        source_uuid=vm.source.instance_uuid,
        source_name=vm.source.name,
        datacenter=vm.source.datacenter,
        target=vm.target,
        target_kind=vm.kind,
        node=vm.node,
        vmid=vm.proxmox.vmid if vm.proxmox is not None else None,
        template=vm.xcpng.template if vm.xcpng is not None else "",
        settings=_settings(vm),
        disks=tuple(_disk(d, vm.kind) for d in vm.disks),
        nics=tuple(_nic(n) for n in vm.nics),
        power_on=plan.options.start_after,
    )


def work_from_plan(plan: Plan) -> Work[VmSpec]:
    """Waves in file order (index 0, 1, ...), each VM in its wave's order."""
    waves = []
    for index, wave in enumerate(plan.waves):
        specs = []
        for key in wave.vms:
            vm = plan.vm(key)
            if vm is None:
                raise PlanError(
                    f"wave {wave.name!r} lists VM {key!r}, which the plan does not describe",
                    hint="re-run migrate plan",
                )
            specs.append(vm_spec(plan, vm))
        waves.append(Wave(index=index, concurrency=wave.concurrency, vms=tuple(specs)))
    return Work(plan_hash=plan.content_hash, waves=tuple(waves))


def options_from_plan(plan: Plan) -> Options:
    shutdown = plan.options.shutdown
    verify = plan.options.verify
    if shutdown not in get_args(ShutdownPolicy) or verify not in get_args(Verify):
        raise PlanError(
            f"plan options shutdown={shutdown!r} verify={verify!r} are not known to the executor",
            hint="re-run migrate plan with this version of migrate",
        )
    return Options(shutdown=shutdown, start=plan.options.start_after, verify=verify)  # type: ignore[arg-type]
