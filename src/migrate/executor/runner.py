"""Run a plan: waves in order, at most ``concurrency`` VMs of a wave at once, each VM through
its applicable steps, every step recorded in the state store so a run can always resume.

The runner knows a plan only through three small Protocols (``VmItem``, ``WaveItem``,
``PlanItem``): a VM has a ``key`` and a ``name``, a wave an ``index``, a ``concurrency`` and
its ``vms``, a plan a ``plan_hash`` and its ``waves``. Which steps apply to a VM is the step
table's business (``Step.when``), what a step talks to is ``services(vm)``.

Retries: only ``TransientError``, bounded by ``RetryPolicy`` (attempts, longest wait),
exponential with jitter, each attempt logged with its number. Anything else fails that VM's
step; the VM is marked failed and the run goes on with the others.

Resuming: a step already ``done`` or ``noop`` in the store is skipped; one found ``running``
was cut off by a crash and runs again (step functions are idempotent). Running a finished
plan again therefore calls no step function at all.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import structlog
import tenacity

from migrate import log as logsetup
from migrate.errors import MigrateError, TransientError
from migrate.executor.state import Journal, RunStatus, StateStore
from migrate.executor.steps import Changed, Options, Outcome, Services, Step, StepContext

log = structlog.get_logger(__name__)


class VmItem(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def name(self) -> str: ...


V = TypeVar("V", bound=VmItem)
V_co = TypeVar("V_co", bound=VmItem, covariant=True)


class WaveItem(Protocol[V_co]):
    @property
    def index(self) -> int: ...

    @property
    def concurrency(self) -> int: ...

    @property
    def vms(self) -> Sequence[V_co]: ...


class PlanItem(Protocol[V_co]):
    @property
    def plan_hash(self) -> str: ...

    @property
    def waves(self) -> Sequence[WaveItem[V_co]]: ...


@dataclass(frozen=True, slots=True)
class Wave(Generic[V]):
    """A plain wave, for callers (and tests) whose plan has no wave type of its own."""

    index: int
    concurrency: int
    vms: tuple[V, ...]


@dataclass(frozen=True, slots=True)
class Work(Generic[V]):
    plan_hash: str
    waves: tuple[Wave[V], ...]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5
    first_delay_s: float = 2.0  # the wait before attempt 2; it doubles after
    max_delay_s: float = 60.0
    jitter_s: float = 2.0


VmOutcome = Literal["done", "failed", "stopped"]


@dataclass(frozen=True, slots=True)
class VmResult:
    key: str
    name: str
    wave: int
    status: VmOutcome
    failed_step: str | None = None
    error: str | None = None
    executed: int = 0  # step functions called in this invocation (0 when all were done already)


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: str
    resumed: bool
    status: RunStatus
    vms: tuple[VmResult, ...]

    @property
    def done(self) -> tuple[VmResult, ...]:
        return tuple(v for v in self.vms if v.status == "done")

    @property
    def failed(self) -> tuple[VmResult, ...]:
        return tuple(v for v in self.vms if v.status == "failed")

    @property
    def exit_code(self) -> int:
        return exit_code(self)


def exit_code(summary: RunSummary) -> int:
    """0 every VM done, 3 some failed, 1 all failed."""
    if not summary.failed:
        return 0
    return 1 if not summary.done else 3


def _run_status(results: Sequence[VmResult]) -> RunStatus:
    failed = sum(r.status == "failed" for r in results)
    if failed == 0:
        return "done"
    return "failed" if failed == len(results) else "partial"


def _error_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, MigrateError) else f"{type(exc).__name__}: {exc}"
    return logsetup.mask_text(text)


class Runner(Generic[V]):
    def __init__(
        self,
        store: StateStore,
        steps: Sequence[Step[V]],
        services: Callable[[V], Services],
        *,
        options: Options | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._store = store
        self._steps = tuple(steps)
        self._services = services
        self._options = options or Options()
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._stop = threading.Event()

    def run(
        self, plan: PlanItem[V], *, plan_path: str = "", run_id: str | None = None, fresh: bool = False
    ) -> RunSummary:
        """Run (or resume) the plan; ``run_id`` picks a run, else the plan's latest run continues."""
        store = self._store
        run_id = store.choose_run_id(plan.plan_hash, run_id, fresh=fresh)
        logsetup.set_run(run_id)
        with store.lock(plan.plan_hash, run_id):
            _, resumed = store.begin_run(run_id, plan.plan_hash, plan_path)
            waves = sorted(plan.waves, key=lambda w: w.index)
            store.register_vms(run_id, [(vm.key, vm.name, w.index) for w in waves for vm in w.vms])
            log.info(
                "run_resumed" if resumed else "run_started",
                plan_hash=plan.plan_hash,
                plan=plan_path,
                waves=len(waves),
                vms=sum(len(w.vms) for w in waves),
            )
            self._stop.clear()
            results: list[VmResult] = []
            try:
                for wave in waves:
                    with logsetup.bound(wave=wave.index):
                        results.extend(self._run_wave(run_id, wave))
            except BaseException as exc:
                store.end_run(run_id, "interrupted")
                log.warning("run_interrupted", reason=type(exc).__name__)
                raise
            status = _run_status(results)
            store.end_run(run_id, status)
            summary = RunSummary(run_id, resumed, status, tuple(results))
            log.info(
                "run_finished",
                status=status,
                done=len(summary.done),
                failed=len(summary.failed),
                failed_vms=[v.key for v in summary.failed],
                exit_code=summary.exit_code,
            )
            return summary

    def _run_wave(self, run_id: str, wave: WaveItem[V]) -> list[VmResult]:
        log.info("wave_started", vms=len(wave.vms), concurrency=wave.concurrency)
        order = {vm.key: i for i, vm in enumerate(wave.vms)}
        results: list[VmResult] = []
        with ThreadPoolExecutor(
            max_workers=max(1, wave.concurrency), thread_name_prefix=f"wave{wave.index}"
        ) as pool:
            # Each VM gets its own copy of the context, so run_id and wave follow it into the thread.
            futures = [
                pool.submit(contextvars.copy_context().run, self._run_vm, run_id, wave.index, vm)
                for vm in wave.vms
            ]
            try:
                results.extend(f.result() for f in as_completed(futures))
            except BaseException as exc:
                # Ctrl-C or a crash: VMs not started stay pending, running ones stop after their step.
                self._stop.set()
                log.warning(
                    "run_stopping", reason=type(exc).__name__, hint="waiting for running steps to end"
                )
                for future in futures:
                    future.cancel()
                raise
        results.sort(key=lambda r: order[r.key])
        log.info(
            "wave_finished",
            done=sum(r.status == "done" for r in results),
            failed=sum(r.status == "failed" for r in results),
        )
        return results

    def _run_vm(self, run_id: str, wave: int, vm: V) -> VmResult:
        store = self._store
        with logsetup.bound(vm=vm.key):
            try:
                services = self._services(vm)
                steps = [s for s in self._steps if s.when(vm, self._options)]
            except Exception as exc:
                error = _error_text(exc)
                store.set_vm(run_id, vm.key, "failed", "setup", error)
                log.error("vm_failed", phase="setup", error=error)
                return VmResult(vm.key, vm.name, wave, "failed", "setup", error)
            executed = 0
            for step in steps:
                if self._stop.is_set():
                    return VmResult(vm.key, vm.name, wave, "stopped", executed=executed)
                previous = store.step(run_id, vm.key, step.name)
                if previous is not None and previous.finished:
                    continue
                if previous is not None and previous.status == "running":
                    log.warning("step_cut_off", step=step.name, attempt=previous.attempt)
                base = previous.attempt if previous is not None else 0
                with logsetup.bound(step=step.name):
                    try:
                        outcome = self._attempts(run_id, vm, step, services, base)
                    except Exception as exc:
                        error = _error_text(exc)
                        store.step_failed(run_id, vm.key, step.name, error)
                        # A MigrateError says what to do; anything else is a bug: keep its trace.
                        log.error("step_failed", error=error, exc_info=not isinstance(exc, MigrateError))
                        return VmResult(vm.key, vm.name, wave, "failed", step.name, error, executed)
                    except BaseException:
                        # Stop this worker's next VM too, before the main thread even hears of it.
                        self._stop.set()
                        raise
                executed += 1
                if isinstance(outcome, Changed):
                    store.step_finished(run_id, vm.key, step.name, "done", outcome.detail)
                    log.info("step_done", detail=outcome.detail)
                else:
                    store.step_finished(run_id, vm.key, step.name, "noop", {"reason": outcome.reason})
                    log.info("step_noop", reason=outcome.reason)
            store.set_vm(run_id, vm.key, "done", steps[-1].name if steps else "")
            log.info("vm_done", executed=executed)
            return VmResult(vm.key, vm.name, wave, "done", executed=executed)

    def _attempts(self, run_id: str, vm: V, step: Step[V], services: Services, base: int) -> Outcome:
        policy = self._retry
        count = 0

        def attempt_once() -> Outcome:
            nonlocal count
            count += 1
            number = base + count
            with logsetup.bound(attempt=number):
                self._store.step_started(run_id, vm.key, step.name, number)
                log.info("step_started")
                journal = Journal(self._store, run_id, vm.key, step.name)
                ctx = StepContext(run_id, vm, step.name, number, self._options, journal, services)
                return step.run(ctx)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "step_retry",
                attempt=base + state.attempt_number,
                error=_error_text(error) if error else "",
                wait_s=round(wait, 3),
                attempts=policy.attempts,
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=tenacity.stop_after_attempt(policy.attempts),
            wait=tenacity.wait_exponential_jitter(
                multiplier=policy.first_delay_s, max=policy.max_delay_s, jitter=policy.jitter_s
            ),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(attempt_once)
