"""PURE: build_plan(source, playbook, targets) -> Plan. No I/O, no clock, no randomness.

Same inputs give a byte-identical plan: VMs, nodes, storages and networks are sorted here
before anything is decided, and ties are broken by name. The steps, in order:

1. scope: the playbook's selection, in (name, moref) order;
2. per VM: target (first matching rule, else default), wave (first matching wave), device and
   firmware mapping, network and datastore mapping, and the blockers and warnings that follow
   from the VM alone;
3. names on each target: sanitised, checked against existing VMs and against each other;
4. placement, biggest VMs first (memory, then disk): the node with most free memory that has
   CPU room under the overcommit ratios and, for every disk, a mapped storage with room above
   the headroom; each disk goes to the mapped storage with most room (or the first with room);
5. VMIDs (Proxmox), in run order: pinned ones first, then the next free in the range;
6. the target configuration and transfer list of every VM that is not blocked.

CPU overcommit counts only the vCPUs this plan adds (discovery does not report the vCPUs
already allocated on a node); memory counts what the node reports used plus this plan.
Disk space is counted at full provisioned size, the most a thin image can grow to.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import operator
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from migrate import mapping
from migrate.errors import PlanError
from migrate.mapping import MiB, gib
from migrate.model import (
    Disk,
    Nic,
    SourceInventory,
    Storage,
    TargetNetwork,
    TargetSnapshot,
    Vm,
    source_to_dict,
)
from migrate.plan import (
    SCHEMA_VERSION,
    BlockedVm,
    Decision,
    DiskPlan,
    Inputs,
    Issue,
    NicPlan,
    NodeUse,
    Plan,
    ProxmoxConfig,
    RunOptions,
    SourceFacts,
    StorageUse,
    TargetRef,
    TransferMethod,
    VmPlan,
    WavePlan,
    XcpngConfig,
    canonical_key,
    sha256_of,
    source_facts,
    target_fingerprint,
)
from migrate.playbook import NetworkRef, Playbook, Selector, TargetRule, any_match

# Every blocker (the VM stays out of the plan) and warning (it moves, with a caveat) the planner
# raises: code -> (what is wrong, how to fix it). Braces are filled in where the issue is found.
BLOCKERS: Final[Mapping[str, tuple[str, str]]] = {
    "template": ("{vm} is a template, not a VM",
                 "convert it to a VM in vSphere first, or exclude it (select.exclude)"),
    "no-target": ("no target rule matches this VM and the playbook has no default target",
                  "add a rule under targets.rules or set targets.default"),
    "unknown-target": ("target {target!r} is not among the discovered targets ({known})",
                       "fix the target name in the playbook or add the target to the inventory"),
    "unknown-node": ("targets rule names node {node!r}, which {target} does not have", "use one of: {known}"),
    "no-wave": ("no wave selects this VM",
                "add it to a wave's select, or end the waves with one that has no select (takes the rest)"),
    "rdm-disk": ("{disk} is a raw device mapping (RDM) to a LUN",
                 "migrate the LUN's data to a virtual disk (Storage vMotion to VMDK) or detach it"),
    "shared-disk": ("{disk} is shared with other VMs (multi-writer)",
                    "shared disks need a clustered storage set-up on the target; move this VM by hand"),
    "independent-disk": ("{disk} is independent ({mode}); snapshots and consistent reads are not possible",
                         "switch the disk to dependent mode in vSphere"),
    "pci-passthrough": ("PCI passthrough devices: {devices}",
                        "remove the passthrough devices; re-add host devices on the target after migrating"),
    "unmapped-network": ("{nic} is on portgroup {portgroup!r}, which network_map.{target} does not map",
                         "add '{portgroup}: <bridge or network>' under network_map.{target}"),
    "vlan-on-xcpng": ("network_map.{target}.{key} gives VLAN {vlan}; XCP-ng networks carry their own VLAN",
                      "map {portgroup!r} to the XCP-ng network of that VLAN (write {{network: name}} if the "
                      "name itself ends in /digits)"),
    "missing-network": ("network_map.{target}.{key} maps to {network!r}, which {target} does not have",
                        "use one of: {known}"),
    "unmapped-datastore": ("{disk} is on datastore {datastore!r}, which storage_map.{target} does not map",
                           "add '{datastore}: <storage>' under storage_map.{target}"),
    "missing-storage": ("storage_map.{target}.{key} names {storage!r}, which {why} on {target}",
                        "use one of: {known}"),
    "too-many-disks": ("{count} disks; {where} takes {limit}", "{fix}"),
    "too-many-nics": ("{count} NICs; {where} takes {limit}", "remove NICs before migrating"),
    "missing-template": ("none of the templates {candidates} exists on {target}",
                         "check the XCP-ng pool's templates (xe template-list)"),
    "name-collision": ("{what}", "rename or remove one of them, or change naming.template "
                                 "(e.g. '{{name}}-{{moref}}')"),
    "vmid-collision": ("pinned VMID {vmid} {what}",
                       "give each VM a free VMID under vmid.fixed, or remove the pin"),
    "vmid-exhausted": ("no free VMID left in {start}-{end} on {target}", "widen vmid.start/vmid.end"),
    "no-node-room": ("{what}", "{fix}"),
    "no-storage-room": ("{what}", "free space on the target storage, add storages to storage_map.{target}, "
                                  "or lower options.storage_headroom_percent (now {headroom})"),
}
WARNINGS: Final[Mapping[str, tuple[str, str]]] = {
    "snapshots": ("{count} snapshot(s); the disks are copied consolidated from the current state and the "
                  "snapshots are not carried over",
                  "delete the snapshots in vSphere after checking nothing needs them"),
    "powered-on-no-shutdown": ("powered on and options.shutdown is never: the disks are read while the "
                               "guest writes (crash-consistent at best){mac}",
                               "use shutdown: guest, or shut the VM down before the run"),
    "powered-on-require-off": ("powered on and options.shutdown is require-off: the run skips this VM until "
                               "it is powered off", "shut it down before the run, or use shutdown: guest"),
    "suspended": ("suspended: the saved memory state is not migrated and the guest boots cold",
                  "resume it and shut it down cleanly before the run"),
    "tools-missing": ("VMware Tools status is {status}: {why}",
                      "install or start VMware Tools, or shut the VM down yourself"),
    "dropped-devices": ("not migrated: {devices}",
                        "re-add what the guest needs on the target after migrating"),
    "no-disks": ("the VM has no disks; only its configuration is created",
                 "nothing to do if that is expected"),
    "no-virtio-drivers": ("windows_first_boot is virtio but this VM is not listed under "
                          "options.virtio_drivers; it gets the safe devices (SATA, e1000) instead",
                          "install the virtio drivers in the guest and list the VM under "
                          "options.virtio_drivers"),
    "tpm": ("{os} needs a TPM; the vSphere vTPM contents cannot be carried over: {where}",
            "have the BitLocker recovery keys at hand before the first boot"),
    "secure-boot-xcpng": ("Secure Boot on XCP-ng needs the pool's UEFI certificates",
                          "run 'secureboot-certs install' on the pool master before the run"),
    "windows-xcp-disks": ("Windows without the XCP-ng guest tools sees only the first disks through "
                          "emulated IDE", "install the XCP-ng Windows tools after the first boot"),
    "template-fallback": ("template {wanted!r} is not on {target}; using {found!r}",
                          "fine for booting; import a closer template if the guest needs its platform "
                          "settings"),
}

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# The guest booted from the first disk in controller order (SCSI, SATA, NVMe, IDE); it stays first.
_CONTROLLER_ORDER = {
    **dict.fromkeys(("pvscsi", "lsilogic", "lsilogic-sas", "buslogic"), 0),
    "sata": 1,
    "nvme": 2,
}
# Decisions read top-down in the plan: where the VM goes, what it becomes, then its devices.
_TOPICS = {t: i for i, t in enumerate(("target", "wave", "node", "name", "vmid", "os", "template", "firmware",
                                       "size", "devices", "disk", "network", "boot"))}
_RANK = operator.attrgetter("rank")


# -- target side state ------------------------------------------------------------------------


@dataclass(slots=True)
class _Node:
    name: str
    cpus: int
    mem_cap: int  # total x ratio - used
    cpu_cap: float  # cpus x ratio
    mem_ratio: float
    cpu_ratio: float
    mem_planned: int = 0
    cpu_planned: int = 0
    vms: int = 0
    rank: tuple[int, str] = (0, "")  # most free memory first, then by name

    def __post_init__(self) -> None:
        self.rank = (-self.mem_cap, self.name)

    @property
    def free_mem(self) -> int:
        return self.mem_cap - self.mem_planned

    def take(self, memory: int, vcpus: int) -> None:
        self.mem_planned += memory
        self.cpu_planned += vcpus
        self.vms += 1 if memory >= 0 else -1
        self.rank = (self.mem_planned - self.mem_cap, self.name)


@dataclass(slots=True)
class _Pool:
    """Capacity of one storage as seen from a node (or of a shared storage from all of them)."""

    storage: Storage
    node: str  # "" when shared
    floor: int  # headroom kept free
    planned: int = 0

    @property
    def room(self) -> int:
        return self.storage.free_bytes - self.planned - self.floor

    @property
    def where(self) -> str:
        return f"{self.storage.name}@{self.node}" if self.node else self.storage.name


class _Target:
    """One target's snapshot, indexed, plus what this plan has placed on it so far."""

    def __init__(self, snap: TargetSnapshot, playbook: Playbook) -> None:
        self.snap, self.name, self.kind = snap, snap.name, snap.kind
        self.headroom = playbook.options.storage_headroom_percent
        self.nodes: dict[str, _Node] = {}
        for n in sorted(snap.nodes, key=lambda n: n.name):
            if n.online and n.name not in self.nodes:
                cpu_ratio, mem_ratio = playbook.options.ratios(snap.name, n.name)
                memory = int(n.memory_total_bytes * mem_ratio) - n.memory_used_bytes
                self.nodes[n.name] = _Node(n.name, n.cpus, memory, n.cpus * cpu_ratio, mem_ratio, cpu_ratio)
        self.all_nodes = {n.name for n in snap.nodes}
        # Nodes by rank (most free memory first): placement walks a prefix instead of every node.
        self.ranked = sorted(self.nodes.values(), key=_RANK)
        self.ranks = [n.rank for n in self.ranked]
        self.networks: dict[str, TargetNetwork] = {}
        for net in sorted(snap.networks, key=lambda x: (x.name, x.nodes)):
            self.networks.setdefault(net.name, net)
        self._storages(snap)
        self.existing_names: dict[str, str] = {}
        self.used_vmids: set[int] = set()
        for vm in sorted(snap.vms, key=lambda v: (v.name, v.vmid or 0)):
            shown = f"{vm.name} (vmid {vm.vmid})" if vm.vmid else vm.name
            self.existing_names.setdefault(vm.name.casefold(), shown)
            if vm.vmid is not None:
                self.used_vmids.add(vm.vmid)
        self.templates = {t.name for t in snap.templates}
        self.planned_names: dict[str, str] = {}
        self.fingerprint = target_fingerprint(snap)

    def _storages(self, snap: TargetSnapshot) -> None:
        """Pools by (storage, node): a shared storage is one pool seen from all its nodes."""
        self.storage_names: dict[str, Storage] = {}
        self.pools: dict[tuple[str, str], _Pool] = {}
        why: dict[str, str] = {}
        for s in sorted(snap.storages, key=lambda s: (s.name, s.nodes, s.free_bytes)):
            self.storage_names.setdefault(s.name, s)
            if not s.active:
                why.setdefault(s.name, "is not active")
                continue
            if self.kind == "proxmox" and s.content and "images" not in s.content:
                why.setdefault(s.name, f"does not hold VM disks (content: {','.join(s.content)})")
                continue
            floor = s.total_bytes * self.headroom // 100
            seen_by = [name for name in (s.nodes or tuple(self.nodes)) if name in self.nodes]
            shared = _Pool(s, "", floor)
            for name in seen_by:
                self.pools.setdefault((s.name, name), shared if s.shared else _Pool(s, name, floor))
        usable = {name for name, _ in self.pools}
        # Unusable only if no entry of that name can take disks on any online node.
        self.unusable = {
            name: why.get(name, "is on no online node")
            for name in self.storage_names
            if name not in usable and (name in why or self.nodes)
        }

    def take(self, node: _Node, memory: int, vcpus: int) -> None:
        i = bisect.bisect_left(self.ranks, node.rank)
        del self.ranks[i], self.ranked[i]
        node.take(memory, vcpus)
        j = bisect.bisect_left(self.ranks, node.rank)
        self.ranks.insert(j, node.rank)
        self.ranked.insert(j, node)

    def unique_pools(self) -> list[_Pool]:
        seen: dict[int, _Pool] = {}
        for pool in self.pools.values():
            seen.setdefault(id(pool), pool)
        return sorted(seen.values(), key=lambda p: (p.storage.name, p.node))


