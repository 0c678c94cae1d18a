"""The command line as a user meets it: --version, --help everywhere, usage errors exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from migrate import __version__
from migrate.cli import main


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MIGRATE_STATE_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-m", "migrate", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(command, click.Group):
            out.extend(_commands(command, (*prefix, name)))
    return out


def test_version(tmp_path: Path) -> None:
    """`migrate --version` prints the package version."""
    proc = _run("--version", tmp_path=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"migrate, version {__version__}"


@pytest.mark.parametrize("command", [(), *_commands(main)], ids=lambda c: " ".join(c) or "migrate")
def test_every_command_has_help(command: tuple[str, ...], tmp_path: Path) -> None:
    """Every command and subcommand answers --help with a usage line and a description."""
    proc = _run(*command, "--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")
    assert len(proc.stdout.splitlines()) > 3


def test_unknown_command_is_usage_error(tmp_path: Path) -> None:
    """A mistyped command exits 2 and says what exists."""
    proc = _run("dicsover", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "No such command 'dicsover'" in proc.stderr
