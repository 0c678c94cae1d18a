"""Benchmark what `migrate run` does with a disk for a Proxmox target, in the local lab.

    .venv/bin/python benchmarks/executor_transfer.py              # 2 GiB disk
    .venv/bin/python benchmarks/executor_transfer.py --size-gib 4
    .venv/bin/python benchmarks/executor_transfer.py --quick      # 256 MiB disk

The lab (`migrate.lab.manager.up`) is started with an estate of one powered-off BIOS VM with
one flat disk. The estate format holds at most 64 MiB of data per disk, so once seeded the
flat extent is rewritten in vcsim's datastore folder (same size, same descriptor) as half
random data, half zeros, in alternating 32 MiB stripes. Measured, each in a fresh child
process (peak RSS is VmHWM of that process alone), one run each:

* migrate: ``ProxmoxExecTarget.prepare_disk`` + ``PipelineMover.send`` (HTTPS ranged reads
  from the datastore via ``VsphereExecSource``, zero blocks skipped, bytes to the node over
  SSH, fsync'd flushes), then ``landing_digest`` (sha256sum on the node) as the transfer
  step does;
* stages alone: the HTTPS read of the flat extent; the SSH write (``NodeShell.upload``) of
  as many bytes as the disk has non-zero bytes, then an fsync of that file on the node;
* naive: download the whole extent to a local file, upload the whole file (zeros too) with
  ``NodeShell.upload``, sha256sum it on the node.

The lab's peers (vcsim, sshd, the node's disk) run on this machine too, so every figure
includes their CPU; the dirty-page state is flushed (untimed) before each measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 2**20
GiB = 2**30
STRIPE = 32 * MiB
NODE = "pve1"
DC, DS = "DC0", "LocalDS_0"
VM_NAME = "bench-xfer-01"


# -- child side: one measurement, printed as a JSON line --------------------------------------


class _Journal:
    """What ``PipelineMover.send`` asks of the state store: progress only (a SQLite row update)."""

    def __init__(self) -> None:
        self.progress: list[int] = []

    def transfer_progress(self, disk: str, bytes_done: int) -> None:
        self.progress.append(bytes_done)


def _specs(job: dict[str, Any]) -> tuple[Any, Any]:
    from migrate.connectors.base import DiskSpec, VmSpec

    disk = DiskSpec(
        key=str(job["disk_key"]), label="Hard disk 1", size_bytes=job["size"], source_path=job["descriptor"],
        storage="local", slot="scsi0", datacenter=DC, datastore=DS, source_chain=tuple(job["chain"]),
        landing_format="raw", format="raw", boot=True,
    )  # fmt: skip
    vm = VmSpec(
        key=job["moref"], name=VM_NAME, source="lab-vc", source_moref=job["moref"], target="lab-pve",
        target_kind="proxmox", source_name=VM_NAME, datacenter=DC, node=NODE, vmid=None, disks=(disk,),
        source_uuid=job["uuid"],
    )  # fmt: skip
    return vm, disk


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    from migrate.connectors.base import Intent
    from migrate.connectors.nodeshell import NodeShell
    from migrate.connectors.proxmox_target import ProxmoxExecTarget
    from migrate.connectors.vsphere_source import VsphereExecSource
    from migrate.executor.diskmover import CHUNK, PipelineMover
    from migrate.executor.steps import Options, Services, StepContext, StepName
    from migrate.inventory import load_inventory

    inventory = load_inventory(job["inventory"])
    vsphere = inventory.sources["lab-vc"]
    proxmox = inventory.targets["lab-pve"]
    vm, disk = _specs(job)
    what, out = job["what"], {}
    with VsphereExecSource("lab-vc", vsphere) as source, ProxmoxExecTarget("lab-pve", proxmox) as target:  # type: ignore[arg-type]
        sinks: list[Any] = []
        receive = target.receive_disk

        def recording_receive(*a: Any, **kw: Any) -> Any:
            sink = receive(*a, **kw)
            sinks.append(sink)
            return sink

        target.receive_disk = recording_receive  # type: ignore[method-assign]
        shell: NodeShell = target.shell(NODE)
        shell.connect()  # logins are not what is measured: both sessions exist before the clock starts
        (flat,) = source.disk_files(vm, disk)
        began = time.perf_counter()
        if what == "migrate":
            run_id = "bench-" + os.urandom(4).hex()
            intent = Intent(run_id=run_id, vm=vm.key, kind="prepare_disk", key=disk.key)
            landing = target.prepare_disk(vm, disk, intent)
            out["prepare_s"] = time.perf_counter() - began
            journal = _Journal()
            ctx = StepContext(
                run_id=run_id, vm=vm, step=StepName.TRANSFER, attempt=1, options=Options(),
                journal=journal, services=Services(source, target, PipelineMover(Path(job["staging"]))),  # type: ignore[arg-type]
            )  # fmt: skip
            sent = ctx.services.disks.send(ctx, disk, landing, 0)
            out["send_s"] = time.perf_counter() - began
            landed = target.landing_digest(landing)
            out["verify_s"] = time.perf_counter() - began - out["send_s"]
            (sink,) = sinks
            stat = shell.stat(landing.ref)
            assert stat is not None
            # journal.progress: one entry per fsync'd flush during the send, then the final length.
            out.update(
                sha256=sent.sha256, landed_sha256=landed, bytes=sent.bytes, bytes_sent=sink.bytes_sent,
                zero_skipped=sink.zero_bytes_skipped, flushes=len(journal.progress) - 1,
                allocated=stat.allocated_bytes, landing=landing.ref,
            )  # fmt: skip
        elif what == "get":
            reader = source.open_file(flat, 0)
            got = 0
            while chunk := reader.read(CHUNK):
                got += len(chunk)
            reader.close()
            out["bytes"] = got
        elif what == "ssh":
            # The disk's non-zero stripes, read from the datastore file (page cache), as one stream.
            def stripes() -> Any:
                with open(job["flat_local"], "rb") as f:
                    for offset in range(0, job["size"], 2 * STRIPE):
                        f.seek(offset)
                        left = min(STRIPE, job["size"] - offset)
                        while left:
                            block = f.read(min(MiB, left))
                            left -= len(block)
                            yield block

            result = shell.upload(stripes(), job["remote"], make_dirs=False)
            out["upload_s"] = time.perf_counter() - began
            shell.run(["sync", "--", job["remote"]])  # the sink fsyncs its landing too
            out.update(bytes=result.bytes_sent, sha256=result.sha256)
        elif what == "naive":
            local = Path(job["staging"]) / "download.raw"
            reader = source.open_file(flat, 0)
            with open(local, "wb") as f:
                while chunk := reader.read(CHUNK):
                    f.write(chunk)
            reader.close()
            out["download_s"] = time.perf_counter() - began
            with open(local, "rb") as f:
                result = shell.upload(f, job["remote"], make_dirs=False)
            out["upload_s"] = time.perf_counter() - began - out["download_s"]
            landed = shell.sha256(job["remote"])
            out["sha256_s"] = time.perf_counter() - began - out["download_s"] - out["upload_s"]
            local.unlink()
            out.update(bytes=result.bytes_sent, sha256=result.sha256, landed_sha256=landed)
        out["seconds"] = time.perf_counter() - began
        if what == "migrate":
            quoted = shlex.quote(out["landing"])
            shell.run(f"rm -f -- {quoted} {quoted}.*", check=False)  # the landing and its sidecar
        else:
            shell.run(["rm", "-f", "--", job["remote"]], check=False)
    me = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's size.
    hwm = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    out.update(cpu=me.ru_utime + me.ru_stime, rss_mb=hwm / 1024)
    return out


# -- parent side ------------------------------------------------------------------------------


def _estate(size_mib: int) -> str:
    return f"""# One VM for benchmarks/executor_transfer.py; its flat extent is rewritten after seeding.
