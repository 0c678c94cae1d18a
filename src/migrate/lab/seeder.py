"""Seed the sample estate into a running vCenter simulator (vcsim), idempotently.

For each VM that is not there yet, in this order:
  1. upload every file the VM's disks need (descriptors, flat extents, snapshot deltas);
  2. CreateVM with those disks attached as existing files (no ``fileOperation``), so vcsim
     leaves our descriptors alone (with ``create`` it would make empty files of its own);
  3. take the snapshots (vcsim 0.24 records the tree but writes no delta: ours are in place);
  4. set custom attributes, power on, or mark as template.
A VM already present is not touched except to converge attributes, power state and template
flag; running the seeder twice changes nothing the second time.

pyVmomi faults are turned into LabError here: this is lab code, not a connector.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog
from pyVim import connect as _connect
from pyVmomi import vim as _vim
from pyVmomi import vmodl as _vmodl

from migrate.disks.datastore import DatastoreFiles
from migrate.errors import LabError, NotFoundError
from migrate.lab import estatedisks
from migrate.lab.estate import EstateSpec, SeededDisk, SeededEstate, SeededFile, SeededVm, VmSpec
from migrate.lab.estatedisks import PlannedDisk, PlannedVm
from migrate.lab.vcsim import RunningVcsim

log = structlog.get_logger(__name__)
# pyVmomi's stubs leave constructors untyped and every property Optional; lab code takes it as Any.
vim: Any = _vim
vmodl: Any = _vmodl
smart_connect: Any = _connect.SmartConnect
disconnect: Any = _connect.Disconnect

_SCSI = {
    "pvscsi": vim.vm.device.ParaVirtualSCSIController,
    "lsilogic": vim.vm.device.VirtualLsiLogicController,
    "lsilogic-sas": vim.vm.device.VirtualLsiLogicSASController,
    "buslogic": vim.vm.device.VirtualBusLogicController,
}
_NIC = {
    "vmxnet3": vim.vm.device.VirtualVmxnet3,
    "vmxnet2": vim.vm.device.VirtualVmxnet2,
    "e1000": vim.vm.device.VirtualE1000,
    "e1000e": vim.vm.device.VirtualE1000e,
    "pcnet32": vim.vm.device.VirtualPCNet32,
}
_IDE0_KEY = 200  # vcsim's (and ESXi's) first IDE controller


class _Context:
    """The vSphere objects seeding needs, looked up once."""

    def __init__(self, si: Any, estate: EstateSpec) -> None:
        self.si = si
        self.content = si.RetrieveContent()
        self.dc = _named(self.content.rootFolder.childEntity, estate.datacenter, vim.Datacenter, "datacenter")
        self.cluster = _named(list(_walk(self.dc.hostFolder)), estate.cluster, vim.ClusterComputeResource,
                              "cluster")
        self.datastore = _named(self.dc.datastore, estate.datastore, vim.Datastore, "datastore")
        self.networks = {net.name: net for net in self.dc.network}
        self.ds = estate.datastore

    def ds_path(self, relative: str) -> str:
        return f"[{self.ds}] {relative}"

    def find_vm(self, name: str) -> Any:
        view = self.content.viewManager.CreateContainerView(self.dc.vmFolder, [vim.VirtualMachine], True)
        try:
            return next((vm for vm in view.view if vm.name == name), None)
        finally:
            view.Destroy()


def _walk(folder: Any) -> Iterator[Any]:
    for child in getattr(folder, "childEntity", []):
        yield child
        yield from _walk(child)


def _named(items: Any, name: str, kind: Any, what: str) -> Any:
    for item in items:
        if isinstance(item, kind) and item.name == name:
            return item
    raise LabError(f"the simulator has no {what} named {name!r}",
                   hint="start vcsim with the default VPX model or fix the estate file")


def _wait(ctx: _Context, task: Any, what: str, timeout: float = 120) -> Any:
    """Wait for ``task``, reading only its state, error and result: pyVmomi's WaitForTask reads
    the whole TaskInfo, and vcsim names non-entities (FileManager) as a task's entity, which
    pyVmomi refuses to deserialise."""
    prop = vmodl.query.PropertyCollector
    spec = prop.FilterSpec(
        objectSet=[prop.ObjectSpec(obj=task)],
        propSet=[prop.PropertySpec(type=vim.Task, pathSet=["info.state", "info.error", "info.result"])],
    )
    deadline = time.monotonic() + timeout
    while True:
        found = ctx.content.propertyCollector.RetrieveContents([spec])
        props = {p.name: p.val for p in found[0].propSet} if found else {}
        state = props.get("info.state")
        if state == vim.TaskInfo.State.success:
            return props.get("info.result")
        if state == vim.TaskInfo.State.error:
            error = props.get("info.error")
            why = (error.localizedMessage or type(error.fault).__name__) if error else "unknown error"
            raise LabError(f"{what} failed: {why}")
        if time.monotonic() > deadline:
            raise LabError(f"{what} did not finish within {timeout:g} s")
        time.sleep(0.05)


def _ensure_folder(ctx: _Context, path: str) -> Any:
    folder = ctx.dc.vmFolder
    for part in [p for p in path.split("/") if p]:
        found = next((c for c in folder.childEntity if isinstance(c, vim.Folder) and c.name == part), None)
        folder = found or folder.CreateFolder(part)
    return folder


def _ensure_fields(ctx: _Context, names: list[str], changes: list[str]) -> dict[str, int]:
    cfm = ctx.content.customFieldsManager
    have = {f.name: f.key for f in (cfm.field or []) if f.managedObjectType in (vim.VirtualMachine, None)}
    for name in names:
        if name not in have:
            have[name] = cfm.AddCustomFieldDef(name=name, moType=vim.VirtualMachine).key
            changes.append(f"custom attribute {name} defined")
    return have


# -- devices -------------------------------------------------------------------------------


def _disk_backing(ctx: _Context, disk: PlannedDisk) -> Any:
    backing = None
    for level, descriptor in enumerate(disk.chain):
        node = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=ctx.ds_path(descriptor),
            datastore=ctx.datastore,
            diskMode="persistent",
            thinProvisioned=disk.spec.thin,
            eagerlyScrub=disk.spec.eager_zero,
            uuid=disk.uuid,  # a disk keeps its UUID across snapshots
            parent=backing,
        )
        if level:
            node.deltaDiskFormat = "redoLogFormat"  # vmfsSparse, as ESXi reports it
        backing = node
    assert backing is not None
    return backing


def _device_changes(ctx: _Context, plan: PlannedVm) -> list[Any]:
    add = vim.vm.device.VirtualDeviceSpec.Operation.add
    changes = []
    controllers: dict[int, int] = {}
    for disk in plan.disks:
        bus = disk.spec.bus
        if bus not in controllers:
            controllers[bus] = -(100 + bus)
            ctrl = _SCSI[disk.spec.controller](
                key=controllers[bus], busNumber=bus, sharedBus="noSharing",
                deviceInfo=vim.Description(label=f"SCSI controller {bus}", summary=disk.spec.controller))
            changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=ctrl))
    for disk in plan.disks:
        device = vim.vm.device.VirtualDisk(
            key=-(200 + disk.index),
            controllerKey=controllers[disk.spec.bus],
            unitNumber=disk.spec.unit,
            capacityInKB=disk.capacity // 1024,
            capacityInBytes=disk.capacity,
            backing=_disk_backing(ctx, disk),
            deviceInfo=vim.Description(label=f"Hard disk {disk.index + 1}",
                                       summary=f"{disk.capacity // 1024:,} KB"),
        )
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=device))
    for i, nic in enumerate(plan.spec.nics):
        net = ctx.networks.get(nic.network)
        if net is None:
            raise LabError(f"VM {plan.spec.name!r}: no network {nic.network!r} in {ctx.dc.name}",
                           hint=f"use one of: {', '.join(sorted(ctx.networks))}")
        if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
            backing: Any = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(switchUuid=net.config.distributedVirtualSwitch.uuid,
                                            portgroupKey=net.key))
        else:
            backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=nic.network,
                                                                           network=net)
        card = _NIC[nic.model](
            key=-(300 + i),
            backing=backing,
            addressType="manual" if nic.mac else "generated",
            macAddress=nic.mac,
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(
                startConnected=nic.start_connected, connected=False, allowGuestControl=True),
            deviceInfo=vim.Description(label=f"Network adapter {i + 1}", summary=nic.network),
        )
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=card))
    if plan.spec.cdrom:
        cdrom = vim.vm.device.VirtualCdrom(
            key=-400,
            controllerKey=_IDE0_KEY,
            unitNumber=0,
            backing=vim.vm.device.VirtualCdrom.IsoBackingInfo(fileName=ctx.ds_path(plan.spec.cdrom),
                                                              datastore=ctx.datastore),
            connectable=vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, connected=False,
                                                                allowGuestControl=True),
            deviceInfo=vim.Description(label="CD/DVD drive 1", summary=f"ISO {ctx.ds_path(plan.spec.cdrom)}"),
        )
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=cdrom))
    return changes


def _config_spec(ctx: _Context, plan: PlannedVm) -> Any:
    vm = plan.spec
    spec = vim.vm.ConfigSpec(
        name=vm.inventory_name,
        guestId=vm.guest_id,
        numCPUs=vm.cpus,
        numCoresPerSocket=vm.cores_per_socket,
        memoryMB=vm.memory_mib,
        version=vm.hw_version,
        annotation=vm.annotation,
        firmware=vm.firmware,
        files=vim.vm.FileInfo(vmPathName=ctx.ds_path(plan.vmx)),
        deviceChange=_device_changes(ctx, plan),
    )
    if vm.firmware == "efi":
        spec.bootOptions = vim.vm.BootOptions(efiSecureBootEnabled=vm.secure_boot)
    return spec


def connect(sdk_url: str, *, user: str, password: str, ca_file: Path | str | None) -> Any:
    """A pyVmomi session to ``https://host:port/sdk`` with TLS verified against ``ca_file``."""
    host, _, port = sdk_url.split("//", 1)[1].split("/", 1)[0].rpartition(":")
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    try:
        return smart_connect(host=host, port=int(port), user=user, pwd=password, sslContext=context)
    except vim.fault.InvalidLogin:
        raise LabError(f"{sdk_url} refused the login of {user!r}") from None
    except (OSError, vmodl.MethodFault) as exc:
        raise LabError(f"cannot connect to {sdk_url}: {exc}") from None


