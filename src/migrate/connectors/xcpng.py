"""XCP-ng target: discovery (``snapshot``) and the ``Target`` protocol, over XenAPI.

Reads take one ``get_all_records`` per class (eight calls for a whole pool), never one call
per object. Everything a run creates carries the run's tag in its ``tags`` and its intent's
key in ``other_config["migrate-key"]``, so ``find_vm`` and ``list_tagged`` find it again after
a crash. XAPI ints travel as decimal strings (XML-RPC ints stop at 2**31).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import structlog

from migrate.connectors.base import (
    CreatedObject,
    DiskLanding,
    DiskSpec,
    Intent,
    TargetVm,
    VmSpec,
    VmState,
    run_tag,
)
from migrate.connectors.xcpng_session import TIMEOUT_S, XapiSession
from migrate.connectors.xcpng_upload import VdiUpload
from migrate.errors import NotFoundError, PermanentError
from migrate.inventory import XcpngSpec
from migrate.model import (
    ExistingVm,
    Storage,
    TargetKind,
    TargetNetwork,
    TargetNode,
    TargetSnapshot,
    TargetTemplate,
)

log = structlog.get_logger(__name__)

NULL: Final = "OpaqueRef:NULL"
KEY: Final = "migrate-key"  # other_config key naming the intent that created an object
# SRs that cannot hold a VM's disks: ISO libraries, removable media, the tools ISO.
_NOT_FOR_DISKS: Final = frozenset({"iso", "udev"})
_POWER: Final = {"Running": "on", "Paused": "on", "Halted": "off", "Suspended": "suspended"}

Record = dict[str, Any]


def _is_vm(rec: Record) -> bool:
    return not (rec["is_a_template"] or rec["is_control_domain"] or rec.get("is_a_snapshot", False))


class XcpngTarget:
    """An XCP-ng pool as a migration target. Use as a context manager: login on enter, logout always."""

    def __init__(self, name: str, spec: XcpngSpec, *, timeout: float = TIMEOUT_S) -> None:
        self._name = name
        self.spec = spec
        self.session = XapiSession(name, spec, timeout=timeout)

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> TargetKind:
        return "xcpng"

    def __enter__(self) -> XcpngTarget:
        self.session.login()
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.logout()

    def _all(self, cls: str) -> dict[str, Record]:
        records: dict[str, Record] = self.session.call(f"{cls}.get_all_records")
        return records

    # -- discovery ----------------------------------------------------------------------------

    def snapshot(self) -> TargetSnapshot:
        """The pool as the planner sees it; same pool state, same snapshot (sorted throughout)."""
        pools, hosts, metrics = self._all("pool"), self._all("host"), self._all("host_metrics")
        srs, pbds, networks, pifs = self._all("SR"), self._all("PBD"), self._all("network"), self._all("PIF")
        vms = self._all("VM")
        pool = next(iter(pools.values()), {})
        host_names = {ref: h["name_label"] for ref, h in hosts.items()}
        master = hosts.get(pool.get("master", NULL), {})
        nodes = []
        for h in hosts.values():
            m = metrics.get(h["metrics"], {})
            total = int(m.get("memory_total", 0))
            cpus = int(h["cpu_info"].get("cpu_count") or len(h["host_CPUs"]))
            nodes.append(
                TargetNode(
                    name=h["name_label"],
                    cpus=cpus,
                    memory_total_bytes=total,
                    memory_used_bytes=total - int(m.get("memory_free", 0)),
                    online=bool(h["enabled"] and m.get("live", False)),
                )
            )
        storages = []
        for ref, sr in srs.items():
            if sr["type"] in _NOT_FOR_DISKS or sr["content_type"] == "iso" or sr.get("is_tools_sr", False):
                continue
            plugged = [p for p in pbds.values() if p["SR"] == ref]
            seen_by = () if sr["shared"] else tuple(sorted(host_names[p["host"]] for p in plugged))
            size = int(sr["physical_size"])
            storages.append(
                Storage(
                    name=sr["name_label"],
                    type=sr["type"],
                    total_bytes=size,
                    free_bytes=size - int(sr["physical_utilisation"]),
                    shared=bool(sr["shared"]),
                    nodes=seen_by,
                    active=any(p["currently_attached"] for p in plugged),
                    uuid=sr["uuid"],
                )
            )
        nets = []
        for ref, net in networks.items():
            if net["other_config"].get("is_host_internal_management_network") == "true":
                continue
            on = [p for p in pifs.values() if p["network"] == ref]
            vlans = {int(p["VLAN"]) for p in on if int(p["VLAN"]) >= 0}
            where = sorted({host_names[p["host"]] for p in on if p["host"] in host_names})
            nets.append(
                TargetNetwork(
                    name=net["name_label"],
                    kind="xapi",
                    nodes=() if len(where) in (0, len(hosts)) else tuple(where),
                    vlan=min(vlans) if vlans else None,
                    uuid=net["uuid"],
                )
            )
        templates = [
            TargetTemplate(name=v["name_label"], uuid=v["uuid"])
            for v in vms.values()
            if v["is_a_template"] and not v.get("is_a_snapshot", False)
        ]
        existing = [
            ExistingVm(
                name=v["name_label"],
                node=host_names.get(v["resident_on"], ""),
                uuid=v["uuid"],
                tags=tuple(sorted(v["tags"])),
            )
            for v in vms.values()
            if _is_vm(v)
        ]
        sw = master.get("software_version", {})
        default_sr = srs.get(pool.get("default_SR", NULL), {})
        extra = {
            "product_brand": sw.get("product_brand", ""),
            "xapi": sw.get("xapi", ""),
            "api_version": f"{master.get('API_version_major', '')}.{master.get('API_version_minor', '')}",
            "default_sr": default_sr.get("name_label", ""),
            "pool_uuid": pool.get("uuid", ""),
            "master": master.get("name_label", ""),
        }
        snap = TargetSnapshot(
            name=self.name,
            kind="xcpng",
            endpoint=self.spec.url,
            version=sw.get("product_version", ""),
            nodes=tuple(sorted(nodes, key=lambda n: n.name)),
            storages=tuple(sorted(storages, key=lambda s: (s.name, s.uuid))),
            networks=tuple(sorted(nets, key=lambda n: (n.name, n.uuid))),
            vms=tuple(sorted(existing, key=lambda v: (v.name, v.uuid))),
            templates=tuple(sorted(templates, key=lambda t: (t.name, t.uuid))),
            pool=pool.get("name_label", ""),
            extra=tuple(sorted(extra.items())),
        )
        log.info("xcpng_snapshot", target=self.name, hosts=len(nodes), srs=len(storages), vms=len(existing))
        return snap

    # -- lookups ------------------------------------------------------------------------------

    def _by_name_or_uuid(self, cls: str, key: str, what: str, **where: Any) -> str:
        """The one ``cls`` whose uuid or name_label is ``key`` (names must be unambiguous)."""
        records = {
            r: rec for r, rec in self._all(cls).items() if all(rec.get(k) == v for k, v in where.items())
        }
        by_uuid = [r for r, rec in records.items() if rec["uuid"] == key]
        if by_uuid:
            return by_uuid[0]
        named = sorted((rec["uuid"], r) for r, rec in records.items() if rec["name_label"] == key)
        if not named:
            raise NotFoundError(f"XCP-ng target {self.name}: no {what} named {key!r}", system=self._system)
        if len(named) > 1:
            raise PermanentError(
                f"XCP-ng target {self.name}: {len(named)} {what}s are named {key!r}",
                system=self._system,
                hint=f"name the {what} by uuid instead: {', '.join(u for u, _ in named)}",
            )
        return named[0][1]

    @property
    def _system(self) -> str:
        return f"xcpng:{self.name}"

    def _vm_ref(self, uuid: str) -> str:
        return str(self.session.call("VM.get_by_uuid", uuid))

    def _tagged(self, cls: str, tag: str, key: str | None = None) -> list[tuple[str, Record]]:
        return sorted(
            (
                (r, rec)
                for r, rec in self._all(cls).items()
                if tag in rec["tags"] and (key is None or rec["other_config"].get(KEY) == key)
            ),
            key=lambda item: item[1]["uuid"],
        )

    def _handle(self, rec: Record, hosts: dict[str, Record] | None = None) -> TargetVm:
        host = (hosts or {}).get(rec["resident_on"], {}).get("name_label", "")
        return TargetVm(
            target=self.name,
            id=rec["uuid"],
            name=rec["name_label"],
            node=host,
            tags=tuple(sorted(rec["tags"])),
        )

    # -- Target protocol ----------------------------------------------------------------------

    def find_vm(
        self, *, name: str | None = None, vmid: int | None = None, tag: str | None = None
    ) -> tuple[TargetVm, ...]:
        if vmid is not None:
            return ()  # XCP-ng has no VMIDs
        hosts = self._all("host")
        found = [
            self._handle(rec, hosts)
            for rec in self._all("VM").values()
            if _is_vm(rec)
            and (name is None or rec["name_label"] == name)
            and (tag is None or tag in rec["tags"])
        ]
        return tuple(sorted(found, key=lambda v: (v.name, v.id)))

    def prepare_disk(self, vm: VmSpec, disk: DiskSpec, intent: Intent) -> DiskLanding:
        """A VDI on ``disk.storage`` of the disk's size, tagged; an existing one from this run is reused."""
        if disk.landing_format not in ("raw", "vhd"):
            raise PermanentError(
                f"XCP-ng imports raw or vhd bytes, not {disk.landing_format} ({vm.name} disk {disk.label})",
                system=self._system,
                hint="plan landing_format raw",
            )
        key = f"{vm.key}/{disk.key}"
        found = self._tagged("VDI", intent.tag, key)
        if found:
            uuid = found[0][1]["uuid"]
            log.info("noop", step="prepare_disk", reason="VDI already created", vdi=uuid)
        else:
            sr = self._by_name_or_uuid("SR", disk.storage, "SR")
            ref = self.session.call(
                "VDI.create",
                {
                    "name_label": disk.name or f"{vm.name} {disk.label}",
                    "name_description": f"migrated from {vm.source}",
                    "SR": sr,
                    "virtual_size": str(disk.size_bytes),
                    "type": "user",
                    "sharable": False,
                    "read_only": False,
                    "other_config": {KEY: key},
                    "xenstore_data": {},
                    "sm_config": {},
                    "tags": [intent.tag],
                },
            )
            uuid = str(self.session.call("VDI.get_uuid", ref))
            intent.note("vdi", uuid)
            log.info("xcpng_vdi_created", vdi=uuid, sr=disk.storage, bytes=disk.size_bytes)
        return DiskLanding(
            disk_key=disk.key,
            target=self.name,
            ref=uuid,
            format=disk.landing_format,
            size_bytes=disk.size_bytes,
            resumable=False,
            temporary=False,
        )

    def receive_disk(self, landing: DiskLanding, offset: int = 0, *, length: int | None = None) -> VdiUpload:
        """A sink into the landing's VDI; ``length`` is the byte count to send (a VHD's file size)."""
        if offset:
            raise PermanentError(
                f"XCP-ng imports cannot resume at byte {offset}; send the whole disk again",
                system=self._system,
            )
        if landing.format != "vhd" and length not in (None, landing.size_bytes):
            raise PermanentError(
                f"a raw import into VDI {landing.ref} takes the disk's {landing.size_bytes} bytes, "
                f"not {length}",
                system=self._system,
            )
        vdi = str(self.session.call("VDI.get_by_uuid", landing.ref))
        length = landing.size_bytes if length is None else length
        return VdiUpload(self.session, vdi, length, fmt="vhd" if landing.format == "vhd" else "raw")

    def landing_digest(self, landing: DiskLanding) -> str | None:
        """None: reading a VDI back means exporting it over HTTP, as costly as the upload itself."""
        return None

    def create_vm(self, vm: VmSpec, intent: Intent) -> tuple[TargetVm, tuple[CreatedObject, ...]]:
        """Clone ``vm.template``, size it, tag it and give it its NICs (no disks: see attach_disks)."""
        found = self._tagged("VM", intent.tag, vm.key)
        if found:
            ref, rec = found[0]
            log.info("noop", step="create_vm", reason="VM already created", vm=rec["uuid"])
        else:
            template = self._by_name_or_uuid("VM", vm.template, "template", is_a_template=True)
            ref = str(self.session.call("VM.clone", template, vm.name))
            rec = self.session.call("VM.get_record", ref)
            intent.note("vm", rec["uuid"])
            # Tagged first, so that a crash from here on leaves a VM rollback can find.
            self.session.call("VM.set_tags", ref, [intent.tag])
            other = {k: v for k, v in rec["other_config"].items() if k not in ("disks", "install-methods")}
            self.session.call("VM.set_other_config", ref, other | {KEY: vm.key})
            self.session.call("VM.provision", ref)  # no "disks" left: it only turns the template into a VM
            self._shape(ref, rec, vm)
            rec = self.session.call("VM.get_record", ref)
            log.info("xcpng_vm_created", vm=vm.name, uuid=rec["uuid"], template=vm.template)
        created = [CreatedObject(kind="vm", id=rec["uuid"], target=self.name, vm=vm.key)]
        created += self._ensure_nics(ref, vm)
        return self._handle(rec), tuple(created)

    def _shape(self, ref: str, rec: Record, vm: VmSpec) -> None:
        """Apply the plan's settings (XcpngConfig by XAPI name; ``map:key`` entries merge into maps)."""
        call = self.session.call
        plain: dict[str, str] = {}
        maps: dict[str, dict[str, str]] = {}
        for name, value in vm.settings:
            field, colon, key = name.partition(":")
            if colon:
                maps.setdefault(field, {})[key] = value
            else:
                plain[name] = value
        if "name_description" in plain:
            call("VM.set_name_description", ref, plain["name_description"])
        limits = ("memory_static_min", "memory_static_max", "memory_dynamic_min", "memory_dynamic_max")
        if all(k in plain for k in limits):
            call("VM.set_memory_limits", ref, *(plain[k] for k in limits))
        vcpus = {k: plain[k] for k in ("vcpus_max", "vcpus_at_startup") if k in plain}
        # VCPUs_at_startup <= VCPUs_max holds after every single call.
        grow = int(vcpus.get("vcpus_max", "0")) > int(rec["VCPUs_max"])
        for key in ("vcpus_max", "vcpus_at_startup") if grow else ("vcpus_at_startup", "vcpus_max"):
            if key in vcpus:
                call("VM.set_VCPUs_max" if key == "vcpus_max" else "VM.set_VCPUs_at_startup", ref, vcpus[key])
        if "hvm_boot_policy" in plain:
            call("VM.set_HVM_boot_policy", ref, plain["hvm_boot_policy"])
        for field, method in (("hvm_boot_params", "VM.set_HVM_boot_params"), ("platform", "VM.set_platform")):
            if field in maps:
                current = rec["HVM_boot_params" if field == "hvm_boot_params" else field]
                call(method, ref, dict(current, **maps[field]))
        if vm.node:
            call("VM.set_affinity", ref, self._by_name_or_uuid("host", vm.node, "host"))

    def _ensure_nics(self, ref: str, vm: VmSpec) -> list[CreatedObject]:
        present = {
            rec["device"]: rec
            for rec in (self.session.call("VIF.get_record", v) for v in self.session.call("VM.get_VIFs", ref))
        }
        created = []
        for index, nic in enumerate(vm.nics):
            device = nic.slot or str(index)
            if device in present:
                uuid = present[device]["uuid"]
            else:
                net = self._by_name_or_uuid("network", nic.network, "network")
                vif = self.session.call(
                    "VIF.create",
                    {
                        "device": device,
                        "network": net,
                        "VM": ref,
                        "MAC": nic.mac.lower(),  # "" lets xapi generate one
                        "MTU": str(self.session.call("network.get_MTU", net)),
                        "other_config": {KEY: nic.key},
                        "qos_algorithm_type": "",
                        "qos_algorithm_params": {},
                    },
                )
                uuid = str(self.session.call("VIF.get_uuid", vif))
            created.append(CreatedObject(kind="nic", id=uuid, target=self.name, vm=vm.key))
        return created

    def attach_disks(
        self, vm: TargetVm, disks: Sequence[tuple[DiskSpec, DiskLanding]], intent: Intent
    ) -> tuple[CreatedObject, ...]:
        ref = self._vm_ref(vm.id)
        slots = {
            rec["userdevice"]: rec
            for rec in (self.session.call("VBD.get_record", b) for b in self.session.call("VM.get_VBDs", ref))
        }
        created = []
        for spec, landing in disks:
            vdi = str(self.session.call("VDI.get_by_uuid", landing.ref))
            taken = slots.get(spec.slot)
            if taken is not None and taken["VDI"] != vdi:
                raise PermanentError(
                    f"{vm.name}: VBD slot {spec.slot} already holds another disk",
                    system=self._system,
                    vm=vm.name,
                )
            if taken is None:
                vbd = self.session.call(
                    "VBD.create",
                    {
                        "VM": ref,
                        "VDI": vdi,
                        "userdevice": spec.slot,
                        "bootable": spec.boot,
                        "mode": "RW",
                        "type": "Disk",
                        "empty": False,
                        "unpluggable": False,
                        "other_config": {KEY: spec.key},
                        "qos_algorithm_type": "",
                        "qos_algorithm_params": {},
                    },
                )
                uuid = str(self.session.call("VBD.get_uuid", vbd))
            else:
                uuid = taken["uuid"]
                log.info("noop", step="attach_disk", reason="disk already attached", slot=spec.slot)
            created.append(
                CreatedObject(
                    kind="other",
                    id=uuid,
                    target=self.name,
                    vm=intent.vm,
                    detail=(("class", "VBD"), ("slot", spec.slot)),
                )
            )
        return tuple(created)

    def start_vm(self, vm: TargetVm, intent: Intent) -> None:
        ref = self._vm_ref(vm.id)
        state = self.session.call("VM.get_power_state", ref)
        if state == "Running":
            log.info("noop", step="start_vm", reason="VM already running", vm=vm.name)
        elif state == "Paused":
            self.session.call("VM.unpause", ref)
        else:
            self.session.call("VM.start", ref, False, False)

    def vm_state(self, vm: TargetVm) -> VmState:
        rec = self.session.call("VM.get_record", self._vm_ref(vm.id))
        vbds = [self.session.call("VBD.get_record", b) for b in rec["VBDs"]]
        macs = sorted(self.session.call("VIF.get_MAC", v) for v in rec["VIFs"])
        power = _POWER.get(rec["power_state"], "unknown")
        agent = None if power != "on" else rec["guest_metrics"] != NULL
        return VmState(
            power=power,  # type: ignore[arg-type]
            disk_slots=tuple(sorted((b["userdevice"] for b in vbds if not b["empty"]), key=_slot_key)),
            nic_macs=tuple(macs),
            guest_agent=agent,
            locked=bool(rec["blocked_operations"] or rec["current_operations"]),
        )

    def remove(self, objects: Sequence[CreatedObject]) -> None:
        """Delete ``objects``: running VMs are powered off first, devices and VDIs next, VMs last."""
        rank = {"nic": 0, "other": 1, "landing": 2, "disk": 2, "task": 3, "vm": 4}
        vms = [o for o in objects if o.kind == "vm"]
        for obj in vms:
            ref = self._gone_or("VM", obj.id)
            if ref and self.session.call("VM.get_power_state", ref) in ("Running", "Paused"):
                self.session.call("VM.hard_shutdown", ref)
        for obj in sorted(objects, key=lambda o: rank.get(o.kind, 3)):
            cls = {"nic": "VIF", "landing": "VDI", "disk": "VDI", "vm": "VM"}.get(obj.kind)
            cls = cls or dict(obj.detail).get("class")
            if cls is None:
                continue
            ref = self._gone_or(cls, obj.id)
            if ref is not None:
                self.session.call(f"{cls}.destroy", ref)
                log.info("xcpng_removed", cls=cls, uuid=obj.id)

    def _gone_or(self, cls: str, uuid: str) -> str | None:
        try:
            return str(self.session.call(f"{cls}.get_by_uuid", uuid))
        except NotFoundError:
            return None

    def list_tagged(self, run_id: str) -> tuple[CreatedObject, ...]:
        tag = run_tag(run_id)
        found = [
            CreatedObject(kind="vm", id=rec["uuid"], target=self.name, vm=rec["other_config"].get(KEY, ""))
            for _, rec in self._tagged("VM", tag)
            if _is_vm(rec)
        ]
        found += [
            CreatedObject(
                kind="landing",
                id=rec["uuid"],
                target=self.name,
                vm=rec["other_config"].get(KEY, "").rpartition("/")[0],
            )
            for _, rec in self._tagged("VDI", tag)
        ]
        return tuple(found)


def _slot_key(slot: str) -> tuple[int, str]:
    return (int(slot), slot) if slot.isdigit() else (1 << 30, slot)
