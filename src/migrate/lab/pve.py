"""The lab's Proxmox VE cluster: fakepve in a child process, seeded like a small real cluster.

fakepve (AGPL, lab extra only) answers the whole PVE 9 API with PVE's own validation, keeps
state and runs tasks. It is imported only in the child (``python -m migrate.lab.pve serve``),
never by migrate proper. The child adds what a migration target needs and fakepve leaves
generic: per-node CPU and memory, storage space in /cluster/resources, bridges and SDN
vnets, disk imports that really copy bytes (``import-from`` runs ``qemu-img convert`` into
a file under the lab's node directory), and a control endpoint (``POST /_lab/<action>``,
guarded by a secret) through which tests inject faults and read the fake's state.

Directory storages point into ``<workdir>/node`` so that the lab's sshd, standing for the
nodes' shells, holds the bytes the executor lands there (every node shares that directory).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from migrate.lab.certs import CertPaths
from migrate.lab.control import call_control
from migrate.lab.process import end_process, start_ready_child, stop_pid_file
from migrate.lab.sshd import RunningSshd

GiB = 1024**3
TiB = 1024**4
START_TIMEOUT = 30.0
# What the lab grants migrate@pve on "/": the role the documentation recommends.
MIGRATE_PRIVILEGES = (
    "Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate", "Datastore.Audit",
    "Pool.Audit", "SDN.Audit", "SDN.Use", "Sys.Audit", "VM.Allocate", "VM.Audit", "VM.Config.CDROM",
    "VM.Config.CPU", "VM.Config.Cloudinit", "VM.Config.Disk", "VM.Config.HWType", "VM.Config.Memory",
    "VM.Config.Network", "VM.Config.Options", "VM.GuestAgent.Audit", "VM.PowerMgmt",
)  # fmt: skip


# -- the seed ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeSeed:
    name: str
    cpus: int
    memory_bytes: int
    memory_used_bytes: int
    online: bool = True


@dataclass(frozen=True, slots=True)
class StorageSeed:
    """A storage.cfg entry; ``path`` (file storages) is where it lives on the node, under the lab root."""

    name: str
    type: str
    content: tuple[str, ...]
    total_bytes: int
    free_bytes: int
    shared: bool = False
    nodes: tuple[str, ...] = ()  # empty: every node
    path: str = ""
    options: tuple[tuple[str, str], ...] = ()  # type-specific: vgname, thinpool, server, export, pool


@dataclass(frozen=True, slots=True)
class BridgeSeed:
    name: str
    ports: str
    vlan_aware: bool = False
    nodes: tuple[str, ...] = ()
    cidr: str = ""  # the node's address on it; nodes get consecutive hosts from it
    comment: str = ""


@dataclass(frozen=True, slots=True)
class ZoneSeed:
    name: str
    type: str
    bridge: str
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VnetSeed:
    name: str
    zone: str
    tag: int | None = None
    alias: str = ""


@dataclass(frozen=True, slots=True)
class VmSeed:
    vmid: int
    name: str
    node: str
    status: str = "stopped"
    config: tuple[tuple[str, str], ...] = ()
    # (storage, volume name, bytes) of the VM's disks, so the storages account for them.
    volumes: tuple[tuple[str, str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class PveSeed:
    nodes: tuple[NodeSeed, ...]
    storages: tuple[StorageSeed, ...]
    bridges: tuple[BridgeSeed, ...]
    zones: tuple[ZoneSeed, ...] = ()
    vnets: tuple[VnetSeed, ...] = ()
    vms: tuple[VmSeed, ...] = ()
    cluster_name: str = "lab"
    version: str = "9.0.10"
    release: str = "9.0"
    user: str = "migrate@pve"
    token_name: str = "lab"
    privileges: tuple[str, ...] = MIGRATE_PRIVILEGES

    @property
    def token_id(self) -> str:
        return f"{self.user}!{self.token_name}"

    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)


def default_seed() -> PveSeed:
    """Three nodes, local + LVM-thin per node, shared NFS everywhere and Ceph RBD on two nodes."""
    nodes = (
        NodeSeed("pve1", cpus=32, memory_bytes=128 * GiB, memory_used_bytes=24 * GiB),
        NodeSeed("pve2", cpus=32, memory_bytes=128 * GiB, memory_used_bytes=40 * GiB),
        NodeSeed("pve3", cpus=16, memory_bytes=64 * GiB, memory_used_bytes=8 * GiB),
    )
    storages = (
        StorageSeed("local", "dir", ("backup", "images", "import", "iso", "vztmpl"), 100 * GiB, 80 * GiB,
                    path="/var/lib/vz"),
        StorageSeed("local-lvm", "lvmthin", ("images", "rootdir"), 400 * GiB, 350 * GiB,
                    options=(("thinpool", "data"), ("vgname", "pve"))),
        StorageSeed("nfs-shared", "nfs", ("images", "import", "iso"), 2 * TiB, 1536 * GiB, shared=True,
                    path="/mnt/pve/nfs-shared", options=(("export", "/srv/pve"), ("server", "192.0.2.50"))),
        StorageSeed("ceph-vm", "rbd", ("images",), 3 * TiB, 2 * TiB, shared=True, nodes=("pve1", "pve2"),
                    options=(("pool", "vm"),)),
    )  # fmt: skip
    bridges = (
        BridgeSeed("vmbr0", "eno1", cidr="192.0.2.11/24", comment="management and VMs"),
        BridgeSeed("vmbr1", "eno2", vlan_aware=True, comment="VLAN trunk"),
        BridgeSeed("vmbr2", "eno3", nodes=("pve1",), comment="storage network"),
    )
    vm = VmSeed(
        100, "legacy-app01", "pve1", status="running",
        config=(("cores", "2"), ("memory", "4096"), ("net0", "virtio=BC:24:11:00:01:00,bridge=vmbr0"),
                ("ostype", "l26"), ("scsi0", "local-lvm:vm-100-disk-0,size=32G"),
                ("scsihw", "virtio-scsi-single"), ("tags", "legacy;prod")),
        volumes=(("local-lvm", "vm-100-disk-0", 32 * GiB),),
    )  # fmt: skip
    return PveSeed(
        nodes=nodes, storages=storages, bridges=bridges,
        zones=(ZoneSeed("lab", "vlan", "vmbr1"),), vnets=(VnetSeed("vnet100", "lab", tag=100, alias="app"),),
        vms=(vm,),
    )  # fmt: skip


# -- the running cluster ----------------------------------------------------------------------


@dataclass
class RunningPve:
    """A started fake cluster and how to reach it; ``control()`` injects faults and reads state."""

    url: str
    host: str
    port: int
    token_id: str
    token_secret_file: Path
    user: str
    password_file: Path
    ca_file: Path
    node_root: Path
    pid: int
    seed: PveSeed
    control_secret_file: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process)
            return
        stop_pid_file(self.node_root.parent / "pve" / "pve.pid")

    def control(self, action: str, **params: Any) -> Any:
        """Call the fake's control endpoint: fail, clear_failures, flaky_network, slow_network,
        node_offline, lock_vm, unlock_vm, hold_config_lock, release_config_lock, vm_set, set,
        state, requests. Returns the action's data."""
        return call_control("fakepve", self.url, self.control_secret_file, self.ca_file, action, params)

    def state(self) -> dict[str, Any]:
        return self.control("state")  # type: ignore[no-any-return]

    def inventory_entry(self, ssh: dict[str, Any] | RunningSshd) -> dict[str, Any]:
        """A ``targets:`` entry for an inventory file (secrets as file: references); given the lab's
        sshd, every node's shell is that sshd."""
        if isinstance(ssh, RunningSshd):
            ssh = {"user": ssh.user, "port": ssh.port, "key_file": str(ssh.key_file),
                   "known_hosts": str(ssh.known_hosts),
                   "hosts": dict.fromkeys(self.seed.node_names(), ssh.host)}
        return {
            "type": "proxmox", "host": self.host, "port": self.port, "ca_file": str(self.ca_file),
            "token_id": self.token_id, "token_secret": f"file:{self.token_secret_file}", "ssh": ssh,
        }  # fmt: skip


