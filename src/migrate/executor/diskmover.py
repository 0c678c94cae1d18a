"""The disk pipeline as the steps call it (``steps.DiskMover``), over the Source and Target protocols.

Two paths, chosen by the disk:

* **Streamed** (a flat disk without snapshots, the common case): the flat extent is read from
  the datastore with HTTP Range from the resume offset and written straight into the target's
  landing; no local copy. The reader runs in its own thread a few chunks ahead, so reading and
  writing overlap with bounded memory.
* **Staged** (a snapshot chain or a sparse extent): ``export`` downloads the chain's descriptors
  and extents (each resumable by byte offset) into the run's staging directory, ``convert``
  consolidates them with qemu-img into one sparse raw image, and ``send`` streams that.

Where the bytes go depends on the landing's format:

* **raw** (Proxmox landings, XCP-ng raw SRs): the guest bytes are written into the target's
  sink as they come, from the resume offset.
* **vhd** (XCP-ng VHD-based SRs): the guest bytes are written into a dynamic VHD in the
  staging directory (qemu-nbd; zero blocks are never written, so only allocated blocks take
  room), which is then uploaded whole and deleted. One disk's VHD at a time is staged, and
  an upload cannot resume: a retry builds and sends it again.

The sha256 of the guest-visible bytes is computed while sending; after a resume the bytes
before the offset are hashed again from the source (read only), so the digest always covers
the whole disk. For a VHD landing it is still the raw guest content's digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import structlog

from migrate import failpoints
from migrate.connectors.base import DatastoreFile, DiskLanding, DiskReader, DiskSpec, Source, VmSpec
from migrate.disks import qemu
from migrate.disks.sinks import QemuNbdSink
from migrate.disks.stream import nonzero_runs
from migrate.disks.vmdk import parse_descriptor
from migrate.errors import PermanentError
from migrate.executor.progress import Board, Task
from migrate.executor.steps import Changed, Noop, Outcome, Sent, StepContext

log = structlog.get_logger(__name__)

CHUNK = 8 << 20
# A flush makes the landing durable (Proxmox: fsync on the node) and is what a resume trusts;
# it also ends the SSH stream, so not too often.
FLUSH_EVERY = 1 << 30
AHEAD = 4  # chunks read ahead of the writer: memory stays at ~(AHEAD + 2) x CHUNK
UPLOAD_CHUNK = 1 << 20  # a staged VHD is read locally: small writes cost nothing and keep progress smooth


def _basename(path: str) -> str:
    return path.split("]", 1)[-1].strip().rsplit("/", 1)[-1]


class PipelineMover:
    def __init__(self, staging_dir: Path, board: Board | None = None) -> None:
        self._staging = staging_dir
        self._board = board

    # -- staging (chains) ---------------------------------------------------------------------

    def _dir(self, vm: VmSpec, disk: DiskSpec) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{vm.key}-{disk.key}")
        return self._staging / safe

    def release(self, ctx: StepContext[VmSpec]) -> int:
        freed = 0
        for disk in ctx.vm.disks:
            folder = self._dir(ctx.vm, disk)
            if folder.is_dir():
                freed += sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())
                shutil.rmtree(folder, ignore_errors=True)
        if freed:
            log.info("staging_released", bytes=freed)
        return freed

    def _image(self, vm: VmSpec, disk: DiskSpec) -> Path:
        return self._dir(vm, disk) / "consolidated.raw"

    def export(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        source = ctx.services.source
        folder = self._dir(ctx.vm, disk)
        folder.mkdir(parents=True, exist_ok=True)
        fetched = 0
        files = source.disk_files(ctx.vm, disk)
        for file in files:
            local = folder / _basename(file.path)
            have = local.stat().st_size if local.exists() else 0
            if have == file.size_bytes:
                continue
            if have > file.size_bytes:
                local.unlink()
                have = 0
            reader = source.open_file(file, have)
            try:
                with open(local, "ab") as out:
                    for chunk in _chunks(reader):
                        out.write(chunk)
                        fetched += len(chunk)
            finally:
                reader.close()
            if local.stat().st_size != file.size_bytes:
                raise PermanentError(
                    f"{file.path}: got {local.stat().st_size} bytes, expected {file.size_bytes}",
                    vm=ctx.vm.key,
                    step=ctx.step,
                    system=source.name,
                    hint="the datastore file changed while copying; check the source VM is off, then resume",
                )
        if not fetched:
            return Noop(f"{len(files)} file(s) already staged")
        return Changed({"files": len(files), "bytes": fetched})

    def convert(self, ctx: StepContext[VmSpec], disk: DiskSpec) -> Outcome:
        image = self._image(ctx.vm, disk)
        done_marker = image.with_suffix(".done")
        if done_marker.exists() and image.exists():
            return Noop("chain already consolidated")
        top = self._dir(ctx.vm, disk) / _basename(disk.source_path)
        descriptor = parse_descriptor(top.read_bytes(), where=str(top))
        partial = image.with_suffix(".partial")
        qemu.convert_image(top, partial, source_format="vmdk", target_format="raw")
        info = qemu.image_info(partial, "raw")
        if info.virtual_size != disk.size_bytes:
            raise PermanentError(
                f"consolidated {disk.label} is {info.virtual_size} bytes, the plan says {disk.size_bytes}",
                vm=ctx.vm.key,
                step=ctx.step,
                hint="re-run migrate plan: the disk changed",
            )
        partial.rename(image)
        done_marker.write_text(descriptor.create_type + "\n")
        return Changed({"image": str(image), "bytes": info.virtual_size})

    # -- sending ----------------------------------------------------------------------------

    def _open(self, ctx: StepContext[VmSpec], disk: DiskSpec, offset: int) -> DiskReader:
        if disk.needs_staging:
            handle = open(self._image(ctx.vm, disk), "rb")  # noqa: SIM115 - closed by the caller
            handle.seek(offset)
            return handle
        files = ctx.services.source.disk_files(ctx.vm, disk)
        return _Concatenated(ctx.services.source, list(files), offset)

    def _bar(self, ctx: StepContext[VmSpec], label: str, total: int, done: int = 0) -> Task | None:
        return self._board.task(f"{ctx.vm.name} {label}", total, done) if self._board else None

    def _hash_prefix(self, ctx: StepContext[VmSpec], disk: DiskSpec, offset: int) -> hashlib._Hash:
        """A sha256 fed with the disk's first ``offset`` bytes, read again from the source."""
        digest = hashlib.sha256()
        if not offset:
            return digest
        prefix = self._open(ctx, disk, 0)
        try:
            remaining = offset
            while remaining:
                chunk = prefix.read(min(CHUNK, remaining))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
        finally:
            prefix.close()
        return digest

    def _check_size(self, ctx: StepContext[VmSpec], disk: DiskSpec, done: int) -> None:
        if done != disk.size_bytes:
            raise PermanentError(
                f"{disk.label}: sent {done} bytes, the disk has {disk.size_bytes}",
                vm=ctx.vm.key,
                step=ctx.step,
                hint="the source disk changed size; re-run migrate plan",
            )

    def send(self, ctx: StepContext[VmSpec], disk: DiskSpec, landing: DiskLanding, offset: int) -> Sent:
        if landing.format == "vhd":
            return self._send_vhd(ctx, disk, landing, offset)
        digest = self._hash_prefix(ctx, disk, offset)
        reader = self._open(ctx, disk, offset)
        sink = ctx.services.target.receive_disk(landing, offset)
        done, reported = offset, offset
        bar = self._bar(ctx, disk.label, disk.size_bytes, offset)
        try:
            for chunk in _read_ahead(reader):
                digest.update(chunk)
                sink.write(chunk)
                done += len(chunk)
                if bar is not None:
                    bar.advance(len(chunk))
                failpoints.reached("transfer-chunk")
                if done - reported >= FLUSH_EVERY:
                    reported = done
                    ctx.journal.transfer_progress(disk.key, sink.flush())
            sink.close()
        except BaseException:
            sink.abort()
            raise
        finally:
            reader.close()
            if bar is not None:
                bar.finish()
        self._check_size(ctx, disk, done)
        ctx.journal.transfer_progress(disk.key, done)
        log.info("disk_sent", disk=disk.key, bytes=done - offset, resumed_from=offset)
        return Sent(done, digest.hexdigest())

    # -- VHD landings -----------------------------------------------------------------------

    def _send_vhd(self, ctx: StepContext[VmSpec], disk: DiskSpec, landing: DiskLanding, offset: int) -> Sent:
        if offset:
            raise PermanentError(
                f"{disk.label}: a VHD landing is sent whole, it cannot continue at byte {offset}",
                vm=ctx.vm.key,
                step=ctx.step,
                system=landing.target,
                hint="resume the run: the disk is sent again from its first byte",
            )
        image = self._dir(ctx.vm, disk) / "landing.vhd"
        try:
            digest = self._build_vhd(ctx, disk, image)
            wire = image.stat().st_size
            self._upload(ctx, disk, landing, image, wire)
        finally:
            # Bounded staging: the VHD is rebuilt for any retry, so it never outlives this call.
            image.unlink(missing_ok=True)
            image.with_name(image.name + ".progress").unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a chain's staged files keep the folder
                image.parent.rmdir()
        ctx.journal.transfer_progress(disk.key, disk.size_bytes)
        log.info(
            "disk_sent", disk=disk.key, bytes=disk.size_bytes, resumed_from=0, format="vhd", wire_bytes=wire
        )
        return Sent(disk.size_bytes, digest)

    def _build_vhd(self, ctx: StepContext[VmSpec], disk: DiskSpec, image: Path) -> str:
        """Write the disk's guest bytes into a new dynamic VHD at ``image``; returns their sha256."""
        image.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        # A scratch image: it is uploaded right after qemu-nbd closes it, or rebuilt, never resumed.
        sink = QemuNbdSink(image, "vpc", durable=False)
        reader = self._open(ctx, disk, 0)
        bar = self._bar(ctx, f"{disk.label} (vhd)", disk.size_bytes)
        done = 0
        try:
            sink.size(disk.size_bytes)
            for chunk in _read_ahead(reader):
                if done + len(chunk) > disk.size_bytes:
                    self._check_size(ctx, disk, done + len(chunk))
                digest.update(chunk)
                view = memoryview(chunk)
                for start, end in nonzero_runs(chunk):  # zeros stay unallocated blocks
                    sink.write_at(done + start, view[start:end])
                done += len(chunk)
                if bar is not None:
                    bar.advance(len(chunk))
                failpoints.reached("transfer-chunk")
            self._check_size(ctx, disk, done)
            result = sink.finish()
        except PermanentError as exc:
            sink.abort()
            if "no space left" in exc.message:
                raise PermanentError(
                    f"building the VHD of {disk.label} in {image.parent}: no space left",
                    vm=ctx.vm.key,
                    step=ctx.step,
                    system="local",
                    hint=f"free space in {self._staging} (one disk's VHD at a time, up to its allocated "
                    "size), then resume the run",
                ) from exc
            raise
        except BaseException:
            sink.abort()
            raise
        finally:
            reader.close()
            if bar is not None:
                bar.finish()
        info = qemu.image_info(image, "vpc")
        if info.virtual_size != disk.size_bytes:
            raise PermanentError(
                f"the VHD built for {disk.label} holds {info.virtual_size} bytes, "
                f"the disk has {disk.size_bytes}",
                vm=ctx.vm.key,
                step=ctx.step,
                system="qemu",
            )
        log.info(
            "vhd_built", disk=disk.key, bytes=disk.size_bytes, file_bytes=result.file_size, path=str(image)
        )
        return digest.hexdigest()

    def _upload(
        self, ctx: StepContext[VmSpec], disk: DiskSpec, landing: DiskLanding, image: Path, length: int
    ) -> None:
        sink = ctx.services.target.receive_disk(landing, 0, length=length)
        bar = self._bar(ctx, f"{disk.label} (upload)", length)
        try:
            with open(image, "rb") as handle:
                while chunk := handle.read(UPLOAD_CHUNK):
                    sink.write(chunk)
                    if bar is not None:
                        bar.advance(len(chunk))
            sink.close()
        except BaseException:
            sink.abort()
            raise
        finally:
            if bar is not None:
                bar.finish()


