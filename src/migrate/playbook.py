"""Playbooks: which VMs move where, in which waves, under which rules.

A playbook is a YAML file (see ``playbooks/*.yaml`` for documented samples) validated here
with every problem reported at once as ``file:line $.path: message``. Target, network and
storage names refer to the inventory and the targets as discovered; they are checked by the
planner, which turns a mismatch into a blocker for the VMs concerned, not here.

Selectors (used by ``select``, target ``rules``, ``waves`` and ``options.virtio_drivers``)
match a VM when every field given matches; a list field matches when any entry does. A
place that takes selectors takes one mapping or a list of them (any of them matches).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from migrate import mapping
from migrate.errors import Problem
from migrate.model import SourceInventory, Vm
from migrate.yamlsource import LoadedYaml, format_path, load, validate

PowerState = Literal["poweredOn", "poweredOff", "suspended"]
Family = Literal["windows", "linux", "other"]
ShutdownPolicy = Literal["never", "guest", "require-off"]
Verify = Literal["none", "running", "boot"]
NAME_PLACEHOLDERS = ("name", "moref", "datacenter", "cluster")
PVE_VMID_MIN, PVE_VMID_MAX = 100, 999_999_999


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, str | dict) else value


StrList = Annotated[list[str], pydantic.BeforeValidator(_listify)]


@functools.lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    """Shell-style glob (*, ?, [abc], [!abc]), case-insensitive: vSphere names differ by case by accident."""
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


def glob_match(pattern: str, text: str) -> bool:
    return _glob(pattern).fullmatch(text) is not None


def _any_glob(patterns: list[str], text: str) -> bool:
    return any(_glob(p).fullmatch(text) is not None for p in patterns)


class _Spec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class Selector(_Spec):
    """Which VMs a rule applies to; all given fields must match."""

    names: StrList = Field(default_factory=list)  # globs on the VM name: "web-*"
    vms: StrList = Field(default_factory=list)  # exact names or morefs: an explicit list
    folders: StrList = Field(default_factory=list)  # globs on the folder path
    clusters: StrList = Field(default_factory=list)
    datacenters: StrList = Field(default_factory=list)
    hosts: StrList = Field(default_factory=list)
    guest_ids: StrList = Field(default_factory=list)  # globs on the vSphere guest id
    os: Annotated[list[Family], pydantic.BeforeValidator(_listify)] = Field(default_factory=list)
    power_state: Annotated[list[PowerState], pydantic.BeforeValidator(_listify)] = Field(default_factory=list)
    # Custom attribute name -> glob on its value; every one must match.
    attributes: dict[str, str] = Field(default_factory=dict)

    @pydantic.model_validator(mode="after")
    def _not_empty(self) -> Selector:
        if not any(getattr(self, f) for f in type(self).model_fields):
            raise ValueError("an empty selector would match every VM; write names: ['*'] if that is meant")
        return self

    def matches(self, vm: Vm) -> bool:
        if self.names and not _any_glob(self.names, vm.name):
            return False
        if self.vms and vm.name not in self.vms and vm.moref not in self.vms:
            return False
        if self.folders and not _any_glob(self.folders, vm.folder):
            return False
        if self.clusters and not _any_glob(self.clusters, vm.cluster):
            return False
        if self.datacenters and not _any_glob(self.datacenters, vm.datacenter):
            return False
        if self.hosts and not _any_glob(self.hosts, vm.host):
            return False
        if self.guest_ids and not _any_glob(self.guest_ids, vm.guest_id):
            return False
        if self.os and mapping.guest_os(vm.guest_id, vm.guest_full_name)[0].family not in self.os:
            return False
        if self.power_state and vm.power_state not in self.power_state:
            return False
        for attr, pattern in sorted(self.attributes.items()):
            value = vm.attribute(attr)
            if value is None or not glob_match(pattern, value):
                return False
        return True

    def describe(self) -> str:
        parts = []
        for f in type(self).model_fields:
            value = getattr(self, f)
            if value:
                shown = (
                    ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
                    if isinstance(value, dict)
                    else ", ".join(value)
                )
                parts.append(f"{f}: {shown}")
        return "; ".join(parts)


Selectors = Annotated[list[Selector], pydantic.BeforeValidator(_listify)]


def any_match(selectors: list[Selector], vm: Vm) -> Selector | None:
    return next((s for s in selectors if s.matches(vm)), None)


class Selection(_Spec):
    """VMs in scope: matching any ``include`` selector and no ``exclude`` selector."""

    include: Selectors = Field(min_length=1)
    exclude: Selectors = Field(default_factory=list)


class TargetRule(_Spec):
    match: Selectors = Field(min_length=1)
    target: str = Field(min_length=1)
    # Restrict placement to these nodes/hosts; empty means any node of the target.
    nodes: StrList = Field(default_factory=list)


class Targets(_Spec):
    """First matching rule wins; VMs no rule matches go to ``default`` (or are blocked)."""

    rules: list[TargetRule] = Field(default_factory=list)
    default: str | None = None

    @pydantic.model_validator(mode="after")
    def _something(self) -> Targets:
        if not self.rules and not self.default:
            raise ValueError("give at least one rule or a default target")
        return self


class NetworkRef(_Spec):
    """Proxmox bridge (+ VLAN tag) or XCP-ng network (name label)."""

    name: str = Field(min_length=1)
    vlan: int | None = Field(default=None, ge=1, le=4094)


def _network_ref(value: Any) -> Any:
    if isinstance(value, str):
        # "vmbr0/20" is bridge vmbr0 with tag 20; a name with a non-numeric tail stays whole,
        # so XAPI network labels with slashes keep working.
        head, sep, tail = value.rpartition("/")
        if sep and head and tail.isdigit():
            return {"name": head, "vlan": int(tail)}
        return {"name": value}
    if isinstance(value, dict) and "bridge" in value and "name" not in value:
        return {"name": value["bridge"], **{k: v for k, v in value.items() if k != "bridge"}}
    if isinstance(value, dict) and "network" in value and "name" not in value:
        return {"name": value["network"], **{k: v for k, v in value.items() if k != "network"}}
    return value


NetworkValue = Annotated[NetworkRef, pydantic.BeforeValidator(_network_ref)]
StorageValue = Annotated[
    list[Annotated[str, Field(min_length=1)]], pydantic.BeforeValidator(_listify), Field(min_length=1)
]


class Wave(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    concurrency: int = Field(default=1, ge=1, le=64)
    # No selector: this wave takes every VM earlier waves did not.
    select: Selectors = Field(default_factory=list)


class VmidRange(_Spec):
    start: int = Field(default=100, ge=PVE_VMID_MIN, le=PVE_VMID_MAX)
    end: int = Field(default=PVE_VMID_MAX, ge=PVE_VMID_MIN, le=PVE_VMID_MAX)
    # Pin VMIDs by source VM name or moref; these must still be free on the target.
    fixed: dict[str, Annotated[int, Field(ge=PVE_VMID_MIN, le=PVE_VMID_MAX)]] = Field(default_factory=dict)

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> VmidRange:
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) is below start ({self.start})")
        return self


class Naming(_Spec):
    # Placeholders: {name} {moref} {datacenter} {cluster}. Proxmox names are then made
    # DNS-safe (non-ASCII transliterated); the original name goes into the description.
    template: str = "{name}"

    @pydantic.field_validator("template")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}; write e.g. 'mig-{{name}}'") from None
        unknown = sorted({f for f in fields if f not in NAME_PLACEHOLDERS})
        if unknown:
            raise ValueError(
                f"unknown placeholder {{{unknown[0]}}}; use "
                + ", ".join(f"{{{p}}}" for p in NAME_PLACEHOLDERS)
            )
        if not fields:
            raise ValueError(
                "the template has no placeholder, so every VM would get the same name; "
                "include {name} or {moref}"
            )
        return value

    def render(self, vm: Vm) -> str:
        return self.template.format(
            name=vm.name, moref=vm.moref, datacenter=vm.datacenter, cluster=vm.cluster
        )


Ratio = Annotated[float, Field(gt=0, le=64)]


def _node_key(value: str) -> str:
    target, sep, node = value.partition("/")
    if not (sep and target and node) or "/" in node:
        raise ValueError(f"write the node as target/node, e.g. lab-pve/pve1 (got {value!r})")
    return value


NodeKey = Annotated[str, pydantic.AfterValidator(_node_key)]


class Overcommit(_Spec):
    cpu: Ratio = 4.0
    memory: Ratio = 1.0


class NodeOvercommit(_Spec):
    cpu: Ratio | None = None
    memory: Ratio | None = None


class DiskFormats(_Spec):
    """Override the format per storage type (see migrate.mapping for the defaults)."""

    proxmox: dict[str, Literal["raw", "qcow2"]] = Field(default_factory=dict)
    xcpng: dict[str, Literal["raw", "vhd"]] = Field(default_factory=dict)


class Options(_Spec):
    keep_mac: bool = True
    shutdown: ShutdownPolicy = "guest"
    start_after: bool = True
    verify: Verify = "running"
    windows_first_boot: Literal["safe", "virtio"] = "safe"
    # VMs known to carry the virtio drivers; in virtio mode the others fall back to safe.
    virtio_drivers: Selectors = Field(default_factory=list)
    disk_format: DiskFormats = DiskFormats()
    storage_headroom_percent: int = Field(default=10, ge=0, le=90)
    # With several storages mapped for a datastore: "most-free" spreads disks to the one with
    # most room left; "in-order" fills them in the order written (a preference list).
    storage_policy: Literal["most-free", "in-order"] = "most-free"
    overcommit: Overcommit = Overcommit()
    # "target/node" -> ratios for that node only.
    node_overcommit: dict[NodeKey, NodeOvercommit] = Field(default_factory=dict)
    cpu_type: str = Field(default="x86-64-v2-AES", min_length=1)
    qemu_agent: bool = True

    @pydantic.model_validator(mode="after")
    def _verify_needs_start(self) -> Options:
        if self.verify != "none" and not self.start_after:
            raise ValueError(
                f"verify: {self.verify} needs the VM to run; set start_after: true or verify: none"
            )
        return self

    def ratios(self, target: str, node: str) -> tuple[float, float]:
        """(cpu, memory) overcommit for one node."""
        per = self.node_overcommit.get(f"{target}/{node}")
        cpu = per.cpu if per and per.cpu is not None else self.overcommit.cpu
        memory = per.memory if per and per.memory is not None else self.overcommit.memory
        return cpu, memory


Name = Annotated[str, Field(min_length=1)]


class Playbook(_Spec):
    version: Literal[1] = 1
    name: str = Field(min_length=1)
    description: str = ""
    # The inventory source this playbook is written for; the CLI checks it when given.
    source: str | None = None
    select: Selection
    targets: Targets
    # target -> source portgroup (or "*") -> "bridge", "bridge/VLAN" or XAPI network name.
    network_map: dict[Name, dict[Name, NetworkValue]] = Field(default_factory=dict)
    # target -> source datastore (or "*") -> storage/SR name, or a list to place over.
    storage_map: dict[Name, dict[Name, StorageValue]] = Field(default_factory=dict)
    waves: list[Wave] = Field(default_factory=lambda: [Wave(name="all", concurrency=2)], min_length=1)
    vmid: VmidRange = VmidRange()
    naming: Naming = Naming()
    options: Options = Options()
    # Where it came from: for the plan's inputs, not part of the file.
    file: str = Field(default="", exclude=True)
    sha256: str = Field(default="", exclude=True)
    _loaded: LoadedYaml | None = pydantic.PrivateAttr(default=None)

    @pydantic.field_validator("waves")
    @classmethod
    def _unique_waves(cls, waves: list[Wave]) -> list[Wave]:
        seen: dict[str, int] = {}
        for i, wave in enumerate(waves):
            if wave.name in seen:
                raise ValueError(
                    f"waves[{i}] repeats the name {wave.name!r} of waves[{seen[wave.name]}]; "
                    "wave names must be unique"
                )
            seen[wave.name] = i
        catch_all = [i for i, w in enumerate(waves[:-1]) if not w.select]
        if catch_all:
            raise ValueError(
                f"waves[{catch_all[0]}] has no select, so it takes every VM and the waves after "
                "it stay empty; give it a select or move it last"
            )
        return waves


def load_playbook(path: Path | str) -> Playbook:
    """Read and validate a playbook; raise ConfigError listing every problem with its line."""
    loaded = load(path)
    playbook = validate(Playbook, loaded)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    playbook = playbook.model_copy(update={"file": str(path), "sha256": digest})
    playbook._loaded = loaded  # the line map, for problems found later against a source
    return playbook


def _named_vms(playbook: Playbook) -> list[tuple[tuple[str | int, ...], str]]:
    """Every exact VM name or moref the playbook names, with its $.path."""
    out: list[tuple[tuple[str | int, ...], str]] = []

    def selectors(path: tuple[str | int, ...], items: list[Selector]) -> None:
        for i, sel in enumerate(items):
            out.extend(((*path, i, "vms", j), name) for j, name in enumerate(sel.vms))

    selectors(("select", "include"), playbook.select.include)
    selectors(("select", "exclude"), playbook.select.exclude)
    for w, wave in enumerate(playbook.waves):
        selectors(("waves", w, "select"), wave.select)
    for r, rule in enumerate(playbook.targets.rules):
        selectors(("targets", "rules", r, "match"), rule.match)
    out.extend((("vmid", "fixed", name), name) for name in playbook.vmid.fixed)
    return out


def unknown_vms(playbook: Playbook, source: SourceInventory) -> list[Problem]:
    """Problems for VM names the playbook gives that the source does not have (a typo moves nothing)."""
    known = {vm.name for vm in source.vms} | {vm.moref for vm in source.vms}
    loaded = playbook._loaded
    problems = []
    for path, name in _named_vms(playbook):
        if name in known:
            continue
        message = f"no VM {name!r} in source {source.source}; check the name (exact, case-sensitive) or moref"
        where = Problem(playbook.file, None, format_path(path), message)
        problems.append(loaded.problem(path, message) if loaded else where)
    return problems