def _seed_files(workdir: Path, seed: PveSeed) -> tuple[Path, dict[str, Any]]:
    pve_dir = workdir / "pve"
    pve_dir.mkdir(parents=True, exist_ok=True)
    node_root = workdir / "node"
    files = {
        "token": pve_dir / "token.secret", "password": pve_dir / "migrate.password",
        "root": pve_dir / "root.password", "control": pve_dir / "control.secret",
    }  # fmt: skip
    for name, path in files.items():
        if not path.exists():
            # PVE's token secrets are UUIDs; the others only need to be unguessable.
            _write_private(path, (str(uuid.uuid4()) if name == "token" else secrets.token_urlsafe(18)) + "\n")
    storages = []
    for st in seed.storages:
        item = asdict(st)
        if st.path:
            item["path"] = str(node_root) + st.path
            for sub in ("images", "import", "template/iso", "template/cache", "dump", "snippets"):
                Path(item["path"], sub).mkdir(parents=True, exist_ok=True)
        storages.append(item)
    config = {
        "seed": dict(asdict(seed), storages=storages, token_id=seed.token_id),
        "node_root": str(node_root),
        "secrets": {name: path.read_text().strip() for name, path in files.items()},
    }
    return pve_dir, dict(config, files={k: str(v) for k, v in files.items()})


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)
        out.write(text)


