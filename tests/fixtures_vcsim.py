"""Shared fixtures: a TLS-verified vcsim on 127.0.0.1 and the sample estate seeded into it.

Import the fixtures a test module needs by assigning them at module level (importing
them by name would make ruff see the test's parameter as a redefinition)::

    import fixtures_vcsim

    lab_certs = fixtures_vcsim.lab_certs
    vcsim_server = fixtures_vcsim.vcsim_server
    seeded_lab = fixtures_vcsim.seeded_lab

Each module gets its own vcsim (module scope), so modules run in parallel under xdist
without sharing state; tests inside a module share the seeded estate and must not change it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyVim.connect import Disconnect
from pyVmomi import vim

from migrate.disks.datastore import DatastoreFiles
from migrate.lab import certs, seeder, vcsim
from migrate.lab.estate import EstateSpec, SeededEstate, load_estate

ROOT = Path(__file__).parents[1]
ESTATE_FILE = ROOT / "examples" / "lab-estate.yaml"
USER, PASSWORD = "user", "pass"


@dataclass
class SeededLab:
    """A running vcsim holding the sample estate, and ways to talk to it."""

    server: vcsim.RunningVcsim
    ca: Path
    si: vim.ServiceInstance
    spec: EstateSpec
    estate: SeededEstate

    @property
    def folder_url(self) -> str:
        return self.server.url.removesuffix("/sdk") + "/folder"

    def http(self) -> DatastoreFiles:
        """The product's datastore reader, with the session cookie and TLS verified by the lab CA."""
        return DatastoreFiles(
            self.folder_url,
            self.si._stub.cookie,
            datacenter=self.spec.datacenter,
            datastore=self.spec.datastore,
            ca_file=self.ca,
        )

    def seed_again(self) -> SeededEstate:
        return seeder.seed_estate(self.si, self.spec, datastore_url=self.folder_url, ca_file=self.ca)


@pytest.fixture(scope="session")
def lab_certs(tmp_path_factory: pytest.TempPathFactory) -> certs.CertPaths:
    return certs.make_certs(tmp_path_factory.mktemp("lab-certs"))


@pytest.fixture(scope="module")
def vcsim_server(lab_certs: certs.CertPaths) -> Iterator[vcsim.RunningVcsim]:
    server = vcsim.start(
        vcsim.VcsimOptions(
            tls_cert=str(lab_certs.cert), tls_key=str(lab_certs.key), username=USER, password=PASSWORD
        )
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def seeded_lab(vcsim_server: vcsim.RunningVcsim, lab_certs: certs.CertPaths) -> Iterator[SeededLab]:
    si = seeder.connect(vcsim_server.url, user=USER, password=PASSWORD, ca_file=lab_certs.ca)
    spec = load_estate(ESTATE_FILE)
    folder_url = vcsim_server.url.removesuffix("/sdk") + "/folder"
    estate = seeder.seed_estate(si, spec, datastore_url=folder_url, ca_file=lab_certs.ca)
    try:
        yield SeededLab(vcsim_server, lab_certs.ca, si, spec, estate)
    finally:
        Disconnect(si)


def file_sha256(files: DatastoreFiles, path: str) -> str:
    """sha256 of a whole datastore file, streamed."""
    digest = hashlib.sha256()
    with files.read_range(path) as stream:
        for piece in stream:
            digest.update(piece)
    return digest.hexdigest()


def range_bytes(files: DatastoreFiles, path: str, offset: int, length: int) -> bytes:
    """Exactly [offset, offset+length), and only if the server honoured the Range (HTTP 206)."""
    with files.read_range(path, offset, offset + length) as stream:
        assert stream.honoured and stream.offset == offset
    return files.read_bytes(path, offset, offset + length)
