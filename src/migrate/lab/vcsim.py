"""Build (once, cached) and start govmomi's vcsim on 127.0.0.1.

The binary is built from Debian's golang-github-vmware-govmomi-dev source with our small
main.go beside this file; the cache key is the hash of main.go and the govmomi version, so
a changed main or package rebuilds and nothing else does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from migrate.errors import LabError
from migrate.lab.process import end_process, start_ready_child

GOVMOMI_SRC = Path("/usr/share/gocode/src/github.com/vmware/govmomi")
MAIN_GO = Path(__file__).with_name("vcsim") / "main.go"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "migrate"


def _govmomi_version() -> str:
    # Debian's package keeps the module's version nowhere in the tree; its changelog has it.
    changelog = Path("/usr/share/doc/golang-github-vmware-govmomi-dev/changelog.Debian.gz")
    return hashlib.sha256(changelog.read_bytes()).hexdigest()[:12] if changelog.exists() else "unknown"


def binary_path() -> Path:
    digest = hashlib.sha256(MAIN_GO.read_bytes() + _govmomi_version().encode()).hexdigest()[:16]
    return cache_dir() / f"vcsim-{digest}"


def ensure_built() -> Path:
    """Return the cached vcsim binary, building it first if needed (about 15 s)."""
    target = binary_path()
    if target.exists():
        return target
    go = shutil.which("go")
    if not go or not GOVMOMI_SRC.exists():
        raise LabError(
            "cannot build vcsim: Go or the govmomi source is missing",
            hint="apt-get install golang-go golang-github-vmware-govmomi-dev",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="migrate-vcsim-") as work:
        shutil.copy(MAIN_GO, Path(work) / "main.go")
        env = dict(
            os.environ,
            GOPATH="/usr/share/gocode",
            GO111MODULE="off",
            GOCACHE=str(cache_dir() / "gocache"),
            GOFLAGS="",
        )
        partial = target.with_suffix(".partial")
        proc = subprocess.run(
            [go, "build", "-o", str(partial), "."], cwd=work, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise LabError(f"building vcsim failed:\n{proc.stderr.strip()}")
        partial.rename(target)  # atomic: a concurrent builder never sees a half-written binary
    return target


@dataclass(frozen=True, slots=True)
class VcsimOptions:
    datacenters: int = 1
    clusters: int = 1
    cluster_hosts: int = 2
    standalone_hosts: int = 0
    vms_per_pool: int = 0
    datastores: int = 1
    portgroups: int = 1
    username: str = "user"
    password: str = "pass"
    tls_cert: str = ""
    tls_key: str = ""
    listen: str = "127.0.0.1:0"


def command(opts: VcsimOptions) -> list[str]:
    cmd = [
        str(ensure_built()),
        "-l", opts.listen,
        "-dc", str(opts.datacenters),
        "-cluster", str(opts.clusters),
        "-cluster-host", str(opts.cluster_hosts),
        "-standalone-host", str(opts.standalone_hosts),
        "-vm", str(opts.vms_per_pool),
        "-ds", str(opts.datastores),
        "-pg", str(opts.portgroups),
        "-username", opts.username,
        "-password", opts.password,
    ]  # fmt: skip
    if opts.tls_cert:
        cmd += ["-tlscert", opts.tls_cert, "-tlskey", opts.tls_key]
    return cmd


@dataclass
class RunningVcsim:
    process: subprocess.Popen[bytes]
    url: str  # https://127.0.0.1:PORT/sdk (no credentials)

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    def stop(self) -> None:
        end_process(self.process)


def start(opts: VcsimOptions, *, detach: bool = False, log_path: Path | None = None) -> RunningVcsim:
    """Start vcsim and wait until it prints its URL (it listens before printing)."""
    proc, ready = start_ready_child("vcsim", command(opts), log_path, detach=detach)
    url = ready["url"]
    scheme, rest = url.split("://", 1)
    url = f"{scheme}://{rest.split('@', 1)[-1]}"
    return RunningVcsim(process=proc, url=url)
