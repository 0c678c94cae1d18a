"""qemu-img and qemu-nbd command lines, and which image format a target wants. PURE.

Builders return argv lists (nothing runs here) so tests can compare them and callers can log
them. Options are the ones that matter for migrations with qemu 7.2:

* sparseness: ``-S 4k`` makes convert skip runs of zeros of at least 4 KiB instead of
  writing them; ``--target-is-zero`` (only with ``-n``) lets convert skip zeroing a target
  that is known to be empty (a fresh LVM thin volume, a new zvol);
* ``-W`` (out-of-order writes) and ``-m`` (parallel coroutines) for speed on local files;
* qcow2 ``compat=1.1`` (every Proxmox VE reads it) and VHD ``subformat=dynamic`` with
  ``force_size=on``: without it qemu rounds the size to a CHS geometry and the guest sees
  a different disk size than on vSphere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

ImageFormat = Literal["raw", "qcow2", "vpc", "vmdk", "vhdx"]
TARGET_FORMATS: tuple[ImageFormat, ...] = ("raw", "qcow2", "vpc")

QEMU_IMG = "qemu-img"
QEMU_NBD = "qemu-nbd"

# Proxmox storage types that hold raw volumes (block devices or pools) vs files.
_RAW_STORAGES = frozenset({"lvm", "lvmthin", "zfspool", "rbd", "iscsi", "iscsidirect", "zfs"})
_FILE_STORAGES = frozenset({"dir", "nfs", "cifs", "glusterfs", "cephfs", "btrfs"})


def create_options(fmt: ImageFormat) -> dict[str, str]:
    """The ``-o`` options a new image of ``fmt`` gets."""
    if fmt == "qcow2":
        return {"compat": "1.1", "cluster_size": "65536", "preallocation": "off"}
    if fmt == "vpc":
        return {"subformat": "dynamic", "force_size": "on"}
    if fmt == "vmdk":
        return {"subformat": "streamOptimized"}
    if fmt == "vhdx":
        return {"subformat": "dynamic"}
    return {}


def _options(opts: Mapping[str, str]) -> list[str]:
    if not opts:
        return []
    # A comma inside a value must be doubled for qemu's option parser.
    return ["-o", ",".join(f"{k}={str(v).replace(',', ',,')}" for k, v in opts.items())]


def create_args(
    path: str, fmt: ImageFormat, size_bytes: int, options: Mapping[str, str] | None = None
) -> list[str]:
    """``qemu-img create`` for a new, empty (all zero, unallocated) image."""
    opts = create_options(fmt) if options is None else dict(options)
    return [QEMU_IMG, "create", "-q", "-f", fmt, *_options(opts), path, str(size_bytes)]


def convert_args(
    source: str,
    target: str,
    *,
    source_format: str | None,
    target_format: ImageFormat,
    sparse_size: str | None = "4k",
    existing_target: bool = False,
    target_is_zero: bool = False,
    options: Mapping[str, str] | None = None,
    coroutines: int = 8,
    out_of_order: bool = True,
    source_image_opts: bool = False,
    progress: bool = False,
) -> list[str]:
    """``qemu-img convert`` keeping sparseness.

    ``existing_target`` writes into a target that already exists (``-n``: an LVM volume, a
    zvol); add ``target_is_zero`` only when that target is known to read back as zeros, or
    stale bytes would survive where the source has zeros.
    """
    if target_is_zero and not existing_target:
        raise ValueError("target_is_zero needs existing_target (qemu-img requires -n with it)")
    args = [QEMU_IMG, "convert"]
    if progress:
        args.append("-p")
    if source_image_opts:
        args.append("--image-opts")
    elif source_format:
        args += ["-f", source_format]
    args += ["-O", target_format]
    if existing_target:
        args.append("-n")
        if target_is_zero:
            args.append("--target-is-zero")
    else:
        args += _options(create_options(target_format) if options is None else options)
    if sparse_size is not None:
        args += ["-S", sparse_size]
    if out_of_order and target_format != "vmdk":  # streamOptimized must be written in order
        args.append("-W")
    if coroutines > 1:
        args += ["-m", str(min(coroutines, 16))]
    return [*args, source, target]


def info_args(path: str, fmt: str | None = None, *, backing_chain: bool = False) -> list[str]:
    """``qemu-img info --output=json``; ``-U`` so a running qemu-nbd's lock does not block it."""
    args = [QEMU_IMG, "info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    if backing_chain:
        args.append("--backing-chain")
    return [*args, path]


def map_args(path: str, fmt: str | None = None) -> list[str]:
    args = [QEMU_IMG, "map", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    return [*args, path]


def nbd_args(
    image: str,
    socket_path: str,
    *,
    fmt: str | None,
    read_only: bool,
    cache: str = "writeback",
    image_opts: bool = False,
) -> list[str]:
    """``qemu-nbd`` serving ``image`` on a unix socket to one client, exiting when it leaves."""
    args = [QEMU_NBD, "--socket", socket_path, "--shared=1", f"--cache={cache}", "--aio=threads"]
    if read_only:
        args.append("--read-only")
    else:
        args.append("--discard=unmap")
    if image_opts:
        args.append("--image-opts")
    elif fmt:
        args += ["--format", fmt]
    return [*args, image]


def json_filename(spec: Mapping[str, Any]) -> str:
    """A ``json:{...}`` pseudo file name: lets qemu open a chain with explicit backing files."""
    return "json:" + json.dumps(spec, separators=(",", ":"), sort_keys=True)


def vmdk_chain_spec(descriptors: Sequence[str]) -> dict[str, Any]:
    """Open spec for a vmdk chain, base first, with each backing given explicitly.

    Explicit backing beats ``parentFileNameHint``, which may be absolute, on another
    datastore, or embedded in a binary file we cannot rewrite.
    """
    if not descriptors:
        raise ValueError("empty chain")
    spec: dict[str, Any] | None = None
    for path in descriptors:
        node: dict[str, Any] = {"driver": "vmdk", "file": {"driver": "file", "filename": path}}
        if spec is not None:
            node["backing"] = spec
        spec = node
    assert spec is not None
    return spec


# -- parsing qemu-img output (JSON text in, dataclasses out) --------------------------------


@dataclass(frozen=True, slots=True)
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None = None
    cluster_size: int | None = None
    dirty: bool = False


def parse_info(text: str) -> list[ImageInfo]:
    """Parse ``qemu-img info --output=json`` (one object, or a list with --backing-chain)."""
    data = json.loads(text)
    items = data if isinstance(data, list) else [data]
    return [
        ImageInfo(
            filename=str(item.get("filename", "")),
            format=str(item.get("format", "")),
            virtual_size=int(item.get("virtual-size", 0)),
            actual_size=int(item.get("actual-size", 0)),
            backing_filename=item.get("full-backing-filename") or item.get("backing-filename"),
            cluster_size=item.get("cluster-size"),
            dirty=bool(item.get("dirty-flag", False)),
        )
        for item in items
    ]


@dataclass(frozen=True, slots=True)
class MapExtent:
    start: int
    length: int
    data: bool
    zero: bool
    depth: int = 0


def parse_map(text: str) -> list[MapExtent]:
    return [
        MapExtent(int(m["start"]), int(m["length"]), bool(m["data"]), bool(m["zero"]), int(m.get("depth", 0)))
        for m in json.loads(text)
    ]


def data_bytes(extents: Sequence[MapExtent]) -> int:
    """Bytes the guest could read as non-zero (allocated data that is not known zero)."""
    return sum(e.length for e in extents if e.data and not e.zero)


# -- which format a target wants ------------------------------------------------------------


def target_format(
    target_kind: str, storage_type: str = "", *, prefer: ImageFormat | None = None
) -> ImageFormat:
    """The image format to produce for a target and storage.

    Proxmox VE: qcow2 on file storages (thin, snapshots), raw on block/pool storages where
    the volume itself is the disk. XCP-ng: VHD (dynamic), which ``import_raw_vdi`` accepts
    with ``format=vhd`` and sends only allocated blocks.
    """
    if prefer is not None:
        return prefer
    if target_kind == "xcpng":
        return "vpc"
    if target_kind == "proxmox":
        kind = storage_type.lower()
        if kind in _RAW_STORAGES:
            return "raw"
        if kind in _FILE_STORAGES or not kind:
            return "qcow2"
        return "raw"
    raise ValueError(f"unknown target kind {target_kind!r}; expected 'proxmox' or 'xcpng'")


def file_suffix(fmt: ImageFormat) -> str:
    return {"raw": ".raw", "qcow2": ".qcow2", "vpc": ".vhd", "vmdk": ".vmdk", "vhdx": ".vhdx"}[fmt]