class _Concatenated:
    """The flat extents of one disk, read in order as one stream from ``offset``."""

    def __init__(self, source: Source, files: list[DatastoreFile], offset: int) -> None:
        self._source = source
        self._files = files
        self._index = 0
        self._reader: DiskReader | None = None
        skip = offset
        while self._index < len(files) and skip >= files[self._index].size_bytes:
            skip -= files[self._index].size_bytes
            self._index += 1
        self._first_offset = skip

    def read(self, size: int = -1, /) -> bytes:
        while self._index < len(self._files):
            if self._reader is None:
                self._reader = self._source.open_file(self._files[self._index], self._first_offset)
                self._first_offset = 0
            data = self._reader.read(size)
            if data:
                return data
            self._reader.close()
            self._reader = None
            self._index += 1
        return b""

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _chunks(reader: DiskReader) -> Iterator[bytes]:
    while True:
        chunk = reader.read(CHUNK)
        if not chunk:
            return
        yield chunk


def _read_ahead(reader: DiskReader) -> Iterator[bytes]:
    """Chunks from ``reader``, read by a thread up to AHEAD chunks ahead of the consumer."""
    slots: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=AHEAD)
    stop = threading.Event()

    def pump() -> None:
        try:
            for chunk in _chunks(reader):
                while not stop.is_set():
                    try:
                        slots.put(chunk, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            slots.put(exc)

    thread = threading.Thread(target=pump, name="disk-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
