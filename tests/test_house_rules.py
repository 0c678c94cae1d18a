"""House rules a reviewer would otherwise have to remember: lint, and the import boundaries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "migrate"
ROOT = SRC.parents[1]

# Pure layers: no SDK, no connectors, no I/O libraries (STYLE.md, "Rule of imports").
PURE = ["model.py", "planner.py", "plan.py", "mapping.py", "playbook.py", "disks/formats.py", "disks/vmdk.py"]
FORBIDDEN = (
    "pyVmomi",
    "pyVim",
    "proxmoxer",
    "XenAPI",
    "paramiko",
    "requests",
    "migrate.connectors",
    "migrate.executor",
    "subprocess",
    "socket",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_sdk_or_connector(module: str) -> None:
    """Planner-side modules stay pure: none imports an SDK, a connector or an I/O library."""
    path = SRC / module
    if not path.exists():
        pytest.fail(f"{module} is listed as pure but does not exist; update PURE")
    bad = {name for name in _imports(path) if name.startswith(FORBIDDEN)}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_executor_knows_only_the_protocols() -> None:
    """The executor imports connectors only through connectors/base.py."""
    offenders = []
    for path in (SRC / "executor").rglob("*.py"):
        for name in _imports(path):
            if name.startswith("migrate.connectors") and name != "migrate.connectors.base":
                offenders.append(f"{path.name}: {name}")
    assert not offenders, offenders


def test_ruff_is_clean() -> None:
    """ruff finds nothing in the sources, tests and benchmarks."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_is_clean() -> None:
    """mypy --strict finds nothing in the package (third-party packages without types are borders)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "src/migrate"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
