"""The steps of one VM's migration, as data: ``STEPS`` is a table of ``Step(name, when, run)``.

``when(vm, options)`` says whether a step applies to a VM (a flat disk streams straight to
the target, so export and convert do not apply to it); the runner walks the table in order.

The contract of every step function:

* **look at the real state first** (the source's power state, the VM on the target, the
  landings tagged with the run) and return ``Noop(reason)`` when there is nothing to do;
* otherwise record an intent (``ctx.journal.intend``) before each create/import/start, do the
  work, record what was created, and return ``Changed(detail)``;
* be safe to run again from the top: a step found ``running`` when a run resumes was cut off
  and is run again;
* raise ``TransientError`` for what may pass (the runner retries) and anything else to fail
  the VM (the run goes on with the others).

Disk bytes (export, convert, send) are the pipeline's job, reached through ``DiskMover``.
Once a disk is sent, ``transfer`` asks the target for the sha256 of what landed
(``Target.landing_digest``) and fails the VM if it differs from the source's, with the
transfer reset so that a resume sends that disk again from its first byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

import structlog

from migrate.connectors.base import (
    CreatedObject,
    DiskLanding,
    DiskSpec,
    ShutdownPolicy,
    Source,
    Target,
    TargetVm,
    VmSpec,
    run_tag,
)
from migrate.errors import PermanentError, PreflightError, StepError, TransientError
from migrate.executor.state import Journal

log = structlog.get_logger(__name__)

V = TypeVar("V")
Verify = Literal["none", "running", "boot"]


class StepName(StrEnum):
    PREFLIGHT = "preflight"
    SHUTDOWN_SOURCE = "shutdown_source"
    EXPORT = "export"
    CONVERT = "convert"
    TRANSFER = "transfer"
    CREATE_VM = "create_vm"
    ATTACH_DISKS = "attach_disks"
    START = "start"
    VERIFY = "verify"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Changed:
    """The step changed something; ``detail`` (JSON-able) goes to the state store and the report."""

    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Noop:
    """The real state already was what the step would make it; ``reason`` says how it looked."""

    reason: str


Outcome = Changed | Noop


@dataclass(frozen=True, slots=True)
class Options:
    """Run-wide choices that steps and their ``when`` predicates read."""

    shutdown: ShutdownPolicy = "guest"
    shutdown_timeout_s: float = 300.0
    start: bool = True  # False keeps every migrated VM off, whatever the plan says
    # none: skip; running: the VM is built as planned and powered as planned; boot: and its
    # guest agent answers (retried as a transient fault until the retry policy gives up).
    verify: Verify = "running"
    staging_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class Sent:
    """What a disk send left in the landing: all bytes from offset 0, and their sha256."""

    bytes: int
    sha256: str


class DiskMover(Protocol):
    """The disk pipeline, as the steps call it; each method is safe to repeat."""

    def export(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        """Copy the disk's datastore files to ``options.staging_dir`` (only disks that need staging)."""
        ...

    def convert(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        """Consolidate the staged files into one raw image (``send`` writes it in the landing's format)."""
        ...

    def send(self, ctx: StepContext[VmSpec], disk: DiskSpec, landing: DiskLanding, offset: int) -> Sent:
        """Write the disk's bytes into ``landing`` from ``offset``; report ``journal.transfer_progress``."""
        ...

    def release(self, ctx: StepContext[VmSpec]) -> int:
        """Delete what this VM staged locally, once it is migrated; returns the bytes freed."""
        ...


@dataclass(frozen=True, slots=True)
class Services:
    """The systems one VM's steps talk to."""

    source: Source
    target: Target
    disks: DiskMover


@dataclass(frozen=True, slots=True)
class StepContext(Generic[V]):
    run_id: str
    vm: V
    step: StepName
    attempt: int
    options: Options
    journal: Journal
    services: Services


Predicate = Callable[[V, Options], bool]
StepFn = Callable[[StepContext[V]], Outcome]


@dataclass(frozen=True, slots=True)
class Step(Generic[V]):
    name: StepName
    when: Predicate[V]
    run: StepFn[V]


def applicable(steps: tuple[Step[V], ...] | list[Step[V]], vm: V, options: Options) -> tuple[Step[V], ...]:
    return tuple(s for s in steps if s.when(vm, options))


# -- predicates -----------------------------------------------------------------------------


def always(_vm: VmSpec, _options: Options) -> bool:
    return True


def has_disks(vm: VmSpec, _options: Options) -> bool:
    return bool(vm.disks)


def needs_staging(vm: VmSpec, _options: Options) -> bool:
    return any(d.needs_staging for d in vm.disks)


def wants_start(vm: VmSpec, options: Options) -> bool:
    return vm.power_on and options.start


def wants_shutdown(_vm: VmSpec, options: Options) -> bool:
    return options.shutdown != "never"


def wants_verify(_vm: VmSpec, options: Options) -> bool:
    return options.verify != "none"


# -- helpers --------------------------------------------------------------------------------


def _ours(ctx: StepContext[VmSpec]) -> TargetVm | None:
    target = ctx.services.target
    found = target.find_vm(name=ctx.vm.name, tag=run_tag(ctx.run_id))
    if len(found) > 1:
        ids = ", ".join(v.id for v in found)
        raise StepError(
            f"{target.name} has {len(found)} VMs named {ctx.vm.name!r} tagged {run_tag(ctx.run_id)} ({ids})",
            vm=ctx.vm.key,
            step=ctx.step,
            system=target.name,
            hint="remove the extra ones by hand (rollback lists them), then resume the run",
        )
    return found[0] if found else None


def _require_ours(ctx: StepContext[VmSpec]) -> TargetVm:
    found = _ours(ctx)
    if found is None:
        raise StepError(
            f"VM {ctx.vm.name!r} made by this run is not on {ctx.services.target.name} any more",
            vm=ctx.vm.key,
            step=ctx.step,
            system=ctx.services.target.name,
            hint="it was removed outside migrate; roll the VM back and run it again",
        )
    return found


def _per_disk(ctx: StepContext[VmSpec], call: Callable[[DiskSpec], Outcome], what: str) -> Outcome:
    changed: dict[str, Any] = {}
    reasons: list[str] = []
    for disk in ctx.vm.disks:
        if not disk.needs_staging:
            continue
        outcome = call(disk)
        if isinstance(outcome, Changed):
            changed[disk.key] = outcome.detail
        else:
            reasons.append(f"{disk.label}: {outcome.reason}")
    return Changed({"disks": changed}) if changed else Noop(f"nothing to {what}: " + "; ".join(reasons))


# -- the steps ------------------------------------------------------------------------------


def preflight(ctx: StepContext[VmSpec]) -> Outcome:
    vm, source, target = ctx.vm, ctx.services.source, ctx.services.target
    power = source.power_state(vm)
    tag = run_tag(ctx.run_id)
    clashes = {v.id: v for v in target.find_vm(name=vm.name) if tag not in v.tags}
    if vm.vmid is not None and (holders := [v for v in target.find_vm(vmid=vm.vmid) if tag not in v.tags]):
        # Not a blocker: create_vm picks the next free VMID (noted in its intent) and leaves that VM be.
        log.warning("vmid_taken", vmid=vm.vmid, by=holders[0].name, hint="a free VMID will be used instead")
    if clashes:
        taken = ", ".join(f"{v.name!r} ({v.id})" for v in clashes.values())
        raise PreflightError(
            f"{target.name} already has {taken}, which clashes with {vm.name!r}",
            vm=vm.key,
            step=ctx.step,
            system=target.name,
            hint="migrate never overwrites a VM: rename or remove that one, or plan again",
        )
    if power != "off" and ctx.options.shutdown == "require-off":
        raise PreflightError(
            f"source VM {vm.source_name or vm.name!r} is {power} and the shutdown policy is require-off",
            vm=vm.key,
            step=ctx.step,
            system=source.name,
            hint="power it off first, or choose shutdown policy guest or guest-then-force",
        )
    return Changed({"source_power": power})


def shutdown_source(ctx: StepContext[VmSpec]) -> Outcome:
    vm, source, options = ctx.vm, ctx.services.source, ctx.options
    power = source.power_state(vm)
    if power == "off":
        ctx.journal.settle_open("power_off")
        return Noop("source VM is already powered off")
    if options.shutdown == "require-off":
        raise StepError(
            f"source VM {vm.source_name or vm.name!r} is {power}; policy require-off never powers it off",
            vm=vm.key,
            step=ctx.step,
            system=source.name,
            hint="power it off, then resume the run",
        )
    ctx.journal.settle_open("power_off", ok=False)  # an earlier request, if any, did not take
    intent = ctx.journal.intend("power_off", vm.source_moref, policy=options.shutdown)
    reached = source.power_off(vm, options.shutdown, options.shutdown_timeout_s)
    ctx.journal.settle(intent, ok=reached == "off")
    if reached != "off":
        raise StepError(
            f"source VM {vm.source_name or vm.name!r} is still {reached} after a {options.shutdown} shutdown "
            f"({options.shutdown_timeout_s:.0f}s)",
            vm=vm.key,
            step=ctx.step,
            system=source.name,
            hint="shut the guest down by hand, or use shutdown policy guest-then-force",
        )
    return Changed({"was": power, "policy": options.shutdown})


def export(ctx: StepContext[VmSpec]) -> Outcome:
    return _per_disk(ctx, lambda disk: ctx.services.disks.export(ctx, disk), "export")


def convert(ctx: StepContext[VmSpec]) -> Outcome:
    return _per_disk(ctx, lambda disk: ctx.services.disks.convert(ctx, disk), "convert")


def transfer(ctx: StepContext[VmSpec]) -> Outcome:
    vm, target, journal = ctx.vm, ctx.services.target, ctx.journal
    present = {o.id for o in target.list_tagged(ctx.run_id) if o.kind in ("landing", "disk")}
    moved: dict[str, Any] = {}
    for disk in vm.disks:
        row = journal.transfer(disk.key)
        if row is not None and row.landing.ref not in present:
            log.warning("landing_gone", disk=disk.key, landing=row.landing.ref)
            row = None
        if row is not None and row.complete:
            continue
        if row is not None:
            landing = row.landing
        else:
            intent = journal.intend("prepare_disk", disk.key, storage=disk.storage)
            landing = target.prepare_disk(vm, disk, intent)
            journal.created(landing.as_object(vm.key))
            # prepare_disk finds what an earlier, cut-off request made: that one took effect too.
            journal.settle_open("prepare_disk", key=disk.key)
        offset = row.bytes_done if row is not None and landing.resumable else 0
        if offset == 0:
            journal.transfer_begin(landing, disk.size_bytes)
        else:
            log.info("transfer_resumed", disk=disk.key, offset=offset)
        sent = ctx.services.disks.send(ctx, disk, landing, offset)
        verified = _verify_landing(ctx, disk, landing, sent)
        journal.transfer_done(disk.key, sent.bytes, sent.sha256)
        moved[disk.key] = {
            "landing": landing.ref,
            "bytes": sent.bytes,
            "sha256": sent.sha256,
            "from": offset,
            "verified": verified,
        }
    if not moved:
        return Noop(f"all {len(vm.disks)} disks already landed on {target.name}")
    return Changed({"disks": moved})


def _verify_landing(ctx: StepContext[VmSpec], disk: DiskSpec, landing: DiskLanding, sent: Sent) -> bool:
    """Compare what landed with the source's sha256; False when the target cannot read it back."""
    target = ctx.services.target
    landed = target.landing_digest(landing)
    if landed is None:
        log.info("disk_unverified", disk=disk.key, landing=landing.ref, target=target.name)
        return False
    if landed != sent.sha256:
        # Nothing of this landing can be trusted, not even a prefix: a resume sends it all again.
        ctx.journal.transfer_begin(landing, disk.size_bytes)
        raise PermanentError(
            f"disk {disk.label!r} of {ctx.vm.name!r} landed on {target.name} ({landing.ref}) with sha256 "
            f"{landed}, but the source's is {sent.sha256}",
            vm=ctx.vm.key,
            step=ctx.step,
            system=target.name,
            hint="the bytes were damaged on the way or on the target's storage; check that storage, then "
            "resume the run: the disk is sent again from its first byte",
        )
    log.info("disk_verified", disk=disk.key, landing=landing.ref, sha256=landed)
    return True


def create_vm(ctx: StepContext[VmSpec]) -> Outcome:
    vm, target, journal = ctx.vm, ctx.services.target, ctx.journal
    found = _ours(ctx)
    if found is not None:
        # A crash after the request but before the answer lands here: the VM is there, tagged.
        journal.created(CreatedObject("vm", found.id, target.name, found.node, vm.key))
        journal.settle_open("create_vm")
        return Noop(f"VM {found.name!r} ({found.id}) already exists on {target.name}")
    journal.settle_open("create_vm", ok=False)  # the VM is not there: earlier requests did not take
    intent = journal.intend("create_vm", vm.name, vmid="" if vm.vmid is None else str(vm.vmid))
    made, extras = target.create_vm(vm, intent)
    journal.created(CreatedObject("vm", made.id, target.name, made.node, vm.key), *extras)
    journal.settle(intent)
    return Changed({"id": made.id, "node": made.node})


def attach_disks(ctx: StepContext[VmSpec]) -> Outcome:
    vm, target, journal = ctx.vm, ctx.services.target, ctx.journal
    made = _require_ours(ctx)
    state = target.vm_state(made)
    missing = [d for d in vm.disks if d.slot not in state.disk_slots]
    if not missing:
        journal.settle_open("attach_disks")
        return Noop(f"all {len(vm.disks)} disks are attached")
    pairs: list[tuple[DiskSpec, DiskLanding]] = []
    for disk in missing:
        row = journal.transfer(disk.key)
        if row is None or not row.complete:
            raise StepError(
                f"disk {disk.label!r} of {vm.name!r} has no finished transfer to attach",
                vm=vm.key,
                step=ctx.step,
                system=target.name,
                hint="resume the run so the transfer step completes first",
            )
        pairs.append((disk, row.landing))
    journal.settle_open("attach_disks", ok=False)
    intent = journal.intend("attach_disks", made.id, slots=",".join(d.slot for d in missing))
    journal.created(*target.attach_disks(made, pairs, intent))
    journal.settle(intent)
    return Changed({"attached": [d.slot for d in missing]})


def start(ctx: StepContext[VmSpec]) -> Outcome:
    target, journal = ctx.services.target, ctx.journal
    made = _require_ours(ctx)
    if target.vm_state(made).power == "on":
        journal.settle_open("start_vm")
        return Noop(f"VM {made.name!r} ({made.id}) is already running")
    journal.settle_open("start_vm", ok=False)
    intent = journal.intend("start_vm", made.id)
    target.start_vm(made, intent)
    journal.settle(intent)
    return Changed({"id": made.id})


def verify(ctx: StepContext[VmSpec]) -> Outcome:
    vm, target = ctx.vm, ctx.services.target
    made = _require_ours(ctx)
    state = target.vm_state(made)
    want_power = "on" if wants_start(vm, ctx.options) else "off"
    problems = []
    if state.power != want_power:
        problems.append(f"power is {state.power}, expected {want_power}")
    if missing := [d.slot for d in vm.disks if d.slot not in state.disk_slots]:
        problems.append(f"disks missing at {', '.join(missing)}")
    macs = {m.lower() for m in state.nic_macs}
    if missing_macs := [n.mac for n in vm.nics if n.mac and n.mac.lower() not in macs]:
        problems.append(f"NICs missing: {', '.join(missing_macs)}")
    if problems:
        raise StepError(
            f"VM {vm.name!r} ({made.id}) on {target.name} is not as planned: " + "; ".join(problems),
            vm=vm.key,
            step=ctx.step,
            system=target.name,
            hint="look at the VM on the target; fix it by hand or roll it back and resume",
        )
    if ctx.options.verify == "boot" and want_power == "on" and state.guest_agent is not True:
        # Booting takes a while: "not yet" is transient, and the retry policy bounds the wait.
        raise TransientError(
            f"the guest agent of {vm.name!r} ({made.id}) does not answer yet",
            vm=vm.key,
            step=ctx.step,
            system=target.name,
            hint="check the VM's console; the guest may lack the agent or fail to boot",
        )
    return Changed(
        {"power": state.power, "disks": len(vm.disks), "nics": len(vm.nics), "guest_agent": state.guest_agent}
    )


def done(ctx: StepContext[VmSpec]) -> Outcome:
    # Staging is freed per VM, so a long run's staging area holds only the VMs still in flight.
    freed = ctx.services.disks.release(ctx)
    temporary = [o for o in ctx.journal.objects() if o.temporary]
    if temporary:
        ctx.services.target.remove(temporary)
        ctx.journal.removed(*temporary)
    if not temporary and not freed:
        return Noop("no temporary objects or staged files to clean up")
    return Changed({"removed": [o.id for o in temporary], "staging_bytes_freed": freed})


STEPS: tuple[Step[VmSpec], ...] = (
    Step(StepName.PREFLIGHT, always, preflight),
    Step(StepName.SHUTDOWN_SOURCE, wants_shutdown, shutdown_source),
    Step(StepName.EXPORT, needs_staging, export),
    Step(StepName.CONVERT, needs_staging, convert),
    Step(StepName.TRANSFER, has_disks, transfer),
    Step(StepName.CREATE_VM, always, create_vm),
    Step(StepName.ATTACH_DISKS, has_disks, attach_disks),
    Step(StepName.START, wants_start, start),
    Step(StepName.VERIFY, wants_verify, verify),
    Step(StepName.DONE, always, done),
)
