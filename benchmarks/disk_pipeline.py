"""Benchmark the disk pipeline against vcsim over TLS.

    .venv/bin/python benchmarks/disk_pipeline.py            # 2 GiB disk
    .venv/bin/python benchmarks/disk_pipeline.py --large    # and a 20 GiB disk
    .venv/bin/python benchmarks/disk_pipeline.py --durable  # every path ends with its data on disk

The disk is half random data, half zeros (alternating 32 MiB stripes), a thin flat VMDK on
vcsim's datastore. Measured, each in a fresh child process (so peak RSS is the pipeline's
own), best and median of ``--runs``:

* stages alone: HTTPS GET of the extent; sha256 of the content; writing the content into
  the sink (raw sparse file / qcow2 via qemu-nbd) from the page cache, zeros skipped;
* the pipeline end to end (datastore -> sink, hashing, zero skipping, overlapped);
* naive: download the whole extent to a local file, then qemu-img convert, then sha256.

Targets: pipeline <= 1.2x the slowest stage alone; >= 1.5x faster than naive; Python peak
RSS <= 200 MB; the target image sparse. Also printed: CPU seconds of every process involved
(the machine has few cores and vcsim runs on it too, so the sum of stage CPU bounds the
overlap), and the dirty-page state is flushed (untimed) before every measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 2**20
GiB = 2**30
STRIPE = 32 * MiB
DC, DS = "DC0", "LocalDS_0"


# -- child side: one measurement, printed as a JSON line --------------------------------------


class LocalFile:
    """A local raw file as an engine Source (for the stage-alone measurements)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.total = os.stat(path).st_size

    def open(self, start: int) -> LocalFile._Reader:
        return LocalFile._Reader(self.path, start)

    class _Reader:
        def __init__(self, path: str, start: int) -> None:
            self._fd = os.open(path, os.O_RDONLY)
            self.offset = self._pos = start
            self.bytes_read = 0

        def read(self, size: int) -> bytes:
            data = os.pread(self._fd, size, self._pos)
            self._pos += len(data)
            self.bytes_read += len(data)
            return data

        def close(self) -> None:
            os.close(self._fd)


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    from migrate.disks import stream
    from migrate.disks.datastore import DatastoreFiles
    from migrate.disks.pipeline import transfer_disk
    from migrate.disks.sinks import LocalSparseFileSink, QemuNbdSink

    durable = job["durable"]

    def sink_for(kind: str, path: str) -> Any:
        if kind == "raw":
            return LocalSparseFileSink(Path(path), durable=durable)
        return QemuNbdSink(Path(path), kind, durable=durable)

    files = DatastoreFiles(job["url"], job["cookie"], datacenter=DC, datastore=DS, ca_file=job["ca"])
    what = job["what"]
    began = time.perf_counter()
    out: dict[str, Any] = {}
    if what == "get":
        with files.read_range(job["flat"]) as body:
            while body.read(8 * MiB):
                pass
    elif what == "hash":
        sha, fd, buf = hashlib.sha256(), os.open(job["local_source"], os.O_RDONLY), bytearray(8 * MiB)
        view = memoryview(buf)
        while n := os.readinto(fd, view) if hasattr(os, "readinto") else _readinto(fd, view):
            sha.update(view[:n])
        os.close(fd)
    elif what == "write":
        result = stream.stream(
            LocalFile(job["local_source"]),
            sink_for(job["kind"], job["target"]),
            digest=False,
            checkpoint_bytes=1 << 62,
        )
        out["allocated"] = result.sink.allocated_bytes
    elif what == "pipeline":
        result = transfer_disk(
            files,
            job["disk"],
            sink_for(job["kind"], job["target"]),
            checkpoint_bytes=(512 * MiB if durable else 1 << 62),
        )
        out.update(
            allocated=result.sink.allocated_bytes,
            apparent=result.sink.file_size,
            virtual=result.sink.virtual_size,
            sha256=result.sha256,
            written=result.bytes_written,
            busy=result.busy,
        )
    elif what == "naive":
        import requests

        dense = job["target"] + ".download"
        with (
            requests.get(files.url(job["flat"]), stream=True, verify=job["ca"], timeout=60) as r,
            open(dense, "wb") as f,
        ):
            r.raise_for_status()
            for chunk in r.iter_content(8 * MiB):
                f.write(chunk)
            if durable:
                os.fsync(f.fileno())
        out["download_s"] = time.perf_counter() - began
        argv = [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            job["kind"],
            *(["-o", "subformat=dynamic,force_size=on"] if job["kind"] == "vpc" else []),
            dense,
            job["target"],
        ]
        subprocess.run(argv, check=True)
        if durable:
            os.sync()
        out["convert_s"] = time.perf_counter() - began - out["download_s"]
        sha = hashlib.sha256()
        with open(dense, "rb") as f:
            while block := f.read(8 * MiB):
                sha.update(block)
        out["sha256"] = sha.hexdigest()
        os.unlink(dense)
    if durable and what in ("write", "pipeline"):
        os.sync()
    out["seconds"] = time.perf_counter() - began
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would report the parent's size.
    hwm = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    out.update(
        cpu=me.ru_utime + me.ru_stime,
        child_cpu=kids.ru_utime + kids.ru_stime,
        rss_mb=hwm / 1024,
        child_rss_mb=kids.ru_maxrss / 1024,
    )
    files.close()
    return out


