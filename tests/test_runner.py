"""The runner with fake step functions: resume after kill -9, retries, failures, waves, concurrency, lock."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from fake_target import FakeMover, FakeSource, FakeTarget, World
from migrate import log as logsetup
from migrate.errors import PermanentError, PlanError, TransientError
from migrate.executor.runner import RetryPolicy, Runner, RunSummary, VmResult, Wave, Work, exit_code
from migrate.executor.state import RunLockedError, StateStore
from migrate.executor.steps import Changed, Noop, Options, Outcome, Services, Step, StepContext, StepName

TESTS = Path(__file__).parent
ALL_STEPS = tuple(StepName)


@dataclass(frozen=True, slots=True)
class FVm:
    key: str
    name: str


PLAN = Work(
    "sha256:plan-a", (Wave(0, 1, (FVm("a", "alpha"), FVm("b", "bravo"))), Wave(1, 1, (FVm("c", "charlie"),)))
)


class Effects:
    """The fake steps' "real state": one line per call and per effect, in a file that survives kill -9."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def add(self, kind: str, vm: str, step: str) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(f"{kind} {vm} {step}\n")

    def lines(self, kind: str) -> Counter[tuple[str, str]]:
        if not self.path.exists():
            return Counter()
        rows = [line.split() for line in self.path.read_text(encoding="utf-8").splitlines()]
        return Counter((vm, step) for k, vm, step in rows if k == kind)


Crash = tuple[str, str, str]  # (vm, step, "before" | "after" its effect)


