"""The state store: what each run did, so a run can be resumed, queried and rolled back.

One SQLite file per state directory (``<state dir>/state.db``), WAL and ``synchronous=FULL``:
a row the runner wrote is on disk before the next request goes out, so ``kill -9`` at any
point leaves a store that says exactly which steps finished. Every write is one transaction.

Tables: ``runs`` (one per run id, tied to a plan hash), ``vms`` (phase and status per VM and
run), ``steps`` (pending/running/done/failed/noop, attempts, detail, error), ``intents``
(committed *before* each create/import/start, settled after, so a crash between a request
and its answer can be reconciled), ``objects`` (what a run created, for rollback) and
``transfers`` (per disk: landing, bytes done, final sha256; a sha256 in progress cannot be
saved, so a resumed transfer re-hashes what already landed).

Two runs of the same plan cannot overlap: ``lock()`` takes an ``flock`` on
``<state dir>/locks/<plan hash>.lock``. The kernel drops it when the holder dies, even by
``kill -9``; the holder's record left in the file is then reported as a stale lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from migrate import failpoints
from migrate.connectors.base import CreatedObject, DiskLanding, Intent
from migrate.errors import MigrateError, PlanError

log = structlog.get_logger(__name__)

SCHEMA_VERSION: Final = 1
DB_NAME: Final = "state.db"

RunStatus = Literal["running", "done", "partial", "failed", "interrupted", "rolled-back"]
VmStatus = Literal["pending", "running", "done", "failed", "rolled-back"]
StepStatus = Literal["pending", "running", "done", "failed", "noop"]
IntentStatus = Literal["open", "done", "failed"]
FINISHED: Final = ("done", "noop")


class RunLockedError(MigrateError):
    """Another live process is running the same plan."""

    exit_code = 2


# -- rows -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRow:
    id: str
    plan_hash: str
    plan_path: str
    status: RunStatus
    started: str
    ended: str | None


@dataclass(frozen=True, slots=True)
class VmRow:
    run_id: str
    vm: str
    name: str
    wave: int
    status: VmStatus
    phase: str
    error: str | None
    updated: str


@dataclass(frozen=True, slots=True)
class StepRow:
    run_id: str
    vm: str
    step: str
    status: StepStatus
    attempt: int
    started: str | None
    ended: str | None
    detail_json: str
    error: str | None

    @property
    def detail(self) -> dict[str, Any]:
        return dict(json.loads(self.detail_json))

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True, slots=True)
class IntentRow:
    id: int
    run_id: str
    vm: str
    step: str
    kind: str
    key: str
    status: IntentStatus
    notes_json: str
    created: str
    settled: str | None

    @property
    def notes(self) -> dict[str, str]:
        return dict(json.loads(self.notes_json))


@dataclass(frozen=True, slots=True)
class ObjectRow:
    id: int
    run_id: str
    obj: CreatedObject
    created: str
    removed: str | None


@dataclass(frozen=True, slots=True)
class TransferRow:
    run_id: str
    vm: str
    disk: str
    landing: DiskLanding
    total_bytes: int
    bytes_done: int
    sha256: str | None
    status: Literal["running", "done"]
    updated: str

    @property
    def complete(self) -> bool:
        return self.status == "done"


@dataclass(frozen=True, slots=True)
class LockInfo:
    plan_hash: str
    run_id: str
    pid: int
    host: str
    since: str
    # The record a dead holder left behind, if the lock was taken over from one.
    stale: LockInfo | None = None


# -- schema ---------------------------------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    plan_hash TEXT NOT NULL,
    plan_path TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('running', 'done', 'partial', 'failed', 'interrupted', 'rolled-back')),
    started TEXT NOT NULL,
    ended TEXT
);
CREATE INDEX runs_plan ON runs (plan_hash, started);
CREATE TABLE vms (
    run_id TEXT NOT NULL REFERENCES runs (id),
    vm TEXT NOT NULL,
    name TEXT NOT NULL,
    wave INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'rolled-back')),
    phase TEXT NOT NULL DEFAULT '',
    error TEXT,
    updated TEXT NOT NULL,
    PRIMARY KEY (run_id, vm)
);
CREATE TABLE steps (
    run_id TEXT NOT NULL REFERENCES runs (id),
    vm TEXT NOT NULL,
    step TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed', 'noop')),
    attempt INTEGER NOT NULL DEFAULT 0,
    started TEXT,
    ended TEXT,
    detail TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    PRIMARY KEY (run_id, vm, step)
);
CREATE TABLE intents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs (id),
    vm TEXT NOT NULL,
    step TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'done', 'failed')),
    notes TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL,
    settled TEXT
);
CREATE INDEX intents_vm ON intents (run_id, vm, status);
CREATE TABLE objects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs (id),
    vm TEXT NOT NULL,
    kind TEXT NOT NULL,
    object_id TEXT NOT NULL,
    target TEXT NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    temporary INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '[]',
    created TEXT NOT NULL,
    removed TEXT,
    UNIQUE (run_id, target, kind, object_id)
);
CREATE TABLE transfers (
    run_id TEXT NOT NULL REFERENCES runs (id),
    vm TEXT NOT NULL,
    disk TEXT NOT NULL,
    landing TEXT NOT NULL,
    total_bytes INTEGER NOT NULL,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'done')),
    updated TEXT NOT NULL,
    PRIMARY KEY (run_id, vm, disk)
);
"""


