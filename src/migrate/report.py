"""Run reports and status views, read from the state store: what moved, how fast, what failed.

Pure with respect to the outside world: reads the local SQLite store only.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.table import Table

from migrate.errors import PlanError
from migrate.executor.state import StateStore

MiB = 1024**2


@dataclass(frozen=True, slots=True)
class VmReport:
    key: str
    name: str
    wave: int
    status: str
    phase: str
    error: str
    bytes_moved: int
    seconds: float
    steps: tuple[tuple[str, str, int, str], ...]  # (step, status, attempt, note)


@dataclass(frozen=True, slots=True)
class RunReport:
    run_id: str
    plan_path: str
    plan_hash: str
    status: str
    started: str
    ended: str
    vms: tuple[VmReport, ...]

    @property
    def bytes_moved(self) -> int:
        return sum(v.bytes_moved for v in self.vms)

    @property
    def seconds(self) -> float:
        return _seconds(self.started, self.ended)


def _seconds(start: str | None, end: str | None) -> float:
    if not start or not end:
        return 0.0
    return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


def _note(detail: dict[str, Any]) -> str:
    if "reason" in detail:
        return str(detail["reason"])
    if "disks" in detail and isinstance(detail["disks"], dict):
        moved = [d for d in detail["disks"].values() if isinstance(d, dict) and "bytes" in d]
        if moved:
            return f"{sum(int(d['bytes']) for d in moved) / MiB:.1f} MiB"
    return ", ".join(f"{k}={v}" for k, v in detail.items() if not isinstance(v, dict | list))[:80]


def collect(store: StateStore, run_id: str) -> RunReport:
    run = store.run(run_id)
    if run is None:
        raise PlanError(f"no run {run_id!r} in this state directory", hint="`migrate status` lists runs")
    vms = []
    for row in store.vms(run_id):
        steps = store.steps(run_id, row.vm)
        moved = 0
        for disk_row in (store.transfer(run_id, row.vm, s) for s in _disks_of(store, run_id, row.vm)):
            if disk_row is not None and disk_row.complete:
                moved += disk_row.bytes_done
        transfer = next((s for s in steps if s.step == "transfer"), None)
        vms.append(
            VmReport(
                key=row.vm,
                name=row.name,
                wave=row.wave,
                status=row.status,
                phase=row.phase,
                error=row.error or "",
                bytes_moved=moved,
                seconds=_seconds(transfer.started, transfer.ended) if transfer else 0.0,
                steps=tuple((s.step, s.status, s.attempt, s.error or _note(s.detail)) for s in steps),
            )
        )
    return RunReport(
        run.id, run.plan_path, run.plan_hash, run.status, run.started, run.ended or "", tuple(vms)
    )


def _disks_of(store: StateStore, run_id: str, vm: str) -> list[str]:
    transfer = store.step(run_id, vm, "transfer")
    disks = transfer.detail.get("disks", {}) if transfer is not None else {}
    return sorted(disks) if isinstance(disks, dict) else []


def runs_table(store: StateStore) -> Table:
    table = Table(title="runs", title_justify="left")
    for column in ("run", "status", "plan", "started", "ended"):
        table.add_column(column)
    for run in store.runs():
        table.add_row(run.id, run.status, run.plan_path, run.started, run.ended or "-")
    if not store.runs():
        table.add_row("-", "no runs yet", "`migrate run PLAN`", "", "")
    return table


def run_table(store: StateStore, run_id: str) -> Table:
    report = collect(store, run_id)
    table = Table(
        title=f"run {report.run_id}: {report.status} ({report.bytes_moved / MiB:.1f} MiB moved)",
        title_justify="left",
    )
    for column in ("wave", "VM", "status", "at step", "MiB", "error"):
        table.add_column(column, overflow="fold")
    for vm in report.vms:
        table.add_row(str(vm.wave), vm.name, vm.status, vm.phase, f"{vm.bytes_moved / MiB:.1f}", vm.error)
    return table


def _as_dict(report: RunReport) -> dict[str, Any]:
    return {
        "run_id": report.run_id,
        "plan": report.plan_path,
        "plan_hash": report.plan_hash,
        "status": report.status,
        "started": report.started,
        "ended": report.ended,
        "seconds": round(report.seconds, 3),
        "bytes_moved": report.bytes_moved,
        "vms": [
            {
                "key": v.key,
                "name": v.name,
                "wave": v.wave,
                "status": v.status,
                "phase": v.phase,
                "error": v.error,
                "bytes_moved": v.bytes_moved,
                "transfer_seconds": round(v.seconds, 3),
                "mib_per_s": round(v.bytes_moved / MiB / v.seconds, 1) if v.seconds else None,
                "steps": [{"step": s, "status": st, "attempts": a, "note": n} for s, st, a, n in v.steps],
            }
            for v in report.vms
        ],
    }


def run_report(store: StateStore, run_id: str, fmt: str) -> str:
    report = collect(store, run_id)
    data = _as_dict(report)
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False)
    lines = [
        f"# Migration run {report.run_id}",
        "",
        f"- plan: `{report.plan_path}` ({report.plan_hash})",
        f"- status: **{report.status}**, {len(report.vms)} VMs, {report.bytes_moved / MiB:.1f} MiB moved "
        f"in {report.seconds:.1f} s",
        f"- started {report.started}, ended {report.ended or '-'}",
        "",
        "| wave | VM | status | MiB | MiB/s | error |",
        "|---|---|---|---|---|---|",
    ]
    for vm in data["vms"]:
        rate = vm["mib_per_s"] if vm["mib_per_s"] is not None else "-"
        error = str(vm["error"]).replace("|", "\\|").replace("\n", " ")
        name = str(vm["name"]).replace("|", "\\|")
        lines.append(
            f"| {vm['wave']} | {name} | {vm['status']} | {vm['bytes_moved'] / MiB:.1f} | {rate} | {error} |"
        )
    for vm in data["vms"]:
        lines += ["", f"## {vm['name']}", "", "| step | status | attempts | note |", "|---|---|---|---|"]
        for step in vm["steps"]:
            note = str(step["note"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {step['step']} | {step['status']} | {step['attempts']} | {note} |")
    text = "\n".join(lines) + "\n"
    if fmt == "md":
        return text
    body = "".join(f"<pre>{html.escape(text)}</pre>")
    return f"<!doctype html><meta charset=utf-8><title>run {html.escape(report.run_id)}</title>{body}\n"
