"""A whole lab for end-to-end tests (vcsim + fakepve + sshd node + XAPI fake), started once per
module through `migrate lab up`'s own code, plus helpers to run the CLI and read what landed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from migrate.lab import manager
from migrate.lab.estate import SeededEstate, read_seeded

ROOT = Path(__file__).parents[1]


@dataclass
class Lab:
    state_dir: Path
    inventory: Path
    estate: SeededEstate
    workdir: Path

    def migrate(
        self, *args: str, timeout: float = 300, check: int | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, MIGRATE_STATE_DIR=str(self.state_dir), COLUMNS="200")
        proc = subprocess.run(
            [sys.executable, "-m", "migrate", *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def control(self, service: str, action: str, **params: Any) -> Any:
        return manager.control(self.state_dir, service, action, **params)

    @property
    def node_root(self) -> Path:
        return Path(manager.service(self.state_dir, "fakepve").node_root)

    def pve_volume_file(self, volid: str) -> Path:
        """The lab file standing for a Proxmox volume like 'local-lvm:vm-200-disk-0'."""
        name = volid.split(":", 1)[1].rsplit("/", 1)[-1]
        found = [p for p in self.node_root.rglob(name) if p.is_file()]
        assert len(found) == 1, f"{volid}: {found}"
        return found[0]


def guest_sha256(image: Path) -> str:
    """sha256 of the guest-visible bytes of an image in any format qemu-img reads."""
    raw = image.with_name(image.name + ".check.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    digest = hashlib.sha256()
    with open(raw, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    raw.unlink()
    return digest.hexdigest()


def start_lab(tmp: Path) -> Iterator[Lab]:
    state_dir = tmp / "state"
    workdir = tmp / "work"
    workdir.mkdir(parents=True)
    (workdir / "playbooks").symlink_to(ROOT / "playbooks")
    inventory = workdir / "lab.yaml"
    manager.up(state_dir, inventory=inventory)
    try:
        status = manager.status(state_dir)
        yield Lab(state_dir, inventory, read_seeded(Path(status.estate)), workdir)
    finally:
        manager.down(state_dir)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from start_lab(tmp_path_factory.mktemp("lab"))
