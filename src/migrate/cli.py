"""The command line: the only module that parses arguments, prints, and maps errors to exit codes.

Exit codes: 0 ok, 1 failure, 2 bad input or usage (nothing was touched), 3 partial (some VMs
failed or were blocked).
"""

from __future__ import annotations

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

    migrate_log.configure(state_dir / "logs" / "migrate.jsonl", console=True,
                          level="debug" if verbose else "info", console_level=None if verbose else "warning")
    # Every log line carries an id; `run` replaces it with the run's own id.
    migrate_log.set_run(f"cli-{uuid.uuid4().hex[:12]}")


# -- discover ----------------------------------------------------------------------------------


@main.command()
@click.option("-i", "--inventory", "inventory_path", required=True, type=click.Path(path_type=Path),
              help="Inventory YAML naming the vSphere source(s).")
@click.option("--source", help="Which source of the inventory (needed when it has several).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the discovered inventory to this file (JSON, or YAML by extension).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "yaml"]), default=None,
              help="What to print: a table on a terminal, JSON otherwise.")
@handle_errors
def discover(inventory_path: Path, source: str | None, output: Path | None, fmt: str | None) -> None:
    """Read every VM, host, datastore and network of a vSphere source (read only)."""
    from migrate.connectors.vsphere import VsphereSource
    from migrate.inventory import load_inventory
    from migrate.model import source_to_dict
    from migrate.render import inventory_table

    inventory = load_inventory(inventory_path)
    name, spec = inventory.source(source)
    with VsphereSource(name, spec) as vsphere:
        found = vsphere.discover()
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
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


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
