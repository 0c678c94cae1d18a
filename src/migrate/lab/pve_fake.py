"""fakepve with the lab's additions. Runs only in the lab's child process (see lab/pve.py).

This is the one module that imports fakepve (AGPL-3.0, in the ``lab`` extra only); nothing in
migrate proper imports it. The additions, each where fakepve answers generically:

- per-node CPU and memory in /nodes and /cluster/resources, and storage space there too;
- /nodes/{node}/network with the seeded bridges (and SDN vnets for ``type=any_bridge``),
  /cluster/sdn/zones and /cluster/sdn/vnets;
- ``import-from`` on create and on config changes really converts the source image into a
  file standing for the new volume under the lab's node directory (qemu-img), so tests can
  check the bytes a migration produced; new disks on config changes are allocated;
- ``POST /_lab/<action>`` (header X-Lab-Control: secret): faults and a view of the state.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

from aiohttp import web
from fakepve import FakePve
from fakepve.lxc import format_size
from fakepve.model import PveError, TaskError
from fakepve.qemu import DRIVE_KEY, NEW_DISK, is_cdrom, join_drive, split_drive, volume_ref

CONTROL_PREFIX = "/_lab/"
_VOLUME_KEYS = ("size", "format", "vmid", "content")


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

    # -- control -----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await self._lab_control(request)
        return await super()._middleware(request, handler)  # type: ignore[no-any-return]

    async def _lab_control(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get("X-Lab-Control", "")
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


def build(config: dict[str, Any]) -> LabPve:
    return LabPve(config)
