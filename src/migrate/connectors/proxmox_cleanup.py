"""What a run left on Proxmox VE: found by the run's tag, removed exactly, and nothing else.

``list_tagged`` reports the VMs carrying the tag and the landing files whose name ends with
it (found over SSH on every online node; a directory seen twice, through a shared storage or
two node names for one host, is listed once). ``remove`` deletes landings first, then VMs
(stopped, destroyed with purge, which takes their disks along), then any disk volume whose VM
is gone. Objects already gone are fine; a VM that carries no run tag is refused, whatever the
caller asked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from migrate.connectors import proxmox_landing as landing_files
from migrate.connectors import proxmox_vmconfig as vmconfig
from migrate.connectors.base import CreatedObject
from migrate.errors import NotFoundError, PermanentError

if TYPE_CHECKING:
    from migrate.connectors.proxmox_target import ProxmoxExecTarget

log = structlog.get_logger(__name__)

_ORDER = {"landing": 0, "vm": 1, "disk": 2}
_OWNER = re.compile(r"(?:^|[:/])(?:vm|base)-(\d+)-")


def _online_nodes(target: ProxmoxExecTarget) -> list[str]:
    nodes = target.session().api.get("cluster/resources", type="node")
    return sorted(str(n["node"]) for n in nodes if n.get("status") == "online")


def list_tagged(target: ProxmoxExecTarget, tag: str) -> tuple[CreatedObject, ...]:
    pve = target.session()
    out: list[CreatedObject] = []
    for vm in pve.find_vms(tag=tag):
        try:
            description = pve.vm_config(vm.node, int(vm.vmid or 0)).get("description")
        except NotFoundError:
            continue  # removed between the listing and now
        out.append(
            CreatedObject(
                "vm",
                str(vm.vmid),
                target.name,
                vm.node,
                vmconfig.moref_of(description),
                detail=(("name", vm.name), ("tag", tag)),
            )
        )
    seen: set[tuple[str, ...]] = set()
    ssh = target.spec.ssh
    for node in _online_nodes(target):
        directories = []
        for store in target.import_storages(node):
            key = (
                ("shared", store.directory)
                if store.shared
                else (ssh.address(node), str(ssh.port), store.directory)
            )
            if key not in seen:
                seen.add(key)
                directories.append(store.directory)
        for path in landing_files.find(target.shell(node), directories, f"*-{tag}{vmconfig.LANDING_SUFFIX}"):
            parts = vmconfig.landing_parts(path.rpartition("/")[2], tag)
            if parts is not None:
                out.append(
                    CreatedObject(
                        "landing",
                        path,
                        target.name,
                        node,
                        temporary=True,
                        detail=(("vm_name", parts[0]), ("disk", parts[1])),
                    )
                )
    return tuple(out)


def remove(target: ProxmoxExecTarget, objects: Sequence[CreatedObject]) -> None:
    refused: list[str] = []
    # Landings first (nothing depends on them), the VM before its disks: its purge takes them along.
    for obj in sorted(objects, key=lambda o: _ORDER.get(o.kind, 3)):
        if obj.target != target.name:
            log.warning(
                "proxmox_remove_skipped", target=target.name, object=obj.id, reason=f"on {obj.target}"
            )
        elif obj.kind == "landing":
            _landing(target, obj, refused)
        elif obj.kind == "vm":
            _vm(target, obj, refused)
        elif obj.kind == "disk":
            _disk(target, obj)
        else:
            log.info("proxmox_remove_skipped", target=target.name, object=obj.id, reason=f"kind {obj.kind}")
    if refused:
        raise PermanentError(
            f"{target.name}: not removed, as migrate did not make them: " + "; ".join(refused),
            system=target.name,
            hint="check these by hand; migrate never removes what it did not create",
        )


def _landing(target: ProxmoxExecTarget, obj: CreatedObject, refused: list[str]) -> None:
    if not vmconfig.is_landing_path(obj.id):
        refused.append(f"{obj.id} is not a landing file name")
        return
    node = obj.node or next(iter(_online_nodes(target)), "")
    landing_files.delete(target.shell(node), obj.id)
    log.info("proxmox_landing_removed", target=target.name, node=node, path=obj.id)


def _vm(target: ProxmoxExecTarget, obj: CreatedObject, refused: list[str]) -> None:
    pve = target.session()
    try:
        vmid = int(obj.id)
    except ValueError:
        refused.append(f"{obj.id!r} is not a VMID")
        return
    found = pve.find_vms(vmid=vmid)
    if not found:
        log.info("proxmox_vm_gone", target=target.name, vmid=vmid)
        return
    here = found[0]
    tag = dict(obj.detail).get("tag", "")
    if not (tag in here.tags if tag else any(t.startswith("migrate-") for t in here.tags)):
        refused.append(
            f"VM {vmid} ({here.name!r}, tags {';'.join(here.tags) or 'none'}) lacks "
            f"{tag or 'a migrate run tag'}"
        )
        return
    if pve.vm_status(here.node, vmid) != "stopped":
        pve.stop_vm(here.node, vmid)
    pve.destroy_vm(here.node, vmid, purge=True)
    log.info("proxmox_vm_removed", target=target.name, vmid=vmid, vm=here.name, node=here.node)


def _disk(target: ProxmoxExecTarget, obj: CreatedObject) -> None:
    pve = target.session()
    owner = dict(obj.detail).get("vmid") or next(iter(_OWNER.findall(obj.id)), "")
    if owner and pve.find_vms(vmid=int(owner)):
        # Still part of a VM: destroying that VM removes it; a VM kept keeps its disk.
        log.info("proxmox_disk_kept", target=target.name, volume=obj.id, vmid=owner)
        return
    storage = obj.id.split(":", 1)[0]
    node = obj.node or next(iter(_online_nodes(target)), "")
    try:
        upid = pve.api.call("DELETE", f"nodes/{node}/storage/{storage}/content/{obj.id}")
    except NotFoundError:
        return
    if isinstance(upid, str) and upid.startswith("UPID:"):
        pve.wait_task(upid)
    log.info("proxmox_disk_removed", target=target.name, volume=obj.id, node=node)
