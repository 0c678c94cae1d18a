"""How fast discovery reads a large vSphere, next to plain pyvmomi and naive attribute walking.

    .venv/bin/python benchmarks/discovery.py [--sizes 1000,5000,10000] [--quick] [--methods ...] [--strict]

For each size a vcsim with that many VMs is started (TLS verified, on 127.0.0.1). Each method
then runs in a fresh process, so its peak memory is its own:

- ``migrate``: ``VsphereSource.discover()``, the streaming RetrievePropertiesEx parser;
- ``pyvmomi``: ``discover(method="pyvmomi")``, the same request deserialised by pyvmomi;
- ``naive``: ``vm.config``, ``vm.runtime``... attribute by attribute over a ContainerView, the
  way most scripts do it (each top-level property fetched once per object).

Per run it prints end-to-end seconds (login, discovery, logout), discovery seconds, SOAP round
trips after login, peak RSS and its growth over the process's RSS before login, and a digest
of the inventory: all methods must agree. Then the ratios and the targets (10k VMs in <= 6 s,
>= 4x plain pyvmomi, >= 10x naive, <= 2 round trips per 1,000 VMs, <= 400 MB peak growing at
most linearly). ``--strict`` exits 1 when a target is missed. ``--quick``: 1,000 VMs only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("migrate", "pyvmomi", "naive")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- one measurement (child process) --------------------------------------------------------


def _naive(source: Any) -> Any:
    """Attribute traversal: one Fetch per top-level property per object, sub-properties walked locally."""
    from pyVmomi import VmomiSupport, vim

    from migrate.connectors.vsphere_convert import build_inventory
    from migrate.connectors.vsphere_props import PROPERTIES, VIEW_TYPES, RawObject
    from migrate.connectors.vsphere_pyvmomi import plain

    content = source.content
    types = [VmomiSupport.GetWsdlType("urn:vim25", kind) for kind in VIEW_TYPES]
    view = content.viewManager.CreateContainerView(content.rootFolder, types, True)
    wanted = [(VmomiSupport.GetWsdlType("urn:vim25", kind), paths) for kind, paths in PROPERTIES.items()]

    def fetch(obj: Any, name: str, cache: dict[str, Any]) -> Any:
        if name not in cache:
            # What a careful script does anyway, and vcsim 0.24 drops the connection when asked for
            # an unset property: skip what cannot be set.
            skip = isinstance(obj, vim.VirtualMachine) and (
                (name == "parentVApp" and fetch(obj, "parent", cache) is not None)
                or (name == "snapshot" and not obj.rootSnapshot)
                or (name == "resourcePool" and fetch(obj, "config", cache).template))
            cache[name] = None if skip else getattr(obj, name)
        return cache[name]

    def raw(obj: Any) -> RawObject:
        cache: dict[str, Any] = {}
        props: dict[str, Any] = {}
        for kind, paths in wanted:
            if not isinstance(obj, kind):
                continue
            for path in paths:
                top, *rest = path.split(".")
                value = fetch(obj, top, cache)
                for part in rest:
                    value = getattr(value, part, None) if value is not None else None
                if value is not None and not (isinstance(value, list) and not value):
                    props[path] = plain(value)
        return RawObject(type(obj)._wsdlName, obj._moId, props)

    objects = [raw(obj) for obj in view.view]
    objects.append(raw(content.customFieldsManager))
    view.Destroy()
    return build_inventory(objects, source=source.name, endpoint=source.where,
                           api_version=content.about.apiVersion, instance_uuid=content.about.instanceUuid)


def measure(method: str, host: str, port: int, ca: str) -> dict[str, Any]:
    from migrate.connectors.vsphere import VsphereSource
    from migrate.inventory import VsphereSpec
    from migrate.model import source_to_dict
    from migrate.secrets import Secret

    spec = VsphereSpec(type="vsphere", host=host, port=port, user="user", password=Secret("pass", "bench"),
                       ca_file=Path(ca))
    baseline = _rss_mib()
    started = time.perf_counter()
    with VsphereSource("bench", spec) as source:
        begin = time.perf_counter()
        if method == "naive":
            inventory = _naive(source)
        else:
            inventory = source.discover(method="fast" if method == "migrate" else "pyvmomi")
        discovered = time.perf_counter()
        trips = source.round_trips
    ended = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    digest = hashlib.sha256(json.dumps(source_to_dict(inventory), sort_keys=True).encode()).hexdigest()[:12]
    return {"method": method, "vms": len(inventory.vms), "end_to_end_s": ended - started,
            "discover_s": discovered - begin, "round_trips": trips, "peak_mib": peak,
            "growth_mib": peak - baseline, "digest": digest}


# -- the run (parent process) -----------------------------------------------------------------


def _child(method: str, host: str, port: int, ca: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", method, "--host", host, "--port", str(port), "--ca", str(ca)],
        capture_output=True, text=True, timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(sizes: list[int], methods: list[str]) -> list[dict[str, Any]]:
    from migrate.lab import certs, vcsim

    rows = []
    with tempfile.TemporaryDirectory(prefix="migrate-bench-") as work:
        paths = certs.make_certs(Path(work))
        for size in sizes:
            started = time.perf_counter()
            server = vcsim.start(vcsim.VcsimOptions(vms_per_pool=size, tls_cert=str(paths.cert),
                                                    tls_key=str(paths.key)))
            print(f"vcsim with {size} VMs up in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            try:
                for method in methods:
                    row = _child(method, server.host, server.port, paths.ca)
                    rows.append(row)
                    print(f"  {method:8} {row['end_to_end_s']:7.2f} s", file=sys.stderr)
            finally:
                server.stop()
    return rows


def report(rows: list[dict[str, Any]]) -> bool:
    print(f"{'VMs':>6}  {'method':8} {'end-to-end s':>12} {'discover s':>10} {'round trips':>11} "
          f"{'peak MiB':>9} {'growth MiB':>10}  digest")
    for r in rows:
        print(f"{r['vms']:>6}  {r['method']:8} {r['end_to_end_s']:>12.2f} {r['discover_s']:>10.2f} "
              f"{r['round_trips']:>11} {r['peak_mib']:>9.0f} {r['growth_mib']:>10.0f}  {r['digest']}")
    ok = True
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_size.setdefault(r["vms"], {})[r["method"]] = r
    print()
    for size, runs in sorted(by_size.items()):
        same = len({r["digest"] for r in runs.values()}) == 1
        ok &= same
        line = f"{size:>6} VMs: identical inventories from {', '.join(runs)}: {'yes' if same else 'NO'}"
        if "migrate" in runs:
            base = runs["migrate"]["end_to_end_s"]
            for other in ("pyvmomi", "naive"):
                if other in runs:
                    line += f"; {other} / migrate = {runs[other]['end_to_end_s'] / base:.1f}x"
        print(line)
    mine = [by_size[s]["migrate"] for s in sorted(by_size) if "migrate" in by_size[s]]
    if mine:
        print("\ntargets (migrate):")
        checks = []
        largest = mine[-1]
        if largest["vms"] >= 10_000:
            checks.append((f"10k VMs end to end <= 6 s ({largest['end_to_end_s']:.2f} s)",
                           largest["end_to_end_s"] <= 6.0))
        runs = by_size[largest["vms"]]
        if largest["vms"] >= 10_000:  # the ratio targets are set at 10k VMs
            for other, target in (("pyvmomi", 4), ("naive", 10)):
                if other in runs:
                    ratio = runs[other]["end_to_end_s"] / largest["end_to_end_s"]
                    text = f">= {target}x {other} at {largest['vms']} VMs ({ratio:.1f}x)"
                    checks.append((text, ratio >= target))
        for r in mine:
            per_k = r["round_trips"] / (r["vms"] / 1000)
            text = f"<= 2 round trips per 1,000 VMs at {r['vms']} ({r['round_trips']}, {per_k:.2f}/1k)"
            checks.append((text, per_k <= 2))
            checks.append((f"peak RSS <= 400 MB at {r['vms']} ({r['peak_mib'] * 1.048576:.0f} MB)",
                           r["peak_mib"] * 1.048576 <= 400))
        if len(mine) > 1:
            small, big = mine[0], mine[-1]
            growth = big["growth_mib"] / max(small["growth_mib"], 1.0)
            scale = big["vms"] / small["vms"]
            text = f"memory at most linear: {scale:.0f}x the VMs -> {growth:.1f}x the growth"
            checks.append((text, growth <= scale * 1.1))
        for text, passed in checks:
            ok &= passed
            print(f"  [{'ok' if passed else 'MISS'}] {text}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000", help="comma-separated VM counts")
    parser.add_argument("--quick", action="store_true", help="1,000 VMs only")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.host, args.port, args.ca)))
        return
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    rows = run(sizes, methods)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    ok = report(rows)
    if args.strict and not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
