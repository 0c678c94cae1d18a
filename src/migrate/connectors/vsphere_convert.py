"""The whole PropertyCollector answer -> ``SourceInventory``.

VMs are converted as they stream in (``vsphere_vm``); containers (folders, datacenters,
clusters, hosts, pools, datastores, networks) are few and kept raw until the end, when
names and paths are resolved. Conventions of the result:

- ``Vm.folder`` is the path below the datacenter's VM folder, names joined by '/', "" at the
  root; a VM inside a vApp sits under the vApp's name.
- Entity names are unescaped (vSphere sends '%', '/' and '\\' as %25, %2f, %5c).
- Every collection is sorted by (name, moref), so equal estates give equal inventories.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from migrate.connectors.vsphere_props import RawObject, array, flag, integer, struct, text, unescape
from migrate.connectors.vsphere_vm import VmDraft, vm_draft
from migrate.model import Cluster, Datastore, Host, Network, Nic, SourceInventory, Vm


class _Tree:
    """Names and parents of the containers, to answer "which datacenter" and "which folder path"."""

    def __init__(self, containers: list[RawObject]) -> None:
        self.objects = {o.moref: o for o in containers}
        self.names = {o.moref: unescape(text(o.props.get("name"))) for o in containers}
        self._paths: dict[str, str] = {}
        self._datacenters: dict[str, str] = {}

    def kind(self, moref: str) -> str:
        found = self.objects.get(moref)
        return found.type if found else ""

    def parent(self, moref: str) -> str:
        found = self.objects.get(moref)
        return text(found.props.get("parent")) if found else ""

    def datacenter(self, moref: str) -> str:
        if moref not in self._datacenters:
            node, seen = moref, set()
            while node and node not in seen and self.kind(node) != "Datacenter":
                seen.add(node)
                node = self.parent(node)
            self._datacenters[moref] = self.names.get(node, "")
        return self._datacenters[moref]

    def folder_path(self, moref: str) -> str:
        if moref not in self._paths:
            parts: list[str] = []
            node, seen = moref, set()
            while self.kind(node) == "Folder" and node not in seen:
                seen.add(node)
                parent = self.parent(node)
                if not parent or self.kind(parent) == "Datacenter":
                    break  # the datacenter's own "vm" folder is the root, not part of the path
                parts.append(self.names[node])
                node = parent
            self._paths[moref] = "/".join(reversed(parts))
        return self._paths[moref]


def build_inventory(
    objects: Iterable[RawObject], *, source: str, endpoint: str, api_version: str, instance_uuid: str = ""
) -> SourceInventory:
    """Consume the object stream and return the sorted inventory."""
    drafts: list[VmDraft] = []
    containers: list[RawObject] = []
    fields: dict[int, str] = {}
    for raw in objects:
        if raw.type == "VirtualMachine":
            drafts.append(vm_draft(raw))
        elif raw.type == "CustomFieldsManager":
            defs = map(struct, array(raw.props.get("field")))
            fields = {integer(f.get("key")): text(f.get("name")) for f in defs}
        else:
            containers.append(raw)
    tree = _Tree(containers)
    by_kind: dict[str, list[RawObject]] = {}
    for raw in containers:
        by_kind.setdefault(raw.type, []).append(raw)
    portgroups = {text(o.props.get("key")) or o.moref: tree.names[o.moref]
                  for o in by_kind.get("DistributedVirtualPortgroup", ())}
    hosts = _hosts(tree, by_kind)
    by_moref = {h.moref: h for h in hosts}
    vms = [_vm(d, tree, by_moref, portgroups, fields) for d in drafts]
    return SourceInventory(
        source=source,
        endpoint=endpoint,
        api_version=api_version,
        instance_uuid=instance_uuid,
        vms=tuple(sorted(vms, key=lambda v: (v.name, v.moref))),
        hosts=tuple(sorted(hosts, key=lambda h: (h.name, h.moref))),
        clusters=_clusters(tree, by_kind),
        datastores=_datastores(tree, by_kind),
        networks=_networks(tree, by_kind),
    )


def _vm(draft: VmDraft, tree: _Tree, hosts: dict[str, Host], portgroups: dict[str, str],
        fields: dict[int, str]) -> Vm:
    if draft.parent:
        folder, anchor = tree.folder_path(draft.parent), draft.parent
    elif draft.vapp:
        # A vApp's VMs have no folder of their own: they show under the vApp, in the vApp's folder.
        vapp = tree.objects.get(draft.vapp)
        vapp_folder = text(vapp.props.get("parentFolder")) if vapp else ""
        base, name = tree.folder_path(vapp_folder), tree.names.get(draft.vapp, "")
        folder, anchor = (f"{base}/{name}" if base else name), vapp_folder or draft.vapp
    else:
        folder, anchor = "", draft.host
    host = hosts.get(draft.host)
    # The datastore was read from the disk's path; the moref has the last word (and rarely differs).
    disks = tuple(
        replace(disk, datastore=tree.names[ref]) if tree.names.get(ref, disk.datastore) != disk.datastore
        else disk
        for disk, ref in zip(draft.disks, draft.disk_datastores, strict=True)
    )
    nics = tuple(
        Nic(network=portgroups.get(ref) or tree.names.get(ref) or fallback, **args)
        for args, (ref, fallback) in zip(draft.nics, draft.nic_networks, strict=True)
    )
    return Vm(
        moref=draft.moref,
        folder=folder,
        datacenter=tree.datacenter(anchor) or (host.datacenter if host else ""),
        cluster=host.cluster if host else "",
        host=host.name if host else "",
        resource_pool=tree.names.get(draft.pool, ""),
        disks=disks,
        nics=nics,
        custom_attributes=tuple(sorted((fields.get(key, str(key)), value) for key, value in draft.custom)),
        **draft.fields,
    )


def _hosts(tree: _Tree, by_kind: dict[str, list[RawObject]]) -> list[Host]:
    out = []
    for raw in by_kind.get("HostSystem", ()):
        p = raw.props
        parent = text(p.get("parent"))
        out.append(Host(
            moref=raw.moref,
            name=tree.names[raw.moref],
            datacenter=tree.datacenter(raw.moref),
            cluster=tree.names.get(parent, "") if tree.kind(parent) == "ClusterComputeResource" else "",
            cpu_cores=integer(p.get("summary.hardware.numCpuCores")),
            memory_bytes=integer(p.get("summary.hardware.memorySize")),
            version=text(p.get("summary.config.product.version")),
            connection_state=text(p.get("runtime.connectionState")) or "connected",
            power_state=text(p.get("runtime.powerState")) or "poweredOn",
        ))  # fmt: skip
    return out


def _clusters(tree: _Tree, by_kind: dict[str, list[RawObject]]) -> tuple[Cluster, ...]:
    clusters = [
        Cluster(
            moref=raw.moref,
            name=tree.names[raw.moref],
            datacenter=tree.datacenter(raw.moref),
            hosts=tuple(sorted(tree.names.get(h, h) for h in array(raw.props.get("host")))),
        )
        for raw in by_kind.get("ClusterComputeResource", ())
    ]
    return tuple(sorted(clusters, key=lambda c: (c.name, c.moref)))


def _datastores(tree: _Tree, by_kind: dict[str, list[RawObject]]) -> tuple[Datastore, ...]:
    stores = []
    for raw in by_kind.get("Datastore", ()):
        p = raw.props
        accessible = p.get("summary.accessible")
        stores.append(Datastore(
            moref=raw.moref,
            name=tree.names[raw.moref],
            type=text(p.get("summary.type")),
            capacity_bytes=integer(p.get("summary.capacity")),
            free_bytes=integer(p.get("summary.freeSpace")),
            url=text(p.get("summary.url")),
            accessible=True if accessible is None else flag(accessible),
            datacenter=tree.datacenter(raw.moref),
        ))  # fmt: skip
    return tuple(sorted(stores, key=lambda d: (d.name, d.moref)))


def _vlan(port_config: object) -> int | None:
    vlan = struct(struct(port_config).get("vlan"))
    kind = text(vlan.get("_type"))
    if kind == "VmwareDistributedVirtualSwitchVlanIdSpec":
        return integer(vlan.get("vlanId"))
    if kind == "VmwareDistributedVirtualSwitchPvlanSpec":
        return integer(vlan.get("pvlanId"))
    return None  # a trunk (or unknown) has no single VLAN


def _networks(tree: _Tree, by_kind: dict[str, list[RawObject]]) -> tuple[Network, ...]:
    switches = {o.moref: tree.names[o.moref]
                for kind in ("DistributedVirtualSwitch", "VmwareDistributedVirtualSwitch")
                for o in by_kind.get(kind, ())}
    nets = [Network(moref=raw.moref, name=tree.names[raw.moref], kind="standard")
            for raw in by_kind.get("Network", ())]
    nets += [Network(moref=raw.moref, name=tree.names[raw.moref], kind="opaque")
             for raw in by_kind.get("OpaqueNetwork", ())]
    for raw in by_kind.get("DistributedVirtualPortgroup", ()):
        p = raw.props
        nets.append(Network(
            moref=raw.moref,
            name=tree.names[raw.moref],
            kind="uplink" if flag(p.get("config.uplink")) else "distributed",
            vlan=_vlan(p.get("config.defaultPortConfig")),
            switch=switches.get(text(p.get("config.distributedVirtualSwitch")), ""),
        ))  # fmt: skip
    return tuple(sorted(nets, key=lambda n: (n.name, n.moref)))
