"""The plan file: what ``migrate run`` will do, reviewable before anything moves.

A plan is YAML with a schema version, a content hash (sha256 over the canonical JSON of the
content, the hash field left out), fingerprints of the inputs it was computed from, the
waves, and per VM the complete target configuration, the disk transfer list and every
decision with its reason. VMs that cannot move are listed under ``blocked`` with what to fix.

The executor runs exactly what is written here; a plan edited by hand fails the hash check
so a change board approves the bytes that run. Plans hold no secrets: only names, sizes,
paths and settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import pydantic
import yaml

from migrate.errors import PlanError, Problem
from migrate.mapping import gib
from migrate.model import SourceInventory, TargetKind, TargetSnapshot, Vm, target_to_dict
from migrate.yamlsource import format_path

SCHEMA_VERSION: Final = 1
HASH_PREFIX: Final = "sha256:"

Pairs = tuple[tuple[str, str], ...]


def _pairs_in(value: Any) -> Any:
    return tuple((str(k), str(v)) for k, v in value.items()) if isinstance(value, dict) else value


# Ordered key/value settings appear in the file as a mapping, in the order the planner chose.
OrderedPairs = Annotated[Pairs, pydantic.BeforeValidator(_pairs_in), pydantic.PlainSerializer(dict)]


@dataclass(frozen=True, slots=True)
class Decision:
    """One choice the planner made for a VM, and why."""

    topic: str
    choice: str
    reason: str


@dataclass(frozen=True, slots=True)
class Issue:
    """A blocker or a warning: a stable code, what is wrong, and how to fix it."""

    code: str
    message: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class SourceFacts:
    """The source VM as planned; ``migrate plan --check`` compares the live VM against this."""

    moref: str
    name: str
    datacenter: str
    folder: str
    cluster: str
    host: str
    power_state: str
    template: bool
    guest_id: str
    tools_status: str
    firmware: str
    secure_boot: bool
    cpu_sockets: int
    cores_per_socket: int
    memory_mib: int
    disks: tuple[str, ...]  # "label|capacity|top-of-chain path" per disk
    nics: tuple[str, ...]  # "label|mac|network" per NIC
    fingerprint: str
    # vSphere's config.instanceUuid: the executor refuses a VM at this moref with another uuid
    # (re-registered, or an ESXi host reusing the moref). "" in plans written before it was kept.
    instance_uuid: str = ""


TransferMethod = Literal["ssh-import", "xapi-import-raw-vdi"]


@dataclass(frozen=True, slots=True)
class DiskPlan:
    """One disk to copy: where it is read and where and how it is written."""

    source_key: int
    label: str
    datacenter: str
    datastore: str
    descriptor: str  # the top of the chain: what a consolidated read starts from
    chain: tuple[str, ...]
    capacity_bytes: int
    storage: str
    format: str
    # Proxmox: "scsi0" / "sata0" / "ide0" / "virtio0"; XCP-ng: the VBD userdevice ("0", "1", ...).
    slot: str
    bootable: bool
    method: TransferMethod
    # Proxmox only: the drive value for ``slot``; the executor replaces {import_from} with the
    # landed image's path on the node (or its volume id).
    drive: str = ""
    # XCP-ng only: the VDI's name label.
    vdi_name: str = ""

    def drive_value(self, import_from: str) -> str:
        if not self.drive:
            raise ValueError(f"{self.label} is not a Proxmox disk")
        return self.drive.replace("{import_from}", import_from)


@dataclass(frozen=True, slots=True)
class NicPlan:
    source_key: int
    label: str
    source_network: str
    mac: str  # the MAC the target VM gets; "" lets the target generate one
    slot: str  # Proxmox "net0"; XCP-ng VIF device "0"
    network: str  # Proxmox bridge or XAPI network name label
    vlan: int | None = None
    model: str = ""  # Proxmox NIC model; XCP-ng chooses by itself
    connected: bool = True


@dataclass(frozen=True, slots=True)
class ProxmoxConfig:
    """The VM as Proxmox's ``POST /nodes/{node}/qemu`` takes it, less the data disks."""

    vmid: int
    params: OrderedPairs

    def api_params(self, disks: tuple[DiskPlan, ...], import_from: Mapping[str, str]) -> dict[str, str]:
        """The complete create call: ``import_from`` maps each disk slot to its landed image."""
        out = {"vmid": str(self.vmid), **dict(self.params)}
        for disk in disks:
            out[disk.slot] = disk.drive_value(import_from[disk.slot])
        return out