def _migrate_0_to_1(db: sqlite3.Connection) -> None:
    # Statement by statement: executescript() would commit the surrounding transaction first.
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            db.execute(statement)


# Each entry upgrades the schema from its key to key + 1; a new version adds one function here.
_MIGRATIONS: Final[dict[int, Callable[[sqlite3.Connection], None]]] = {0: _migrate_0_to_1}


def _utcnow() -> datetime:
    return datetime.now(UTC)


def new_run_id(now: datetime) -> str:
    return f"r{now.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


class StateStore:
    """The state directory's database. Thread-safe: one connection, one lock, short transactions."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self._clock = clock
        self._mutex = threading.RLock()
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise MigrateError(
                f"cannot open the state database {self.path}: {exc}",
                hint="make the state directory writable, or choose another with --state-dir",
            ) from exc
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._upgrade()

    def close(self) -> None:
        with self._mutex:
            self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _now(self) -> str:
        return self._clock().isoformat(timespec="milliseconds")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._mutex:
            return self._db.execute(sql, tuple(params)).fetchall()

    def _upgrade(self) -> None:
        with self._tx() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise MigrateError(
                    f"state database {self.path} has schema version {version}; "
                    f"this migrate knows up to {SCHEMA_VERSION}",
                    hint="upgrade migrate, or use another --state-dir",
                )
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](db)
                version += 1
                db.execute(f"PRAGMA user_version = {version}")

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    # -- runs -------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.state_dir / "runs" / run_id

    def run(self, run_id: str) -> RunRow | None:
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        return RunRow(*rows[0]) if rows else None

    def runs(self, plan_hash: str | None = None) -> tuple[RunRow, ...]:
        if plan_hash is None:
            rows = self._query("SELECT * FROM runs ORDER BY started, id")
        else:
            rows = self._query("SELECT * FROM runs WHERE plan_hash = ? ORDER BY started, id", (plan_hash,))
        return tuple(RunRow(*r) for r in rows)

    def choose_run_id(self, plan_hash: str, requested: str | None = None, *, fresh: bool = False) -> str:
        """The run to use: ``requested`` if given, else the plan's latest run, else a new id."""
        if requested:
            return requested
        runs = self.runs(plan_hash)
        if runs and not fresh:
            return runs[-1].id
        return new_run_id(self._clock())

    def begin_run(self, run_id: str, plan_hash: str, plan_path: str) -> tuple[RunRow, bool]:
        """Create the run, or reopen it for resuming; returns (run, resumed)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is not None:
                run = RunRow(*row)
                if run.plan_hash != plan_hash:
                    raise PlanError(
                        f"run {run_id} was started from a plan with hash {run.plan_hash[:12]} "
                        f"({run.plan_path}); this plan has hash {plan_hash[:12]}",
                        hint="resume it with the plan it was started from, or start a new run (no --run-id)",
                    )
                db.execute("UPDATE runs SET status = 'running', ended = NULL WHERE id = ?", (run_id,))
                resumed = True
            else:
                db.execute(
                    "INSERT INTO runs (id, plan_hash, plan_path, status, started) "
                    "VALUES (?, ?, ?, 'running', ?)",
                    (run_id, plan_hash, plan_path, self._now()),
                )
                resumed = False
            new = RunRow(*db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
        return new, resumed

    def end_run(self, run_id: str, status: RunStatus) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET status = ?, ended = ? WHERE id = ?", (status, self._now(), run_id))

    # -- vms --------------------------------------------------------------------------------

    def register_vms(self, run_id: str, vms: Iterable[tuple[str, str, int]]) -> None:
        """Add (key, name, wave) rows as pending; rows from an earlier attempt of the run stay."""
        now = self._now()
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO vms (run_id, vm, name, wave, status, updated) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                [(run_id, key, name, wave, now) for key, name, wave in vms],
            )

    def set_vm(self, run_id: str, vm: str, status: VmStatus, phase: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE vms SET status = ?, phase = ?, error = ?, updated = ? WHERE run_id = ? AND vm = ?",
                (status, phase, error, self._now(), run_id, vm),
            )

    def vm(self, run_id: str, vm: str) -> VmRow | None:
        rows = self._query("SELECT * FROM vms WHERE run_id = ? AND vm = ?", (run_id, vm))
        return VmRow(*rows[0]) if rows else None

    def vms(self, run_id: str) -> tuple[VmRow, ...]:
        rows = self._query("SELECT * FROM vms WHERE run_id = ? ORDER BY wave, vm", (run_id,))
        return tuple(VmRow(*r) for r in rows)

    # -- steps ------------------------------------------------------------------------------

    def step(self, run_id: str, vm: str, step: str) -> StepRow | None:
        rows = self._query("SELECT * FROM steps WHERE run_id = ? AND vm = ? AND step = ?", (run_id, vm, step))
        return StepRow(*rows[0]) if rows else None

    def steps(self, run_id: str, vm: str | None = None) -> tuple[StepRow, ...]:
        sql = "SELECT * FROM steps WHERE run_id = ?" + (" AND vm = ?" if vm is not None else "")
        params = (run_id, vm) if vm is not None else (run_id,)
        return tuple(StepRow(*r) for r in self._query(sql + " ORDER BY rowid", params))

    def step_started(self, run_id: str, vm: str, step: str, attempt: int) -> None:
        """Mark the step running with this attempt number; committed before the step's code runs."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO steps (run_id, vm, step, status, attempt, started) "
                "VALUES (?, ?, ?, 'running', ?, ?) "
                "ON CONFLICT (run_id, vm, step) DO UPDATE SET status = 'running', "
                "attempt = excluded.attempt, started = excluded.started, ended = NULL, error = NULL",
                (run_id, vm, step, attempt, self._now()),
            )
            db.execute(
                "UPDATE vms SET status = 'running', phase = ?, error = NULL, updated = ? "
                "WHERE run_id = ? AND vm = ?",
                (step, self._now(), run_id, vm),
            )

    def step_finished(
        self, run_id: str, vm: str, step: str, status: Literal["done", "noop"], detail: dict[str, Any]
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE steps SET status = ?, ended = ?, detail = ?, error = NULL "
                "WHERE run_id = ? AND vm = ? AND step = ?",
                (status, self._now(), json.dumps(detail, sort_keys=True, default=str), run_id, vm, step),
            )
        failpoints.reached(f"step-done:{step}")

    def step_failed(self, run_id: str, vm: str, step: str, error: str) -> None:
        """Fail the step and its VM in one transaction."""
        with self._tx() as db:
            now = self._now()
            db.execute(
                "UPDATE steps SET status = 'failed', ended = ?, error = ? "
                "WHERE run_id = ? AND vm = ? AND step = ?",
                (now, error, run_id, vm, step),
            )
            db.execute(
                "UPDATE vms SET status = 'failed', phase = ?, error = ?, updated = ? "
                "WHERE run_id = ? AND vm = ?",
                (step, error, now, run_id, vm),
            )

    # -- intents ----------------------------------------------------------------------------

    def add_intent(self, run_id: str, vm: str, step: str, kind: str, key: str, notes: dict[str, str]) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO intents (run_id, vm, step, kind, key, status, notes, created) "
                "VALUES (?, ?, ?, ?, ?, 'open', ?, ?)",
                (run_id, vm, step, kind, key, json.dumps(notes, sort_keys=True), self._now()),
            )
            return int(cur.lastrowid or 0)

    def note_intent(self, intent_id: int, key: str, value: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT notes FROM intents WHERE id = ?", (intent_id,)).fetchone()
            if row is None:
                raise KeyError(f"no intent {intent_id}")
            notes = json.loads(row[0]) | {key: value}
            db.execute(
                "UPDATE intents SET notes = ? WHERE id = ?", (json.dumps(notes, sort_keys=True), intent_id)
            )

    def settle_intent(self, intent_id: int, status: Literal["done", "failed"]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE intents SET status = ?, settled = ? WHERE id = ?", (status, self._now(), intent_id)
            )

    def intents(
        self, run_id: str, vm: str | None = None, status: IntentStatus | None = None
    ) -> tuple[IntentRow, ...]:
        sql, params = "SELECT * FROM intents WHERE run_id = ?", [run_id]
        if vm is not None:
            sql, params = sql + " AND vm = ?", [*params, vm]
        if status is not None:
            sql, params = sql + " AND status = ?", [*params, status]
        return tuple(IntentRow(*r) for r in self._query(sql + " ORDER BY id", params))

    # -- created objects --------------------------------------------------------------------

    def add_object(self, run_id: str, obj: CreatedObject) -> None:
        """Record an object the run created; recording it twice is harmless."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO objects (run_id, vm, kind, object_id, target, node, temporary, detail, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, target, kind, object_id) DO UPDATE SET removed = NULL",
                (
                    run_id,
                    obj.vm,
                    obj.kind,
                    obj.id,
                    obj.target,
                    obj.node,
                    int(obj.temporary),
                    json.dumps(obj.detail),
                    self._now(),
                ),
            )

    def mark_removed(self, run_id: str, obj: CreatedObject) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE objects SET removed = ? "
                "WHERE run_id = ? AND target = ? AND kind = ? AND object_id = ?",
                (self._now(), run_id, obj.target, obj.kind, obj.id),
            )

    def objects(self, run_id: str, vm: str | None = None, *, removed: bool = False) -> tuple[ObjectRow, ...]:
        sql, params = "SELECT * FROM objects WHERE run_id = ?", [run_id]
        if vm is not None:
            sql, params = sql + " AND vm = ?", [*params, vm]
        if not removed:
            sql += " AND removed IS NULL"
        out = []
        for oid, rid, vm_key, kind, object_id, target, node, temporary, detail, created, gone in self._query(
            sql + " ORDER BY id", params
        ):
            obj = CreatedObject(
                kind=kind,
                id=object_id,
                target=target,
                node=node,
                vm=vm_key,
                temporary=bool(temporary),
                detail=tuple(tuple(pair) for pair in json.loads(detail)),
            )
            out.append(ObjectRow(id=oid, run_id=rid, obj=obj, created=created, removed=gone))
        return tuple(out)

    # -- transfers --------------------------------------------------------------------------

    def transfer(self, run_id: str, vm: str, disk: str) -> TransferRow | None:
        rows = self._query(
            "SELECT * FROM transfers WHERE run_id = ? AND vm = ? AND disk = ?", (run_id, vm, disk)
        )
        if not rows:
            return None
        rid, vm_key, disk_key, landing, total, done, sha, status, updated = rows[0]
        return TransferRow(
            rid, vm_key, disk_key, DiskLanding(**json.loads(landing)), total, done, sha, status, updated
        )

    def transfer_begin(self, run_id: str, vm: str, landing: DiskLanding, total_bytes: int) -> None:
        """Start (or restart at 0 for a new landing) the transfer of one disk."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO transfers (run_id, vm, disk, landing, total_bytes, bytes_done, status, updated) "
                "VALUES (?, ?, ?, ?, ?, 0, 'running', ?) ON CONFLICT (run_id, vm, disk) DO UPDATE SET "
                "landing = excluded.landing, total_bytes = excluded.total_bytes, bytes_done = 0, "
                "sha256 = NULL, status = 'running', updated = excluded.updated",
                (
                    run_id,
                    vm,
                    landing.disk_key,
                    json.dumps(dataclasses.asdict(landing)),
                    total_bytes,
                    self._now(),
                ),
            )

    def transfer_progress(self, run_id: str, vm: str, disk: str, bytes_done: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE transfers SET bytes_done = ?, updated = ? WHERE run_id = ? AND vm = ? AND disk = ?",
                (bytes_done, self._now(), run_id, vm, disk),
            )

    def transfer_done(self, run_id: str, vm: str, disk: str, bytes_done: int, sha256: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE transfers SET bytes_done = ?, sha256 = ?, status = 'done', updated = ? "
                "WHERE run_id = ? AND vm = ? AND disk = ?",
                (bytes_done, sha256, self._now(), run_id, vm, disk),
            )

    # -- lock -------------------------------------------------------------------------------

    def lock_path(self, plan_hash: str) -> Path:
        return self.state_dir / "locks" / f"{plan_hash}.lock"

    def lock_holder(self, plan_hash: str) -> LockInfo | None:
        """Who holds the plan's lock now, or None if nobody (a dead holder's record does not count)."""
        path = self.lock_path(plan_hash)
        if not path.exists():
            return None
        with open(path, "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_lock(path, plan_hash)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return None

    @contextlib.contextmanager
    def lock(self, plan_hash: str, run_id: str) -> Iterator[LockInfo]:
        """Hold the plan's run lock for the block; raise RunLockedError if a live process holds it."""
        path = self.lock_path(plan_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock(path, plan_hash)
                who = (
                    f"pid {holder.pid} on {holder.host} (run {holder.run_id}, since {holder.since})"
                    if holder
                    else "another process"
                )
                raise RunLockedError(
                    f"plan {plan_hash[:12]} is already being run by {who}",
                    hint="wait for that run to finish, or stop it; a stopped run resumes where it left off",
                ) from None
            stale = _read_lock(path, plan_hash)
            info = LockInfo(plan_hash, run_id, os.getpid(), socket.gethostname(), self._now(), stale)
            if stale is not None:
                # The holder died without releasing (crash, kill -9): flock let go, its record stayed.
                log.warning(
                    "stale_lock_taken_over",
                    plan_hash=plan_hash,
                    dead_pid=stale.pid,
                    dead_host=stale.host,
                    dead_run=stale.run_id,
                    since=stale.since,
                )
            record = {"run_id": run_id, "pid": info.pid, "host": info.host, "since": info.since}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
            try:
                yield info
            finally:
                # An empty file means "released cleanly"; a record left behind means the holder died.
                os.ftruncate(fd, 0)
                os.fsync(fd)
        finally:
            os.close(fd)  # closing the descriptor releases the flock


def _read_lock(path: Path, plan_hash: str) -> LockInfo | None:
    try:
        data = json.loads(path.read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return LockInfo(
        plan_hash,
        str(data.get("run_id", "")),
        int(data.get("pid", 0)),
        str(data.get("host", "")),
        str(data.get("since", "")),
    )


class Journal:
    """The state store as one step of one VM sees it: intents, created objects, transfers."""

    def __init__(self, store: StateStore, run_id: str, vm: str, step: str) -> None:
        self.store = store
        self.run_id = run_id
        self.vm = vm
        self.step = step

    def intend(self, kind: str, key: str, **notes: str) -> Intent:
        """Commit what is about to be asked of a target; the returned Intent goes with the request."""
        intent_id = self.store.add_intent(self.run_id, self.vm, self.step, kind, key, dict(notes))
        log.info("intent_recorded", intent=kind, key=key, intent_id=intent_id)
        failpoints.reached(f"intent:{kind}")

        def note(name: str, value: str) -> None:
            self.store.note_intent(intent_id, name, value)

        return Intent(run_id=self.run_id, vm=self.vm, kind=kind, key=key, id=intent_id, note=note)

    def settle(self, intent: Intent, ok: bool = True) -> None:
        failpoints.reached(f"settle:{intent.kind}")
        self.store.settle_intent(intent.id, "done" if ok else "failed")

    def settle_open(self, kind: str, ok: bool = True, key: str | None = None) -> int:
        """Settle this VM's open intents of ``kind`` (and ``key``) once the real state told how they
        ended: ``ok`` if their effect is there, not ``ok`` if it is not. Returns how many."""
        rows = [
            i
            for i in self.store.intents(self.run_id, self.vm, "open")
            if i.kind == kind and (key is None or i.key == key)
        ]
        for row in rows:
            self.store.settle_intent(row.id, "done" if ok else "failed")
        return len(rows)

    def open_intents(self, kind: str | None = None) -> tuple[IntentRow, ...]:
        rows = self.store.intents(self.run_id, self.vm, "open")
        return tuple(r for r in rows if kind is None or r.kind == kind)

    def created(self, *objects: CreatedObject) -> None:
        for obj in objects:
            self.store.add_object(self.run_id, obj)

    def removed(self, *objects: CreatedObject) -> None:
        for obj in objects:
            self.store.mark_removed(self.run_id, obj)

    def objects(self) -> tuple[CreatedObject, ...]:
        return tuple(row.obj for row in self.store.objects(self.run_id, self.vm))

    def transfer(self, disk: str) -> TransferRow | None:
        return self.store.transfer(self.run_id, self.vm, disk)

    def transfer_begin(self, landing: DiskLanding, total_bytes: int) -> None:
        self.store.transfer_begin(self.run_id, self.vm, landing, total_bytes)

    def transfer_progress(self, disk: str, bytes_done: int) -> None:
        self.store.transfer_progress(self.run_id, self.vm, disk, bytes_done)

    def transfer_done(self, disk: str, bytes_done: int, sha256: str) -> None:
        self.store.transfer_done(self.run_id, self.vm, disk, bytes_done, sha256)
