"""The command line: the only module that parses arguments, prints, and maps errors to exit codes.

Exit codes: 0 ok, 1 failure, 2 bad input or usage (nothing was touched), 3 partial (some VMs
failed or were blocked).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog
import yaml
from rich.console import Console

from migrate import __version__
from migrate.errors import ConfigError, MigrateError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger(__name__)


def _stdout() -> Console:
    return Console(soft_wrap=True)


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def inventory_option(help_text: str, *, required: bool = False) -> Callable[[F], F]:
    """``-i/--inventory``, the same on every command that talks to vSphere or a target."""
    return click.option(
        "-i",
        "--inventory",
        "inventory_path",
        required=required,
        type=click.Path(path_type=Path),
        help=help_text,
    )


def handle_errors(func: F) -> F:
    """Turn migrate's errors into one readable message and an exit code; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MigrateError as exc:
            console = _stderr()
            title = "invalid input" if isinstance(exc, ConfigError) else "error"
            console.print(f"[bold red]{title}:[/] {exc}", markup=True, highlight=False)
            log.error("command_failed", error=type(exc).__name__, message=exc.message)
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:
            _stderr().print("interrupted; state is saved, `migrate resume RUN` continues a run")
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="migrate")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get("MIGRATE_STATE_DIR", ".migrate"),
    show_default="$MIGRATE_STATE_DIR or .migrate",
    help="Where runs, logs and the lab keep their state.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show debug events on the console.")
@click.pass_context
def main(ctx: click.Context, state_dir: Path, verbose: bool) -> None:
    """Move VMs from VMware vSphere to Proxmox VE and XCP-ng: discover, plan, review, run.

    \b
    Typical flow:
      migrate discover -i inventories/site.yaml
      migrate plan -i inventories/site.yaml -p playbooks/wave1.yaml -o plan.yaml
      migrate run plan.yaml            (shows the plan again, then executes exactly it)
      migrate status / resume / rollback / report

    Try it locally with `migrate lab demo`.
    """
    ctx.obj = {"state_dir": state_dir, "verbose": verbose}
    _configure_logging(state_dir, verbose)


def _configure_logging(state_dir: Path, verbose: bool) -> None:
    import uuid

    from migrate import log as migrate_log

    migrate_log.configure(
        state_dir / "logs" / "migrate.jsonl",
        console=True,
        level="debug" if verbose else "info",
        console_level=None if verbose else "warning",
    )
    # Every log line carries an id; `run` replaces it with the run's own id.
    migrate_log.set_run(f"cli-{uuid.uuid4().hex[:12]}")


# -- discover ----------------------------------------------------------------------------------


@main.command()
@inventory_option("Inventory YAML naming the vSphere source(s).", required=True)
@click.option("--source", help="Which source of the inventory (needed when it has several).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the discovered inventory to this file (JSON, or YAML by extension).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "yaml"]),
    default=None,
    help="What to print: a table on a terminal, JSON otherwise.",
)
@handle_errors
def discover(inventory_path: Path, source: str | None, output: Path | None, fmt: str | None) -> None:
    """Read every VM, host, datastore and network of a vSphere source (read only)."""
    from migrate.connect import discover_source
    from migrate.inventory import load_inventory
    from migrate.model import source_to_dict
    from migrate.render import inventory_table

    inventory = load_inventory(inventory_path)
    found = discover_source(inventory, source)
    data = source_to_dict(found)
    if output:
        output.write_text(_dump(data, "yaml" if output.suffix in (".yaml", ".yml") else "json"), "utf-8")
        _stderr().print(f"wrote {len(found.vms)} VMs to {output}")
    fmt = fmt or ("table" if sys.stdout.isatty() else "json")
    if fmt == "table":
        _stdout().print(inventory_table(found))
    elif not output:
        click.echo(_dump(data, fmt))