@dataclass(frozen=True, slots=True)
class XcpngConfig:
    """What to set on a VM cloned from ``template`` (XAPI field names)."""

    template: str
    name_label: str
    name_description: str
    vcpus_max: int
    vcpus_at_startup: int
    memory_static_min: int
    memory_static_max: int
    memory_dynamic_min: int
    memory_dynamic_max: int
    hvm_boot_policy: str
    hvm_boot_params: OrderedPairs
    platform: OrderedPairs


@dataclass(frozen=True, slots=True)
class VmPlan:
    key: str  # the source VM's moref
    name: str  # the VM's name on the target
    wave: str
    target: str
    kind: TargetKind
    node: str  # Proxmox node or XCP-ng host (affinity)
    source: SourceFacts
    disks: tuple[DiskPlan, ...]
    nics: tuple[NicPlan, ...]
    decisions: tuple[Decision, ...]
    warnings: tuple[Issue, ...] = ()
    proxmox: ProxmoxConfig | None = None
    xcpng: XcpngConfig | None = None

    @property
    def total_bytes(self) -> int:
        return sum(d.capacity_bytes for d in self.disks)

    def decision(self, topic: str) -> Decision | None:
        return next((d for d in self.decisions if d.topic == topic), None)


@dataclass(frozen=True, slots=True)
class BlockedVm:
    key: str
    name: str  # the source name
    target: str  # "" when no target could be chosen
    blockers: tuple[Issue, ...]
    source: SourceFacts
    warnings: tuple[Issue, ...] = ()


@dataclass(frozen=True, slots=True)
class WavePlan:
    name: str
    concurrency: int
    vms: tuple[str, ...]  # VmPlan keys in run order


@dataclass(frozen=True, slots=True)
class NodeUse:
    """What the plan puts on one node; ``plan --check`` re-checks it against live capacity."""

    target: str
    node: str
    vms: int
    memory_bytes: int
    vcpus: int
    memory_ratio: float
    cpu_ratio: float


@dataclass(frozen=True, slots=True)
class StorageUse:
    target: str
    storage: str
    node: str  # "" for shared storage
    bytes: int
    headroom_percent: int


@dataclass(frozen=True, slots=True)
class TargetRef:
    name: str
    kind: TargetKind
    version: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Inputs:
    source: str
    source_fingerprint: str
    playbook_name: str
    playbook_file: str
    playbook_sha256: str
    inventory_file: str = ""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Playbook options the executor needs at run time."""

    shutdown: str
    start_after: bool
    verify: str
    keep_mac: bool


@dataclass(frozen=True, slots=True)
class Plan:
    schema: int
    inputs: Inputs
    targets: tuple[TargetRef, ...]
    options: RunOptions
    waves: tuple[WavePlan, ...]
    vms: tuple[VmPlan, ...]
    blocked: tuple[BlockedVm, ...]
    nodes: tuple[NodeUse, ...] = ()
    storages: tuple[StorageUse, ...] = ()
    content_hash: str = field(default="")

    def vm(self, key: str) -> VmPlan | None:
        return next((v for v in self.vms if v.key == key), None)

    def target(self, name: str) -> TargetRef | None:
        return next((t for t in self.targets if t.name == name), None)


_adapter: pydantic.TypeAdapter[Plan] = pydantic.TypeAdapter(Plan)
_vm_adapter: pydantic.TypeAdapter[Vm] = pydantic.TypeAdapter(Vm)


# -- hashes and fingerprints --------------------------------------------------------------------


def canonical_json(data: Any) -> str:
    """The one serialisation every hash in migrate is taken over."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_of(data: Any) -> str:
    return HASH_PREFIX + hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def canonical_key(item: Any) -> str:
    """Sort key for lists whose order carries no meaning."""
    return canonical_json(item)


def _ordered(vm: Vm) -> Vm:
    """The VM with its devices in key order, so the order discovery listed them in changes nothing."""
    disks = tuple(sorted(vm.disks, key=lambda d: d.key))
    nics = tuple(sorted(vm.nics, key=lambda n: n.key))
    snapshots = tuple(sorted(vm.snapshots, key=lambda s: (s.path, s.moref)))
    if (disks, nics, snapshots) != (vm.disks, vm.nics, vm.snapshots):
        vm = replace(vm, disks=disks, nics=nics, snapshots=snapshots)
    return vm


def vm_fingerprint(vm: Vm) -> str:
    """sha256 of the VM's JSON (fields in model order, devices in key order)."""
    return HASH_PREFIX + hashlib.sha256(_vm_adapter.dump_json(_ordered(vm))).hexdigest()


def target_fingerprint(snapshot: TargetSnapshot) -> str:
    data = target_to_dict(snapshot)
    for key in ("nodes", "storages", "networks", "vms", "templates", "extra"):
        data[key] = sorted(data[key], key=canonical_key)
    return sha256_of(data)


