"""vSphere as the executor sees it: the ``connectors.base.Source`` a run reads disks from.

    with VsphereExecSource("vc1", spec) as source:
        source.power_off(vm, "guest-then-force", 300)
        for file in source.disk_files(vm, disk):
            reader = source.open_file(file, offset)

Three promises:

* **Only the planned VM is touched.** Every call looks the VM up by its moref and checks its
  instance UUID against the plan in the same PropertyCollector request, so a VM that was
  removed, re-registered (new moref) or replaced at a reused moref (ESXi hands them out
  again) is refused before anything is done to it.
* **The source is read, never changed**, except for powering it off as the shutdown policy
  says (and on again when a rollback restores what the run found): no snapshots, no
  reconfiguration. Disk bytes come from the datastore's ``/folder`` HTTPS door with ranged
  GETs (``disks.datastore``), TLS verified with the source's ``ca_file``.
* **Faults are translated here.** pyvmomi faults, socket and HTTP errors leave as
  ``TransientError`` (retry) or ``PermanentError`` subclasses naming the VM, the host and
  the fix.

Properties are read with one small ``RetrievePropertiesEx`` per question, never by walking
pyvmomi attributes (a round trip each, and some lazy reads crash vcsim 0.24).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import requests
import structlog
from pyVmomi import vim, vmodl

from migrate.connectors.base import DatastoreFile, DiskSpec, PowerState, ShutdownPolicy, VmSpec
from migrate.connectors.vsphere import VsphereSource
from migrate.connectors.vsphere_props import unescape
from migrate.disks.datastore import DEFAULT_CHUNK, DatastoreFiles, RangeStream, session_cookie
from migrate.disks.staging import discover_chain
from migrate.disks.vmdk import FLAT_KINDS, Chain, DatastorePath, split_datastore_path
from migrate.errors import (
    AuthError,
    MigrateError,
    NotFoundError,
    PermanentError,
    StepError,
    TransientError,
)
from migrate.inventory import VsphereSpec

log = structlog.get_logger(__name__)

_PC: Any = vmodl.query.PropertyCollector  # pyvmomi ships no type hints
_vim: Any = vim
_vmodl: Any = vmodl
_POWER: dict[str, PowerState] = {"poweredOn": "on", "poweredOff": "off", "suspended": "suspended"}
_IDENTITY = ("name", "config.instanceUuid", "runtime.powerState", "runtime.connectionState")
# Faults that say "not now" rather than "never": the runner retries these.
_BUSY = (vim.fault.TaskInProgress, vim.fault.InvalidState, vim.fault.Timedout, vmodl.fault.HostCommunication)


class VsphereExecSource:
    """A logged-in vSphere session serving one run's VMs; use as a context manager.

    Safe to share between the runner's threads: pyvmomi serialises SOAP calls on its stub,
    and each thread gets its own HTTP session for datastore reads.
    """

    def __init__(self, name: str, spec: VsphereSpec, *, poll_s: float = 2.0, http_timeout: float = 60.0,
                 task_timeout_s: float = 600.0) -> None:
        self._name = name
        self.spec = spec
        self.poll_s = poll_s
        self.task_timeout_s = task_timeout_s
        self._http_timeout = http_timeout
        self._vsphere = VsphereSource(name, spec)
        self._base_url = ""
        self._cookie: Any = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []
        self._dc_paths: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self._name

    # -- session --------------------------------------------------------------------------

    def __enter__(self) -> VsphereExecSource:
        self._vsphere.connect()
        try:
            self._cookie = session_cookie(self._vsphere.soap_endpoint().cookie)
        except MigrateError:
            self._vsphere.close()
            raise
        host = f"[{self.spec.host}]" if ":" in self.spec.host else self.spec.host
        self._base_url = f"https://{host}:{self.spec.port}"
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP sessions and log out; never raises."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._vsphere.close()

    def _files(self, datacenter: str, datastore: str) -> DatastoreFiles:
        """This thread's client for one datastore (requests sessions are not shared across threads)."""
        cache: dict[tuple[str, str], DatastoreFiles] | None = getattr(self._local, "files", None)
        if cache is None:
            cache = self._local.files = {}
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        key = (datacenter, datastore)
        if key not in cache:
            verify = self.spec.verify_tls
            cache[key] = DatastoreFiles(
                self._base_url, self._cookie, datacenter=datacenter, datastore=datastore,
                ca_file=self.spec.ca_file if verify else None, verify=verify,
                timeout=self._http_timeout, session=self._local.session,
            )
        return cache[key]

    # -- faults ---------------------------------------------------------------------------

    def _error(self, exc: BaseException, doing: str, vm: VmSpec | None) -> MigrateError:
        where, key = self._vsphere.where, vm.key if vm is not None else None
        if isinstance(exc, vmodl.fault.ManagedObjectNotFound) and vm is not None:
            return NotFoundError(
                f"source VM {_label(vm)} ({vm.source_moref}) is no longer in vSphere at {where}: it was "
                "removed, or unregistered and registered again (which gives it a new moref)",
                vm=key, system=self.name, hint="find the VM in vSphere, then run migrate plan again")
        if isinstance(exc, vim.fault.NotAuthenticated):
            return AuthError(f"vSphere at {where} ended the session while {doing}", vm=key, system=self.name,
                             hint="the session expired or was closed; resume the run to log in again")
        if isinstance(exc, vim.fault.NoPermission):
            privilege = getattr(exc, "privilegeId", "") or "a privilege"
            return PermanentError(f"vSphere at {where} refused {doing}: user '{self.spec.user}' lacks "
                                  f"{privilege}", vm=key, system=self.name,
                                  hint="grant the role the migration needs on the VM and its datastores")
        if isinstance(exc, _BUSY):
            return TransientError(f"vSphere at {where} is busy with the VM while {doing} "
                                  f"({type(exc).__name__}: {_msg(exc)})", vm=key, system=self.name)
        if isinstance(exc, vmodl.MethodFault):
            return PermanentError(f"vSphere at {where} refused {doing} ({type(exc).__name__}: {_msg(exc)})",
                                  vm=key, system=self.name)
        if isinstance(exc, (OSError, http.client.HTTPException)):
            return TransientError(f"lost the connection to vSphere at {where} while {doing} "
                                  f"({exc or type(exc).__name__})", vm=key, system=self.name)
        raise exc  # not a fault of the peer: a bug, keep its trace

    @contextmanager
    def _sdk(self, doing: str, vm: VmSpec | None = None) -> Iterator[None]:
        failure: MigrateError | None = None
        try:
            yield
        except MigrateError:
            raise
        except Exception as exc:  # the border: every SDK fault becomes a migrate error
            failure = self._error(exc, doing, vm)
        if failure is not None:
            raise failure  # outside the except block: no SDK frame is chained

    # -- properties -----------------------------------------------------------------------

    def _ref(self, kind: str, moref: str) -> Any:
        return getattr(_vim, kind)(moref, self._vsphere.service_instance._GetStub())

    def _retrieve(
        self, obj: Any, kind: Any, paths: Sequence[str], *, select: Sequence[Any] = (), skip: bool = False,
        doing: str, vm: VmSpec | None = None,
    ) -> list[tuple[Any, dict[str, Any]]]:
        """One RetrievePropertiesEx: (object, {path: value}) for ``obj`` and what ``select`` reaches."""
        spec = _PC.FilterSpec(
            objectSet=[_PC.ObjectSpec(obj=obj, skip=skip, selectSet=list(select))],
            propSet=[_PC.PropertySpec(type=kind, all=False, pathSet=list(paths))],
        )
        with self._sdk(doing, vm):
            collector = self._vsphere.content.propertyCollector
            result = collector.RetrievePropertiesEx([spec], _PC.RetrieveOptions())
            out = []
            while result is not None:
                out += [(o.obj, {p.name: p.val for p in o.propSet or []}) for o in result.objects or []]
                result = collector.ContinueRetrievePropertiesEx(result.token) if result.token else None
        return out

    def _live(self, vm: VmSpec, extra: Sequence[str] = (), *, doing: str) -> tuple[Any, dict[str, Any]]:
        """The VM's reference and properties, after checking it is the VM the plan means."""
        ref = self._ref("VirtualMachine", vm.source_moref)
        found = self._retrieve(ref, vim.VirtualMachine, (*_IDENTITY, *extra), doing=doing, vm=vm)
        if not found:
            raise self._error(_vmodl.fault.ManagedObjectNotFound(obj=ref), doing, vm)
        props = found[0][1]
        live_name = unescape(str(props.get("name", "")))
        live_uuid = str(props.get("config.instanceUuid") or "")
        if vm.source_uuid:
            same = live_uuid.lower() == vm.source_uuid.lower()
            planned = f"instance uuid {vm.source_uuid}"
        else:  # a plan from before uuids were recorded: the name is the best identity left
            same = not vm.source_name or live_name == vm.source_name
            planned = "no instance uuid recorded"
        if not same:
            raise NotFoundError(
                f"the VM at {vm.source_moref} on vSphere {self._vsphere.where} is {live_name!r} "
                f"(instance uuid {live_uuid or 'unreadable'}), not the planned {_label(vm)} ({planned}); "
                "migrate will not touch a VM the plan does not name",
                vm=vm.key, system=self.name,
                hint="the VM was re-registered or replaced since planning: run migrate plan again")
        return ref, props

    def _power(self, ref: Any, vm: VmSpec) -> PowerState:
        found = self._retrieve(ref, vim.VirtualMachine, ("runtime.powerState",),
                               doing="reading the power state", vm=vm)
        return _POWER.get(str(found[0][1].get("runtime.powerState")) if found else "", "unknown")

    # -- power ----------------------------------------------------------------------------

    def power_state(self, vm: VmSpec) -> PowerState:
        """"on", "off" or "suspended"; "unknown" while the VM's host is not connected."""
        _ref, props = self._live(vm, doing="reading the power state")
        if str(props.get("runtime.connectionState", "connected")) != "connected":
            return "unknown"  # the last state the host reported may no longer be true
        return _POWER.get(str(props.get("runtime.powerState")), "unknown")

    def power_off(self, vm: VmSpec, policy: ShutdownPolicy, timeout_s: float) -> PowerState:
        """Power the VM off as ``policy`` says; return the state reached (see base.ShutdownPolicy)."""
        ref, props = self._live(vm, doing="powering the VM off")
        state = _POWER.get(str(props.get("runtime.powerState")), "unknown")
        bound = log.bind(vm=vm.key, source=self.name, moref=vm.source_moref, policy=policy)
        if policy == "never" or state == "off":
            return state
        if policy == "require-off":
            raise StepError(
                f"source VM {_label(vm)} is {state}; shutdown policy require-off never powers it off",
                vm=vm.key, system=self.name, hint="power it off in vSphere, then resume the run")
        connection = str(props.get("runtime.connectionState", "connected"))
        if connection != "connected":
            raise TransientError(f"the host of source VM {_label(vm)} is {connection}; vSphere cannot "
                                 "power the VM off now", vm=vm.key, system=self.name,
                                 hint="reconnect the host in vSphere; the run retries")
        asked = policy in ("guest", "guest-then-force") and state == "on"
        if asked and self._shutdown_guest(ref, vm, force_next=policy == "guest-then-force"):
            bound.info("source_guest_shutdown_requested", timeout_s=timeout_s)
            state = self._wait_off(ref, vm, timeout_s)
            if state == "off":
                bound.info("source_powered_off", how="guest")
                return state
        if policy == "guest":
            bound.warning("source_still_running", state=state, timeout_s=timeout_s)
            return state  # a suspended guest cannot be asked; the step says what to do
        bound.info("source_power_off_forced", was=state)
        state = self._force_off(ref, vm)
        bound.info("source_powered_off", how="force", state=state)
        return state

    def power_on(self, vm: VmSpec) -> PowerState:
        """Power the VM on again (rollback restores a source the run powered off)."""
        ref, props = self._live(vm, doing="powering the VM on")
        if props.get("runtime.powerState") == "poweredOn":
            return "on"
        with self._sdk("powering the VM on", vm):
            task = ref.PowerOnVM_Task()
        self._wait_task(task, "powering the VM on", vm)
        log.info("source_powered_on", vm=vm.key, source=self.name, moref=vm.source_moref)
        return self._power(ref, vm)

    def _shutdown_guest(self, ref: Any, vm: VmSpec, *, force_next: bool) -> bool:
        """Ask the guest OS to shut down; False when VMware Tools cannot take the request."""
        failure: BaseException | None = None
        try:
            ref.ShutdownGuest()  # returns at once; the guest powers off when it is done
            return True
        except vim.fault.InvalidPowerState:
            return True  # it went off on its own meanwhile: waiting sees that at once
        except vim.fault.ToolsUnavailable as exc:
            failure = exc
        except Exception as exc:
            raise self._error(exc, "asking the guest to shut down", vm) from None
        if force_next:
            log.warning("source_guest_shutdown_unavailable", vm=vm.key, reason=type(failure).__name__)
            return False
        raise StepError(
            f"VMware Tools are not running in source VM {_label(vm)}, so the guest cannot be asked to shut "
            "down", vm=vm.key, system=self.name,
            hint="shut the guest down by hand and resume, or use shutdown policy guest-then-force")

    def _wait_off(self, ref: Any, vm: VmSpec, timeout_s: float) -> PowerState:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self._power(ref, vm)
            left = deadline - time.monotonic()
            if state == "off" or left <= 0:
                return state
            time.sleep(min(self.poll_s, left))

    def _force_off(self, ref: Any, vm: VmSpec) -> PowerState:
        with self._sdk("powering the VM off", vm):
            task = ref.PowerOffVM_Task()
        try:
            self._wait_task(task, "powering the VM off", vm)
        except PermanentError as exc:
            if self._power(ref, vm) != "off":  # InvalidPowerState when it went off meanwhile is fine
                raise exc from None
        return self._power(ref, vm)

    def _wait_task(self, task: Any, doing: str, vm: VmSpec) -> None:
        """Wait for a task by reading its state and error only (vcsim names non-entities as a
        task's entity, which pyvmomi's WaitForTask refuses to read)."""
        deadline, delay = time.monotonic() + self.task_timeout_s, 0.05
        while True:
            found = self._retrieve(task, vim.Task, ("info.state", "info.error"), doing=doing, vm=vm)
            props = found[0][1] if found else {}
            state = props.get("info.state")
            if state == vim.TaskInfo.State.success:
                return
            if state == vim.TaskInfo.State.error:
                error = props.get("info.error")
                fault = getattr(error, "fault", None) or _vmodl.fault.SystemError(
                    msg=getattr(error, "localizedMessage", "") or "the task failed")
                raise self._error(fault, doing, vm)
            if time.monotonic() > deadline:
                raise TransientError(f"vSphere at {self._vsphere.where} is still {doing} after "
                                     f"{self.task_timeout_s:g} s", vm=vm.key, system=self.name,
                                     hint="look at the VM's recent tasks in vSphere; the run retries")
            time.sleep(delay)
            delay = min(delay * 2, self.poll_s)

    # -- disks ----------------------------------------------------------------------------

    def disk_files(self, vm: VmSpec, disk: DiskSpec) -> tuple[DatastoreFile, ...]:
        """The flat extent alone for a single flat disk; else every descriptor and extent, base first."""
        ref, props = self._live(vm, ("config.hardware.device",), doing="reading the VM's disks")
        live = _backing_chain(props.get("config.hardware.device") or (), disk.key)
        if not live:
            raise NotFoundError(
                f"source VM {_label(vm)} has no disk with key {disk.key} ({disk.label}) any more",
                vm=vm.key, system=self.name,
                hint="the VM's disks changed since planning: run migrate plan again")
        planned = disk.source_chain or (disk.source_path,)
        if live[-1] != disk.source_path or (disk.source_chain and live != disk.source_chain):
            raise PermanentError(
                f"{disk.label} of source VM {_label(vm)} is now {' <- '.join(live)}, but the plan has "
                f"{' <- '.join(planned)}: a snapshot was taken, reverted or consolidated since planning",
                vm=vm.key, system=self.name, hint="run migrate plan again, then run the new plan")
        datacenter = self._datacenter_path(ref, vm)
        files = self._files(datacenter, split_datastore_path(live[-1]).datastore)
        chain = discover_chain(files, live[-1], chain=live)
        return self._chain_files(chain, datacenter)

    def _chain_files(self, chain: Chain, datacenter: str) -> tuple[DatastoreFile, ...]:
        def size(path: DatastorePath) -> int:
            return self._files(datacenter, path.datastore).size(path.path)

        base = chain.base
        if chain.is_single_flat and len(base.descriptor.extents) == 1:
            extent = base.descriptor.extents[0]
            (path,) = base.extent_paths()
            if extent.kind in FLAT_KINDS and extent.offset == 0 and path is not None:
                have = size(path)
                if have < extent.size_bytes:
                    raise PermanentError(
                        f"{path}: {have} bytes, but its descriptor {base.path} says {extent.size_bytes}",
                        system=self.name, hint="the disk's extent file is truncated; check it in vSphere")
                if have == extent.size_bytes:  # the file is the disk: stream it with ranged reads
                    return (DatastoreFile(str(path), have, datacenter),)
        out: list[DatastoreFile] = []
        seen: set[DatastorePath] = set()
        for link in chain.links:
            for path in ((() if link.embedded else (link.path,)) + link.extent_paths()):
                if path is not None and path not in seen:  # ZERO extents have no file
                    seen.add(path)
                    out.append(DatastoreFile(str(path), size(path), datacenter))
        return tuple(out)

    def _datacenter_path(self, ref: Any, vm: VmSpec) -> str:
        """The VM's datacenter as the /folder door's ``dcPath`` wants it: its inventory path."""
        if vm.source_moref in self._dc_paths:
            return self._dc_paths[vm.source_moref]
        up = _PC.TraversalSpec(name="up", type=vim.ManagedEntity, path="parent", skip=False,
                               selectSet=[_PC.SelectionSpec(name="up")])
        found = self._retrieve(ref, vim.ManagedEntity, ("name", "parent"), select=(up,),
                               doing="finding the VM's datacenter", vm=vm)
        nodes = {obj._moId: (obj, props) for obj, props in found}
        names: list[str] = []
        at = nodes.get(vm.source_moref, (None, {}))[1].get("parent")
        while at is not None and at._moId in nodes:
            obj, props = nodes[at._moId]
            if names or isinstance(obj, vim.Datacenter):
                names.append(str(props.get("name", "")))
            at = props.get("parent")
        if not names:
            raise PermanentError(f"cannot tell which datacenter source VM {_label(vm)} is in",
                                 vm=vm.key, system=self.name, hint="check the VM in vSphere")
        path = "/".join(reversed(names[:-1]))  # the last name is the root folder's, not in the path
        self._dc_paths[vm.source_moref] = path
        return path

    def open_file(self, file: DatastoreFile, offset: int = 0) -> _Reader:
        """A reader of ``file`` from ``offset`` (a ranged GET); read it to b"" and close it."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0 (got {offset})")
        if not file.datacenter:
            raise PermanentError(f"{file.path}: no datacenter given", system=self.name,
                                 hint="take the files from disk_files(), which names their datacenter")
        path = split_datastore_path(file.path)
        if file.size_bytes and offset >= file.size_bytes:
            if offset > file.size_bytes:
                raise PermanentError(
                    f"{file.path}: offset {offset} is past its end ({file.size_bytes} bytes)",
                    system=self.name, hint="restart the transfer from byte 0")
            return _Reader(None, 0)
        stream = self._files(file.datacenter, path.datastore).read_range(path.path, offset)
        return _Reader(stream, offset - stream.offset)


class _Reader:
    """``base.DiskReader`` over a ranged GET; reads return what was asked unless the file ends."""

    def __init__(self, stream: RangeStream | None, skip: int) -> None:
        self._stream = stream
        self._skip = skip  # the server ignored Range and started at byte 0

    def read(self, size: int = -1, /) -> bytes:
        if self._stream is None:
            return b""
        while self._skip > 0:
            dropped = self._stream.read(min(self._skip, DEFAULT_CHUNK))
            if not dropped:
                return b""
            self._skip -= len(dropped)
        parts, got = [], 0
        while size < 0 or got < size:
            chunk = self._stream.read(DEFAULT_CHUNK if size < 0 else size - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _backing_chain(devices: Sequence[Any], key: str) -> tuple[str, ...]:
    """The disk's backing files from the base up to the top the VM runs on; () if no such disk."""
    for device in devices:
        if isinstance(device, vim.vm.device.VirtualDisk) and str(device.key) == key:
            chain: list[str] = []
            backing: Any = device.backing
            while backing is not None and getattr(backing, "fileName", None):
                chain.append(str(backing.fileName))
                backing = getattr(backing, "parent", None)
            return tuple(reversed(chain))
    return ()


def _label(vm: VmSpec) -> str:
    return repr(vm.source_name or vm.name)


def _msg(fault: BaseException) -> str:
    return str(getattr(fault, "msg", "") or type(fault).__name__)