# -- seeding -------------------------------------------------------------------------------


def _size(http: DatastoreFiles, path: str) -> int | None:
    try:
        return http.size(path)
    except NotFoundError:
        return None


class _PieceReader:
    """An iterator of bytes with a known total, read like a file: lab disks stream to the
    datastore without being built in memory or on disk first."""

    def __init__(self, pieces: Iterable[bytes], size: int) -> None:
        self._pieces: Iterator[bytes] = iter(pieces)
        self._piece = b""
        self._pos = 0  # read position in _piece: no re-slicing of a 1 MiB piece per 8 KiB read
        self._size = size

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1, /) -> bytes:
        out = []
        want = size if size >= 0 else self._size
        while want > 0:
            if self._pos >= len(self._piece):
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._piece, self._pos = piece, 0
            take = self._piece[self._pos : self._pos + want]
            self._pos += len(take)
            want -= len(take)
            out.append(take)
        return b"".join(out)


def _upload(http: DatastoreFiles, plan: PlannedVm) -> None:
    started = time.monotonic()
    total = 0
    for disk in plan.disks:
        for file in disk.files:
            content = file.content
            if isinstance(content, bytes):
                http.put(file.path, content)
            else:
                http.put(file.path, _PieceReader(content.iter_bytes(), content.size))
            total += file.size
        if disk.placeholder:
            http.put(disk.placeholder, b"")
    log.info("lab_vm_files_uploaded", vm=plan.spec.name, bytes=total, s=round(time.monotonic() - started, 2))