def _dump(data: Any, fmt: str) -> str:
    if fmt == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# -- plan ------------------------------------------------------------------------------------


@main.command()
@inventory_option("Inventory YAML with the source and the targets.", required=True)
@click.option(
    "-p",
    "--playbook",
    "playbook_path",
    type=click.Path(path_type=Path),
    help="Playbook YAML: what moves where, in which waves (not needed with --check).",
)
@click.option("--source", help="Which source of the inventory (default: the playbook's, or the only one).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the plan file here (default: print only the summary).",
)
@click.option(
    "--check",
    "check_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Re-read source and targets and report drift against this plan file.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "md", "html", "yaml"]),
    default="table",
    help="table: summary on the terminal; md/html: a document for a change board; yaml: the plan.",
)
@handle_errors
def plan(
    inventory_path: Path,
    playbook_path: Path | None,
    source: str | None,
    output: Path | None,
    check_path: Path | None,
    fmt: str,
) -> None:
    """Plan a migration (read only): decide target, node, storage and config for every VM.

    Exits 0 when every selected VM is planned, 3 when some are blocked (each with its reason and a fix).
    """
    from migrate import plan as plan_file
    from migrate.connect import discover_source, playbook_targets, snapshot_targets
    from migrate.inventory import load_inventory
    from migrate.planner import build_plan
    from migrate.playbook import load_playbook, unknown_vms

    inventory = load_inventory(inventory_path)
    if check_path:
        existing = plan_file.load_plan(check_path)
        source_inv = discover_source(inventory, source or existing.inputs.source)
        targets = snapshot_targets(inventory, [t.name for t in existing.targets])
        items = plan_file.drift(existing, source_inv, targets)
        _print_drift(check_path, items)
        raise SystemExit(EXIT_PARTIAL if items else EXIT_OK)
    if playbook_path is None:
        raise click.UsageError("give -p/--playbook (or --check PLAN)")
    book = load_playbook(playbook_path)
    source_inv = discover_source(inventory, source or book.source)
    if problems := unknown_vms(book, source_inv):
        raise ConfigError(problems)
    targets = snapshot_targets(inventory, playbook_targets(book), playbook_file=str(playbook_path))
    result = build_plan(source_inv, book, targets, inventory_file=str(inventory_path))
    text = plan_file.dump_plan(result)
    if output:
        output.write_text(text, encoding="utf-8")
    _show_plan(result, fmt, text)
    if output:
        _stderr().print(
            f"plan written to {output} (hash {plan_file.content_hash(result)[7:19]}); "
            f"review it, then: migrate run {output}"
        )
    raise SystemExit(EXIT_PARTIAL if result.blocked else EXIT_OK)


def _show_plan(result: Any, fmt: str, text: str) -> None:
    from migrate.plan_render import render
    from migrate.render import plan_tables

    if fmt == "yaml":
        click.echo(text, nl=False)
    elif fmt in ("md", "html"):
        click.echo(render(result, "md" if fmt == "md" else "html"))
    else:
        console = _stdout()
        for table in plan_tables(result):
            console.print(table)


def _print_drift(path: Path, items: list[Any]) -> None:
    console = _stdout()
    if not items:
        console.print(f"no drift: source and targets still match {path}")
        return
    console.print(f"[bold yellow]{len(items)} change(s) since {path} was made[/]; re-run `migrate plan`:")
    for item in items:
        console.print(f"  - {item.kind}: {item.vm or item.target}: {item.message}", markup=False)


# -- run, resume, status, report, rollback -----------------------------------------------------


def _store(obj: dict[str, Any]) -> Any:
    from migrate.executor.state import StateStore

    return StateStore(obj["state_dir"])


def _inventory_for(plan_obj: Any, inventory_path: Path | None) -> Any:
    from migrate.inventory import load_inventory

    path = inventory_path or (
        Path(plan_obj.inputs.inventory_file) if plan_obj.inputs.inventory_file else None
    )
    if path is None:
        raise click.UsageError("the plan does not say which inventory it was made with; give -i INVENTORY")
    return load_inventory(path)