def _readinto(fd: int, view: memoryview) -> int:
    data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


# -- parent side ------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _make_disk(folder: Path, size: int) -> tuple[str, int]:
    """Half random, half zeros in 32 MiB stripes; zeros are holes. Returns sha256 and data bytes."""
    sha, zero = hashlib.sha256(), bytes(STRIPE)
    with open(folder / "bench-flat.vmdk", "wb") as f:
        f.truncate(size)
        for offset in range(0, size, STRIPE):
            if (offset // STRIPE) % 2 == 0:
                block = os.urandom(STRIPE)
                f.seek(offset)
                f.write(block)
                sha.update(block)
            else:
                sha.update(zero)
    from migrate.disks.vmdk import Descriptor, Extent, render_descriptor

    desc = Descriptor("vmfs", (Extent("RW", size // 512, "VMFS", "bench-flat.vmdk"),), cid=0xBE7C0001)
    (folder / "bench.vmdk").write_bytes(render_descriptor(desc))
    return sha.hexdigest(), size // 2


def _measure(job: dict[str, Any], vcsim_pid: int, work: Path) -> dict[str, Any]:
    """One child run of ``job``; every run starts with no dirty pages and no old outputs (untimed)."""
    for leftover in work.glob("out.*"):
        leftover.unlink()
    os.sync()
    cpu0 = _proc_cpu(vcsim_pid)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {job['what']} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["vcsim_cpu"] = _proc_cpu(vcsim_pid) - cpu0
    return result


def run_size(size: int, args: argparse.Namespace, server: Any, ca: str, cookie: str, dsdir: Path) -> None:
    folder = dsdir / "bench"
    folder.mkdir(exist_ok=True)
    mode = "durable (fsync)" if args.durable else "page cache (no fsync)"
    print(f"\n== {size // GiB} GiB disk, half random / half zeros, {args.runs} rounds, {mode} ==", flush=True)
    t = time.perf_counter()
    expected, data_bytes = _make_disk(folder, size)
    print(f"  made the disk in {time.perf_counter() - t:.1f} s; data {data_bytes / GiB:.1f} GiB", flush=True)
    local_source = str(folder / "bench-flat.vmdk")
    subprocess.run(["cat", local_source], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    work = Path(args.work) / f"bench-{size // GiB}g"
    work.mkdir(parents=True, exist_ok=True)
    base = {
        "url": server.url,
        "ca": ca,
        "cookie": cookie,
        "flat": "bench/bench-flat.vmdk",
        "disk": f"[{DS}] bench/bench.vmdk",
        "local_source": local_source,
        "durable": args.durable,
    }
    pid, cores = server.process.pid, os.cpu_count() or 1

    def line(name: str, runs: list[dict[str, Any]], extra: str = "") -> dict[str, Any]:
        best = min(runs, key=lambda r: r["seconds"])
        median = statistics.median(r["seconds"] for r in runs)
        print(
            f"  {name:<29} best {best['seconds']:6.2f} s  median {median:6.2f} s  "
            f"{size / best['seconds'] / GiB:5.2f} GiB/s  "
            f"cpu py {best['cpu']:5.2f} qemu {best['child_cpu']:5.2f} "
            f"vcsim {best['vcsim_cpu']:5.2f}  rss {max(r['rss_mb'] for r in runs):4.0f} MB {extra}",
            flush=True,
        )
        return best

    for kind in args.formats:
        target = str(work / f"out.{kind}")
        names = ("get", "hash", "write", "pipeline", "naive")
        rounds: list[dict[str, dict[str, Any]]] = []
        for _ in range(args.runs):  # interleaved: a load swing hits every measurement of a round alike
            rounds.append(
                {w: _measure({**base, "what": w, "kind": kind, "target": target}, pid, work) for w in names}
            )
        by = {w: [r[w] for r in rounds] for w in names}
        print(f"  -- target {kind}")
        line("stage: HTTPS GET", by["get"])
        line("stage: sha256", by["hash"])
        line(f"stage: write {kind} (zeros skipped)", by["write"])
        pipe = line(
            f"pipeline -> {kind}", by["pipeline"], f"qemu-nbd rss {by['pipeline'][0]['child_rss_mb']:.0f} MB"
        )
        line(
            "naive download+convert+hash",
            by["naive"],
            f"(download {by['naive'][0]['download_s']:.2f} s, convert {by['naive'][0]['convert_s']:.2f} s)",
        )
        assert all(r["pipeline"]["sha256"] == expected == r["naive"]["sha256"] for r in rounds), (
            "digests differ"
        )
        vs_stage = [
            r["pipeline"]["seconds"] / max(r[w]["seconds"] for w in ("get", "hash", "write")) for r in rounds
        ]
        vs_naive = [r["naive"]["seconds"] / r["pipeline"]["seconds"] for r in rounds]
        cpu_total = pipe["cpu"] + pipe["child_cpu"] + pipe["vcsim_cpu"]
        slowest = min(max(r[w]["seconds"] for w in ("get", "hash", "write")) for r in rounds)
        floor = max(slowest, cpu_total / cores)
        print(
            f"    -> pipeline / slowest stage alone: best {min(vs_stage):.2f}x, median "
            f"{statistics.median(vs_stage):.2f}x (target <= 1.2x)"
        )
        print(
            f"    -> naive / pipeline: best {max(vs_naive):.2f}x, median {statistics.median(vs_naive):.2f}x "
            "(target >= 1.5x)"
        )
        print(
            f"    -> CPU of the best pipeline run (python + qemu-nbd + vcsim) {cpu_total:.2f} s "
            f"on {cores} cores: "
            f"floor {floor:.2f} s; the pipeline ran at {floor / pipe['seconds']:.0%} of it"
        )
        print(
            "    -> stage busy seconds in the best pipeline run: "
            + ", ".join(f"{k} {v:.2f}" for k, v in pipe["busy"])
        )
        print(
            f"    -> peak RSS: python {max(r['pipeline']['rss_mb'] for r in rounds):.0f} MB (target <= 200), "
            f"qemu-nbd {max(r['pipeline']['child_rss_mb'] for r in rounds):.0f} MB"
        )
        print(
            f"    -> target sparse: {pipe['allocated'] / GiB:.2f} GiB allocated "
            f"for {data_bytes / GiB:.2f} GiB "
            f"of data, {size / GiB:.0f} GiB virtual (file {pipe['apparent'] / GiB:.2f} GiB); sha256 equal"
        )
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large", action="store_true", help="also run the 20 GiB disk")
    parser.add_argument("--only-large", action="store_true", help="run only the 20 GiB disk")
    parser.add_argument("--durable", action="store_true", help="fsync every output (disk speed dominates)")
    parser.add_argument("--runs", type=int, default=3, help="rounds of all measurements")
    parser.add_argument("--formats", nargs="+", default=["qcow2", "raw"])
    parser.add_argument("--work", default=tempfile.gettempdir())
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    from pyVim.connect import Disconnect, SmartConnect

    from migrate.lab import certs, vcsim

    with tempfile.TemporaryDirectory(prefix="migrate-bench-") as tmp:
        paths = certs.make_certs(Path(tmp) / "certs")
        server = vcsim.start(vcsim.VcsimOptions(tls_cert=str(paths.cert), tls_key=str(paths.key)))
        try:
            si = SmartConnect(
                host=server.host,
                port=server.port,
                user="user",
                pwd="pass",
                sslContext=ssl.create_default_context(cafile=str(paths.ca)),
            )
            datastore = next(
                ds for dc in si.content.rootFolder.childEntity for ds in dc.datastore if ds.name == DS
            )
            dsdir = Path(datastore.info.url)  # vcsim keeps the datastore in a local folder
            print(
                f"vcsim {server.url} over TLS, datastore {DS} at {dsdir}; {os.cpu_count()} CPUs; "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            sizes = ([] if args.only_large else [2 * GiB]) + (
                [20 * GiB] if args.large or args.only_large else []
            )
            for size in sizes:
                run_size(size, args, server, str(paths.ca), si._stub.cookie, dsdir)
            Disconnect(si)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