def _park(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    time.sleep(120)  # the parent kills us here


def fake_steps(
    effects: Effects,
    *,
    crash: Crash | None = None,
    marker: Path | None = None,
    extra: Callable[[StepContext[FVm]], None] | None = None,
) -> list[Step[FVm]]:
    """One idempotent fake function per StepName: it looks at the effects file before acting."""

    def make(name: StepName) -> Callable[[StepContext[FVm]], Outcome]:
        def run(ctx: StepContext[FVm]) -> Outcome:
            vm = ctx.vm.key
            effects.add("call", vm, name)
            if crash == (vm, name, "before") and marker is not None:
                _park(marker)
            if extra is not None:
                extra(ctx)
            if effects.lines("effect")[(vm, name)]:
                return Noop("effect already there")
            effects.add("effect", vm, name)
            if crash == (vm, name, "after") and marker is not None:
                _park(marker)
            return Changed({"step": str(name)})

        return run

    return [Step(name, lambda _vm, _o: True, make(name)) for name in ALL_STEPS]


def _services(world: World) -> Callable[[FVm], Services]:
    source = FakeSource(world)
    target = FakeTarget(world)
    services = Services(source, target, FakeMover(source, target))
    return lambda _vm: services


def make_runner(store: StateStore, steps: list[Step[FVm]], **kw: object) -> Runner[FVm]:
    kw.setdefault("sleep", lambda _s: None)
    return Runner(store, steps, _services(World()), **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state") as s:
        yield s


def child_main(state_dir: str, effects: str, vm: str, step: str, phase: str, marker: str) -> None:
    """Entry point of the child process the crash tests kill."""
    with StateStore(Path(state_dir)) as store:
        steps = fake_steps(Effects(Path(effects)), crash=(vm, step, phase), marker=Path(marker))
        make_runner(store, steps).run(PLAN, plan_path="plan.yaml")


CHILD = (
    f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
    "import test_runner; test_runner.child_main(*sys.argv[1:])"
)


def start_child(tmp_path: Path, crash: Crash) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a run in a child process and wait until it is parked at ``crash``."""
    marker = tmp_path / "parked"
    args = [str(tmp_path / "state"), str(tmp_path / "effects"), *crash, str(marker)]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if child.poll() is not None:
            raise AssertionError(f"child ended before the crash point: {child.stderr.read().decode()}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError("child never reached the crash point")
        time.sleep(0.01)
    return child, marker


def kill(child: subprocess.Popen[bytes]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    if child.stderr is not None:
        child.stderr.close()


@pytest.mark.parametrize("phase", ["before", "after"])
@pytest.mark.parametrize("step", [str(s) for s in ALL_STEPS])
def test_kill_9_at_each_step_then_resume_repeats_no_finished_step(
    tmp_path: Path, step: str, phase: str
) -> None:
    """A run SIGKILLed inside any step resumes: finished steps never run again, each effect happens once."""
    child, _ = start_child(tmp_path, ("b", step, phase))
    kill(child)
    effects = Effects(tmp_path / "effects")
    with StateStore(tmp_path / "state") as store:
        (run,) = store.runs()
        assert run.status == "running"  # the dead child could not say otherwise
        cut = store.step(run.id, "b", step)
        assert cut is not None and cut.status == "running"
        finished = {(s.vm, s.step) for s in store.steps(run.id) if s.finished}
        calls_before = effects.lines("call")

        summary = make_runner(store, fake_steps(effects)).run(PLAN, plan_path="plan.yaml")

        assert (summary.run_id, summary.resumed, summary.status, summary.exit_code) == (
            run.id,
            True,
            "done",
            0,
        )
        calls_after = effects.lines("call")
        for pair in finished:
            assert calls_after[pair] == calls_before[pair], f"{pair} was finished and ran again"
        assert calls_after[("b", step)] == calls_before[("b", step)] + 1
        every = {(vm, str(s)) for vm in "abc" for s in ALL_STEPS}
        assert effects.lines("effect") == Counter(dict.fromkeys(every, 1))
        assert store.step(run.id, "b", step).status == ("noop" if phase == "after" else "done")
        assert all(v.status == "done" for v in store.vms(run.id))

        again = make_runner(store, fake_steps(effects)).run(PLAN, plan_path="plan.yaml")
        assert again.run_id == run.id and [v.executed for v in again.vms] == [0, 0, 0]
        assert effects.lines("call") == calls_after


def test_finished_plan_run_again_calls_no_step_function(store: StateStore, tmp_path: Path) -> None:
    """Running a plan that already finished calls zero step functions and reports every VM done."""
    effects = Effects(tmp_path / "effects")
    first = make_runner(store, fake_steps(effects)).run(PLAN)
    assert first.status == "done" and [v.executed for v in first.vms] == [10, 10, 10]
    calls = effects.lines("call")
    second = make_runner(store, fake_steps(effects)).run(PLAN)
    assert (second.run_id, second.resumed, second.exit_code) == (first.run_id, True, 0)
    assert [(v.status, v.executed) for v in second.vms] == [("done", 0)] * 3
    assert effects.lines("call") == calls


def test_interrupt_inside_a_step_leaves_it_running_and_resume_reruns_it(
    store: StateStore, tmp_path: Path
) -> None:
    """A KeyboardInterrupt in a step stops the run (interrupted), the step stays running and runs again."""
    effects = Effects(tmp_path / "effects")

    def interrupt(ctx: StepContext[FVm]) -> None:
        if ctx.vm.key == "a" and ctx.step == StepName.TRANSFER and ctx.attempt == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_runner(store, fake_steps(effects, extra=interrupt)).run(PLAN)
    (run,) = store.runs()
    assert run.status == "interrupted"
    assert store.step(run.id, "a", "transfer").status == "running"
    assert store.vm(run.id, "b").status == "pending" and store.steps(run.id, "b") == ()

    summary = make_runner(store, fake_steps(effects, extra=interrupt)).run(PLAN)
    assert summary.status == "done"
    row = store.step(run.id, "a", "transfer")
    assert (row.status, row.attempt) == ("done", 2)  # attempts count across the interruption
    assert effects.lines("call")[("a", "transfer")] == 2 and effects.lines("call")[("a", "export")] == 1


def test_transient_faults_are_retried_with_backoff_then_succeed(store: StateStore, tmp_path: Path) -> None:
    """Two TransientErrors, then success: 3 attempts, exponential waits within the policy, step done."""
    effects = Effects(tmp_path / "effects")
    failures = iter([TransientError("503 from pve1"), TransientError("connection reset")])

    def flaky(ctx: StepContext[FVm]) -> None:
        if ctx.vm.key == "a" and ctx.step == StepName.CREATE_VM:
            error = next(failures, None)
            if error is not None:
                raise error

    sleeps: list[float] = []
    policy = RetryPolicy(attempts=5, first_delay_s=1.0, max_delay_s=30.0, jitter_s=0.5)
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        summary = make_runner(store, fake_steps(effects, extra=flaky), retry=policy, sleep=sleeps.append).run(
            PLAN
        )
    assert summary.exit_code == 0
    assert len(sleeps) == 2 and 1.0 <= sleeps[0] <= 1.5 and 2.0 <= sleeps[1] <= 2.5
    row = store.step(summary.run_id, "a", "create_vm")
    assert (row.status, row.attempt) == ("done", 3)
    retries = [e for e in logs if e["event"] == "step_retry"]
    assert [(e["attempt"], e["error"]) for e in retries] == [(1, "503 from pve1"), (2, "connection reset")]
    started = [
        e["attempt"]
        for e in logs
        if e["event"] == "step_started" and e.get("step") == "create_vm" and e.get("vm") == "a"
    ]
    assert started == [1, 2, 3]


def test_transient_faults_give_up_after_the_bounded_attempts(store: StateStore, tmp_path: Path) -> None:
    """A fault that never clears fails the VM after `attempts` tries, each wait capped at max_delay_s."""
    effects = Effects(tmp_path / "effects")

    def down(ctx: StepContext[FVm]) -> None:
        if ctx.vm.key == "b" and ctx.step == StepName.TRANSFER:
            raise TransientError("node n1 does not answer")

    sleeps: list[float] = []
    policy = RetryPolicy(attempts=4, first_delay_s=2.0, max_delay_s=5.0, jitter_s=1.0)
    summary = make_runner(store, fake_steps(effects, extra=down), retry=policy, sleep=sleeps.append).run(PLAN)
    assert len(sleeps) == 3 and all(s <= 5.0 for s in sleeps) and sleeps[-1] == 5.0
    assert effects.lines("call")[("b", "transfer")] == 4
    (failed,) = summary.failed
    assert (failed.key, failed.failed_step, failed.error) == ("b", "transfer", "node n1 does not answer")
    assert store.step(summary.run_id, "b", "transfer").attempt == 4
    assert summary.exit_code == 3


def test_permanent_fault_fails_one_vm_the_others_complete(store: StateStore, tmp_path: Path) -> None:
    """A PermanentError fails that VM at once (no retry); the others finish; exit 3; resume picks it up."""
    effects = Effects(tmp_path / "effects")
    broken = {"on": True}

    def refuse(ctx: StepContext[FVm]) -> None:
        if broken["on"] and ctx.vm.key == "a" and ctx.step == StepName.ATTACH_DISKS:
            raise PermanentError("storage local-lvm is full", vm="a", system="pve1", hint="free 20 GiB")

    sleeps: list[float] = []
    summary = make_runner(store, fake_steps(effects, extra=refuse), sleep=sleeps.append).run(PLAN)
    assert sleeps == [] and effects.lines("call")[("a", "attach_disks")] == 1
    assert [(v.key, v.status) for v in summary.vms] == [("a", "failed"), ("b", "done"), ("c", "done")]
    assert summary.failed[0].error == "storage local-lvm is full\n  fix: free 20 GiB"
    assert (summary.status, summary.exit_code) == ("partial", 3)
    vm = store.vm(summary.run_id, "a")
    assert (vm.status, vm.phase) == ("failed", "attach_disks")
    assert store.run(summary.run_id).status == "partial"
    assert effects.lines("call")[("a", "start")] == 0

    broken["on"] = False
    resumed = make_runner(store, fake_steps(effects, extra=refuse)).run(PLAN)
    assert resumed.exit_code == 0 and [v.executed for v in resumed.vms] == [4, 0, 0]
    assert effects.lines("call")[("a", "create_vm")] == 1


def test_unexpected_exception_fails_the_vm_with_its_type(store: StateStore, tmp_path: Path) -> None:
    """A bug (not a MigrateError) fails only its VM; the error names the exception type."""
    effects = Effects(tmp_path / "effects")

    def bug(ctx: StepContext[FVm]) -> None:
        if ctx.vm.key == "c":
            raise KeyError("slot")

    summary = make_runner(store, fake_steps(effects, extra=bug)).run(PLAN)
    assert [(v.key, v.status, v.failed_step) for v in summary.vms] == [
        ("a", "done", None),
        ("b", "done", None),
        ("c", "failed", "preflight"),
    ]
    assert summary.failed[0].error == "KeyError: 'slot'"


def test_all_failed_is_exit_1_and_exit_code_mapping() -> None:
    """exit_code: 0 when all are done, 3 when some failed, 1 when all failed."""

    def summary(*statuses: str) -> RunSummary:
        vms = tuple(VmResult(str(i), str(i), 0, s) for i, s in enumerate(statuses))  # type: ignore[arg-type]
        return RunSummary("r", False, "done", vms)

    assert [
        exit_code(summary("done", "done")),
        exit_code(summary("done", "failed")),
        exit_code(summary("failed", "failed")),
        exit_code(summary()),
    ] == [0, 3, 1, 0]


def test_everything_failing_marks_the_run_failed(store: StateStore, tmp_path: Path) -> None:
    """When every VM fails the run's status is failed and the exit code 1."""

    def fail(ctx: StepContext[FVm]) -> None:
        raise PermanentError(f"{ctx.vm.name} is a template")

    summary = make_runner(store, fake_steps(Effects(tmp_path / "e"), extra=fail)).run(PLAN)
    assert (summary.status, summary.exit_code, len(summary.failed)) == ("failed", 1, 3)
    assert store.run(summary.run_id).status == "failed"


def _tracking_steps(peak: Counter[int], seen: list[tuple[int, str, str]]) -> list[Step[FVm]]:
    """Steps that count how many VMs are inside a step at the same time, per wave."""
    lock = threading.Lock()
    inside = [0]

    def run(ctx: StepContext[FVm]) -> Outcome:
        wave = int(ctx.vm.key[1])
        with lock:
            inside[0] += 1
            peak[wave] = max(peak[wave], inside[0])
            seen.append((wave, "start", ctx.vm.key))
        time.sleep(0.03)
        with lock:
            inside[0] -= 1
            seen.append((wave, "end", ctx.vm.key))
        return Changed()

    return [Step(StepName.TRANSFER, lambda _v, _o: True, run), Step(StepName.DONE, lambda _v, _o: True, run)]


def test_concurrency_per_wave_is_respected_and_waves_run_in_order(store: StateStore) -> None:
    """At most `concurrency` VMs of a wave run at once (and that many do); wave 1 starts after wave 0 ends."""
    plan = Work(
        "sha256:conc",
        (
            Wave(1, 3, tuple(FVm(f"w1-{i}", f"y{i}") for i in range(7))),
            Wave(0, 2, tuple(FVm(f"w0-{i}", f"x{i}") for i in range(6))),
        ),
    )
    peak: Counter[int] = Counter()
    seen: list[tuple[int, str, str]] = []
    summary = make_runner(store, _tracking_steps(peak, seen)).run(plan)
    assert summary.exit_code == 0 and [v.wave for v in summary.vms] == [0] * 6 + [1] * 7
    assert (peak[0], peak[1]) == (2, 3)
    last_of_wave0 = max(i for i, (w, _e, _k) in enumerate(seen) if w == 0)
    first_of_wave1 = min(i for i, (w, _e, _k) in enumerate(seen) if w == 1)
    assert last_of_wave0 < first_of_wave1
    assert [v.wave for v in store.vms(summary.run_id)] == [0] * 6 + [1] * 7


def test_a_second_run_of_the_same_plan_is_refused_while_one_runs(tmp_path: Path) -> None:
    """While a run is going (in another process), starting the same plan fails with that run's pid."""
    child, _ = start_child(tmp_path, ("a", "transfer", "before"))
    try:
        with StateStore(tmp_path / "state") as store:
            effects = Effects(tmp_path / "effects")
            with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
                make_runner(store, fake_steps(effects)).run(PLAN)
            assert effects.lines("call")[("a", "transfer")] == 1  # only the child's call
            with pytest.raises(RunLockedError):  # a fresh run id does not get around it
                make_runner(store, fake_steps(effects)).run(PLAN, fresh=True)
    finally:
        kill(child)


def test_resuming_a_run_with_another_plan_is_refused(store: StateStore, tmp_path: Path) -> None:
    """A run id belongs to one plan: resuming it with a plan of another hash raises PlanError."""
    first = make_runner(store, fake_steps(Effects(tmp_path / "e"))).run(PLAN)
    other = Work("sha256:plan-b", PLAN.waves)
    with pytest.raises(PlanError, match=f"run {first.run_id} was started from a plan"):
        make_runner(store, fake_steps(Effects(tmp_path / "e"))).run(other, run_id=first.run_id)


def test_steps_not_applicable_are_skipped_and_not_recorded(store: StateStore, tmp_path: Path) -> None:
    """A step whose `when` is false for a VM is never called nor recorded; options reach the predicate."""
    effects = Effects(tmp_path / "e")
    steps = fake_steps(effects)
    steps[2] = Step(StepName.EXPORT, lambda vm, o: vm.key != "a" and o.shutdown == "guest", steps[2].run)
    summary = make_runner(store, steps, options=Options(shutdown="guest")).run(PLAN)
    assert effects.lines("call")[("a", "export")] == 0 and effects.lines("call")[("b", "export")] == 1
    assert store.step(summary.run_id, "a", "export") is None
    assert [v.executed for v in summary.vms] == [9, 10, 10]


@pytest.fixture
def json_log(tmp_path: Path) -> Iterator[Path]:
    path = logsetup.configure(tmp_path / "run", console=False, level="debug")
    assert path is not None
    yield path
    logsetup.close()
    logsetup.set_run(None)
    structlog.reset_defaults()


def test_log_lines_carry_run_wave_vm_step_and_attempt(
    store: StateStore, tmp_path: Path, json_log: Path
) -> None:
    """Every JSON line has run_id; step lines have wave, vm, step and the attempt number of each try."""
    effects = Effects(tmp_path / "effects")
    failures = iter([TransientError("busy")])

    def flaky(ctx: StepContext[FVm]) -> None:
        if ctx.vm.key == "c" and ctx.step == StepName.START and next(failures, None):
            logging.getLogger("paramiko.transport").warning("foreign library line")
            raise TransientError("VM 105 is locked (clone)")

    summary = make_runner(store, fake_steps(effects, extra=flaky)).run(PLAN)
    lines = [json.loads(line) for line in json_log.read_text().splitlines()]
    assert lines and all(line["run_id"] == summary.run_id for line in lines)
    started = [x for x in lines if x["event"] == "step_started"]
    assert len(started) == 31 and all({"wave", "vm", "step", "attempt"} <= x.keys() for x in started)
    tries = [(x["wave"], x["attempt"]) for x in started if x["vm"] == "c" and x["step"] == "start"]
    assert tries == [(1, 1), (1, 2)]
    (retry,) = [x for x in lines if x["event"] == "step_retry"]
    assert (retry["vm"], retry["step"], retry["attempt"], retry["error"]) == (
        "c",
        "start",
        1,
        "VM 105 is locked (clone)",
    )
    (foreign,) = [x for x in lines if x["event"] == "foreign library line"]
    assert (foreign["vm"], foreign["step"], foreign["logger"]) == ("c", "start", "paramiko.transport")
    assert {x["event"] for x in lines} >= {
        "run_started",
        "wave_started",
        "step_done",
        "vm_done",
        "run_finished",
    }