def _execute(
    obj: dict[str, Any], plan_path: Path, plan_obj: Any, inventory: Any, run_id: str | None, *, fresh: bool
) -> int:
    from migrate import log as migrate_log
    from migrate.connect import ExecutionServices
    from migrate.executor.fromplan import options_from_plan, work_from_plan
    from migrate.executor.progress import open_board
    from migrate.executor.runner import Runner
    from migrate.executor.steps import STEPS
    from migrate.report import run_table

    store = _store(obj)
    run_id = store.choose_run_id(plan_obj.content_hash, run_id, fresh=fresh)
    migrate_log.configure(
        store.run_dir(run_id),
        console=True,
        level="debug" if obj["verbose"] else "info",
        console_level=None if obj["verbose"] else "warning",
    )
    staging = store.run_dir(run_id) / "staging"
    options = dataclasses.replace(options_from_plan(plan_obj), staging_dir=staging)
    with (
        open_board() as board,
        ExecutionServices(inventory, plan_obj.inputs.source, staging_dir=staging, board=board) as services,
    ):
        runner = Runner(store, STEPS, services.for_vm, options=options)
        summary = runner.run(work_from_plan(plan_obj), plan_path=str(plan_path), run_id=run_id)
    _stdout().print(run_table(store, summary.run_id))
    code = int(summary.exit_code)
    if code:
        _stderr().print(
            f"run {summary.run_id}: {len(summary.failed)} VM(s) failed; fix the cause, then "
            f"`migrate resume {summary.run_id}` (or `migrate rollback {summary.run_id}`)"
        )
    return code


@main.command()
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False, path_type=Path))
@inventory_option("Inventory to use (default: the one the plan was made with).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation after showing the plan.")
@click.pass_obj
@handle_errors
def run(obj: dict[str, Any], plan_path: Path, inventory_path: Path | None, yes: bool) -> None:
    """Execute exactly the reviewed PLAN: shown first, refused if altered or if the world drifted.

    A plan whose run finished is not run again (exit 0). A plan whose run failed or was killed
    continues only with `migrate resume RUN`.
    """
    from migrate.connect import discover_source, snapshot_targets
    from migrate.errors import PlanError
    from migrate.plan import drift, load_plan
    from migrate.render import plan_tables

    plan_obj = load_plan(plan_path)
    for table in plan_tables(plan_obj):
        _stdout().print(table)
    store = _store(obj)
    previous = [r for r in store.runs(plan_obj.content_hash) if r.status != "rolled-back"]
    if previous:
        latest = previous[-1]
        if latest.status == "done":
            _stderr().print(f"plan already carried out by run {latest.id}; nothing to do")
            raise SystemExit(EXIT_OK)
        raise PlanError(
            f"run {latest.id} of this plan is {latest.status}",
            hint=f"continue it with `migrate resume {latest.id}`, or undo it with "
            f"`migrate rollback {latest.id}` before running the plan again",
        )
    if not plan_obj.vms:
        raise PlanError(
            f"{plan_path} has no VM to migrate (all blocked or none selected)",
            hint="fix the blockers listed by `migrate plan`, then plan again",
        )
    inventory = _inventory_for(plan_obj, inventory_path)
    source_inv = discover_source(inventory, plan_obj.inputs.source)
    items = drift(plan_obj, source_inv, snapshot_targets(inventory, [t.name for t in plan_obj.targets]))
    if items:
        _print_drift(plan_path, items)
        raise PlanError(
            f"{plan_path} no longer matches the source or targets ({len(items)} change(s))",
            hint="re-run `migrate plan` and review the new plan",
        )
    if not yes and sys.stdin.isatty() and not click.confirm("Run this plan?", default=False):
        raise SystemExit(EXIT_OK)
    raise SystemExit(_execute(obj, plan_path, plan_obj, inventory, None, fresh=True))


