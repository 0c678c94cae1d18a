"""A plan for people: the summary the CLI prints, and Markdown/HTML for a change board.

PURE: the output depends only on the plan, so a rendered plan can be diffed and archived
next to the plan file (its content hash is printed at the top).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from migrate.mapping import gib
from migrate.plan import Plan, VmPlan

Format = Literal["md", "html"]


@dataclass(frozen=True, slots=True)
class SummaryRow:
    wave: str
    concurrency: int
    target: str
    vms: int
    disk_bytes: int
    memory_mib: int


@dataclass(frozen=True, slots=True)
class IssueRow:
    vm: str
    code: str
    message: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """What ``migrate plan`` prints: VMs per wave and target, totals, blockers and warnings."""

    playbook: str
    content_hash: str
    rows: tuple[SummaryRow, ...]
    total_vms: int
    total_disk_bytes: int
    blocked_vms: int
    blockers: tuple[IssueRow, ...]
    warnings: tuple[IssueRow, ...]

    @property
    def total_gib(self) -> float:
        return self.total_disk_bytes / (1 << 30)


def summarize(plan: Plan) -> PlanSummary:
    by_key = {v.key: v for v in plan.vms}
    rows = []
    for wave in plan.waves:
        members = [by_key[k] for k in wave.vms if k in by_key]
        for target in sorted({v.target for v in members}) or [""]:
            vms = [v for v in members if v.target == target]
            rows.append(
                SummaryRow(
                    wave.name,
                    wave.concurrency,
                    target,
                    len(vms),
                    sum(v.total_bytes for v in vms),
                    sum(v.source.memory_mib for v in vms),
                )
            )
    blockers = tuple(IssueRow(b.name, i.code, i.message, i.hint) for b in plan.blocked for i in b.blockers)
    owners = [(v.source.name, v.warnings) for v in plan.vms] + [(b.name, b.warnings) for b in plan.blocked]
    warnings = tuple(IssueRow(name, i.code, i.message, i.hint) for name, issues in owners for i in issues)
    return PlanSummary(
        playbook=plan.inputs.playbook_name,
        content_hash=plan.content_hash,
        rows=tuple(rows),
        total_vms=len(plan.vms),
        total_disk_bytes=sum(v.total_bytes for v in plan.vms),
        blocked_vms=len(plan.blocked),
        blockers=blockers,
        warnings=warnings,
    )


def render(plan: Plan, fmt: Format) -> str:
    """The plan as a Markdown or HTML document for review."""
    if fmt == "md":
        return _Doc(_md_escape, markdown=True).build(plan)
    if fmt == "html":
        return _Doc(html.escape, markdown=False).build(plan)
    raise ValueError(f"unknown format {fmt!r}; use 'md' or 'html'")


def _md_escape(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("*", "\\*")
        .replace("_", "\\_")
        .replace("<", "&lt;")
        .replace("\n", " ")
    )


_CSS = (
    "body{font-family:sans-serif;max-width:80em;margin:2em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #bbb;padding:.2em .5em;text-align:left}.blocked{color:#a00}.warn{color:#a60}"
)


class _Doc:
    """One document builder for both formats; only the few primitives differ."""

    def __init__(self, esc: Callable[[str], str], *, markdown: bool) -> None:
        self.esc = esc
        self.md = markdown
        self.out: list[str] = []

    def h(self, level: int, text: str) -> None:
        self.out.append(
            f"{'#' * level} {self.esc(text)}\n" if self.md else f"<h{level}>{self.esc(text)}</h{level}>"
        )

    def p(self, text: str) -> None:
        self.out.append(f"{self.esc(text)}\n" if self.md else f"<p>{self.esc(text)}</p>")

    def table(self, head: list[str], rows: list[list[str]]) -> None:
        if self.md:
            self.out.append("| " + " | ".join(self.esc(c) for c in head) + " |")
            self.out.append("|" + "---|" * len(head))
            self.out.extend("| " + " | ".join(self.esc(c) for c in row) + " |" for row in rows)
            self.out.append("")
            return
        self.out.append("<table><tr>" + "".join(f"<th>{self.esc(c)}</th>" for c in head) + "</tr>")
        self.out.extend("<tr>" + "".join(f"<td>{self.esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        self.out.append("</table>")

    def items(self, items: list[str], css: str = "") -> None:
        if self.md:
            self.out.extend(f"- {self.esc(i)}" for i in items)
            self.out.append("")
            return
        cls = f' class="{css}"' if css else ""
        self.out.append(f"<ul{cls}>" + "".join(f"<li>{self.esc(i)}</li>" for i in items) + "</ul>")

    def build(self, plan: Plan) -> str:
        s = summarize(plan)
        inp = plan.inputs
        if not self.md:
            self.out.append(
                f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{self.esc(inp.playbook_name)}'
                f"</title><style>{_CSS}</style></head><body>"
            )
        self.h(1, f"Migration plan: {inp.playbook_name}")
        self.table(
            ["", ""],
            [
                ["plan hash", plan.content_hash or "(not written yet)"],
                ["source", inp.source],
                ["playbook", f"{inp.playbook_file} ({inp.playbook_sha256[:12]})"],
                ["inventory", inp.inventory_file or "-"],
                ["targets", ", ".join(f"{t.name} ({t.kind} {t.version})" for t in plan.targets) or "-"],
                [
                    "run options",
                    f"shutdown {plan.options.shutdown}, start after {plan.options.start_after}, "
                    f"verify {plan.options.verify}, keep MAC {plan.options.keep_mac}",
                ],
            ],
        )
        self.h(2, "Summary")
        self.table(
            ["wave", "concurrency", "target", "VMs", "disks", "memory"],
            [
                [
                    r.wave,
                    str(r.concurrency),
                    r.target or "-",
                    str(r.vms),
                    gib(r.disk_bytes),
                    f"{r.memory_mib / 1024:.1f} GiB",
                ]
                for r in s.rows
            ],
        )
        self.p(
            f"{s.total_vms} VMs to migrate ({s.total_gib:.1f} GiB of disks), {s.blocked_vms} blocked, "
            f"{len(s.warnings)} warnings."
        )
        by_key = {v.key: v for v in plan.vms}
        for wave in plan.waves:
            self.h(2, f"Wave {wave.name} (up to {wave.concurrency} at a time)")
            vms = [by_key[k] for k in wave.vms if k in by_key]
            if not vms:
                self.p("No VMs.")
                continue
            self.table(
                ["VM", "source", "target", "node", "id", "vCPU", "memory", "disks"],
                [self._vm_row(v) for v in vms],
            )
        if plan.blocked:
            self.h(2, "Blocked")
            self.items(
                [
                    f"{b.name}: {i.message}" + (f" (fix: {i.hint})" if i.hint else "")
                    for b in plan.blocked
                    for i in b.blockers
                ],
                "blocked",
            )
        if s.warnings:
            self.h(2, "Warnings")
            self.items([f"{w.vm}: {w.message}" for w in s.warnings], "warn")
        self.h(2, "Decisions")
        for vm in plan.vms:
            self.h(3, f"{vm.name} ({vm.source.name}, {vm.key})")
            self.items(
                [f"{d.topic}: {d.choice} ({d.reason})" for d in vm.decisions]
                + [f"warning: {w.message}" for w in vm.warnings]
            )
        if not self.md:
            self.out.append("</body></html>")
        return "\n".join(self.out).rstrip("\n") + "\n"

    @staticmethod
    def _vm_row(v: VmPlan) -> list[str]:
        vmid = str(v.proxmox.vmid) if v.proxmox else "-"
        disks = ", ".join(
            f"{d.slot if v.proxmox else 'vbd' + d.slot} {gib(d.capacity_bytes)} on {d.storage} ({d.format})"
            for d in v.disks
        )
        vcpus = v.source.cpu_sockets * v.source.cores_per_socket
        return [
            v.name,
            v.source.name,
            v.target,
            v.node,
            vmid,
            str(vcpus),
            f"{v.source.memory_mib} MiB",
            disks or "-",
        ]