datacenter: {DC}
cluster: DC0_C0
datastore: {DS}
vms:
  - name: {VM_NAME}
    guest_id: debian12_64Guest
    firmware: bios
    cpus: 1
    memory_mib: 512
    disks:
      - {{size_mib: {size_mib}, boot: true, controller: pvscsi, unit: 0}}
    nics:
      - {{model: vmxnet3, network: VM Network}}
"""


def _rewrite_extent(path: Path, size: int) -> tuple[str, int]:
    """Half random, half zeros in 32 MiB stripes (zeros are holes); returns sha256 and data bytes."""
    sha, zero, data = hashlib.sha256(), bytes(STRIPE), 0
    fresh = path.with_name(path.name + ".bench")
    with open(fresh, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, STRIPE):
            n = min(STRIPE, size - offset)
            if (offset // STRIPE) % 2 == 0:
                block = os.urandom(n)
                f.seek(offset)
                f.write(block)
                sha.update(block)
                data += n
            else:
                sha.update(zero[:n])
    os.replace(fresh, path)
    return sha.hexdigest(), data


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime + stime + the reaped children's (sshd forks a process per connection).
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _measure(job: dict[str, Any], peers: dict[str, int]) -> dict[str, Any]:
    os.sync()
    cpu0 = {name: _proc_cpu(pid) for name, pid in peers.items()}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"child {job['what']} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peer_cpu"] = {name: _proc_cpu(pid) - cpu0[name] for name, pid in peers.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="disk size in GiB (default 2)")
    parser.add_argument("--quick", action="store_true", help="a 256 MiB disk")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    from pyVmomi import vim

    from migrate.inventory import load_inventory
    from migrate.lab import manager
    from migrate.lab.estate import read_seeded
    from migrate.lab.seeder import connect

    size_mib = 256 if args.quick else int(args.size_gib * 1024)
    with tempfile.TemporaryDirectory(prefix="migrate-xfer-bench-") as tmp:
        work = Path(tmp)
        estate_file = work / "estate.yaml"
        estate_file.write_text(_estate(size_mib))
        inventory = work / "inventory.yaml"
        state_dir = work / "state"
        t = time.perf_counter()
        try:
            lab = manager.up(state_dir, estate_file=estate_file, inventory=inventory)
            print(
                f"lab up and seeded in {time.perf_counter() - t:.1f} s ({', '.join(lab.running)}); "
                f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            run(args, size_mib, work, state_dir, inventory, load_inventory, read_seeded, connect, vim)
        finally:
            manager.down(state_dir)
            print("lab stopped")


def run(args: Any, size_mib: int, work: Path, state_dir: Path, inventory: Path, load_inventory: Any,
        read_seeded: Any, connect: Any, vim: Any) -> None:  # fmt: skip
    from migrate.lab import manager

    seeded = read_seeded(manager.lab_dir(state_dir) / "estate.json")
    (vm,) = seeded.vms
    (disk,) = vm.disks
    size = disk.capacity_bytes
    assert size == size_mib * MiB, (size, size_mib)
    spec = load_inventory(inventory).sources["lab-vc"]
    vcsim = manager.service(state_dir, "vcsim")
    si = connect(vcsim.url, user=spec.user, password=spec.password.reveal(), ca_file=spec.ca_file)
    datastore = next(
        ds for dc in si.content.rootFolder.childEntity if isinstance(dc, vim.Datacenter)
        for ds in dc.datastore if ds.name == DS
    )  # fmt: skip
    dsdir = Path(datastore.info.url)  # vcsim keeps the datastore in a local folder
    vm_ref = next(v for v in si.content.viewManager.CreateContainerView(
        si.content.rootFolder, [vim.VirtualMachine], True).view if v._moId == vm.moref)  # fmt: skip
    instance_uuid = vm_ref.config.instanceUuid
    from pyVim.connect import Disconnect

    Disconnect(si)
    relative = disk.descriptor.split("]", 1)[1].strip().removesuffix(".vmdk") + "-flat.vmdk"
    flat_local = dsdir / relative
    t = time.perf_counter()
    expected, data_bytes = _rewrite_extent(flat_local, size)
    print(
        f"flat extent rewritten in {time.perf_counter() - t:.1f} s: {size / GiB:.2f} GiB, "
        f"{data_bytes / GiB:.2f} GiB random in 32 MiB stripes, the rest zeros",
        flush=True,
    )
    subprocess.run(["cat", str(flat_local)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    pve = manager.service(state_dir, "fakepve")
    peers = {s.name: s.pid for s in manager.status(state_dir).services if s.name in ("vcsim", "sshd")}
    staging = work / "staging"
    staging.mkdir()
    base = {
        "inventory": str(inventory), "moref": vm.moref, "uuid": instance_uuid, "disk_key": disk.key,
        "size": size, "descriptor": disk.descriptor, "chain": list(disk.chain), "staging": str(staging),
        "flat_local": str(flat_local), "remote": str(Path(pve.node_root) / "bench-upload.raw"),
    }  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for what in ("get", "ssh", "migrate", "naive"):
        results[what] = _measure({**base, "what": what}, peers)
        print(f"  measured {what}: {results[what]['seconds']:.2f} s", flush=True)

    def mbs(seconds: float, nbytes: int = size) -> str:
        return f"{nbytes / MiB / seconds:7.1f} MB/s"

    def line(name: str, r: dict[str, Any], extra: str = "") -> None:
        peer = " ".join(f"{k} {v:.1f}" for k, v in r["peer_cpu"].items())
        print(
            f"  {name:<40} {r['seconds']:7.2f} s {mbs(r['seconds'])}  cpu py {r['cpu']:5.1f} {peer}  "
            f"rss {r['rss_mb']:5.0f} MB {extra}"
        )

    m, g, s, n = results["migrate"], results["get"], results["ssh"], results["naive"]
    print(
        f"\n== {size / GiB:.2f} GiB flat disk -> Proxmox landing over SSH (MB/s of disk size; "
        "cpu seconds: this process, vcsim, sshd + its children) =="
    )
    line("stage: HTTPS read of the extent", g)
    line(
        f"stage: SSH upload {s['bytes'] / GiB:.2f} GiB + fsync",
        s,
        f"(upload {s['upload_s']:.2f} s, {mbs(s['upload_s'], s['bytes'])} of data)",
    )
    line(
        "migrate: prepare + send + verify",
        m,
        f"(prepare {m['prepare_s']:.2f} s, +send {m['send_s']:.2f} s, "
        f"sha256sum on node {m['verify_s']:.2f} s)",
    )
    line(
        "naive: download + upload all + sha256",
        n,
        f"(download {n['download_s']:.2f} s, upload {n['upload_s']:.2f} s, sha256 {n['sha256_s']:.2f} s)",
    )
    slowest = max(g["seconds"], s["seconds"])
    print(
        f"    -> migrate prepare+send: {m['send_s']:.2f} s, {mbs(m['send_s'])}; "
        f"crossed SSH {m['bytes_sent'] / GiB:.2f} GiB, zeros skipped {m['zero_skipped'] / GiB:.2f} GiB, "
        f"{m['flushes']} fsync'd flush(es) before close; landing allocated {m['allocated'] / GiB:.2f} GiB"
    )
    print(
        f"    -> migrate send / slowest stage alone: {m['send_s'] / slowest:.2f}x "
        f"(slowest: {'HTTPS read' if g['seconds'] >= s['seconds'] else 'SSH write'} {slowest:.2f} s)"
    )
    print(f"    -> naive / migrate (both with sha256 of the landed file): {n['seconds'] / m['seconds']:.2f}x")
    print(f"    -> peak RSS: migrate {m['rss_mb']:.0f} MB, naive {n['rss_mb']:.0f} MB")
    ok = m["sha256"] == m["landed_sha256"] == expected == n["landed_sha256"] == n["sha256"]
    print(
        f"    -> sha256 source {expected[:16]}… migrate sent {m['sha256'][:16]}… landed "
        f"{m['landed_sha256'][:16]}…, naive landed {n['landed_sha256'][:16]}…: "
        f"{'all equal' if ok else 'MISMATCH'}"
    )
    if not ok:
        raise SystemExit("sha256 mismatch")


if __name__ == "__main__":
    main()