@main.command()
@click.argument("run_id", metavar="RUN")
@inventory_option("Inventory to use (default: the one the plan was made with).")
@click.pass_obj
@handle_errors
def resume(obj: dict[str, Any], run_id: str, inventory_path: Path | None) -> None:
    """Continue a failed or killed run where it stopped; finished steps are never repeated."""
    from migrate.errors import PlanError
    from migrate.plan import load_plan

    store = _store(obj)
    row = store.run(run_id)
    if row is None:
        known = ", ".join(r.id for r in store.runs()[-5:]) or "none"
        raise PlanError(
            f"no run {run_id!r} in {obj['state_dir']}", hint=f"`migrate status` lists runs ({known})"
        )
    plan_obj = load_plan(row.plan_path)
    if plan_obj.content_hash != row.plan_hash:
        raise PlanError(
            f"{row.plan_path} changed since run {run_id} started",
            hint="restore the plan file the run was started with",
        )
    inventory = _inventory_for(plan_obj, inventory_path)
    raise SystemExit(_execute(obj, Path(row.plan_path), plan_obj, inventory, run_id, fresh=False))


@main.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@click.pass_obj
@handle_errors
def status(obj: dict[str, Any], run_id: str | None) -> None:
    """List runs, or show one run: per VM its step, bytes moved and errors."""
    from migrate.report import run_table, runs_table

    store = _store(obj)
    _stdout().print(run_table(store, run_id) if run_id else runs_table(store))


@main.command()
@click.argument("run_id", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]), default="md")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file.")
@click.pass_obj
@handle_errors
def report(obj: dict[str, Any], run_id: str, fmt: str, output: Path | None) -> None:
    """A report of RUN: what moved, timings, throughput, warnings and errors."""
    from migrate.report import run_report

    text = run_report(_store(obj), run_id, fmt)
    if output:
        output.write_text(text, encoding="utf-8")
        _stderr().print(f"report written to {output}")
    else:
        click.echo(text)


