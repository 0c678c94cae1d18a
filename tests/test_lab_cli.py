"""`migrate lab up|status|down` as a user runs it: idempotent up, valid inventory, nothing left after down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from migrate.inventory import load_inventory

pytestmark = pytest.mark.lab


def _migrate(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MIGRATE_STATE_DIR=str(cwd / ".migrate"), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "migrate", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_lab_up_status_down(tmp_path: Path) -> None:
    """up starts four services and writes a valid inventory; up again changes nothing; down stops all."""
    (tmp_path / "inventories").mkdir()
    first = _migrate(tmp_path, "lab", "up")
    assert first.returncode == 0, first.stderr
    record = json.loads((tmp_path / ".migrate" / "lab" / "lab.json").read_text())
    pids = {s["name"]: s["pid"] for s in record["services"]}
    assert set(pids) == {"vcsim", "sshd", "fakepve", "xapi-fake"}
    assert all(_alive(pid) for pid in pids.values())

    inventory = load_inventory(tmp_path / "inventories" / "lab.yaml")
    assert set(inventory.sources) == {"lab-vc"} and set(inventory.targets) == {"lab-pve", "lab-xcp"}
    text = (tmp_path / "inventories" / "lab.yaml").read_text()
    for secret_file in (tmp_path / ".migrate" / "lab").rglob("*.pass*"):
        assert secret_file.read_text().strip() not in text  # only file: references

    again = _migrate(tmp_path, "lab", "up")
    assert again.returncode == 0 and "already running" in again.stderr
    record_again = json.loads((tmp_path / ".migrate" / "lab" / "lab.json").read_text())
    assert {s["name"]: s["pid"] for s in record_again["services"]} == pids

    status = _migrate(tmp_path, "lab", "status")
    assert status.returncode == 0 and status.stdout.count("running") == 4

    down = _migrate(tmp_path, "lab", "down")
    assert down.returncode == 0
    assert not any(_alive(pid) for pid in pids.values())
    assert not (tmp_path / ".migrate" / "lab").exists()
    assert not (tmp_path / "inventories" / "lab.yaml").exists()
    after = _migrate(tmp_path, "lab", "status")
    assert after.returncode == 1 and "not started" in after.stdout