def start_pve(
    workdir: Path,
    certs: CertPaths,
    *,
    detach: bool = False,
    seed: PveSeed | None = None,
    time_scale: float = 0.0,
    host: str = "127.0.0.1",
) -> RunningPve:
    """Start the fake cluster on ``host`` and a free port with the lab's certificate.

    ``time_scale`` is real seconds per PVE second for tasks (0: every task ends before its
    request returns). ``detach`` lets it outlive this process; its pid is in ``<workdir>/pve``.
    """
    seed = seed or default_seed()
    pve_dir, config = _seed_files(workdir, seed)
    config.update(host=host, time_scale=time_scale, cert=str(certs.cert), key=str(certs.key))
    config_file = pve_dir / "config.json"
    _write_private(config_file, json.dumps(config, indent=1))
    proc, ready = start_ready_child(
        "fakepve", [sys.executable, "-m", "migrate.lab.pve", "serve", str(config_file)], pve_dir / "pve.log",
        detach=detach, timeout=START_TIMEOUT,
        hint="pip install 'migrate[lab]' (fakepve, aiohttp, cryptography)",
    )  # fmt: skip
    (pve_dir / "pve.pid").write_text(f"{proc.pid}\n")
    files = config["files"]
    running = RunningPve(
        url=ready["url"], host=host, port=int(ready["port"]), token_id=seed.token_id,
        token_secret_file=Path(files["token"]), user=seed.user, password_file=Path(files["password"]),
        ca_file=certs.ca, node_root=Path(config["node_root"]), pid=proc.pid, seed=seed,
        control_secret_file=Path(files["control"]), process=None if detach else proc,
    )  # fmt: skip
    (pve_dir / "running.json").write_text(json.dumps({"url": running.url, "pid": proc.pid}) + "\n")
    return running


# -- the child: fakepve with the lab's additions ----------------------------------------------


def _serve(config_file: str) -> None:
    import asyncio
    import signal

    from migrate.lab import pve_fake  # the only module that imports fakepve

    config = json.loads(Path(config_file).read_text())

    async def main() -> None:
        fake = pve_fake.build(config)
        await fake.start(config["cert"], config["key"])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(json.dumps({"url": fake.url, "port": fake.port, "pid": os.getpid()}), flush=True)
        # Nothing else is printed; a detached parent may be gone and its pipe with it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        await stop.wait()
        await fake.stop()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "serve":
        sys.exit("usage: python -m migrate.lab.pve serve CONFIG.json")
    _serve(args[1])


if __name__ == "__main__":
    main()