class _Misses:
    """Why no node's storages could take a VM's disks, gathered over every node tried."""

    def __init__(self) -> None:
        self.disk: Disk | None = None
        self.rooms: dict[str, int] = {}
        self.unseen: list[str] = []

    def note(self, disk: Disk, node: str, rooms: list[tuple[str, int]]) -> None:
        if self.disk is None or disk.capacity_bytes > self.disk.capacity_bytes:
            self.disk = disk
        if not rooms:
            self.unseen.append(node)
        self.rooms.update(rooms)

    def message(self, headroom: int) -> str:
        assert self.disk is not None
        shown = ", ".join(f"{w} {gib(max(r, 0))}" for w, r in sorted(self.rooms.items()))
        parts = [f"usable: {shown}"] if shown else []
        if self.unseen:
            parts.append(f"no mapped storage on {', '.join(sorted(self.unseen))}")
        return (
            f"no mapped storage has room for {self.disk.label} ({gib(self.disk.capacity_bytes)}) keeping "
            f"{headroom}% free on the nodes with memory and CPU room ({'; '.join(parts)})"
        )


# -- per-VM working state ---------------------------------------------------------------------


@dataclass(slots=True)
class _Draft:
    vm: Vm
    facts: SourceFacts
    os: mapping.GuestOs
    os_reason: str
    disks: list[Disk]
    order: tuple[int, str, str] = (0, "", "")  # (wave index, name, moref): run order
    target: _Target | None = None
    target_name: str = ""
    rule: TargetRule | None = None
    wave: str = ""
    storage_candidates: list[list[str]] = field(default_factory=list)
    nets: list[tuple[Nic, NetworkRef, str]] = field(default_factory=list)  # (NIC, where to, map key)
    template: str = ""
    devices: mapping.Devices | None = None
    name: str = ""
    node: str = ""
    pools: list[_Pool] = field(default_factory=list)
    pool_reasons: list[str] = field(default_factory=list)
    vmid: int | None = None
    decisions: list[tuple[int, int, Decision]] = field(default_factory=list)  # (topic rank, seq, ...)
    warnings: list[Issue] = field(default_factory=list)
    blockers: list[Issue] = field(default_factory=list)

    def decide(self, topic: str, choice: str, reason: str) -> None:
        rank = _TOPICS.get(topic.partition(" ")[0], len(_TOPICS))
        self.decisions.append((rank, len(self.decisions), Decision(topic, choice, reason)))

    def warn(self, code: str, **fields: Any) -> None:
        message, hint = WARNINGS[code]
        self.warnings.append(Issue(code, message.format(**fields), hint.format(**fields)))

    def block(self, code: str, **fields: Any) -> None:
        message, hint = BLOCKERS[code]
        self.blockers.append(Issue(code, message.format(**fields), hint.format(**fields)))

    @property
    def memory(self) -> int:
        return self.vm.memory_mib * MiB


