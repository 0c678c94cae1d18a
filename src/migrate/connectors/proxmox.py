"""Proxmox VE as a migration target: what the cluster looks like, and the VM operations a run needs.

Reading takes few round trips whatever the cluster's size: /version, /cluster/resources (nodes,
guests, storages with their space per node, SDN zones per node), /cluster/nextid,
/cluster/sdn/vnets, and one /nodes/{node}/network per online node for its bridges. Output is
sorted, so two snapshots of the same cluster are equal.

Writing goes through small methods that start a PVE task and wait for it (see proxmox_api for
how failures are classified). The node's shell (disk landing) is connectors/nodeshell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import structlog

from migrate import model
from migrate.connectors.proxmox_api import TASK_TIMEOUT, PveApi, Value
from migrate.errors import AuthError, NotFoundError, PermanentError, TlsError, UnreachableError
from migrate.inventory import ProxmoxSpec

log = structlog.get_logger(__name__)

DISK_SLOT_PREFIXES: Final = ("scsi", "virtio", "sata", "ide", "efidisk", "tpmstate")


def _tags(text: str | None) -> tuple[str, ...]:
    return tuple(sorted({t for t in (text or "").replace(",", ";").replace(" ", ";").split(";") if t}))


def _existing(item: Mapping[str, Any]) -> model.ExistingVm:
    return model.ExistingVm(name=str(item.get("name", "")), vmid=int(item["vmid"]),
                            node=str(item.get("node", "")), tags=_tags(item.get("tags")))


class ProxmoxTarget:
    """One Proxmox VE cluster named ``name`` in the inventory."""

    kind: Final = "proxmox"

    def __init__(self, name: str, spec: ProxmoxSpec, *, timeout: float = 30.0) -> None:
        self.name = name
        self.spec = spec
        self.api = PveApi(name, spec, timeout=timeout)

    @property
    def endpoint(self) -> str:
        return self.api.endpoint

    def close(self) -> None:
        self.api.close()

    # -- reading -----------------------------------------------------------------------------

    def version(self) -> str:
        return str(self.api.get("version")["version"])

    def snapshot(self) -> model.TargetSnapshot:
        """Nodes, storages, bridges and vnets, existing guests and the next free VMID."""
        version = self.version()
        resources: list[dict[str, Any]] = self.api.get("cluster/resources")
        by_type: dict[str, list[dict[str, Any]]] = {}
        for item in resources:
            by_type.setdefault(str(item.get("type")), []).append(item)
        nodes = tuple(sorted((self._node(i) for i in by_type.get("node", [])), key=lambda n: n.name))
        online = [n.name for n in nodes if n.online]
        guests = by_type.get("qemu", []) + by_type.get("lxc", [])
        snapshot = model.TargetSnapshot(
            name=self.name, kind="proxmox", endpoint=self.endpoint, version=version, nodes=nodes,
            storages=self._storages(by_type.get("storage", [])),
            networks=self._bridges(online) + self._vnets(by_type.get("sdn", []), [n.name for n in nodes]),
            vms=tuple(sorted((_existing(g) for g in guests), key=lambda v: (v.vmid or 0, v.name))),
            next_vmid=self.next_vmid(),
        )  # fmt: skip
        log.info("proxmox_snapshot", target=self.name, version=version, nodes=len(nodes), online=len(online),
                 storages=len(snapshot.storages), networks=len(snapshot.networks), vms=len(snapshot.vms))
        return snapshot

    @staticmethod
    def _node(item: Mapping[str, Any]) -> model.TargetNode:
        return model.TargetNode(
            name=str(item["node"]), cpus=int(item.get("maxcpu") or 0),
            memory_total_bytes=int(item.get("maxmem") or 0), memory_used_bytes=int(item.get("mem") or 0),
            online=item.get("status") == "online",
        )  # fmt: skip

    @staticmethod
    def _storages(items: Iterable[Mapping[str, Any]]) -> tuple[model.Storage, ...]:
        """One entry per shared storage (with every node that sees it), one per node for local ones."""
        shared: dict[str, list[Mapping[str, Any]]] = {}
        out: list[model.Storage] = []
        for item in items:
            if item.get("shared"):
                shared.setdefault(str(item["storage"]), []).append(item)
            else:
                out.append(ProxmoxTarget._storage(item, (str(item["node"]),), [item]))
        for seen in shared.values():
            nodes = tuple(sorted(str(i["node"]) for i in seen))
            out.append(ProxmoxTarget._storage(seen[0], nodes, seen))
        return tuple(sorted(out, key=lambda s: (s.name, s.nodes)))

    @staticmethod
    def _storage(
        item: Mapping[str, Any], nodes: tuple[str, ...], seen: list[Mapping[str, Any]]
    ) -> model.Storage:
        # A shared storage's space is the same from every node; take it from one that reports it.
        live = [i for i in seen if i.get("status") == "available" and i.get("maxdisk")]
        ref = live[0] if live else item
        total = int(ref.get("maxdisk") or 0)
        return model.Storage(
            name=str(item["storage"]), type=str(item.get("plugintype", "")), total_bytes=total,
            free_bytes=max(total - int(ref.get("disk") or 0), 0), shared=bool(item.get("shared")),
            content=tuple(sorted(c for c in str(item.get("content", "")).split(",") if c)), nodes=nodes,
            active=bool(live),
        )  # fmt: skip

    def _bridges(self, online: Iterable[str]) -> tuple[model.TargetNetwork, ...]:
        seen: dict[tuple[str, bool], list[str]] = {}
        for node in online:
            for iface in self.api.get(f"nodes/{node}/network", type="any_bridge"):
                if iface.get("type") in ("bridge", "OVSBridge"):
                    key = (str(iface["iface"]), bool(iface.get("bridge_vlan_aware")))
                    seen.setdefault(key, []).append(node)
        return tuple(
            model.TargetNetwork(name=name, kind="bridge", nodes=tuple(sorted(nodes)), vlan_aware=aware)
            for (name, aware), nodes in sorted(seen.items())
        )

    def _vnets(
        self, zones: Iterable[Mapping[str, Any]], all_nodes: list[str]
    ) -> tuple[model.TargetNetwork, ...]:
        zone_nodes: dict[str, set[str]] = {}
        for item in zones:
            zone_nodes.setdefault(str(item.get("sdn")), set()).add(str(item.get("node")))
        try:
            vnets = self.api.get("cluster/sdn/vnets")
        except PermanentError as exc:
            if isinstance(exc, AuthError | TlsError | UnreachableError):
                raise
            # No SDN (older PVE, or the package is missing) means no vnets, not a failed discovery.
            log.info("proxmox_sdn_unavailable", target=self.name, error=exc.message)
            return ()
        return tuple(sorted((
            model.TargetNetwork(
                name=str(v["vnet"]), kind="vnet", vlan=int(v["tag"]) if v.get("tag") is not None else None,
                vlan_aware=bool(v.get("vlanaware")),
                nodes=tuple(sorted(zone_nodes.get(str(v.get("zone")), set()) or all_nodes)),
            ) for v in vnets), key=lambda n: n.name))  # fmt: skip

    def next_vmid(self) -> int:
        return int(self.api.get("cluster/nextid"))

    def vmid_free(self, vmid: int) -> bool:
        try:
            self.api.get("cluster/nextid", vmid=vmid)
        except PermanentError as exc:
            if "already exists" in exc.message:
                return False
            raise
        return True

    def find_vms(self, *, vmid: int | None = None, name: str | None = None,
                 tag: str | None = None) -> tuple[model.ExistingVm, ...]:
        """Guests matching every criterion given (all guests when none is)."""
        found = []
        for item in self.api.get("cluster/resources", type="vm"):
            vm = _existing(item)
            if (vmid is None or vm.vmid == vmid) and (name is None or vm.name == name) and (
                    tag is None or tag.lower() in vm.tags):
                found.append(vm)
        return tuple(sorted(found, key=lambda v: (v.vmid or 0, v.name)))

    def vm_config(self, node: str, vmid: int) -> dict[str, str]:
        config = self.api.get(f"nodes/{node}/qemu/{vmid}/config")
        return {str(k): str(v) for k, v in config.items()}

    def vm_status(self, node: str, vmid: int) -> str:
        return str(self.api.get(f"nodes/{node}/qemu/{vmid}/status/current")["status"])

    def storage_config(self, storage: str) -> dict[str, Any]:
        return dict(self.api.get(f"storage/{storage}"))

    def import_location(self, storage: str, filename: str) -> tuple[str, str]:
        """(volume id, path on the node) where a disk image must land to be imported from ``storage``."""
        config = self.storage_config(storage)
        content = str(config.get("content", "")).split(",")
        if "import" not in content or not config.get("path"):
            raise PermanentError(
                f"storage {storage} on {self.name} cannot hold disk images to import (content: "
                f"{config.get('content', '')}, type: {config.get('type')})", system=self.name,
                hint=f"add 'import' to the content of a directory storage (pvesm set {storage} "
                     "--content ...,import) or choose another landing storage",
            )  # fmt: skip
        return f"{storage}:import/{filename}", f"{str(config['path']).rstrip('/')}/import/{filename}"

    # -- writing (each waits for its task) ----------------------------------------------------

    def create_vm(self, node: str, vmid: int, config: Mapping[str, Value], *,
                  timeout: float = TASK_TIMEOUT) -> str:
        """Create VM ``vmid`` on ``node`` from a PVE config dict; returns the task's UPID."""
        vm = str(config.get("name", vmid))
        upid = self.api.run_task("POST", f"nodes/{node}/qemu", {**config, "vmid": vmid}, vm=vm,
                                 timeout=timeout)
        log.info("proxmox_vm_created", target=self.name, node=node, vmid=vmid, vm=vm)
        return upid

    def set_config(self, node: str, vmid: int, changes: Mapping[str, Value], *, delete: Iterable[str] = (),
                   timeout: float = TASK_TIMEOUT) -> str:
        """Change a VM's config through the asynchronous API, which may allocate and import disks."""
        params: dict[str, Any] = dict(changes)
        removed = ",".join(delete)
        if removed:
            params["delete"] = removed
        return self.api.run_task("POST", f"nodes/{node}/qemu/{vmid}/config", params, vm=str(vmid),
                                 timeout=timeout)

    def attach_disk(self, node: str, vmid: int, slot: str, storage: str, source: str, *,
                    options: Mapping[str, Value] | None = None, timeout: float = TASK_TIMEOUT) -> str:
        """Import ``source`` (a volume id such as local:import/x.raw) as a new disk in ``slot``; returns
        the slot's new config value."""
        if not slot.startswith(DISK_SLOT_PREFIXES):
            raise PermanentError(f"{slot!r} is not a disk slot (scsiN, virtioN, sataN, ideN, efidisk0)",
                                 system=self.name, vm=str(vmid))
        value = ",".join([f"{storage}:0", f"import-from={source}",
                          *(f"{k}={_flag(v)}" for k, v in sorted((options or {}).items()))])
        self.set_config(node, vmid, {slot: value}, timeout=timeout)
        return self.vm_config(node, vmid)[slot]

    def start_vm(self, node: str, vmid: int, *, timeout: float = 300.0) -> str:
        return self.api.run_task("POST", f"nodes/{node}/qemu/{vmid}/status/start", vm=str(vmid),
                                 timeout=timeout)

    def stop_vm(self, node: str, vmid: int, *, timeout: float = 300.0) -> str:
        return self.api.run_task("POST", f"nodes/{node}/qemu/{vmid}/status/stop", vm=str(vmid),
                                 timeout=timeout)

    def shutdown_vm(self, node: str, vmid: int, *, timeout: int = 180, force_stop: bool = True) -> str:
        return self.api.run_task("POST", f"nodes/{node}/qemu/{vmid}/status/shutdown",
                                 {"timeout": timeout, "forceStop": force_stop}, vm=str(vmid),
                                 timeout=timeout + 60.0)

    def destroy_vm(self, node: str, vmid: int, *, purge: bool = True, timeout: float = 600.0) -> str | None:
        """Destroy a stopped VM and its disks; None if it was already gone."""
        try:
            return self.api.run_task("DELETE", f"nodes/{node}/qemu/{vmid}",
                                     {"purge": purge, "destroy-unreferenced-disks": True}, vm=str(vmid),
                                     timeout=timeout)
        except NotFoundError:
            return None

    def wait_task(self, upid: str, *, timeout: float = TASK_TIMEOUT) -> dict[str, Any]:
        return self.api.wait_task(upid, timeout=timeout)

    def __enter__(self) -> ProxmoxTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flag(value: Value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)

