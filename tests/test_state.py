"""The state store: schema, typed rows, transactions that are on disk at once, the run lock."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate.connectors.base import CreatedObject, DiskLanding
from migrate.errors import MigrateError, PlanError
from migrate.executor.state import SCHEMA_VERSION, RunLockedError, StateStore, StepRow

SRC = Path(__file__).parents[1] / "src"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state") as s:
        yield s


def _other(store: StateStore) -> sqlite3.Connection:
    """A second, independent connection: sees only what was committed."""
    return sqlite3.connect(store.path)


def test_new_store_has_current_schema_wal_and_full_sync(store: StateStore) -> None:
    """A fresh state.db is at SCHEMA_VERSION, in WAL mode, with synchronous=FULL on our connection."""
    assert store.schema_version == SCHEMA_VERSION == 1
    assert store._query("PRAGMA journal_mode")[0][0] == "wal"
    assert store._query("PRAGMA synchronous")[0][0] == 2  # FULL
    tables = {r[0] for r in store._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "vms", "steps", "intents", "objects", "transfers"} <= tables


def test_reopening_keeps_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    """Opening an existing store keeps its rows and its schema version."""
    with StateStore(tmp_path) as s:
        s.begin_run("r1", "sha256:aa", "plan.yaml")
    with StateStore(tmp_path) as s:
        run = s.run("r1")
        assert run is not None and run.plan_path == "plan.yaml" and s.schema_version == 1


def test_store_from_a_newer_migrate_is_refused(tmp_path: Path) -> None:
    """A state.db with a higher schema version is refused with a message naming both versions."""
    StateStore(tmp_path).close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("PRAGMA user_version = 7")
    db.close()
    with pytest.raises(MigrateError, match=r"schema version 7; this migrate knows up to 1") as err:
        StateStore(tmp_path)
    assert "upgrade migrate" in str(err.value)


def test_begin_run_creates_then_resumes_and_refuses_another_plan(store: StateStore) -> None:
    """begin_run creates a run once, resumes it after, and refuses it for a plan with another hash."""
    run, resumed = store.begin_run("r1", "sha256:aaaa", "a.yaml")
    assert (run.status, resumed) == ("running", False)
    store.end_run("r1", "partial")
    run, resumed = store.begin_run("r1", "sha256:aaaa", "a.yaml")
    assert (run.status, run.ended, resumed) == ("running", None, True)
    with pytest.raises(PlanError, match="run r1 was started from a plan with hash sha256:aaaa"):
        store.begin_run("r1", "sha256:bbbb", "b.yaml")


def test_choose_run_id_continues_latest_unless_fresh(store: StateStore) -> None:
    """Without --run-id the plan's latest run continues; fresh=True or another plan gets a new id."""
    first = store.choose_run_id("sha256:aa")
    store.begin_run(first, "sha256:aa", "p")
    assert store.choose_run_id("sha256:aa") == first
    assert store.choose_run_id("sha256:aa", "explicit") == "explicit"
    fresh = store.choose_run_id("sha256:aa", fresh=True)
    other = store.choose_run_id("sha256:bb")
    assert len({first, fresh, other}) == 3 and fresh.startswith("r")


