"""How fast build_plan is on a large estate, next to a naive first-fit placement.

    .venv/bin/python benchmarks/planner.py [--vms 10000] [--nodes 100] [--repeat 3] [--budget 2.0]

The estate is synthetic and seeded: VMs of mixed size (1-16 vCPUs, 1-64 GiB, 1-4 disks) on a
few datastores and portgroups; one Proxmox target with ``--nodes`` nodes, a local storage per
node and two shared ones. build_plan does everything a real plan needs (selection, mapping,
placement with explanations, VMIDs, full configs, fingerprints); the baseline only places
memory and CPU first-fit in input order. Prints wall and CPU times and their ratio; exits 1
if build_plan's best CPU time exceeds ``--budget`` seconds (CPU time, because a shared
machine stretches wall time with other processes' work).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from collections.abc import Callable

from migrate.model import (
    Datastore,
    Disk,
    Network,
    Nic,
    SourceInventory,
    Storage,
    TargetNetwork,
    TargetNode,
    TargetSnapshot,
    Vm,
)
from migrate.plan import Plan
from migrate.planner import build_plan
from migrate.playbook import Playbook

GiB = 1 << 30
GUESTS = ("rhel9_64Guest", "ubuntu64Guest", "debian12_64Guest", "windows2019srvNext_64Guest", "otherGuest64")


def estate(n_vms: int, seed: int = 7) -> SourceInventory:
    rnd = random.Random(seed)
    vms = []
    for i in range(n_vms):
        name = f"vm-{i:05d}"
        disks = tuple(
            Disk(
                key=2000 + d,
                label=f"Hard disk {d + 1}",
                controller="pvscsi",
                bus=0,
                unit=d,
                capacity_bytes=rnd.choice((8, 16, 32, 64, 128)) * GiB,
                datastore=f"ds{i % 4}",
                path=f"[ds{i % 4}] {name}/{name}_{d}.vmdk",
            )
            for d in range(rnd.randint(1, 4))
        )
        nics = (
            Nic(
                key=4000,
                label="Network adapter 1",
                model="vmxnet3",
                mac=f"00:50:56:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                mac_manual=False,
                network=f"pg{i % 3}",
            ),
        )
        cores = rnd.choice((1, 2, 4, 8))
        vms.append(
            Vm(
                moref=f"vm-{i + 1000}",
                name=name,
                instance_uuid=f"inst-{i}",
                bios_uuid=f"bios-{i}",
                folder="DC0/vm",
                datacenter="DC0",
                cluster="C0",
                host=f"esx{i % 20}",
                resource_pool="Resources",
                power_state=rnd.choice(("poweredOn", "poweredOff")),
                template=False,
                hw_version="vmx-19",
                guest_id=rnd.choice(GUESTS),
                guest_full_name="",
                tools_status="guestToolsRunning",
                firmware=rnd.choice(("bios", "efi")),
                secure_boot=False,
                cpu_sockets=rnd.choice((1, 2)),
                cores_per_socket=cores,
                memory_mib=rnd.choice((1, 2, 4, 8, 16, 32, 64)) * 1024,
                disks=disks,
                nics=nics,
            )
        )
    rnd.shuffle(vms)
    return SourceInventory(
        source="bench-vc",
        endpoint="https://vc/sdk",
        api_version="8.0",
        vms=tuple(vms),
        datastores=tuple(
            Datastore(f"datastore-{i}", f"ds{i}", "VMFS", 100_000 * GiB, 50_000 * GiB) for i in range(4)
        ),
        networks=tuple(Network(f"network-{i}", f"pg{i}", "standard") for i in range(3)),
    )


def target(n_nodes: int) -> TargetSnapshot:
    nodes = tuple(TargetNode(f"node{i:03d}", 256, 2048 * GiB, (i % 7) * 64 * GiB) for i in range(n_nodes))
    storages = tuple(
        Storage("local-lvm", "lvmthin", 8_000 * GiB, 7_000 * GiB, content=("images",), nodes=(n.name,))
        for n in nodes
    )
    storages += (
        Storage("ceph", "rbd", 2_000_000 * GiB, 1_500_000 * GiB, shared=True, content=("images",)),
        Storage("nfs", "nfs", 1_000_000 * GiB, 800_000 * GiB, shared=True, content=("images",)),
    )
    return TargetSnapshot(
        name="big-pve",
        kind="proxmox",
        endpoint="https://pve:8006",
        version="8.4",
        nodes=nodes,
        storages=storages,
        networks=(TargetNetwork("vmbr0", "bridge"), TargetNetwork("vmbr1", "bridge")),
    )


def playbook() -> Playbook:
    return Playbook.model_validate(
        {
            "name": "bench",
            "select": {"include": [{"names": ["*"]}], "exclude": [{"names": ["*-tmpl"]}]},
            "targets": {"default": "big-pve"},
            "network_map": {"big-pve": {"pg0": "vmbr0", "pg1": "vmbr1/10", "pg2": "vmbr1/20"}},
            "storage_map": {"big-pve": {"*": ["local-lvm", "ceph", "nfs"]}},
            "waves": [
                {"name": "linux", "concurrency": 8, "select": {"os": "linux"}},
                {"name": "rest", "concurrency": 4},
            ],
            "options": {"overcommit": {"cpu": 4.0, "memory": 1.5}},
        }
    )


def first_fit(source: SourceInventory, snap: TargetSnapshot) -> dict[str, str]:
    """The naive baseline: each VM, in input order, on the first node with memory and CPU left."""
    free = {n.name: [int(n.memory_total_bytes * 1.5) - n.memory_used_bytes, n.cpus * 4.0] for n in snap.nodes}
    placed = {}
    for vm in source.vms:
        need = vm.memory_mib << 20
        for name, room in free.items():
            if room[0] >= need and room[1] >= vm.vcpus:
                room[0] -= need
                room[1] -= vm.vcpus
                placed[vm.moref] = name
                break
    return placed


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, float, object]:
    """Best wall and best CPU seconds over ``repeat`` runs, and the last result."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    return wall, cpu, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=2.0)
    args = ap.parse_args(argv)
    source, snap, pb = estate(args.vms), target(args.nodes), playbook()
    wall, cpu, plan = best_of(args.repeat, lambda: build_plan(source, pb, {snap.name: snap}))
    naive_wall, naive_cpu, placed = best_of(args.repeat, lambda: first_fit(source, snap))
    assert isinstance(plan, Plan) and isinstance(placed, dict)
    print(f"estate: {args.vms} VMs, {args.nodes} nodes (best of {args.repeat}; wall and CPU seconds)")
    print(f"build_plan : {wall:7.3f} s wall {cpu:7.3f} s CPU  {len(plan.vms)} planned, "
          f"{len(plan.blocked)} blocked (full configs, reasons, fingerprints)")
    print(f"first-fit  : {naive_wall:7.3f} s wall {naive_cpu:7.3f} s CPU  {len(placed)} placed "
          "(memory and CPU only)")
    print(f"ratio      : {cpu / max(naive_cpu, 1e-9):7.1f}x the naive baseline's CPU time")
    print("memory     : peak bytes allocated while planning (tracemalloc), by estate size")
    for n in sorted({max(1, args.vms // 10), max(1, args.vms // 2), args.vms}):
        small = estate(n)
        tracemalloc.start()
        build_plan(small, pb, {snap.name: snap})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"  {n:6d} VMs: {peak / 2**20:7.1f} MiB ({peak / n / 1024:5.1f} KiB per VM)")
    # CPU time, not wall time: on a shared machine other processes stretch the wall clock.
    if cpu > args.budget:
        print(f"OVER BUDGET: {cpu:.3f} s CPU > {args.budget:.1f} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