@main.command()
@click.argument("run_id", metavar="RUN")
@click.option(
    "--vm", "vm_names", multiple=True, help="Only this VM (repeatable); default: every VM of the run."
)
@inventory_option("Inventory to use (default: the one the plan was made with).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@handle_errors
def rollback(
    obj: dict[str, Any], run_id: str, vm_names: tuple[str, ...], inventory_path: Path | None, yes: bool
) -> None:
    """Remove what RUN created on the targets and restore the source VMs' power state.

    Only objects carrying the run's tag are removed; nothing else on a target is touched.
    """
    from migrate.connect import ExecutionServices
    from migrate.errors import PlanError
    from migrate.executor.rollback import roll_back
    from migrate.plan import load_plan

    store = _store(obj)
    row = store.run(run_id)
    if row is None:
        raise PlanError(f"no run {run_id!r} in {obj['state_dir']}", hint="`migrate status` lists runs")
    plan_obj = load_plan(row.plan_path)
    inventory = _inventory_for(plan_obj, inventory_path)
    if not yes and sys.stdin.isatty() and not click.confirm(f"Roll back run {run_id}?", default=False):
        raise SystemExit(EXIT_OK)
    with ExecutionServices(inventory, plan_obj.inputs.source, staging_dir=store.run_dir(run_id)) as services:
        result = roll_back(store, run_id, plan_obj, services, only=vm_names)
    for line in result.lines:
        _stdout().print(line, markup=False)
    raise SystemExit(EXIT_OK if result.ok else EXIT_PARTIAL)


# -- lab ---------------------------------------------------------------------------------------


@main.group()
def lab() -> None:
    """A local lab on 127.0.0.1: vcsim (vSphere), fakepve (Proxmox VE), an XCP-ng fake and an SSH
    node, seeded with a sample estate. For trying migrate and for its tests."""


@lab.command("up")
@click.pass_obj
@handle_errors
def lab_up(obj: dict[str, Any]) -> None:
    """Start the lab (idempotent) and write inventories/lab.yaml."""
    from migrate.lab import manager

    status = manager.up(obj["state_dir"], progress=lambda msg: _stderr().print(f"[dim]lab:[/] {msg}"))
    _stdout().print(manager.status_table(status))


@lab.command("status")
@click.pass_obj
@handle_errors
def lab_status(obj: dict[str, Any]) -> None:
    """Show which lab services run and where."""
    from migrate.lab import manager

    status = manager.status(obj["state_dir"])
    _stdout().print(manager.status_table(status))
    if not status.all_running:
        raise SystemExit(EXIT_FAILURE)


@lab.command("down")
@click.pass_obj
@handle_errors
def lab_down(obj: dict[str, Any]) -> None:
    """Stop every lab service and remove the lab's files."""
    from migrate.lab import manager

    stopped = manager.down(obj["state_dir"])
    _stderr().print(f"lab stopped ({', '.join(stopped) or 'nothing was running'})")


@lab.command("demo")
@click.option(
    "-p",
    "--playbook",
    "playbook_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("playbooks/mixed-waves.yaml"),
    show_default=True,
    help="Playbook to plan the sample estate with.",
)
@click.pass_obj
@handle_errors
def lab_demo(obj: dict[str, Any], playbook_path: Path) -> None:
    """The whole job on a fresh lab: discover the sample estate, plan it (shown first), migrate it to
    Proxmox VE and XCP-ng, and print the report."""
    from migrate.connect import discover_source, playbook_targets, snapshot_targets
    from migrate.inventory import load_inventory
    from migrate.lab import manager
    from migrate.plan import dump_plan, load_plan
    from migrate.planner import build_plan
    from migrate.playbook import load_playbook
    from migrate.render import inventory_table, plan_tables
    from migrate.report import run_report

    out, err = _stdout(), _stderr()
    book = load_playbook(playbook_path)
    state_dir = obj["state_dir"]
    out.rule("[bold]1. lab[/]: vcsim (vSphere), fakepve + SSH node (Proxmox VE), XAPI fake (XCP-ng)")
    manager.down(state_dir)  # a fresh lab each time, so the demo always starts from the same estate
    status = manager.up(state_dir, progress=lambda msg: err.print(f"[dim]lab:[/] {msg}"))
    out.print(manager.status_table(status))
    inventory_path = Path(status.inventory)
    inventory = load_inventory(inventory_path)

    out.rule(f"[bold]2. discover[/]: migrate discover -i {inventory_path}")
    found = discover_source(inventory, book.source)
    out.print(inventory_table(found))

    plan_path = manager.lab_dir(state_dir) / "demo-plan.yaml"
    out.rule(f"[bold]3. plan[/]: migrate plan -i {inventory_path} -p {playbook_path} -o {plan_path}")
    targets = snapshot_targets(inventory, playbook_targets(book), playbook_file=str(playbook_path))
    plan_path.write_text(
        dump_plan(build_plan(found, book, targets, inventory_file=str(inventory_path))), "utf-8"
    )
    plan_obj = load_plan(plan_path)
    for table in plan_tables(plan_obj):
        out.print(table)

    out.rule(f"[bold]4. run[/]: migrate run {plan_path}")
    code = _execute(obj, plan_path, plan_obj, inventory, None, fresh=True)

    out.rule("[bold]5. report[/]")
    store = _store(obj)
    latest = store.runs(plan_obj.content_hash)[-1]
    out.print(run_report(store, latest.id, "md"), markup=False, highlight=False)
    err.print(
        f"lab still running: `migrate lab status`; `migrate rollback {latest.id}` undoes the run; "
        "`migrate lab down` stops the lab"
    )
    raise SystemExit(code)
