"""Proxmox VE as the executor's ``Target``: the steps of ``executor/steps.py`` run against it.

Each call looks at the cluster first and only then changes it, so a step repeated after a
crash finds its own work: a VM is ours when it carries the run's tag (``run_tag``) and has the
planned name; a landing is ours when the run's tag ends its file name. Nothing else is ever
changed: a planned VMID taken by a VM that is not ours gives way to the next free VMID (noted
in the intent before the create), and ``remove`` refuses a VM that carries no run tag.

One instance may be shared by the executor's worker threads: each thread gets its own API
session (requests sessions are not thread-safe), while each node's SSH connection is shared
(``NodeShell`` opens one channel per call). Landings: ``proxmox_landing`` and
``proxmox_sink``; the VM config written and read: ``proxmox_vmconfig``; listing and
removing what a run left: ``proxmox_cleanup``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any, Final

import structlog

from migrate.connectors import proxmox_cleanup as cleanup
from migrate.connectors import proxmox_landing as landing_files
from migrate.connectors import proxmox_vmconfig as vmconfig
from migrate.connectors.base import (
    CreatedObject,
    DiskLanding,
    DiskSpec,
    Intent,
    PowerState,
    TargetVm,
    VmSpec,
    VmState,
    run_tag,
)
from migrate.connectors.nodeshell import NodeShell
from migrate.connectors.proxmox import ProxmoxTarget
from migrate.connectors.proxmox_api import TASK_TIMEOUT
from migrate.connectors.proxmox_landing import ImportStorage
from migrate.connectors.proxmox_sink import LandingSink
from migrate.errors import ConnectorError, NotFoundError, PermanentError, TransientError
from migrate.inventory import ProxmoxSpec
from migrate.model import TargetKind

log = structlog.get_logger(__name__)

VMID_TRIES: Final = 10
START_TIMEOUT: Final = 300.0
IMPORT_FLOOR_BPS: Final = 20 * 1024 * 1024  # the slowest import rate waited for before giving up
_POWER: Final[dict[str, PowerState]] = {"running": "on", "stopped": "off"}
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


class ProxmoxExecTarget:
    """One Proxmox VE cluster of the inventory, as the executor's ``Target``."""

    def __init__(
        self,
        name: str,
        spec: ProxmoxSpec,
        *,
        landing_storage: str = "",
        timeout: float = 30.0,
        task_timeout: float = TASK_TIMEOUT,
    ) -> None:
        self._name = name
        self.spec = spec
        self.landing_storage = landing_storage  # "" picks an import-capable storage on the node
        self._timeout = timeout
        self._task_timeout = task_timeout
        self._lock = threading.Lock()
        self._apis: dict[int, ProxmoxTarget] = {}  # by thread
        self._shells: dict[str, NodeShell] = {}
        self._storages: dict[str, dict[str, Any]] | None = None
        self._agent_audit = True  # False once PVE refused the guest agent ping (403)

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> TargetKind:
        return "proxmox"

    # -- connections -----------------------------------------------------------------------

    def session(self) -> ProxmoxTarget:
        """This thread's API session (made on first use; login happens with its first call)."""
        me = threading.get_ident()
        with self._lock:
            pve = self._apis.get(me)
            if pve is not None:
                return pve
            # Worker threads come and go with the waves: close the sessions of those that ended.
            alive = {t.ident for t in threading.enumerate()}
            ended = [ident for ident in self._apis if ident not in alive]
            stale = [self._apis.pop(ident) for ident in ended]
            pve = self._apis[me] = ProxmoxTarget(self._name, self.spec, timeout=self._timeout)
        for old in stale:
            old.close()
        return pve

    def shell(self, node: str) -> NodeShell:
        """The shell of ``node``, shared by all threads (connects on first use)."""
        with self._lock:
            shell = self._shells.get(node)
            if shell is None:
                shell = self._shells[node] = NodeShell.for_node(self.spec.ssh, node)
            return shell

    def close(self) -> None:
        with self._lock:
            apis, self._apis = list(self._apis.values()), {}
            shells, self._shells = list(self._shells.values()), {}
        for pve in apis:
            pve.close()
        for shell in shells:
            shell.close()

    def __enter__(self) -> ProxmoxExecTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, path: str, params: dict[str, Any], intent: Intent, note: str) -> str:
        """POST a request that starts a task; its UPID is noted in the intent before anyone waits."""
        upid = self.session().api.call("POST", path, **params)
        if not isinstance(upid, str) or not upid.startswith("UPID:"):
            raise PermanentError(
                f"POST /{path} on {self._name} answered {upid!r}, not a task id", system=self._name
            )
        intent.note(note, upid)
        return upid

    def _task(self, path: str, params: dict[str, Any], intent: Intent, note: str, timeout: float) -> None:
        upid = self._start(path, params, intent, note)
        self.session().api.wait_task(upid, timeout=timeout, vm=intent.key)

    # -- VMs -------------------------------------------------------------------------------

    def find_vm(
        self, *, name: str | None = None, vmid: int | None = None, tag: str | None = None
    ) -> tuple[TargetVm, ...]:
        found = self.session().find_vms(vmid=vmid, name=name, tag=tag)
        return tuple(TargetVm(self._name, str(v.vmid), v.name, v.node, v.tags) for v in found)

    def _locate(self, vm: TargetVm) -> tuple[str, int]:
        """(node, vmid) of ``vm`` now (it may have moved); refuses a VMID that holds another VM."""
        try:
            vmid = int(vm.id)
        except ValueError:
            raise PermanentError(f"{vm.id!r} is not a Proxmox VMID", system=self._name, vm=vm.name) from None
        found = self.session().find_vms(vmid=vmid)
        if not found:
            raise NotFoundError(
                f"VM {vm.name!r} ({vmid}) is not on {self._name} any more",
                system=self._name,
                vm=vm.name,
                hint="it was removed outside migrate; roll it back and run it again",
            )
        here = found[0]
        ours = [t for t in vm.tags if t.startswith("migrate-")]
        if (ours and not set(ours) & set(here.tags)) or (not ours and here.name != vm.name):
            raise PermanentError(
                f"VMID {vmid} on {self._name} now holds {here.name!r} "
                f"(tags {';'.join(here.tags) or 'none'}), not {vm.name!r} made by migrate; leaving it alone",
                system=self._name,
                vm=vm.name,
                hint="the VM migrate made was removed outside migrate; roll this VM back and run it again",
            )
        return here.node, vmid

    def _adopt(self, vm: VmSpec, tag: str) -> TargetVm | None:
        found = self.find_vm(name=vm.name, tag=tag)
        if len(found) > 1:
            raise PermanentError(
                f"{self._name} has {len(found)} VMs named {vm.name!r} tagged {tag} "
                f"({', '.join(v.id for v in found)})",
                system=self._name,
                vm=vm.key,
                hint="remove the extra ones by hand (rollback lists them), then resume the run",
            )
        if found:
            log.info(
                "proxmox_vm_adopted", target=self._name, vm=vm.name, vmid=found[0].id, node=found[0].node
            )
            return found[0]
        return None

    def _vmid(self, wanted: int | None, vm: VmSpec) -> int:
        pve = self.session()
        if wanted is not None:
            if pve.vmid_free(wanted):
                return wanted
            log.warning("proxmox_vmid_taken", target=self._name, vm=vm.name, vmid=wanted)
        return pve.next_vmid()

    def create_vm(self, vm: VmSpec, intent: Intent) -> tuple[TargetVm, tuple[CreatedObject, ...]]:
        tag = intent.tag
        if not vm.node:
            raise PermanentError(
                f"VM {vm.name!r} has no Proxmox node in the plan",
                system=self._name,
                vm=vm.key,
                hint="re-run migrate plan",
            )
        made = self._adopt(vm, tag)
        params = vmconfig.create_params(vm, tag, intent.run_id)
        wanted = vm.vmid
        for _ in range(VMID_TRIES):
            if made is not None:
                break
            vmid = self._vmid(wanted, vm)
            intent.note("vmid", str(vmid))
            try:
                upid = self._start(f"nodes/{vm.node}/qemu", {**params, "vmid": vmid}, intent, "task")
            except PermanentError as exc:
                if not re.search(rf"\b{vmid} already exists", exc.message):
                    raise
                # Another client took the VMID between our look and our create: take the next one.
                log.warning("proxmox_vmid_raced", target=self._name, vm=vm.name, vmid=vmid)
                wanted = None
                continue
            except TransientError:
                # The request may have taken effect though its answer was lost.
                made = self._adopt(vm, tag)
                if made is None:
                    raise
                break
            try:
                self.session().api.wait_task(upid, timeout=self._task_timeout, vm=vm.name)
            except TransientError:
                # Still running, or its status could not be read: the VM is there if it took.
                made = self._adopt(vm, tag)
                if made is None:
                    raise
                break
            made = TargetVm(self._name, str(vmid), vm.name, vm.node, vmconfig.split_tags(params["tags"]))
            log.info("proxmox_vm_created", target=self._name, vm=vm.name, vmid=vmid, node=vm.node, tag=tag)
        if made is None:
            raise TransientError(
                f"no free VMID for {vm.name!r} on {self._name} after {VMID_TRIES} tries",
                system=self._name,
                vm=vm.key,
            )
        return made, (self._vm_object(made, vm.key, tag),)

    def _vm_object(self, made: TargetVm, key: str, tag: str) -> CreatedObject:
        return CreatedObject(
            "vm", made.id, self._name, made.node, key, detail=(("name", made.name), ("tag", tag))
        )

    def attach_disks(
        self, vm: TargetVm, disks: Sequence[tuple[DiskSpec, DiskLanding]], intent: Intent
    ) -> tuple[CreatedObject, ...]:
        pve = self.session()
        node, vmid = self._locate(vm)
        config = pve.vm_config(node, vmid)
        made = []
        for disk, landing in disks:
            if disk.slot in vmconfig.disk_slots(config):
                log.info("proxmox_disk_present", target=self._name, vm=vm.name, slot=disk.slot)
                self._drop_landing(landing)
                continue
            volid = self._volid(landing.ref)
            changes = {disk.slot: vmconfig.drive_value(disk, volid)}
            if disk.boot:
                # In the same request: PVE accepts a boot order naming a disk being added with it.
                changes["boot"] = vmconfig.boot_with(config.get("boot"), disk.slot)
            # An import copies the whole disk: allow for a slow storage on top of the usual task time.
            timeout = self._task_timeout + disk.size_bytes / IMPORT_FLOOR_BPS
            self._task(f"nodes/{node}/qemu/{vmid}/config", changes, intent, f"task:{disk.slot}", timeout)
            config = pve.vm_config(node, vmid)
            value = config.get(disk.slot, "")
            if not value:
                raise PermanentError(
                    f"import into {disk.slot} of VM {vmid} ended OK, but the slot is empty",
                    system=self._name,
                    vm=str(vmid),
                )
            volume = vmconfig.volume_of(value)
            log.info(
                "proxmox_disk_imported",
                target=self._name,
                vm=vm.name,
                slot=disk.slot,
                volume=volume,
                source=volid,
            )
            made.append(
                CreatedObject(
                    "disk",
                    volume,
                    self._name,
                    node,
                    intent.vm,
                    detail=(("slot", disk.slot), ("vmid", str(vmid))),
                )
            )
            self._drop_landing(landing)
        return tuple(made)

    def start_vm(self, vm: TargetVm, intent: Intent) -> None:
        node, vmid = self._locate(vm)
        if self.session().vm_status(node, vmid) == "running":
            return
        self._task(f"nodes/{node}/qemu/{vmid}/status/start", {}, intent, "task", START_TIMEOUT)
        log.info("proxmox_vm_started", target=self._name, vm=vm.name, vmid=vmid, node=node)

    def vm_state(self, vm: TargetVm) -> VmState:
        pve = self.session()
        node, vmid = self._locate(vm)
        status: dict[str, Any] = pve.api.get(f"nodes/{node}/qemu/{vmid}/status/current")
        config = pve.vm_config(node, vmid)
        power: PowerState = _POWER.get(str(status.get("status")), "unknown")
        if power == "on" and status.get("qmpstatus") in ("paused", "suspended", "prelaunch"):
            power = "suspended"
        return VmState(
            power=power,
            disk_slots=vmconfig.disk_slots(config),
            nic_macs=vmconfig.nic_macs(config),
            guest_agent=self._agent(node, vmid, power == "on" and bool(status.get("agent"))),
            locked=bool(status.get("lock") or config.get("lock")),
        )

    def _agent(self, node: str, vmid: int, enabled_and_running: bool) -> bool | None:
        if not enabled_and_running:
            return False
        if not self._agent_audit:
            return None
        try:
            self.session().api.call("POST", f"nodes/{node}/qemu/{vmid}/agent/ping")
        except ConnectorError as exc:
            if "not running" in exc.message or "got timeout" in exc.message:
                return False
            if "Permission check failed" in exc.message:
                self._agent_audit = False
                log.warning(
                    "proxmox_agent_unreadable",
                    target=self._name,
                    error=exc.message,
                    hint="grant VM.GuestAgent.Audit to see whether guests booted",
                )
            return None
        return True

    # -- landings --------------------------------------------------------------------------

    def _storage_config(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        with self._lock:
            cached = self._storages
        if cached is None or refresh:
            cached = {str(s["storage"]): dict(s) for s in self.session().api.get("storage")}
            with self._lock:
                self._storages = cached
        return cached

    def import_storages(self, node: str) -> list[ImportStorage]:
        """Active directory storages on ``node`` that hold files to import, with their free space."""
        listing = self.session().api.get(f"nodes/{node}/storage", content="import", enabled=1)
        config = self._storage_config()
        if any(str(item.get("storage")) not in config for item in listing):
            config = self._storage_config(refresh=True)
        return landing_files.import_storages(listing, config)

    def prepare_disk(self, vm: VmSpec, disk: DiskSpec, intent: Intent) -> DiskLanding:
        node = vm.node
        if not node:
            raise PermanentError(
                f"VM {vm.name!r} has no Proxmox node in the plan", system=self._name, vm=vm.key
            )
        filename = vmconfig.landing_filename(vm.name, disk.key, intent.tag)
        stores = self.import_storages(node)
        shell = self.shell(node)
        paths = [f"{s.directory}/{filename}" for s in stores]
        where = f"node {node} of {self._name}"
        try:
            store = landing_files.choose(stores, disk.size_bytes, self.landing_storage, where, self._name)
            new, refusal = f"{store.directory}/{filename}", None
        except PermanentError as exc:  # no room for a new one; an existing one is still fine
            new, refusal = "", exc
        if new:
            intent.note("landing", new)  # before it exists, so a crash right after is reconciled
        path, found = landing_files.ensure(shell, paths, new, disk.size_bytes)
        if not path:
            assert refusal is not None
            raise refusal
        if path != new:
            intent.note("landing", path)
        log.info(
            "proxmox_landing_ready",
            target=self._name,
            node=node,
            path=path,
            bytes=disk.size_bytes,
            reused=bool(found),
        )
        return DiskLanding(
            disk.key, self._name, path, "raw", disk.size_bytes, node, resumable=True, temporary=True
        )

    def receive_disk(
        self, landing: DiskLanding, offset: int = 0, *, length: int | None = None
    ) -> LandingSink:
        if not vmconfig.is_landing_path(landing.ref) or not 0 <= offset <= landing.size_bytes:
            raise PermanentError(
                f"cannot write landing {landing.ref!r} from byte {offset}", system=self._name
            )
        if length not in (None, landing.size_bytes):
            # The import converts from raw: a landing holds the disk's bytes, nothing else.
            raise PermanentError(
                f"landing {landing.ref!r} takes the disk's {landing.size_bytes} raw bytes, not {length}",
                system=self._name,
                hint="plan Proxmox disks with landing format raw",
            )
        shell = self.shell(landing.node)
        landing_files.reset(shell, landing, offset)
        return LandingSink(shell, landing, offset)

    def landing_digest(self, landing: DiskLanding) -> str | None:
        """sha256 of the landing file, computed on its node (it reads the whole file once)."""
        if not vmconfig.is_landing_path(landing.ref):
            raise PermanentError(f"{landing.ref!r} is not a landing of migrate", system=self._name)
        # sha256sum starts its line with a backslash when the path holds one (or a newline).
        digest = self.shell(landing.node).sha256(landing.ref).lstrip("\\").lower()
        if not _SHA256.fullmatch(digest):
            raise PermanentError(
                f"sha256sum of {landing.ref} on node {landing.node} answered {digest[:80]!r}",
                system=self._name,
                hint="check that coreutils' sha256sum works on the node",
            )
        return digest

    def _volid(self, path: str) -> str:
        """The volume id (``local:import/x.raw``) PVE knows the landing at ``path`` by."""
        found = landing_files.volid(path, self._storage_config()) or landing_files.volid(
            path, self._storage_config(refresh=True)
        )
        if found is None:
            raise PermanentError(
                f"no storage of {self._name} with content 'import' holds {path}",
                system=self._name,
                hint="the storage config changed since the disk landed; roll the VM back and run it again",
            )
        return found

    def _drop_landing(self, landing: DiskLanding) -> None:
        if vmconfig.is_landing_path(landing.ref):
            landing_files.delete(self.shell(landing.node), landing.ref)
            log.info("proxmox_landing_removed", target=self._name, node=landing.node, path=landing.ref)

    # -- what the run left -----------------------------------------------------------------

    def list_tagged(self, run_id: str) -> tuple[CreatedObject, ...]:
        return cleanup.list_tagged(self, run_tag(run_id))

    def remove(self, objects: Sequence[CreatedObject]) -> None:
        cleanup.remove(self, objects)
