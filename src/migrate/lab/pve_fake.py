"""fakepve with the lab's additions. Runs only in the lab's child process (see lab/pve.py).

This is the one module that imports fakepve (AGPL-3.0, in the ``lab`` extra only); nothing in
migrate proper imports it. The additions, each where fakepve answers generically:

- per-node CPU and memory in /nodes and /cluster/resources, and storage space there too;
- /nodes/{node}/network with the seeded bridges (and SDN vnets for ``type=any_bridge``),
  /cluster/sdn/zones and /cluster/sdn/vnets;
- ``import-from`` on create and on config changes really converts the source image into a
  file standing for the new volume under the lab's node directory (qemu-img), so tests can
  check the bytes a migration produced; new disks on config changes are allocated;
- a started VM really boots its boot disk's bytes under QEMU (``guestboot``), and its guest
  agent answers only once the guest printed its boot line, as qemu-ga answers only in a
  guest that booted; the serial output is readable through ``POST /_lab/serial``;
- ``POST /_lab/<action>`` (header X-Lab-Control: secret): faults and a view of the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from fakepve import FakePve
from fakepve.lxc import format_size
from fakepve.model import PveError, TaskError
from fakepve.qemu import (
    DRIVE_KEY,
    NEW_DISK,
    boot_order,
    drives_of,
    is_cdrom,
    join_drive,
    split_drive,
    volume_ref,
)

from migrate.lab.bootcode import ascii_tag, serial_line
from migrate.lab.control import CONTROL_HEADER
from migrate.lab.guestboot import Firmware, GuestBoots, GuestDisk

log = structlog.get_logger(__name__)

CONTROL_PREFIX = "/_lab/"
_VOLUME_KEYS = ("size", "format", "vmid", "content")
GUEST_SWEEP = 0.2  # seconds between looks at which VMs run
_NOT_DISKS = ("efidisk0", "tpmstate0")


def _store(st: dict[str, Any]) -> dict[str, Any]:
    store: dict[str, Any] = {
        "type": st["type"], "content": ",".join(st["content"]), "active": 1, "files": set(), "volumes": {},
        "avail": st["free_bytes"], "total": st["total_bytes"],
    }  # fmt: skip
    if st["shared"]:
        store["shared"] = 1
    if st["nodes"]:
        store["nodes"] = ",".join(st["nodes"])
    if st["path"]:
        store["path"] = st["path"]
    store.update(dict(st["options"]))
    return store


class LabPve(FakePve):  # type: ignore[misc]  # fakepve is untyped
    def __init__(self, config: dict[str, Any]) -> None:
        seed, secret = config["seed"], config["secrets"]
        super().__init__(user="root@pam", password=secret["root"], host=config["host"], port=0)
        self.time_scale = float(config["time_scale"])
        self.node_root = Path(config["node_root"])
        self.control_secret: str = secret["control"]
        self.lab_seed = seed
        self.version, self.release_version = seed["version"], seed["release"]
        self.cluster_name = seed["cluster_name"]
        self.nodes = {n["name"]: {"online": n["online"]} for n in seed["nodes"]}
        self.node_stats = {n["name"]: n for n in seed["nodes"]}
        self.storages = {st["name"]: _store(st) for st in seed["storages"]}
        self.users[seed["user"]] = secret["password"]
        self.apitokens[seed["token_id"]] = secret["token"]
        self.grant(seed["user"], "/", *seed["privileges"])
        for vm in seed["vms"]:
            self.add_vm(vm["vmid"], vm["name"], node=vm["node"], status=vm["status"],
                        config=dict(vm["config"]))
            for sid, volname, size in vm["volumes"]:
                self.storages[sid]["volumes"][volname] = {
                    "content": "images", "format": "raw", "size": size, "vmid": vm["vmid"], "ctime": 0}
        self.guests = GuestBoots(self._guest_booted, workdir=self.node_root.parent / "pve" / "guests")
        # VMID -> started_at of the start its guest boots for. VMs seeded as running stand for
        # guests this lab never started: they are left as they are until started again.
        self._guest_starts: dict[int, float | None] = {
            vm.vmid: vm.started_at for vm in self.vms if vm.status == "running"
        }
        self._guest_expect: dict[int, str] = {}  # VMID -> the boot line, when not the name's
        self._guest_loop: asyncio.AbstractEventLoop | None = None
        self._guest_sweeper: asyncio.Task[None] | None = None

    async def start(self, certfile: str, keyfile: str) -> None:
        await super().start(certfile, keyfile)
        self._guest_loop = asyncio.get_running_loop()
        self._guest_sweeper = asyncio.ensure_future(self._sweep_guests())

    async def stop(self) -> None:
        if self._guest_sweeper is not None:
            self._guest_sweeper.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.guests.close)
        await super().stop()

    # -- cluster views fakepve answers with fixed numbers -------------------------------------

    @staticmethod
    def _rewrite(resp: web.StreamResponse, fix: Any) -> web.StreamResponse:
        if not isinstance(resp, web.Response) or resp.status != 200 or resp.text is None:
            return resp
        data = json.loads(resp.text)["data"]
        return web.json_response({"data": [fix(dict(item)) for item in data]})

    def _fix_node(self, item: dict[str, Any]) -> dict[str, Any]:
        stats = self.node_stats.get(item.get("node", ""))
        if stats and item.get("status") == "online":
            item.update(maxcpu=stats["cpus"], maxmem=stats["memory_bytes"], mem=stats["memory_used_bytes"],
                        cpu=0.05)
        return item

    def _fix_resource(self, item: dict[str, Any]) -> dict[str, Any]:
        if item.get("type") == "node":
            return self._fix_node(item)
        if item.get("type") == "storage":
            store = self.storages[item["storage"]]
            if not self.nodes.get(item["node"], {}).get("online", True) or not store.get("active", 1):
                item["status"] = "unknown"
                item.pop("disk", None), item.pop("maxdisk", None)
            else:
                total, _used, avail = self._space(store)
                item.update(disk=total - avail, maxdisk=total)
        return item

    async def _nodes(self, request: web.Request) -> web.StreamResponse:
        return self._rewrite(await super()._nodes(request), self._fix_node)

    async def _resources(self, request: web.Request) -> web.StreamResponse:
        resp = self._rewrite(await super()._resources(request), self._fix_resource)
        kind = request.query.get("type")
        if kind not in (None, "sdn") or not isinstance(resp, web.Response) or resp.text is None:
            return resp
        data = json.loads(resp.text)["data"]
        for zone in self.lab_seed["zones"]:
            for node in zone["nodes"] or sorted(self.nodes):
                data.append({"id": f"sdn/{node}/{zone['name']}", "type": "sdn", "sdn": zone["name"],
                             "node": node,
                             "status": "ok" if self.nodes[node].get("online", True) else "unknown"})
        return web.json_response({"data": data})

    # -- networks and SDN --------------------------------------------------------------------

    def _routes_lab(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/nodes/{node}/network", self._lab_network),
                ("GET", "/cluster/sdn/vnets", self._lab_vnets),
                ("GET", "/cluster/sdn/zones", self._lab_zones)]

    def _zone_nodes(self, zone_name: str) -> list[str]:
        zone = next((z for z in self.lab_seed["zones"] if z["name"] == zone_name), None)
        return list(zone["nodes"] or sorted(self.nodes)) if zone else []

    async def _lab_network(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        node, want = v["node"], v.get("type")
        index = sorted(self.nodes).index(node)
        local: list[dict[str, Any]] = []
        for prio, br in enumerate(self.lab_seed["bridges"], start=3):
            if br["nodes"] and node not in br["nodes"]:
                continue
            item: dict[str, Any] = {
                "iface": br["name"], "type": "bridge", "method": "manual", "method6": "manual",
                "families": ["inet"], "active": 1, "autostart": 1, "priority": prio,
                "bridge_ports": br["ports"], "bridge_stp": "off", "bridge_fd": "0",
            }  # fmt: skip
            if br["vlan_aware"]:
                item.update(bridge_vlan_aware=1, bridge_vids="2-4094")
            if br["cidr"]:
                net = ipaddress.ip_interface(br["cidr"])
                address = net.ip + index
                item.update(method="static", address=str(address), netmask=str(net.netmask),
                            cidr=f"{address}/{net.network.prefixlen}",
                            gateway=str(net.network.network_address + 1))
            if br["comment"]:
                item["comments"] = br["comment"] + "\n"
            local.append(item)
            for port in br["ports"].split():
                local.append({"iface": port, "type": "eth", "method": "manual", "method6": "manual",
                              "families": ["inet"], "active": 1, "exists": 1, "priority": 2})
        vnets = [{"iface": vn["name"], "type": "vnet", "active": 1, "priority": 1}
                 for vn in self.lab_seed["vnets"] if node in self._zone_nodes(vn["zone"])]
        if want in ("any_bridge", "any_local_bridge"):
            picked = [i for i in local if i["type"] in ("bridge", "OVSBridge")]
            return picked + (vnets if want == "any_bridge" else [])
        if want == "vnet":
            return vnets
        if want == "include_sdn":
            return local + vnets
        return [i for i in local if want is None or i["type"] == want]

    def _sdn_visible(self, user: str, zone: str, vnet: str = "") -> bool:
        path = f"/sdn/zones/{zone}" + (f"/{vnet}" if vnet else "")
        return any(self.allowed(user, path, priv) for priv in ("SDN.Audit", "SDN.Allocate"))

    async def _lab_vnets(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        out = []
        for vn in self.lab_seed["vnets"]:
            if self._sdn_visible(user, vn["zone"], vn["name"]):
                item = {"vnet": vn["name"], "type": "vnet", "zone": vn["zone"], "digest": "0" * 40}
                if vn["tag"] is not None:
                    item["tag"] = vn["tag"]
                if vn["alias"]:
                    item["alias"] = vn["alias"]
                out.append(item)
        return sorted(out, key=lambda i: i["vnet"])

    async def _lab_zones(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        out = []
        for zone in self.lab_seed["zones"]:
            if v.get("type") not in (None, zone["type"]) or not self._sdn_visible(user, zone["name"]):
                continue
            item = {"zone": zone["name"], "type": zone["type"], "bridge": zone["bridge"], "ipam": "pve",
                    "digest": "0" * 40}
            if zone["nodes"]:
                item["nodes"] = ",".join(zone["nodes"])
            out.append(item)
        return sorted(out, key=lambda i: i["zone"])

    # -- disks that hold bytes ---------------------------------------------------------------

    def _lab_file(self, sid: str, volname: str, vtype: str = "images") -> Path:
        """The file under the lab's node root that stands for a volume."""
        path: str = self._volume_path(sid, volname, vtype)
        if path.startswith("rbd:"):
            return self.node_root / "rbd" / path[4:]
        if Path(path).is_relative_to(self.node_root):
            return Path(path)
        return self.node_root / path.lstrip("/")

    def _lab_source(self, source: str) -> Path:
        if source.startswith("/"):
            path = Path(source)
        else:
            sid, volname = volume_ref(source)
            store = self._store(sid)
            vtype, _owner, _fmt = self._parse_volname(store, volname)
            path = self._lab_file(sid, volname, vtype)
        if not path.is_file():
            raise PveError(500, f"import-from: volume '{source}' does not exist")
        return path

    def _qm_check_drive(
        self, user: str, vmid: int, pool: str | None, key: str, value: str, default: str | None
    ) -> None:
        source = split_drive(value)[1].get("import-from")
        if source is not None:
            if source.startswith("/") and user != "root@pam":
                raise PveError(403, "Permission check failed "
                                    "(Only root can pass arbitrary filesystem paths.)")
            self._lab_source(source)
        super()._qm_check_drive(user, vmid, pool, key, value, default)

    def _qm_new_drive(self, vmid: int, key: str, value: str, default: str | None) -> tuple[str, list[str]]:
        volume, props = split_drive(value)
        found = NEW_DISK.match(volume)
        if "import-from" not in props or not found:
            return super()._qm_new_drive(vmid, key, value, default)  # type: ignore[no-any-return]
        props = dict(props)
        source = self._lab_source(props.pop("import-from"))
        try:
            info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(source)],
                                             capture_output=True, text=True, check=True).stdout)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise TaskError(f"import failed - cannot read {source}: {getattr(exc, 'stderr', exc)}") from None
        size = int(info["virtual-size"])
        volid, fmt = self._qm_alloc(found.group(1) or default, vmid, props.pop("format", None), size)
        sid, volname = volume_ref(volid)
        target = self._lab_file(sid, volname)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Run inline: lab disks are small, and a real node's import task blocks its VM the same way.
        proc = subprocess.run(
            ["qemu-img", "convert", "-f", info["format"], "-O", fmt, str(source), str(target)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            self._qm_free(volid)
            raise TaskError(f"import failed - qemu-img convert: {proc.stderr.strip()}")
        props["size"] = format_size(size)
        return join_drive(volid, props), [volid]

    def _qm_free(self, volid: str) -> None:
        sid, volname = volume_ref(volid)
        if sid in self.storages:
            path = self._lab_file(sid, volname)
            if path.is_relative_to(self.node_root):
                path.unlink(missing_ok=True)
        super()._qm_free(volid)

    async def _apply_config(self, vm: Any, user: str, p: dict[str, Any]) -> None:
        # PVE allocates (and imports) disks named "storage:size" in a config change; fakepve
        # would store them as given.
        p = dict(p)
        made: list[str] = []
        try:
            for key in sorted(p):
                if not DRIVE_KEY.match(key):
                    continue
                volume, props = split_drive(p[key])
                if NEW_DISK.match(volume) and not is_cdrom(volume, props):
                    self._qm_check_drive(user, vm.vmid, None, key, p[key], None)
                    p[key], volids = self._qm_new_drive(vm.vmid, key, p[key], None)
                    made += volids
            await super()._apply_config(vm, user, p)
        except (PveError, TaskError) as exc:
            for volid in made:
                self._qm_free(volid)
            if isinstance(exc, TaskError):
                raise PveError(500, str(exc)) from exc
            raise

    # -- guests that boot --------------------------------------------------------------------

    async def _sweep_guests(self) -> None:
        # fakepve changes power states in many places (tasks, HA, scenarios, timers): looking
        # often is simpler and surer than hooking each of them.
        while True:
            try:
                self._sync_guests()
            except Exception:  # a bug here must not stop the lab from noticing stopped VMs
                log.exception("lab_guest_sweep_failed")
            await asyncio.sleep(GUEST_SWEEP)

    async def task(self, node: str, ttype: str, tid: Any, user: str, body: Any, vm: Any = None,
                   lock: bool = True, log: Any = ()) -> str:  # fmt: skip
        # A task that changed a VM's power starts or stops its guest before it ends: a stop task
        # returns with QEMU gone, as on a node. The sweep catches the changes no task makes.
        async def then_sync() -> Any:
            try:
                return await body()
            finally:
                self._sync_guests()

        upid: str = await super().task(node, ttype, tid, user, then_sync, vm=vm, lock=lock, log=log)
        return upid

    def _sync_guests(self) -> None:
        """Boot the guests of VMs started since the last look; stop those of VMs that stopped."""
        present = set()
        for vm in self.vms:
            present.add(vm.vmid)
            if vm.status == "running":
                if self._guest_starts.get(vm.vmid, -1.0) != vm.started_at:
                    self._guest_starts[vm.vmid] = vm.started_at
                    self._boot_guest(vm)
            elif vm.vmid in self._guest_starts:
                del self._guest_starts[vm.vmid]
                vm.agent = None
                self.guests.stop(str(vm.vmid))
        for vmid in set(self._guest_starts) - present:
            del self._guest_starts[vmid]
        for key in self.guests.names():
            if int(key) not in present:
                self.guests.forget(key)

    def _boot_guest(self, vm: Any) -> None:
        vm.agent = None  # a guest just started has no agent running yet
        found = self._guest_disk(vm)
        if isinstance(found, str):
            self.guests.fail(str(vm.vmid), found)
        else:
            self.guests.boot(str(vm.vmid), found)

    def _guest_disk(self, vm: Any) -> GuestDisk | str:
        """The boot disk's bytes as QEMU would boot them, or why there is nothing to boot."""
        cfg = vm.config
        order = str(cfg.get("boot") or boot_order(cfg) or "")
        if order.startswith("order="):
            keys = [d for d in order[len("order=") :].split(";") if d]
        elif cfg.get("bootdisk"):  # the legacy form: boot=cdn, bootdisk=scsi0
            keys = [str(cfg["bootdisk"])]
        else:
            keys = [key for key, _volume, _props in drives_of(cfg, skip_cdrom=True)]
        for key in keys:
            if not DRIVE_KEY.match(key) or key in _NOT_DISKS or key not in cfg:
                continue
            volume, props = split_drive(cfg[key])
            if is_cdrom(volume, props):
                continue
            sid, volname = volume_ref(volume)
            if sid not in self.storages:
                return f"{key}: {volume} is not a volume of this cluster's storages"
            path = self._lab_file(sid, volname)
            if not path.is_file():
                return f"{key}: the lab holds no bytes for {volume} ({path} is missing)"
            info = self.storages[sid].get("volumes", {}).get(volname, {})
            fmt = info.get("format") or ("qcow2" if volname.endswith(".qcow2") else "raw")
            expect = self._guest_expect.get(vm.vmid) or serial_line(ascii_tag(str(vm.name)))
            firmware: Firmware = "efi" if cfg.get("bios") == "ovmf" else "bios"
            return GuestDisk(path, fmt, firmware, expect)
        return f"no disk to boot from (boot order {order or 'unset'!r})"

    def _guest_booted(self, key: str, generation: int) -> None:
        """Called from a guest's watcher thread: the VMs live in the event loop, so go there."""
        loop = self._guest_loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the fake is stopping
                loop.call_soon_threadsafe(self._guest_answers, int(key), generation)

    def _guest_answers(self, vmid: int, generation: int) -> None:
        vm = self.vm(vmid)
        if vm is None or vm.status != "running" or not self.guests.is_current(str(vmid), generation):
            return  # stopped or started again meanwhile
        # qemu-ga talks through the virtio-serial port that "agent: 1" adds; without it PVE
        # cannot reach the agent even in a guest that booted.
        if str(vm.config.get("agent", "0")).split(",")[0].split("=")[-1] == "1":
            # fakepve answers the other commands (ping, network-get-interfaces...) in its own way.
            status = self.guests.status(str(vmid))
            vm.agent = {"os": lab_osinfo(status.expect if status else "")}

    async def _agent_call(self, match: Any, values: dict[str, Any]) -> Any:
        self._sync_guests()  # a VM started an instant ago must not answer with its last boot's agent
        return await super()._agent_call(match, values)

    # -- control -----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await self._lab_control(request)
        return await super()._middleware(request, handler)  # type: ignore[no-any-return]

    async def _lab_control(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get(CONTROL_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.control_secret.encode()):
            return web.json_response({"data": None, "message": "bad control secret"}, status=401)
        action = request.path[len(CONTROL_PREFIX):].replace("-", "_")
        handler = getattr(self, "_ctl_" + action, None)
        if handler is None:
            return web.json_response({"data": None, "message": f"no control action {action!r}"}, status=404)
        params = await request.json() if request.can_read_body else {}
        try:
            data = handler(params)
            if inspect.isawaitable(data):
                data = await data
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return web.json_response({"data": None, "message": f"{action}: {exc!r}"}, status=400)
        return web.json_response({"data": data})

    def _ctl_fail(self, p: dict[str, Any]) -> None:
        self.fail(p["method"], p["suffix"], p.get("status"), p.get("message"), html=p.get("html", False),
                  error=p.get("error"), times=p.get("times"))

    def _ctl_clear_failures(self, p: dict[str, Any]) -> None:
        self.failures.clear()

    def _ctl_flaky_network(self, p: dict[str, Any]) -> None:
        self.flaky_network(**p)
        if p.get("seed") is not None:
            self._random.seed(p["seed"])

    def _ctl_slow_network(self, p: dict[str, Any]) -> None:
        self.slow_network(**p)

    def _ctl_node_offline(self, p: dict[str, Any]) -> None:
        self.set_node_offline(p["node"], p.get("offline", True))

    def _ctl_lock_vm(self, p: dict[str, Any]) -> None:
        self.snapshot_lock(p["vmid"], p.get("lock", "backup"))

    def _ctl_unlock_vm(self, p: dict[str, Any]) -> None:
        self.unlock(p["vmid"])

    async def _ctl_hold_config_lock(self, p: dict[str, Any]) -> None:
        await self.hold_config_lock(p["vmid"], p.get("secs"))

    def _ctl_release_config_lock(self, p: dict[str, Any]) -> None:
        self.release_config_lock(p["vmid"])

    def _ctl_vm_set(self, p: dict[str, Any]) -> None:
        vm = self.vm(p.pop("vmid"))
        for key, value in p.items():
            if key not in ("start_error", "shutdown_secs", "start_secs", "stop_secs", "acpi", "status"):
                raise ValueError(f"cannot set {key}")
            setattr(vm, key, value)

    def _ctl_storage_set(self, p: dict[str, Any]) -> None:
        store = self.storages[p.pop("storage")]
        for key, value in p.items():
            if key not in ("avail", "total", "active"):
                raise ValueError(f"cannot set {key}")
            store[key] = value

    def _ctl_set(self, p: dict[str, Any]) -> None:
        for key, value in p.items():
            if key not in ("time_scale", "lock_wait", "latency", "ticket_ttl", "shutdown_default_timeout"):
                raise ValueError(f"cannot set {key}")
            setattr(self, key, value)

    def _ctl_requests(self, p: dict[str, Any]) -> list[list[str]]:
        seen = [[method, path] for method, path, _body in self.requests]
        if p.get("clear"):
            self.requests.clear()
        return seen

    def _ctl_serial(self, p: dict[str, Any]) -> dict[str, Any] | None:
        """The boot of VM ``vmid``'s guest: phase (queued, booting, booted, failed, stopped),
        reason, serial output, the line expected, the image and firmware, QEMU's pid."""
        self._sync_guests()
        found = self.guests.status(str(int(p["vmid"])))
        return found.as_dict() if found else None

    def _ctl_guests(self, p: dict[str, Any]) -> dict[str, dict[str, Any]]:
        self._sync_guests()
        return {key: status.as_dict() for key, status in self.guests.statuses().items()}

    def _ctl_boot_expect(self, p: dict[str, Any]) -> str | None:
        """The boot line VM ``vmid``'s guest must print from its next start on: ``tag`` (the
        MIGRATE-LAB-BOOT-OK line of that tag) instead of its name's; no tag: its name's again."""
        vmid = int(p["vmid"])
        if p.get("tag") is None:
            self._guest_expect.pop(vmid, None)
            return None
        self._guest_expect[vmid] = serial_line(str(p["tag"]))
        return self._guest_expect[vmid]

    def _ctl_guests_set(self, p: dict[str, Any]) -> None:
        for key, value in p.items():
            if key != "timeout":
                raise ValueError(f"cannot set {key}")
            self.guests.timeout = float(value)

    def _ctl_state(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "vms": [{"vmid": vm.vmid, "name": vm.name, "node": vm.node, "status": vm.status, "lock": vm.lock,
                     "template": bool(vm.template), "config": vm.config, "pending": vm.pending}
                    for vm in sorted(self.vms, key=lambda v: v.vmid)],
            "storages": {name: {"avail": store.get("avail"), "total": store.get("total"),
                                "volumes": {vol: {k: info.get(k) for k in _VOLUME_KEYS}
                                            for vol, info in sorted(store.get("volumes", {}).items())}}
                         for name, store in sorted(self.storages.items())},
            "tasks": [{k: t.get(k) for k in ("upid", "node", "type", "id", "user", "status", "exitstatus")}
                      for t in self.tasklog],
        }  # fmt: skip


def lab_osinfo(line: str) -> dict[str, str]:
    """guest-get-osinfo of a lab guest: its boot code, not an OS, says so."""
    return {"id": "migrate-lab", "name": "migrate lab guest", "pretty-name": f"migrate lab guest ({line})",
            "version": "1", "version-id": "1", "kernel-release": "bootcode", "kernel-version": "1",
            "machine": "x86_64"}  # fmt: skip


def build(config: dict[str, Any]) -> LabPve:
    return LabPve(config)
