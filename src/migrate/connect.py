"""Wiring: from inventory entries to concrete connectors. The CLI uses this; the planner and
the executor never import it (they see the model and the Protocols only)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from migrate.connectors.base import Source, Target, VmSpec
from migrate.errors import ConfigError, Problem
from migrate.executor.progress import Board
from migrate.executor.steps import Services
from migrate.inventory import Inventory, ProxmoxSpec, XcpngSpec
from migrate.model import SourceInventory, TargetSnapshot
from migrate.playbook import Playbook

T = TypeVar("T")


def discover_source(inventory: Inventory, name: str | None) -> SourceInventory:
    from migrate.connectors.vsphere import VsphereSource

    source_name, spec = inventory.source(name)
    with VsphereSource(source_name, spec) as vsphere:
        return vsphere.discover()


def snapshot_target(name: str, spec: ProxmoxSpec | XcpngSpec) -> TargetSnapshot:
    if isinstance(spec, ProxmoxSpec):
        from migrate.connectors.proxmox import ProxmoxTarget

        with ProxmoxTarget(name, spec) as pve:
            return pve.snapshot()
    from migrate.connectors.xcpng import XcpngTarget

    with XcpngTarget(name, spec) as xcp:
        return xcp.snapshot()


def playbook_targets(playbook: Playbook) -> list[str]:
    names = {rule.target for rule in playbook.targets.rules}
    if playbook.targets.default:
        names.add(playbook.targets.default)
    return sorted(names)


def snapshot_targets(
    inventory: Inventory, names: Iterable[str], *, playbook_file: str = ""
) -> dict[str, TargetSnapshot]:
    """Read every named target, in parallel (each is a few round trips); unknown names fail first."""
    names = sorted(set(names))
    unknown = [n for n in names if n not in inventory.targets]
    if unknown:
        defined = ", ".join(inventory.targets) or "none"
        raise ConfigError(
            [
                Problem(
                    playbook_file or inventory.file,
                    None,
                    "$.targets",
                    f"target {n!r} is not in inventory {inventory.file} (defined: {defined})",
                )
                for n in unknown
            ]
        )
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(4, len(names))) as pool:
        snapshots = list(pool.map(lambda n: snapshot_target(n, inventory.targets[n]), names))
    return dict(zip(names, snapshots, strict=True))


class ExecutionServices:
    """Opens the connectors a run needs, lazily and once per thread for targets, and closes them all.

    The source session is shared (pyvmomi serialises calls on its stub); target connectors are
    per thread because their HTTP sessions are not meant to be shared by concurrent VMs.
    """

    def __init__(
        self, inventory: Inventory, source_name: str, *, staging_dir: Path, board: Board | None = None
    ) -> None:
        self._board = board
        self._inventory = inventory
        self._source_name = source_name
        self._staging_dir = staging_dir
        self._lock = threading.Lock()
        self._local = threading.local()
        self._opened: list[AbstractContextManager[Any]] = []
        self._source: Any = None

    def _enter(self, manager: AbstractContextManager[T]) -> T:
        value = manager.__enter__()
        with self._lock:
            self._opened.append(manager)
        return value

    def source(self) -> Source:
        with self._lock:
            if self._source is None:
                from migrate.connectors.vsphere_source import VsphereExecSource

                name, spec = self._inventory.source(self._source_name)
                manager = VsphereExecSource(name, spec)
                self._source = manager.__enter__()
                self._opened.append(manager)
            return self._source  # type: ignore[no-any-return]

    def target(self, name: str) -> Target:
        cache: dict[str, Target] = getattr(self._local, "targets", None) or {}
        self._local.targets = cache
        if name not in cache:
            spec = self._inventory.targets.get(name)
            if spec is None:
                raise ConfigError(
                    Problem(
                        self._inventory.file,
                        None,
                        f"$.targets.{name}",
                        "the plan names this target but the inventory does not define it",
                    )
                )
            if isinstance(spec, ProxmoxSpec):
                from migrate.connectors.proxmox_target import ProxmoxExecTarget

                cache[name] = self._enter(ProxmoxExecTarget(name, spec, landing_storage=spec.landing_storage))
            else:
                from migrate.connectors.xcpng import XcpngTarget

                cache[name] = self._enter(XcpngTarget(name, spec))
        return cache[name]

    def for_vm(self, vm: VmSpec) -> Services:
        from migrate.executor.diskmover import PipelineMover

        return Services(
            source=self.source(),
            target=self.target(vm.target),
            disks=PipelineMover(self._staging_dir, self._board),
        )

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for manager in reversed(opened):
            with contextlib.suppress(Exception):
                manager.__exit__(None, None, None)

    def __enter__(self) -> ExecutionServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
