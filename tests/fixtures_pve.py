"""Shared fixtures: the lab's fakepve cluster with TLS from a throwaway CA, one per test module.

Assign them at module level (``certs = fixtures_pve.certs``), as with fixtures_vcsim.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from migrate.lab.certs import CertPaths, make_certs
from migrate.lab.pve import RunningPve, start_pve


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, certs: CertPaths) -> Iterator[RunningPve]:
    """A cluster the module's tests share; tests that change it must put it back."""
    running = start_pve(tmp_path_factory.mktemp("lab"), certs)
    yield running
    running.stop()