def _disk_order(d: Disk) -> tuple[int, int, int, int]:
    return (_CONTROLLER_ORDER.get(d.controller, 3 if d.controller == "ide" else 4), d.bus, d.unit, d.key)


def _lookup(table: Mapping[str, Any], key: str) -> tuple[Any, str] | None:
    if key in table:
        return table[key], key
    return (table["*"], "*") if "*" in table else None


def _known(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


# -- the planner ---------------------------------------------------------------------------


def build_plan(
    source: SourceInventory,
    playbook: Playbook,
    targets: Mapping[str, TargetSnapshot],
    *,
    inventory_file: str = "",
) -> Plan:
    """Decide everything the executor will do; raise PlanError only for inputs that cannot match."""
    if playbook.source and playbook.source != source.source:
        raise PlanError(
            f"playbook {playbook.file or playbook.name} is written for source {playbook.source!r}, "
            f"but the inventory given is {source.source!r}",
            hint="choose the matching source, or change 'source' in the playbook",
        )
    with _collector_paused():
        return _Planner(source, playbook, targets, inventory_file).run()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while planning.

    A plan is a large graph of small objects without reference cycles (reference counting frees
    it); as it grows the collector would rescan it again and again and find nothing, which
    doubles the planning time of a 10,000-VM estate.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Planner:
    def __init__(
        self,
        source: SourceInventory,
        playbook: Playbook,
        targets: Mapping[str, TargetSnapshot],
        inventory_file: str,
    ) -> None:
        self.source, self.pb, self.opts = source, playbook, playbook.options
        self.inventory_file = inventory_file
        self.targets = {name: _Target(targets[name], playbook) for name in sorted(targets)}
        self._descriptions: dict[int, str] = {}

    def run(self) -> Plan:
        scope = [vm for vm in sorted(self.source.vms, key=lambda v: (v.name, v.moref)) if self._selected(vm)]
        drafts = [self._draft(vm) for vm in scope]
        for d in drafts:
            if not d.blockers:
                self._name(d)
        self._check_fixed_vmids(drafts)
        self._place(drafts)
        self._vmids(drafts)
        return self._assemble(drafts)

    # -- scope, target, wave ----------------------------------------------------------------

    def _describe(self, selector: Selector) -> str:
        key = id(selector)  # selectors live as long as the playbook, so ids are stable here
        if key not in self._descriptions:
            self._descriptions[key] = selector.describe()
        return self._descriptions[key]

    def _selected(self, vm: Vm) -> bool:
        sel = self.pb.select
        return any_match(sel.include, vm) is not None and any_match(sel.exclude, vm) is None

    def _draft(self, vm: Vm) -> _Draft:
        os, os_reason = mapping.guest_os(vm.guest_id, vm.guest_full_name)
        d = _Draft(vm, source_facts(vm), os, os_reason, sorted(vm.disks, key=_disk_order))
        if vm.template:
            d.block("template", vm=vm.name)
        self._choose_target(d)
        self._choose_wave(d)
        self._hardware_blockers(d)
        if d.target is not None:
            self._map_networks(d, d.target)
            self._map_storages(d, d.target)
            if d.target.kind == "proxmox":
                self._proxmox_devices(d)
            else:
                self._xcp_limits_and_template(d, d.target)
            self._warnings(d, d.target)
        return d

    def _choose_target(self, d: _Draft) -> None:
        name, reason = "", ""
        for i, rule in enumerate(self.pb.targets.rules):
            hit = any_match(rule.match, d.vm)
            if hit is not None:
                name, reason, d.rule = (
                    rule.target,
                    f"targets.rules[{i}] matches ({self._describe(hit)})",
                    rule,
                )
                break
        else:
            if self.pb.targets.default:
                name, reason = self.pb.targets.default, "no rule matches; the playbook's default target"
        d.target_name = name
        if not name:
            d.block("no-target")
        elif name not in self.targets:
            d.block("unknown-target", target=name, known=_known(self.targets))
        else:
            d.target = self.targets[name]
            d.decide("target", name, reason)
            missing = sorted(set(d.rule.nodes) - d.target.all_nodes) if d.rule else []
            if missing:
                d.block("unknown-node", node=missing[0], target=name, known=_known(d.target.all_nodes))

    def _choose_wave(self, d: _Draft) -> None:
        for i, wave in enumerate(self.pb.waves):
            hit = any_match(wave.select, d.vm) if wave.select else None
            if hit is not None or not wave.select:
                d.wave, d.order = wave.name, (i, d.vm.name, d.vm.moref)
                why = f"matches {self._describe(hit)}" if hit else "has no select: it takes the rest"
                d.decide("wave", wave.name, f"waves[{i}] {why}")
                return
        d.block("no-wave")

    def _hardware_blockers(self, d: _Draft) -> None:
        for disk in d.disks:
            if disk.rdm or disk.backing == "rdm":
                d.block("rdm-disk", disk=disk.label)
            if disk.shared:
                d.block("shared-disk", disk=disk.label)
            if disk.independent or disk.disk_mode.startswith("independent"):
                d.block("independent-disk", disk=disk.label, mode=disk.disk_mode)
        if d.vm.pci_passthrough:
            d.block("pci-passthrough", devices=", ".join(d.vm.pci_passthrough))

    # -- networks, storages, devices ---------------------------------------------------------

    def _map_networks(self, d: _Draft, t: _Target) -> None:
        table = self.pb.network_map.get(t.name, {})
        for nic in sorted(d.vm.nics, key=lambda n: n.key):
            found = _lookup(table, nic.network)
            if found is None:
                d.block("unmapped-network", nic=nic.label, portgroup=nic.network, target=t.name)
                continue
            ref, key = found
            if t.kind == "xcpng" and ref.vlan is not None:
                d.block("vlan-on-xcpng", target=t.name, key=key, vlan=ref.vlan, portgroup=nic.network)
            elif ref.name not in t.networks:
                d.block("missing-network", target=t.name, key=key, network=ref.name, known=_known(t.networks))
            else:
                d.nets.append((nic, ref, key))

    def _map_storages(self, d: _Draft, t: _Target) -> None:
        table = self.pb.storage_map.get(t.name, {})
        for disk in d.disks:
            found = _lookup(table, disk.datastore)
            if found is None:
                d.block("unmapped-datastore", disk=disk.label, datastore=disk.datastore, target=t.name)
                d.storage_candidates.append([])
                continue
            names, key = found
            bad = [n for n in names if n not in t.storage_names or n in t.unusable]
            for n in bad:
                known = _known(s for s in t.storage_names if s not in t.unusable)
                why = t.unusable.get(n, "does not exist")
                d.block("missing-storage", target=t.name, key=key, storage=n, why=why, known=known)
            d.storage_candidates.append([n for n in names if n not in bad])

    def _windows_mode(self, d: _Draft) -> mapping.WindowsMode:
        if d.os.family != "windows" or self.opts.windows_first_boot == "safe":
            return "safe"
        if any_match(self.opts.virtio_drivers, d.vm) is not None:
            return "virtio"
        d.warn("no-virtio-drivers")
        return "safe"

    def _proxmox_devices(self, d: _Draft) -> None:
        dev = d.devices = mapping.proxmox_devices(d.os, self._windows_mode(d))
        controllers = ", ".join(sorted({x.controller for x in d.disks})) or "no disks"
        nic_models = ", ".join(sorted({n.model for n in d.vm.nics})) or "no NICs"
        choice = f"{dev.bus} disks, {dev.scsihw or 'no SCSI controller'}, {dev.nic} NICs"
        d.decide("devices", choice, f"{controllers} / {nic_models} -> {dev.reason}")
        limit = mapping.MAX_DISKS[dev.bus]
        if len(d.disks) > limit:
            fix = "use windows_first_boot: virtio (with drivers) for up to 31 disks, or merge disks"
            d.block("too-many-disks", count=len(d.disks), where=f"the {dev.bus} bus", limit=limit, fix=fix)
        if len(d.vm.nics) > mapping.MAX_PVE_NICS:
            d.block("too-many-nics", count=len(d.vm.nics), where="Proxmox", limit=mapping.MAX_PVE_NICS)

    def _xcp_limits_and_template(self, d: _Draft, t: _Target) -> None:
        if len(d.disks) > mapping.MAX_XCP_VBDS:
            d.block(
                "too-many-disks", count=len(d.disks), where="an XCP-ng HVM guest", limit=mapping.MAX_XCP_VBDS,
                fix="merge disks before migrating",
            )
        if len(d.vm.nics) > mapping.MAX_XCP_VIFS:
            d.block("too-many-nics", count=len(d.vm.nics), where="XCP-ng", limit=mapping.MAX_XCP_VIFS)
        candidates = mapping.xcp_template_candidates(d.os, d.vm.firmware)
        if not t.templates:
            d.template = candidates[0]
            d.decide(
                "template", d.template, f"{d.os_reason}; {t.name} listed no templates, the run checks it"
            )
            return
        found = next((c for c in candidates if c in t.templates), None)
        if found is None:
            d.block("missing-template", candidates=", ".join(candidates), target=t.name)
            return
        d.template = found
        if found != candidates[0]:
            d.warn("template-fallback", wanted=candidates[0], target=t.name, found=found)
        d.decide("template", found, f"{d.os_reason}; first of {', '.join(candidates)} that {t.name} has")

    def _warnings(self, d: _Draft, t: _Target) -> None:
        vm, policy = d.vm, self.opts.shutdown
        if vm.snapshots:
            d.warn("snapshots", count=len(vm.snapshots))
        if vm.power_state == "poweredOn" and policy == "never":
            same_mac = self.opts.start_after and self.opts.keep_mac
            d.warn(
                "powered-on-no-shutdown",
                mac=" and the copy starts with the same MAC address" if same_mac else "",
            )
        if vm.power_state == "poweredOn" and policy == "require-off":
            d.warn("powered-on-require-off")
        if vm.power_state == "suspended":
            d.warn("suspended")
        status = vm.tools_status.lower()
        if "notinstalled" in status or "notrunning" in status:
            stops = vm.power_state == "poweredOn" and policy == "guest"
            why = "a guest shutdown is impossible, so the run will fail at the shutdown step" if stops else (
                "guest state cannot be checked"
            )
            d.warn("tools-missing", status=vm.tools_status, why=why)
        dropped = [f"CD-ROM {c}" for c in vm.cdroms] + [f"floppy {f}" for f in vm.floppies]
        dropped += [f"USB {u}" for u in vm.usb]
        if dropped:
            d.warn("dropped-devices", devices=", ".join(dropped))
        if not vm.disks:
            d.warn("no-disks")
        if d.os.needs_tpm:
            where = "a new empty TPM is added" if t.kind == "proxmox" else (
                "add a vTPM after import (XCP-ng 8.3: xe vtpm-create)"
            )
            d.warn("tpm", os=d.os.label, where=where)
        if t.kind == "xcpng" and vm.firmware == "efi" and vm.secure_boot:
            d.warn("secure-boot-xcpng")
        if t.kind == "xcpng" and d.os.family == "windows" and len(d.disks) > 3:
            d.warn("windows-xcp-disks")

    # -- names and VMIDs ---------------------------------------------------------------------

    def _name(self, d: _Draft) -> None:
        assert d.target is not None
        t, raw, template = d.target, self.pb.naming.render(d.vm), self.pb.naming.template
        reason = f"naming.template {template!r}"
        if t.kind == "proxmox":
            name = mapping.proxmox_name(raw)
            if not name:
                name, reason = mapping.proxmox_name(f"vm-{d.vm.moref}"), (
                    f"{raw!r} has no letters or digits Proxmox accepts; named after the moref"
                )
            elif name != raw:
                reason = f"{raw!r} made DNS-safe for Proxmox (original name kept in the description)"
        else:
            name = mapping.xcp_name(raw)
        d.name, key = name, name.casefold()
        if key in t.existing_names:
            d.block("name-collision", what=f"a VM named {t.existing_names[key]} already exists on {t.name}")
        elif key in t.planned_names:
            d.block(
                "name-collision",
                what=f"name {name!r} is already planned on {t.name} for {t.planned_names[key]}",
            )
        else:
            t.planned_names[key] = f"{d.vm.name} ({d.vm.moref})"
            d.decide("name", name, reason)

    def _check_fixed_vmids(self, drafts: list[_Draft]) -> None:
        claimed: dict[tuple[str, int], str] = {}
        fixed = self.pb.vmid.fixed
        for d in sorted(drafts, key=lambda x: x.order):
            vmid = fixed.get(d.vm.moref, fixed.get(d.vm.name))
            if d.blockers or d.target is None or d.target.kind != "proxmox" or vmid is None:
                continue
            if vmid in d.target.used_vmids:
                d.block("vmid-collision", vmid=vmid, what=f"is already used on {d.target.name}")
            elif (d.target.name, vmid) in claimed:
                d.block(
                    "vmid-collision", vmid=vmid, what=f"is also pinned for {claimed[(d.target.name, vmid)]}"
                )
            else:
                claimed[(d.target.name, vmid)] = d.vm.name
                d.vmid = vmid

    def _vmids(self, drafts: list[_Draft]) -> None:
        rng = self.pb.vmid
        taken = {name: set(t.used_vmids) for name, t in self.targets.items()}
        for d in drafts:
            if d.vmid is not None and d.target is not None:
                taken[d.target.name].add(d.vmid)
        cursor = dict.fromkeys(self.targets, rng.start)
        for d in sorted(drafts, key=lambda x: x.order):
            if d.blockers or d.target is None or d.target.kind != "proxmox":
                continue
            t = d.target
            if d.vmid is not None:
                d.decide("vmid", str(d.vmid), "pinned in vmid.fixed")
                continue
            vmid = cursor[t.name]
            while vmid in taken[t.name]:
                vmid += 1
            if vmid > rng.end:
                d.block("vmid-exhausted", start=rng.start, end=rng.end, target=t.name)
                self._unplace(d)
                continue
            taken[t.name].add(vmid)
            cursor[t.name], d.vmid = vmid + 1, vmid
            d.decide("vmid", str(vmid), f"next free VMID in {rng.start}-{rng.end} on {t.name}")

    # -- placement ----------------------------------------------------------------------------

    def _place(self, drafts: list[_Draft]) -> None:
        todo = [d for d in drafts if not d.blockers and d.target is not None]
        todo.sort(key=lambda d: (-d.memory, -d.vm.provisioned_bytes, d.vm.name, d.vm.moref))
        for d in todo:
            self._place_one(d)

    def _allowed(self, d: _Draft, t: _Target) -> set[str] | None:
        """Nodes the rule pins and the networks leave; None when every node is allowed."""
        allowed: set[str] | None = set(d.rule.nodes) if d.rule and d.rule.nodes else None
        for _, ref, _ in d.nets:
            net_nodes = t.networks[ref.name].nodes
            if net_nodes:
                allowed = set(net_nodes) if allowed is None else allowed & set(net_nodes)
        return None if allowed is not None and allowed >= t.nodes.keys() else allowed

    def _place_one(self, d: _Draft) -> None:
        assert d.target is not None
        t, allowed, vcpus, memory = d.target, self._allowed(d, d.target), d.vm.vcpus, d.memory
        # Nodes with enough free memory, most free first: a prefix of the ranked list.
        with_memory = t.ranked[: bisect.bisect_left(t.ranks, (-memory + 1, ""))]
        if allowed is not None:
            with_memory = [n for n in with_memory if n.name in allowed]
        misses, skipped = _Misses(), 0
        for node in with_memory:
            pools = None
            if vcpus <= node.cpus and node.cpu_planned + vcpus <= node.cpu_cap:
                pools = self._storages_on(d, t, node.name, misses)
            if pools is None:
                skipped += 1
                continue
            t.take(node, memory, vcpus)
            for pool, disk in zip(pools, d.disks, strict=True):
                pool.planned += disk.capacity_bytes
            d.node, d.pools = node.name, pools
            self._node_reason(d, t, node, len(with_memory), skipped, allowed)
            d.pool_reasons = [self._storage_reason(d, i, pool, t) for i, pool in enumerate(pools)]
            return
        if misses.disk is not None:
            d.block("no-storage-room", what=misses.message(t.headroom), target=t.name, headroom=t.headroom)
            return
        nodes = [n for n in t.ranked if allowed is None or n.name in allowed]
        if not nodes:
            what = f"no online node of {t.name} can take this VM (rule pins and networks leave none)"
            d.block("no-node-room", what=what, fix="check targets.rules[].nodes and the bridges on the nodes")
            return
        shown = ", ".join(f"{n.name} {gib(max(n.free_mem, 0))} free, {n.cpu_cap - n.cpu_planned:g} vCPUs left"
                          for n in nodes[:4])
        what = f"no node of {t.name} has room for {gib(memory)} memory and {vcpus} vCPUs ({shown})"
        fix = "free memory on a node, raise options.overcommit, or send the VM to another target"
        d.block("no-node-room", what=what, fix=fix)

    def _node_reason(
        self, d: _Draft, t: _Target, node: _Node, candidates: int, skipped: int, allowed: set[str] | None
    ) -> None:
        scope = "nodes" if allowed is None else "allowed nodes (rule pins, networks)"
        free = gib(node.free_mem + d.memory)
        total = len(t.nodes) if allowed is None else len(allowed & t.nodes.keys())
        if total == 1:
            why = f"the only {scope[:-1]} ({free} free memory)"
        elif skipped:
            why = (f"most free memory ({free}) among {scope} with room; {skipped} with more free memory lack "
                   "CPU or storage room")
        elif candidates > 1:
            why = f"most free memory ({free}) among {candidates} {scope} with enough of it"
        else:
            why = f"the only one of {total} {scope} with enough free memory ({free})"
        d.decide("node", node.name, f"{node.name}: {why}")

    def _storages_on(self, d: _Draft, t: _Target, node: str, misses: _Misses) -> list[_Pool] | None:
        """A pool per disk (largest disks choose first), or None, noting in ``misses`` why not."""
        chosen: dict[int, _Pool] = {}
        extra: dict[int, int] = {}  # bytes this VM already put on a pool
        for i in sorted(range(len(d.disks)), key=lambda i: (-d.disks[i].capacity_bytes, i)):
            disk = d.disks[i]
            pools = [p for name in d.storage_candidates[i] if (p := t.pools.get((name, node))) is not None]
            best: _Pool | None = None
            best_room = 0
            for p in pools:
                room = p.room - extra.get(id(p), 0)
                if room >= disk.capacity_bytes and (best is None or room > best_room):
                    best, best_room = p, room
                    if self.opts.storage_policy == "in-order":
                        break
            if best is None:
                misses.note(disk, node, [(p.where, p.room - extra.get(id(p), 0)) for p in pools])
                return None
            chosen[i] = best
            extra[id(best)] = extra.get(id(best), 0) + disk.capacity_bytes
        return [chosen[i] for i in range(len(d.disks))]

    def _storage_reason(self, d: _Draft, i: int, pool: _Pool, t: _Target) -> str:
        disk, n = d.disks[i], len(d.storage_candidates[i])
        if n == 1:
            why = f"the storage mapped for {disk.datastore}"
        elif self.opts.storage_policy == "in-order":
            why = f"first of {n} mapped storages (in-order) with room"
        else:
            why = f"most room of {n} mapped storages"
        return f"{why}; {gib(pool.room)} usable after placing, keeping {t.headroom}% free"

    def _unplace(self, d: _Draft) -> None:
        if d.target is None or not d.node:
            return
        d.target.take(d.target.nodes[d.node], -d.memory, -d.vm.vcpus)
        for pool, disk in zip(d.pools, d.disks, strict=True):
            pool.planned -= disk.capacity_bytes
        d.node, d.pools, d.pool_reasons = "", [], []

    # -- target configuration -----------------------------------------------------------------

    def _description(self, vm: Vm) -> str:
        return (
            f"Migrated from vSphere by migrate.\nsource: {self.source.source} / {vm.datacenter}\n"
            f"original name: {vm.name}\nmoref: {vm.moref}\ninstance uuid: {vm.instance_uuid}"
        )

    def _nic_decisions(self, d: _Draft, t: _Target) -> None:
        if self.opts.keep_mac:
            mac = ("MAC kept", "options.keep_mac: DHCP reservations and licences tied to the MAC stay valid")
        else:
            mac = ("new MAC", "options.keep_mac is false: the target generates one")
        for nic, ref, key in d.nets:
            tag = f" tag {ref.vlan}" if ref.vlan is not None else ""
            reason = f"network_map.{t.name}.{key} for portgroup {nic.network}; {mac[1]}"
            d.decide(f"network {nic.label}", f"{ref.name}{tag}, {mac[0]}", reason)

    def _disks(self, d: _Draft, kind: str) -> tuple[DiskPlan, ...]:
        """The transfer list, with one decision per disk (where it goes and as what)."""
        out = []
        overrides = self.opts.disk_format.proxmox if kind == "proxmox" else self.opts.disk_format.xcpng
        for i, (disk, pool, pool_why) in enumerate(zip(d.disks, d.pools, d.pool_reasons, strict=True)):
            fmt, fmt_why = mapping.disk_format(kind, pool.storage.type, overrides, disk.capacity_bytes)
            method: TransferMethod = "ssh-import" if kind == "proxmox" else "xapi-import-raw-vdi"
            drive = vdi_name = ""
            if kind == "proxmox":
                assert d.devices is not None
                slot = shown = mapping.disk_slot(d.devices.bus, i)
                options = mapping.drive_options(d.devices.bus, fmt)
                drive = f"{pool.storage.name}:0,import-from={{import_from}},{options}"
            else:
                slot, shown, vdi_name = str(i), f"userdevice {i}", f"{d.name} {disk.label}"
            out.append(DiskPlan(
                source_key=disk.key, label=disk.label, datacenter=d.vm.datacenter, datastore=disk.datastore,
                descriptor=disk.path, chain=disk.chain or (disk.path,), capacity_bytes=disk.capacity_bytes,
                storage=pool.storage.name, format=fmt, slot=slot, bootable=i == 0, method=method, drive=drive,
                vdi_name=vdi_name,
            ))
            d.decide(
                f"disk {disk.label}", f"{shown} on {pool.storage.name} as {fmt}", f"{pool_why}; {fmt_why}"
            )
        return tuple(out)

    def _proxmox_vm(self, d: _Draft) -> VmPlan:
        assert d.target is not None and d.devices is not None and d.vmid is not None
        vm, dev = d.vm, d.devices
        disks = self._disks(d, "proxmox")
        params = [("name", d.name), ("description", self._description(vm)), ("ostype", d.os.ostype)]
        d.decide("os", f"ostype {d.os.ostype}", d.os_reason)
        machine, why = mapping.proxmox_machine(vm.firmware)
        params.append(("machine", machine))
        system = disks[0] if disks else None
        if vm.firmware == "efi":
            params.append(("bios", "ovmf"))
            keys = "pre-enrolled Microsoft and distribution keys, Secure Boot was on" if vm.secure_boot else (
                "no keys enrolled, Secure Boot was off"
            )
            if system is not None:
                params.append(
                    ("efidisk0", mapping.proxmox_efidisk(system.storage, system.format, vm.secure_boot))
                )
                firmware = f"EFI on vSphere: efidisk0 on {system.storage} with {keys}; {why}"
            else:
                firmware = f"EFI on vSphere: no disk, no efidisk0 ({keys}); {why}"
            d.decide("firmware", f"ovmf, {machine}", firmware)
        else:
            params.append(("bios", "seabios"))
            d.decide("firmware", f"seabios, {machine}", f"BIOS on vSphere; {why}")
        if d.os.needs_tpm and system is not None:
            params.append(("tpmstate0", mapping.proxmox_tpm(system.storage)))
        params += [("cpu", self.opts.cpu_type), ("sockets", str(vm.cpu_sockets)),
                   ("cores", str(vm.cores_per_socket)), ("memory", str(vm.memory_mib))]
        size = f"{vm.cpu_sockets} x {vm.cores_per_socket} cores ({self.opts.cpu_type}), {vm.memory_mib} MiB"
        d.decide("size", size, "sockets, cores and memory as on vSphere; CPU model from options.cpu_type")
        if dev.scsihw:
            params.append(("scsihw", dev.scsihw))
        nics = []
        for i, (nic, ref, _) in enumerate(d.nets):
            mac = nic.mac if self.opts.keep_mac else ""
            net = mapping.pve_net(dev.nic, mac or None, ref.name, ref.vlan, nic.start_connected)
            params.append((f"net{i}", net))
            nics.append(NicPlan(nic.key, nic.label, nic.network, mapping.pve_mac(mac) if mac else "",
                                f"net{i}", ref.name, ref.vlan, dev.nic, nic.start_connected))
        self._nic_decisions(d, d.target)
        order = ([disks[0].slot] if disks else []) + (["net0"] if nics else [])
        if order:
            params.append(("boot", "order=" + ";".join(order)))
            d.decide(
                "boot", ";".join(order), "the disk the guest booted from on vSphere first, then the network"
            )
        if self.opts.qemu_agent:
            params.append(("agent", "enabled=1"))
        if _UUID.match(vm.bios_uuid):
            # Licences and some software key on the SMBIOS UUID; keeping it avoids re-activation.
            params.append(("smbios1", f"uuid={vm.bios_uuid.lower()}"))
        params.append(("tags", "migrate"))
        return self._vm_plan(d, disks, tuple(nics), proxmox=ProxmoxConfig(d.vmid, tuple(params)))

    def _xcpng_vm(self, d: _Draft) -> VmPlan:
        assert d.target is not None
        vm = d.vm
        disks = self._disks(d, "xcpng")
        mac = str.lower if self.opts.keep_mac else (lambda _: "")
        nics = tuple(NicPlan(nic.key, nic.label, nic.network, mac(nic.mac), str(i), ref.name, None, "",
                             nic.start_connected) for i, (nic, ref, _) in enumerate(d.nets))
        self._nic_decisions(d, d.target)
        firmware = "uefi" if vm.firmware == "efi" else "bios"
        platform = [("cores-per-socket", str(vm.cores_per_socket))]
        if d.os.family == "windows":
            platform.append(("viridian", "true"))  # Hyper-V enlightenments Windows expects
        if firmware == "uefi":
            platform.append(("secureboot", "true" if vm.secure_boot else "false"))
            d.decide("firmware", firmware, "EFI on vSphere" + (", Secure Boot on" if vm.secure_boot else ""))
        else:
            d.decide("firmware", firmware, "BIOS on vSphere")
        d.decide("size", f"{vm.vcpus} vCPUs ({vm.cores_per_socket} per socket), {vm.memory_mib} MiB",
                 "as on vSphere; static and dynamic memory limits all equal")
        order = "c" + ("n" if nics else "")
        d.decide("boot", order, "disk (userdevice 0, the vSphere boot disk) first, then the network")
        memory = vm.memory_mib * MiB
        config = XcpngConfig(
            template=d.template, name_label=d.name, name_description=self._description(vm),
            vcpus_max=vm.vcpus, vcpus_at_startup=vm.vcpus, memory_static_min=memory, memory_static_max=memory,
            memory_dynamic_min=memory, memory_dynamic_max=memory, hvm_boot_policy="BIOS order",
            hvm_boot_params=(("order", order), ("firmware", firmware)), platform=tuple(platform),
        )
        return self._vm_plan(d, disks, nics, xcpng=config)

    def _vm_plan(
        self, d: _Draft, disks: tuple[DiskPlan, ...], nics: tuple[NicPlan, ...], *,
        proxmox: ProxmoxConfig | None = None, xcpng: XcpngConfig | None = None,
    ) -> VmPlan:
        assert d.target is not None
        return VmPlan(
            key=d.vm.moref, name=d.name, wave=d.wave, target=d.target.name, kind=d.target.kind, node=d.node,
            source=d.facts, disks=disks, nics=nics, decisions=tuple(x[2] for x in sorted(d.decisions)),
            warnings=tuple(d.warnings), proxmox=proxmox, xcpng=xcpng,
        )

    # -- assembly -------------------------------------------------------------------------------

    def _assemble(self, drafts: list[_Draft]) -> Plan:
        blocked = [
            BlockedVm(d.vm.moref, d.vm.name, d.target_name, tuple(d.blockers), d.facts, tuple(d.warnings))
            for d in sorted(drafts, key=lambda x: (x.vm.name, x.vm.moref))
            if d.blockers
        ]
        vms = [
            self._proxmox_vm(d) if d.target and d.target.kind == "proxmox" else self._xcpng_vm(d)
            for d in sorted((x for x in drafts if not x.blockers), key=lambda x: x.order)
        ]
        waves = tuple(
            WavePlan(w.name, w.concurrency, tuple(v.key for v in vms if v.wave == w.name))
            for w in self.pb.waves
        )
        used = sorted({d.target_name for d in drafts if d.target is not None})
        targets = self.targets
        return Plan(
            schema=SCHEMA_VERSION,
            inputs=Inputs(
                source=self.source.source,
                source_fingerprint=self._source_fingerprint(drafts),
                playbook_name=self.pb.name,
                playbook_file=self.pb.file,
                playbook_sha256=self.pb.sha256,
                inventory_file=self.inventory_file,
            ),
            targets=tuple(
                TargetRef(n, targets[n].kind, targets[n].snap.version, targets[n].fingerprint) for n in used
            ),
            options=RunOptions(
                shutdown=self.opts.shutdown,
                start_after=self.opts.start_after,
                verify=self.opts.verify,
                keep_mac=self.opts.keep_mac,
            ),
            waves=waves,
            vms=tuple(vms),
            blocked=tuple(blocked),
            nodes=tuple(
                NodeUse(t.name, n.name, n.vms, n.mem_planned, n.cpu_planned, n.mem_ratio, n.cpu_ratio)
                for t in targets.values()
                for n in t.nodes.values()
                if n.vms
            ),
            storages=tuple(
                StorageUse(t.name, p.storage.name, p.node, p.planned, t.headroom)
                for t in targets.values()
                for p in t.unique_pools()
                if p.planned
            ),
        )

    def _source_fingerprint(self, drafts: list[_Draft]) -> str:
        """Over the parts of the inventory the plan used: the VMs in scope, their datastores and networks."""
        datastores = {disk.datastore for d in drafts for disk in d.vm.disks}
        networks = {nic.network for d in drafts for nic in d.vm.nics}
        rest = source_to_dict(replace(self.source, vms=()))
        return sha256_of({
            "source": self.source.source,
            "instance_uuid": self.source.instance_uuid,
            "vms": sorted((d.vm.moref, d.facts.fingerprint) for d in drafts),
            "datastores": sorted((x for x in rest["datastores"] if x["name"] in datastores),
                                 key=canonical_key),
            "networks": sorted((x for x in rest["networks"] if x["name"] in networks), key=canonical_key),
        })