def test_step_lifecycle_rows_are_typed_and_failure_fails_the_vm(store: StateStore) -> None:
    """Steps move running -> done/noop/failed with attempt, detail and error; a failure marks the VM."""
    store.begin_run("r1", "h", "p")
    store.register_vms("r1", [("vm-1", "web", 0), ("vm-2", "db", 1)])
    store.step_started("r1", "vm-1", "transfer", 1)
    row = store.step("r1", "vm-1", "transfer")
    assert isinstance(row, StepRow) and (row.status, row.attempt, row.ended) == ("running", 1, None)
    assert store.vm("r1", "vm-1").status == "running"
    store.step_finished("r1", "vm-1", "transfer", "done", {"bytes": 42})
    row = store.step("r1", "vm-1", "transfer")
    assert (row.status, row.detail, row.finished) == ("done", {"bytes": 42}, True)
    store.step_started("r1", "vm-2", "create_vm", 3)
    store.step_failed("r1", "vm-2", "create_vm", "VMID 105 is taken")
    assert store.step("r1", "vm-2", "create_vm").status == "failed"
    vm = store.vm("r1", "vm-2")
    assert (vm.status, vm.phase, vm.error) == ("failed", "create_vm", "VMID 105 is taken")
    assert [v.vm for v in store.vms("r1")] == ["vm-1", "vm-2"]
    # A retried step starts again with its new attempt number and no stale error.
    store.step_started("r1", "vm-2", "create_vm", 4)
    row = store.step("r1", "vm-2", "create_vm")
    assert (row.status, row.attempt, row.error) == ("running", 4, None)


def test_register_vms_keeps_progress_of_an_earlier_attempt(store: StateStore) -> None:
    """Registering the plan's VMs again (on resume) does not reset their status."""
    store.begin_run("r1", "h", "p")
    store.register_vms("r1", [("vm-1", "web", 0)])
    store.set_vm("r1", "vm-1", "done", "done")
    store.register_vms("r1", [("vm-1", "web", 0)])
    assert store.vm("r1", "vm-1").status == "done"


def test_intent_is_committed_before_the_call_returns(store: StateStore) -> None:
    """An intent, its notes and its settlement are visible to another connection at once (committed)."""
    store.begin_run("r1", "h", "p")
    intent_id = store.add_intent("r1", "vm-1", "create_vm", "create_vm", "web", {"vmid": "105"})
    other = _other(store)
    assert other.execute("SELECT kind, key, status FROM intents WHERE id = ?", (intent_id,)).fetchone() == (
        "create_vm",
        "web",
        "open",
    )
    store.note_intent(intent_id, "task", "UPID:n1:0001")
    store.settle_intent(intent_id, "done")
    (row,) = store.intents("r1", "vm-1")
    assert (row.status, row.notes) == ("done", {"vmid": "105", "task": "UPID:n1:0001"})
    assert other.execute("SELECT status FROM intents WHERE id = ?", (intent_id,)).fetchone() == ("done",)
    assert store.intents("r1", status="open") == ()
    other.close()


def test_objects_are_recorded_once_and_marked_removed(store: StateStore) -> None:
    """Recording an object twice keeps one row; a removed object leaves the default listing."""
    store.begin_run("r1", "h", "p")
    vm = CreatedObject("vm", "105", "pve1", "n1", "vm-1")
    landing = CreatedObject(
        "landing",
        "/var/lib/vz/import/x.raw",
        "pve1",
        "n1",
        "vm-1",
        temporary=True,
        detail=(("format", "raw"),),
    )
    store.add_object("r1", vm)
    store.add_object("r1", vm)
    store.add_object("r1", landing)
    assert [r.obj for r in store.objects("r1")] == [vm, landing]
    store.mark_removed("r1", landing)
    assert [r.obj for r in store.objects("r1", "vm-1")] == [vm]
    assert [r.removed is not None for r in store.objects("r1", removed=True)] == [False, True]


def test_transfer_progress_and_restart(store: StateStore) -> None:
    """A transfer records its landing, progress and final sha256; beginning it again restarts at 0."""
    store.begin_run("r1", "h", "p")
    landing = DiskLanding("2000", "pve1", "/land/a.raw", "raw", 4096, "n1", resumable=True, temporary=True)
    store.transfer_begin("r1", "vm-1", landing, 4096)
    store.transfer_progress("r1", "vm-1", "2000", 1024)
    row = store.transfer("r1", "vm-1", "2000")
    assert (row.landing, row.bytes_done, row.complete, row.sha256) == (landing, 1024, False, None)
    store.transfer_done("r1", "vm-1", "2000", 4096, "ab" * 32)
    row = store.transfer("r1", "vm-1", "2000")
    assert (row.bytes_done, row.complete, row.sha256) == (4096, True, "ab" * 32)
    store.transfer_begin("r1", "vm-1", landing, 4096)
    row = store.transfer("r1", "vm-1", "2000")
    assert (row.bytes_done, row.complete, row.sha256) == (0, False, None)