def _create(ctx: _Context, http: DatastoreFiles, plan: PlannedVm, changes: list[str]) -> Any:
    vm_spec = plan.spec
    _upload(http, plan)
    folder = _ensure_folder(ctx, vm_spec.folder)
    vm = _wait(ctx, folder.CreateVM_Task(config=_config_spec(ctx, plan), pool=ctx.cluster.resourcePool),
               f"creating VM {vm_spec.name!r}")
    for disk in plan.disks:
        if disk.placeholder:
            _wait(ctx, ctx.content.fileManager.DeleteDatastoreFile_Task(name=ctx.ds_path(disk.placeholder),
                                                                   datacenter=ctx.dc),
                  f"removing vcsim's stand-in {disk.placeholder}")
    for snap in vm_spec.snapshots:
        task = vm.CreateSnapshot_Task(name=snap.name, description=snap.description, memory=False,
                                      quiesce=False)
        _wait(ctx, task, f"snapshot {snap.name!r} of {vm_spec.name!r}")
    changes.append(f"VM {vm_spec.name} created ({vm._moId})")
    return vm


def _converge(ctx: _Context, vm: Any, spec: VmSpec, fields: dict[str, int],
              changes: list[str]) -> None:
    current: dict[int, str] = {}
    for value in vm.customValue or []:
        current[value.key] = value.value  # vcsim appends on every SetField: the last one counts
    for name, value in sorted(spec.attributes.items()):
        if current.get(fields[name]) != value:
            ctx.content.customFieldsManager.SetField(entity=vm, key=fields[name], value=value)
            changes.append(f"VM {spec.name}: attribute {name}={value}")
    if spec.template:
        if not vm.config.template:
            vm.MarkAsTemplate()
            changes.append(f"VM {spec.name} marked as template")
        return
    state = vm.runtime.powerState
    if spec.power_state == "poweredOn" and state != "poweredOn":
        _wait(ctx, vm.PowerOnVM_Task(), f"powering on {spec.name!r}")
        changes.append(f"VM {spec.name} powered on")
    elif spec.power_state == "poweredOff" and state != "poweredOff":
        _wait(ctx, vm.PowerOffVM_Task(), f"powering off {spec.name!r}")
        changes.append(f"VM {spec.name} powered off")