def source_facts(vm: Vm, *, fingerprint: bool = True) -> SourceFacts:
    """What the plan records of a source VM; ``plan --check`` compares these."""
    vm = _ordered(vm)
    digest = HASH_PREFIX + hashlib.sha256(_vm_adapter.dump_json(vm)).hexdigest() if fingerprint else ""
    return SourceFacts(
        moref=vm.moref,
        name=vm.name,
        datacenter=vm.datacenter,
        folder=vm.folder,
        cluster=vm.cluster,
        host=vm.host,
        power_state=vm.power_state,
        template=vm.template,
        guest_id=vm.guest_id,
        tools_status=vm.tools_status,
        firmware=vm.firmware,
        secure_boot=vm.secure_boot,
        cpu_sockets=vm.cpu_sockets,
        cores_per_socket=vm.cores_per_socket,
        memory_mib=vm.memory_mib,
        disks=tuple(f"{d.label}|{d.capacity_bytes}|{d.path}" for d in vm.disks),
        nics=tuple(f"{n.label}|{n.mac}|{n.network}" for n in vm.nics),
        fingerprint=digest,
        instance_uuid=vm.instance_uuid,
    )


# -- the file -----------------------------------------------------------------------------------


def _content(plan: Plan) -> dict[str, Any]:
    # Fields at their default are left out: the file shows what matters, loading restores them.
    data: dict[str, Any] = _adapter.dump_python(plan, mode="json", exclude_defaults=True)
    data.pop("content_hash", None)
    return data


def content_hash(plan: Plan) -> str:
    return sha256_of(_content(plan))


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Safe dumper (libyaml when available: large plans) writing multi-line text as blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def dump_plan(plan: Plan) -> str:
    """The plan file's text, with the content hash computed here and written near the top."""
    content = _content(plan)
    data = {"schema": content.pop("schema"), "content_hash": content_hash(plan), **content}
    text: str = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=4096)
    return text


def loads_plan(text: str, file: str = "<plan>") -> Plan:
    try:
        data = yaml.load(text, Loader=_Loader)  # a safe loader: plain data only
    except yaml.YAMLError as exc:
        raise PlanError(
            f"{file}: not a readable plan file: {exc}",
            hint="give the file migrate plan wrote, or re-run migrate plan",
        ) from None
    if not isinstance(data, dict):
        raise PlanError(
            f"{file}: not a plan file (expected a mapping at the top)",
            hint="give the file migrate plan wrote",
        )
    schema = data.get("schema")
    if schema != SCHEMA_VERSION:
        raise PlanError(
            f"{file}: plan schema {schema!r} is not supported by this migrate (it reads "
            f"schema {SCHEMA_VERSION})",
            hint="re-run migrate plan with this version of migrate",
        )
    stored = data.pop("content_hash", None)
    actual = sha256_of(data)
    if stored != actual:
        raise PlanError(
            f"{file}: hash mismatch: the plan was changed after migrate wrote it "
            f"(stored {stored}, content {actual})",
            hint="do not edit plan files; change the playbook and re-run migrate plan",
        )
    try:
        plan = _adapter.validate_python(data)
    except pydantic.ValidationError as exc:
        problems = [Problem(file, None, format_path(err["loc"]), err["msg"]) for err in exc.errors()[:20]]
        raise PlanError(
            f"{file}: not a valid plan:\n" + "\n".join(str(p) for p in problems), hint="re-run migrate plan"
        ) from None
    return replace(plan, content_hash=stored)