def test_writes_from_many_threads_all_land(store: StateStore) -> None:
    """Concurrent writers (one per VM worker) serialise on the store without losing a row."""
    store.begin_run("r1", "h", "p")
    store.register_vms("r1", [(f"vm-{i}", f"n{i}", 0) for i in range(8)])

    def work(i: int) -> None:
        for step in ("preflight", "transfer", "create_vm", "start"):
            store.step_started("r1", f"vm-{i}", step, 1)
            store.step_finished("r1", f"vm-{i}", step, "done", {"i": i})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.steps("r1")) == 32 and all(s.status == "done" for s in store.steps("r1"))


def test_lock_refuses_a_second_holder_and_is_released_after(store: StateStore) -> None:
    """While one run holds a plan's lock another is refused with pid and run; afterwards it is free."""
    with store.lock("sha256:aa", "r1") as info:
        assert (info.pid, info.run_id, info.stale) == (os.getpid(), "r1", None)
        assert store.lock_holder("sha256:aa") == info.__class__(
            "sha256:aa", "r1", os.getpid(), info.host, info.since
        )
        refused = pytest.raises(RunLockedError, match=rf"already being run by pid {os.getpid()} .*run r1")
        with refused as err, store.lock("sha256:aa", "r2"):
            pass
        assert err.value.exit_code == 2
        with store.lock("sha256:bb", "r3"):  # another plan is not blocked
            pass
    assert store.lock_holder("sha256:aa") is None
    with store.lock("sha256:aa", "r2") as again:
        assert again.stale is None


def test_lock_of_a_killed_process_is_taken_over_and_reported(tmp_path: Path) -> None:
    """A holder killed with SIGKILL never blocks the next run; its leftover record is reported as stale."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(SRC)!r})
        from pathlib import Path
        from migrate.executor.state import StateStore
        store = StateStore(Path({str(tmp_path)!r}))
        with store.lock("sha256:aa", "r-dead"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with StateStore(tmp_path) as store:
            holder = store.lock_holder("sha256:aa")
            assert holder is not None and (holder.pid, holder.run_id) == (child.pid, "r-dead")
            with pytest.raises(RunLockedError, match=f"pid {child.pid}"), store.lock("sha256:aa", "r2"):
                pass
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
            assert store.lock_holder("sha256:aa") is None
            with store.lock("sha256:aa", "r2") as info:
                assert info.stale is not None and (info.stale.pid, info.stale.run_id) == (child.pid, "r-dead")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_rows_written_before_a_kill_survive_it(tmp_path: Path) -> None:
    """Each write is durable at once: a process killed right after writing leaves its rows for the next."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(SRC)!r})
        from pathlib import Path
        from migrate.executor.state import StateStore
        store = StateStore(Path({str(tmp_path)!r}))
        store.begin_run("r1", "h", "p")
        store.register_vms("r1", [("vm-1", "web", 0)])
        store.step_started("r1", "vm-1", "transfer", 1)
        store.add_intent("r1", "vm-1", "transfer", "prepare_disk", "2000", {{}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with StateStore(tmp_path) as store:
        assert store.step("r1", "vm-1", "transfer").status == "running"
        assert [i.kind for i in store.intents("r1", status="open")] == ["prepare_disk"]


def test_clock_is_injectable(tmp_path: Path) -> None:
    """Timestamps come from the given clock, so reports and tests can rely on them."""
    from datetime import UTC, datetime

    fixed = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    with StateStore(tmp_path, clock=lambda: fixed) as s:
        run, _ = s.begin_run(s.choose_run_id("h"), "h", "p")
        assert run.started == "2030-01-02T03:04:05.000+00:00" and run.id.startswith("r20300102-030405-")