def _seeded_vm(ctx: _Context, vm: Any, plan: PlannedVm, fields: dict[str, int]) -> SeededVm:
    spec = plan.spec
    keys = {
        dev.backing.fileName: dev.key
        for dev in vm.config.hardware.device
        if isinstance(dev, vim.vm.device.VirtualDisk)
    }
    disks = []
    for disk in plan.disks:
        top = ctx.ds_path(disk.descriptor)
        if top not in keys:
            raise LabError(f"VM {spec.name!r} exists but has no disk backed by {top}",
                           hint="the simulator holds a different estate; restart vcsim and seed again")
        disks.append(SeededDisk(
            label=f"Hard disk {disk.index + 1}",
            key=keys[top],
            controller=disk.spec.controller,
            bus=disk.spec.bus,
            unit=disk.spec.unit,
            capacity_bytes=disk.capacity,
            descriptor=top,
            chain=tuple(ctx.ds_path(p) for p in disk.chain),
            sha256=disk.sha256,
            base_sha256=disk.base_sha256,
            boot=disk.spec.boot,
            firmware=spec.firmware if disk.spec.boot else None,
            serial_line=disk.serial_line,
            base_serial_line=disk.base_serial_line,
            files=tuple(SeededFile(ctx.ds_path(f.path), f.size, f.sha256()) for f in disk.files),
            thin=disk.spec.thin,
            eager_zero=disk.spec.eager_zero,
            create_type=disk.spec.create_type,
            uuid=disk.uuid,
        ))
    return SeededVm(
        name=spec.name,
        inventory_name=spec.inventory_name,
        moref=vm._moId,
        tag=spec.tag,
        folder=spec.folder,
        vmx_path=ctx.ds_path(plan.vmx),
        guest_id=spec.guest_id,
        firmware=spec.firmware,
        secure_boot=spec.secure_boot,
        power_state=vm.runtime.powerState,
        template=bool(vm.config.template),
        serial_line=plan.serial_line,
        disks=tuple(disks),
        snapshots=tuple(s.name for s in spec.snapshots),
        attributes=tuple(sorted(spec.attributes.items())),
    )


def seed_estate(
    si: Any,
    estate: EstateSpec,
    *,
    datastore_url: str,
    ca_file: Path | str | None,
    cookie: str | None = None,
) -> SeededEstate:
    """Make the simulator hold ``estate``; return what is there (the same on every run).

    ``datastore_url`` is the server's ``https://host:port/folder``; the SOAP session's cookie
    authenticates the uploads unless ``cookie`` is given.
    """
    started = time.monotonic()
    ctx = _Context(si, estate)
    changes: list[str] = []
    session_cookie = cookie if cookie is not None else getattr(si._stub, "cookie", None)
    with DatastoreFiles(datastore_url, session_cookie, datacenter=estate.datacenter,
                        datastore=estate.datastore, ca_file=ca_file) as http:
        try:
            fields = _ensure_fields(ctx, estate.custom_attributes, changes)
            for iso in estate.isos:
                content = estatedisks.iso_placeholder(iso)
                if _size(http, iso) != len(content):
                    http.put(iso, content)
                    changes.append(f"file {iso} uploaded")
            seeded = []
            for spec in estate.vms:
                plan = estatedisks.plan_vm(spec)
                vm = ctx.find_vm(spec.inventory_name) or _create(ctx, http, plan, changes)
                _converge(ctx, vm, spec, fields, changes)
                seeded.append(_seeded_vm(ctx, vm, plan, fields))
        except vmodl.MethodFault as fault:
            raise LabError(f"seeding the lab estate failed: {fault.msg or type(fault).__name__}") from None
    log.info("lab_estate_seeded", vms=len(seeded), changes=len(changes),
             s=round(time.monotonic() - started, 2))
    return SeededEstate(
        sdk_url=datastore_url.rstrip("/").removesuffix("/folder") + "/sdk",
        datastore_url=datastore_url,
        datacenter=estate.datacenter,
        datastore=estate.datastore,
        vms=tuple(seeded),
        changes=tuple(changes),
    )


def seed_vcsim(server: RunningVcsim, estate: EstateSpec, *, ca_file: Path | str, user: str = "user",
               password: str = "pass") -> SeededEstate:
    """Connect to a running lab vcsim, seed ``estate``, disconnect (what ``migrate lab`` needs)."""
    si = connect(server.url, user=user, password=password, ca_file=ca_file)
    try:
        folder_url = server.url.removesuffix("/sdk") + "/folder"
        return seed_estate(si, estate, datastore_url=folder_url, ca_file=ca_file)
    finally:
        disconnect(si)