def load_plan(path: Path | str) -> Plan:
    """Read a plan file; PlanError for a missing file, an unknown schema, a changed file or bad content."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{file}: plan file not found", hint="check the path, or run migrate plan") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{file}: cannot read the plan file: {exc}") from None
    return loads_plan(text, file)


# -- drift ----------------------------------------------------------------------------------------

DriftKind = Literal[
    "vm-replaced",
    "vm-missing",
    "hardware",
    "disks",
    "nics",
    "power",
    "target-missing",
    "capacity",
    "name-taken",
    "vmid-taken",
]


@dataclass(frozen=True, slots=True)
class DriftItem:
    """One way the world no longer matches the plan."""

    kind: DriftKind
    vm: str  # the source VM name, or "" for target-wide items
    message: str
    target: str = ""


_HARDWARE = (
    "template",
    "guest_id",
    "firmware",
    "secure_boot",
    "cpu_sockets",
    "cores_per_socket",
    "memory_mib",
)


def drift(plan: Plan, source: SourceInventory, targets: Mapping[str, TargetSnapshot]) -> list[DriftItem]:
    """What changed since the plan was made that would make running it wrong. PURE."""
    items: list[DriftItem] = []
    by_moref = {vm.moref: vm for vm in source.vms}
    for vp in plan.vms:
        items += _vm_drift(vp, by_moref.get(vp.key))
    for ref in plan.targets:
        snap = targets.get(ref.name)
        if snap is None:
            items.append(DriftItem("target-missing", "", f"target {ref.name} was not discovered", ref.name))
            continue
        items += _target_drift(plan, ref.name, snap)
    return items


def _vm_drift(vp: VmPlan, vm: Vm | None) -> list[DriftItem]:
    was = vp.source
    if vm is None:
        return [DriftItem("vm-missing", was.name, f"{was.name} ({was.moref}) is no longer in the source")]
    now = source_facts(vm, fingerprint=False)
    if was.instance_uuid and now.instance_uuid != was.instance_uuid:
        message = f"{was.moref} is now another VM (instance UUID {was.instance_uuid} -> {now.instance_uuid})"
        return [DriftItem("vm-replaced", was.name, message)]
    out = []
    changes = [
        f"{f} {getattr(was, f)} -> {getattr(now, f)}" for f in _HARDWARE if getattr(was, f) != getattr(now, f)
    ]
    if changes:
        out.append(DriftItem("hardware", was.name, "; ".join(changes)))
    if was.disks != now.disks:
        out.append(
            DriftItem(
                "disks",
                was.name,
                f"disks were {', '.join(was.disks) or 'none'}; now "
                f"{', '.join(now.disks) or 'none'} (a new snapshot moves the top of the chain)",
            )
        )
    if was.nics != now.nics:
        out.append(
            DriftItem(
                "nics",
                was.name,
                f"NICs were {', '.join(was.nics) or 'none'}; now {', '.join(now.nics) or 'none'}",
            )
        )
    if was.power_state != now.power_state:
        out.append(DriftItem("power", was.name, f"power state {was.power_state} -> {now.power_state}"))
    return out


def _target_drift(plan: Plan, target: str, snap: TargetSnapshot) -> list[DriftItem]:
    out = []
    names = {v.name.casefold(): v for v in snap.vms}
    vmids = {v.vmid: v for v in snap.vms if v.vmid is not None}
    for vp in plan.vms:
        if vp.target != target:
            continue
        if vp.name.casefold() in names:
            out.append(
                DriftItem(
                    "name-taken",
                    vp.source.name,
                    f"{target} now has a VM named {names[vp.name.casefold()].name}",
                    target,
                )
            )
        if vp.proxmox is not None and vp.proxmox.vmid in vmids:
            taker = vmids[vp.proxmox.vmid].name
            out.append(
                DriftItem(
                    "vmid-taken",
                    vp.source.name,
                    f"VMID {vp.proxmox.vmid} is now used on {target} by {taker}",
                    target,
                )
            )
    nodes = {n.name: n for n in snap.nodes}
    for use in plan.nodes:
        if use.target != target:
            continue
        node = nodes.get(use.node)
        if node is None or not node.online:
            out.append(DriftItem("capacity", "", f"node {use.node} is gone or offline", target))
            continue
        memory = int(node.memory_total_bytes * use.memory_ratio) - node.memory_used_bytes
        if memory < use.memory_bytes:
            out.append(
                DriftItem(
                    "capacity",
                    "",
                    f"node {use.node} has {gib(memory)} memory for the "
                    f"{gib(use.memory_bytes)} planned",
                    target,
                )
            )
        if node.cpus * use.cpu_ratio < use.vcpus:
            out.append(
                DriftItem(
                    "capacity",
                    "",
                    f"node {use.node} has {node.cpus} CPUs "
                    f"(x{use.cpu_ratio:g}) for the {use.vcpus} vCPUs planned",
                    target,
                )
            )
    for su in plan.storages:
        if su.target != target:
            continue
        entries = [
            s
            for s in snap.storages
            if s.name == su.storage and s.active and (not su.node or not s.nodes or su.node in s.nodes)
        ]
        if not entries:
            out.append(DriftItem("capacity", "", f"storage {su.storage} is gone or inactive", target))
            continue
        s = min(entries, key=lambda x: x.free_bytes)
        usable = s.free_bytes - s.total_bytes * su.headroom_percent // 100
        if usable < su.bytes:
            where = f"{su.storage}@{su.node}" if su.node else su.storage
            out.append(
                DriftItem(
                    "capacity",
                    "",
                    f"storage {where} has {gib(max(usable, 0))} usable "
                    f"(keeping {su.headroom_percent}% free) for the {gib(su.bytes)} planned",
                    target,
                )
            )
    return out

