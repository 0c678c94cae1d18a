"""Undo a run: remove what it created on the targets (only objects carrying its tag) and give the
source VMs back the power state they had before the run.

What was created is known twice: the state store's created-objects table, and the targets'
own view of objects tagged with the run (``Target.list_tagged``), which also catches an
object whose create request was sent but whose answer never came back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from migrate.connectors.base import CreatedObject, Source, Target, VmSpec
from migrate.errors import MigrateError
from migrate.executor.fromplan import vm_spec
from migrate.executor.state import StateStore
from migrate.plan import Plan

log = structlog.get_logger(__name__)


class Connectors(Protocol):
    def source(self) -> Source: ...

    def target(self, name: str) -> Target: ...


@dataclass
class RollbackResult:
    lines: list[str] = field(default_factory=list)
    ok: bool = True


def _selected(plan: Plan, only: Sequence[str]) -> list[VmSpec]:
    specs = [vm_spec(plan, vm) for vm in plan.vms]
    if not only:
        return specs
    wanted = set(only)
    chosen = [s for s in specs if s.name in wanted or s.source_name in wanted or s.key in wanted]
    missing = wanted - {s.name for s in chosen} - {s.source_name for s in chosen} - {s.key for s in chosen}
    if missing:
        raise MigrateError(
            f"the plan has no VM named {', '.join(sorted(missing))}",
            hint="use the names `migrate status RUN` shows",
        )
    return chosen


def roll_back(
    store: StateStore, run_id: str, plan: Plan, connectors: Connectors, only: Sequence[str] = ()
) -> RollbackResult:
    result = RollbackResult()
    for spec in _selected(plan, only):
        target = connectors.target(spec.target)
        recorded = [row.obj for row in store.objects(run_id, spec.key)]
        tagged = [o for o in target.list_tagged(run_id) if o.vm in ("", spec.key)]
        # Objects the store knows first (it has their kinds and order), then any the target adds.
        known = {(o.kind, o.id) for o in recorded}
        objects = recorded + [o for o in tagged if (o.kind, o.id) not in known and _belongs(o, spec)]
        try:
            if objects:
                target.remove(objects)
                for obj in objects:
                    store.mark_removed(run_id, obj)
            result.lines.append(f"{spec.name}: removed {len(objects)} object(s) from {spec.target}")
            log.info("rollback_removed", vm=spec.key, objects=len(objects))
            _restore_power(store, run_id, spec, connectors.source(), result)
        except MigrateError as exc:
            result.ok = False
            result.lines.append(f"{spec.name}: rollback failed: {exc}")
            log.error("rollback_failed", vm=spec.key, error=str(exc))
        store.set_vm(run_id, spec.key, "rolled-back" if result.ok else "failed", "rollback")
    if all(row.status == "rolled-back" for row in store.vms(run_id)):
        store.end_run(run_id, "rolled-back")
    return result


def _belongs(obj: CreatedObject, spec: VmSpec) -> bool:
    return obj.vm == spec.key or (obj.kind == "vm" and obj.id == str(spec.vmid or ""))


def _restore_power(
    store: StateStore, run_id: str, spec: VmSpec, source: Source, result: RollbackResult
) -> None:
    preflight = store.step(run_id, spec.key, "preflight")
    shutdown = store.step(run_id, spec.key, "shutdown_source")
    was = preflight.detail.get("source_power") if preflight is not None else None
    if was != "on" or shutdown is None or shutdown.status != "done":
        return
    if source.power_state(spec) == "on":
        return
    power_on = getattr(source, "power_on", None)
    if power_on is None:
        result.lines.append(f"{spec.name}: was running before the run; power it on in vSphere")
        return
    power_on(spec)
    result.lines.append(f"{spec.name}: source VM powered on again, as before the run")
