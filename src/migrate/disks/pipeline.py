"""Move one vSphere disk into a target image: the entry point the executor calls.

    datastore --(ranged HTTPS GETs)--> sha256 + zero scan --> Sink (sparse raw | qemu-nbd qcow2/VHD)

* A disk without snapshots whose extents are plain file ranges streams straight from the
  datastore: nothing is staged, zeros are never written, and the stages overlap.
* A snapshot chain (or sparse extents) is staged locally first (each file resumable), then
  its consolidation is read through qemu-nbd and streamed into the same sinks.

Either way the result carries the sha256 of the guest-visible content, and
``image_sha256`` computes the same digest for a finished image in any format, so a caller
can prove the target holds exactly what the guest saw.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from migrate.disks import stream as engine
from migrate.disks.datastore import DatastoreFiles
from migrate.disks.sinks import Sink, SinkResult
from migrate.disks.sources import FlatSource, NbdSource, flat_segments
from migrate.disks.staging import discover_chain, stage_chain
from migrate.disks.vmdk import DatastorePath
from migrate.errors import PermanentError
from migrate.model import Disk

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TransferResult:
    sha256: str | None  # of the whole guest-visible disk; None only if a resumed prefix could not be read
    bytes_total: int  # guest-visible size
    bytes_read: int  # taken from the datastore by this run (staging included)
    bytes_written: int  # non-zero bytes delivered to the sink by this run
    zero_bytes_skipped: int  # zero bytes this run did not write
    seconds: float
    start_offset: int
    method: Literal["stream", "staged"]
    sink: SinkResult
    busy: tuple[tuple[str, float], ...] = ()  # seconds each stage worked: the largest is the bottleneck


@dataclass(frozen=True, slots=True)
class Staging:
    """Where snapshot chains and sparse disks are copied before qemu consolidates them.

    Files already there are resumed, not fetched again; the folder is removed after a
    successful transfer unless ``keep``.
    """

    directory: Path
    limit_bytes: int | None = None
    keep: bool = False
    progress: engine.Progress | None = None


def transfer_disk(
    files: DatastoreFiles,
    disk_path: str | DatastorePath,
    sink: Sink,
    *,
    chain: Sequence[str] = (),
    staging: Staging | None = None,
    volumes: Mapping[str, str] | None = None,
    start_offset: int | None = None,
    progress: engine.Progress | None = None,
    chunk_size: int = engine.CHUNK,
    depth: int = engine.DEPTH,
    checkpoint_bytes: int = engine.CHECKPOINT,
) -> TransferResult:
    """Copy the guest-visible content of ``disk_path`` ("[ds] vm/vm.vmdk") into ``sink``.

    ``chain`` is the descriptor chain base-first (``Disk.chain``); without it the chain is
    followed through parentFileNameHint (``volumes`` maps VMFS volume UUIDs in absolute
    hints to datastore names). ``start_offset`` defaults to the sink's resume point;
    ``progress(done, total)`` follows the guest bytes. Snapshot chains need ``staging``.
    """
    began = time.monotonic()
    found = discover_chain(files, disk_path, chain=chain, volumes=volumes)

    def run(source: engine.Source) -> engine.StreamResult:
        return engine.stream(
            source,
            sink,
            start_offset=start_offset,
            progress=progress,
            chunk_size=chunk_size,
            depth=depth,
            checkpoint_bytes=checkpoint_bytes,
        )

    if found.is_single_flat:
        source = FlatSource(files, flat_segments(found.base.path, found.base.descriptor))
        source.check()
        log.info("disk_transfer_start", disk=str(found.top.path), method="stream", bytes=source.total)
        result = run(source)
        return _result(result, result.bytes_read, began, "stream")
    if staging is None:
        sink.abort()
        raise PermanentError(
            f"{found.top.path}: has snapshots or sparse extents and must be staged locally, "
            "but no staging folder was given",
            system="local",
            hint="give a staging folder with room for the disk's files",
        )
    log.info(
        "disk_transfer_start",
        disk=str(found.top.path),
        method="staged",
        links=len(found.links),
        bytes=found.capacity_bytes,
    )
    staged = stage_chain(
        files, found, staging.directory, limit_bytes=staging.limit_bytes, progress=staging.progress
    )
    with NbdSource(staged.image(), fmt=None) as nbd:
        if nbd.total != found.capacity_bytes:
            raise PermanentError(
                f"{found.top.path}: qemu sees {nbd.total} bytes, the descriptors say {found.capacity_bytes}",
                system="qemu",
            )
        result = run(nbd)
    if not staging.keep:
        shutil.rmtree(staging.directory, ignore_errors=True)
    return _result(result, staged.bytes_read, began, "staged")


def transfer_vm_disk(files: DatastoreFiles, disk: Disk, sink: Sink, **options: Any) -> TransferResult:
    """``transfer_disk`` for a discovered ``Disk``: its current file and its snapshot chain."""
    if disk.rdm or disk.backing == "rdm":
        raise PermanentError(
            f"{disk.label} ({disk.path}) is a raw device mapping; its bytes are on a LUN",
            system="vsphere",
            hint="copy RDM disks inside the guest, or convert them first",
        )
    return transfer_disk(files, disk.path, sink, chain=disk.chain, **options)


def _result(
    r: engine.StreamResult, read: int, began: float, method: Literal["stream", "staged"]
) -> TransferResult:
    seconds = time.monotonic() - began
    log.info(
        "disk_transferred",
        method=method,
        bytes=r.total,
        read=read,
        written=r.bytes_written,
        zero_skipped=r.zero_bytes_skipped,
        s=round(seconds, 3),
    )
    return TransferResult(
        r.sha256,
        r.total,
        read,
        r.bytes_written,
        r.zero_bytes_skipped,
        seconds,
        r.start_offset,
        method,
        r.sink,
        r.busy,
    )


class _DigestOnly:
    """A sink that keeps nothing: the engine's hash is all ``image_sha256`` wants."""

    def __init__(self) -> None:
        self._total = 0

    def resume_offset(self) -> int:
        return 0

    def size(self, total: int, *, keep: int = 0) -> None:
        self._total = total

    def write_at(self, offset: int, data: memoryview) -> None:
        pass

    def checkpoint(self, offset: int) -> None:
        pass

    def finish(self) -> SinkResult:
        return SinkResult("", "", self._total, 0, 0)

    def abort(self) -> None:
        pass


def image_sha256(image: str | Path, fmt: str | None = None, *, chunk_size: int = engine.CHUNK) -> str:
    """sha256 of an image's guest-visible content (raw, qcow2, vpc, a vmdk chain...).

    Reads through qemu-nbd in chunks, so memory stays flat and no raw copy is written.
    """
    with NbdSource(str(image), fmt) as source:
        result = engine.stream(source, _DigestOnly(), chunk_size=chunk_size, checkpoint_bytes=1 << 62)
    assert result.sha256 is not None
    return result.sha256
