"""`migrate lab up|status|down`: start the lab's peers detached, remember them, stop them.

The lab lives in ``<state dir>/lab``: TLS material, secrets, each service's files, and
``lab.json`` recording what runs where. ``up`` is idempotent: a healthy lab is left alone; a
half-dead one is stopped and started again (vcsim keeps its estate in memory, so a restarted
vcsim must be seeded again anyway). ``down`` stops every process it recorded and removes the
lab directory, leaving nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from migrate.errors import LabError
from migrate.lab import certs, vcsim
from migrate.lab.control import call_control
from migrate.lab.estate import DEFAULT_ESTATE, load_estate, write_seeded
from migrate.lab.process import running, stop_pid

LAB_FILE = "lab.json"
INVENTORY_NAME = "lab.yaml"
VSPHERE_USER = "migrate@vsphere.local"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    pid: int
    host: str
    port: int
    url: str
    # How to stop it when the pid alone is not enough (a pid file a daemon rewrote, say).
    pid_file: str = ""
    # The fake's control endpoint secret (fault injection, state), for tests and the demo.
    control_secret_file: str = ""
    node_root: str = ""


@dataclass(frozen=True, slots=True)
class LabStatus:
    directory: str
    inventory: str = ""
    services: tuple[Service, ...] = ()
    running: tuple[str, ...] = ()
    estate: str = ""

    @property
    def all_running(self) -> bool:
        return bool(self.services) and len(self.running) == len(self.services)


def lab_dir(state_dir: Path) -> Path:
    return state_dir.resolve() / "lab"


def _alive(service: Service) -> bool:
    if not running(service.pid):
        return False
    with contextlib.suppress(OSError), socket.create_connection((service.host, service.port), timeout=2):
        return True
    return False


def _read(state_dir: Path) -> dict[str, Any]:
    path = lab_dir(state_dir) / LAB_FILE
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise LabError(f"{path} is unreadable ({exc}); run `migrate lab down` to clear it") from None


def status(state_dir: Path) -> LabStatus:
    data = _read(state_dir)
    services = tuple(Service(**s) for s in data.get("services", []))
    return LabStatus(
        directory=str(lab_dir(state_dir)),
        inventory=data.get("inventory", ""),
        services=services,
        running=tuple(s.name for s in services if _alive(s)),
        estate=data.get("estate", ""),
    )


def down(state_dir: Path) -> list[str]:
    """Stop every recorded service and remove the lab directory; returns what was running."""
    current = status(state_dir)
    for service in current.services:
        stop_pid(service.pid, timeout=5.0)
    directory = lab_dir(state_dir)
    if directory.exists():
        shutil.rmtree(directory)
    if current.inventory:
        with contextlib.suppress(FileNotFoundError):
            Path(current.inventory).unlink()
    return list(current.running)


def _write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return path


def inventory_path(state_dir: Path) -> Path:
    """inventories/lab.yaml when run from a checkout, else a file inside the lab directory."""
    here = Path.cwd() / "inventories"
    return here / INVENTORY_NAME if here.is_dir() else lab_dir(state_dir) / INVENTORY_NAME


@dataclass
class _Started:
    services: list[Service] = field(default_factory=list)
    inventory: dict[str, Any] = field(default_factory=lambda: {"sources": {}, "targets": {}})
    stoppers: list[Callable[[], None]] = field(default_factory=list)


def up(
    state_dir: Path,
    *,
    estate_file: Path = DEFAULT_ESTATE,
    inventory: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> LabStatus:
    """Start the lab unless it already runs, seed the sample estate, write the lab inventory."""
    current = status(state_dir)
    if current.all_running:
        progress("already running")
        return current
    if current.services:
        progress("some lab services are down; restarting the lab")
        down(state_dir)
    directory = lab_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tls = certs.make_certs(directory / "tls")
    started = _Started()
    try:
        _start_vsphere(directory, tls, estate_file, started, progress)
        _start_proxmox(directory, tls, started, progress)
        _start_xcpng(directory, tls, started, progress)
    except BaseException:
        for stop in reversed(started.stoppers):
            with contextlib.suppress(Exception):
                stop()
        raise
    target = inventory or inventory_path(state_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `migrate lab up` for the local lab on 127.0.0.1; `migrate lab down` removes it.\n"
    target.write_text(header + yaml.safe_dump(started.inventory, sort_keys=False, allow_unicode=True))
    record = {
        "services": [asdict(s) for s in started.services],
        "inventory": str(target),
        "estate": str(directory / "estate.json"),
    }
    (directory / LAB_FILE).write_text(json.dumps(record, indent=1))
    progress(f"inventory written to {target}")
    return status(state_dir)


def _start_vsphere(
    directory: Path,
    tls: certs.CertPaths,
    estate_file: Path,
    started: _Started,
    progress: Callable[[str], None],
) -> None:
    from migrate.lab.seeder import seed_vcsim

    password = secrets.token_urlsafe(18)
    password_file = _write_secret(directory / "secrets" / "vsphere.pass", password)
    progress("building vcsim (cached after the first time)")
    vcsim.ensure_built()
    (directory / "vcsim").mkdir(exist_ok=True)
    server = vcsim.start(
        vcsim.VcsimOptions(username=VSPHERE_USER, password=password, tls_cert=str(tls.cert),
                           tls_key=str(tls.key)),
        detach=True, log_path=directory / "vcsim" / "vcsim.log",
    )  # fmt: skip
    started.stoppers.append(server.stop)
    started.services.append(Service("vcsim", server.process.pid, server.host, server.port, server.url))
    progress(f"vcsim (vSphere) on {server.url}; seeding the sample estate")
    seeded = seed_vcsim(
        server, load_estate(estate_file), ca_file=tls.ca, user=VSPHERE_USER, password=password
    )
    write_seeded(seeded, directory / "estate.json")
    started.inventory["sources"]["lab-vc"] = {
        "type": "vsphere", "host": server.host, "port": server.port, "user": VSPHERE_USER,
        "password": f"file:{password_file}", "ca_file": str(tls.ca),
    }  # fmt: skip


def _start_proxmox(
    directory: Path, tls: certs.CertPaths, started: _Started, progress: Callable[[str], None]
) -> None:
    from migrate.lab.pve import start_pve
    from migrate.lab.sshd import start_sshd

    sshd = start_sshd(directory / "node-ssh", detach=True)
    started.stoppers.append(sshd.stop)
    started.services.append(
        Service(
            "sshd",
            sshd.pid,
            sshd.host,
            sshd.port,
            f"ssh://{sshd.host}:{sshd.port}",
            pid_file=str(sshd.pid_file),
        )
    )
    pve = start_pve(directory / "pve", tls, detach=True)
    started.stoppers.append(pve.stop)
    started.services.append(
        Service(
            "fakepve",
            pve.pid,
            pve.host,
            pve.port,
            pve.url,
            control_secret_file=str(pve.control_secret_file),
            node_root=str(pve.node_root),
        )
    )
    progress(f"fakepve (Proxmox VE) on {pve.url}, node shell on ssh://{sshd.host}:{sshd.port}")
    started.inventory["targets"]["lab-pve"] = pve.inventory_entry(sshd)


def _start_xcpng(
    directory: Path, tls: certs.CertPaths, started: _Started, progress: Callable[[str], None]
) -> None:
    from migrate.lab.xapi_fake.launch import start_xapi

    xapi = start_xapi(directory / "xapi", tls, detach=True)
    started.stoppers.append(xapi.stop)
    started.services.append(
        Service(
            "xapi-fake",
            xapi.pid,
            "127.0.0.1",
            xapi.port,
            xapi.url,
            control_secret_file=str(xapi.control_secret_file),
            node_root=str(xapi.state_dir),
        )
    )
    progress(f"XAPI fake (XCP-ng) on {xapi.url}")
    started.inventory["targets"]["lab-xcp"] = xapi.inventory_entry()


def service(state_dir: Path, name: str) -> Service:
    found = next((s for s in status(state_dir).services if s.name == name), None)
    if found is None:
        raise LabError(f"the lab has no {name} running", hint="run `migrate lab up`")
    return found


def control(state_dir: Path, name: str, action: str, **params: Any) -> Any:
    """Call a lab fake's control endpoint (``fakepve`` or ``xapi-fake``): faults, state, requests."""
    svc = service(state_dir, name)
    ca_file = lab_dir(state_dir) / "tls" / "ca.pem"
    return call_control(name, svc.url, Path(svc.control_secret_file), ca_file, action, params)


def status_table(current: LabStatus) -> Table:
    table = Table(title=f"lab in {current.directory}", title_justify="left")
    for column in ("service", "state", "where", "pid"):
        table.add_column(column)
    for service in current.services:
        state = "[green]running[/]" if service.name in current.running else "[red]down[/]"
        table.add_row(service.name, state, service.url, str(service.pid))
    if not current.services:
        table.add_row("-", "not started", "run `migrate lab up`", "-")
    if current.inventory:
        table.caption = f"inventory: {current.inventory}"
    return table
