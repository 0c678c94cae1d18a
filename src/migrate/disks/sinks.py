"""Where the guest's bytes go: a sparse raw file, or a qcow2/VHD/raw image fed through qemu-nbd.

A sink is written in increasing offsets and only where the source has data: regions the
pipeline skips must already read as zeros, which is why ``size(total, keep=0)`` starts from
an empty target and ``keep=n`` promises that only bytes [0, n) of an earlier attempt are kept.
``checkpoint(n)`` makes [0, n) durable and records n, which ``resume_offset()`` returns after a
crash; the record is a small JSON file next to the image, removed by ``finish()``.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import structlog

from migrate.disks import qemu
from migrate.disks.formats import ImageFormat
from migrate.disks.nbd import NbdClient, QemuNbd
from migrate.errors import PermanentError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SinkResult:
    path: str
    format: str
    virtual_size: int
    file_size: int  # apparent size of the file
    allocated_bytes: int  # what it takes on disk


class Sink(Protocol):
    def resume_offset(self) -> int:
        """Bytes [0, n) from an earlier attempt that are durable and can be kept."""
        ...

    def size(self, total: int, *, keep: int = 0) -> None:
        """Open for a guest disk of ``total`` bytes, keeping [0, keep); the rest reads as zeros."""
        ...

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def checkpoint(self, offset: int) -> None:
        """Make [0, offset) durable and remember it as the resume point."""
        ...

    def finish(self) -> SinkResult: ...

    def abort(self) -> None:
        """Release resources after a failure, keeping what is durable for a resume."""
        ...


@runtime_checkable
class Readback(Protocol):
    """A sink that can return what it holds (used to hash the kept prefix on resume)."""

    def read_at(self, offset: int, length: int) -> bytes: ...


class _ProgressFile:
    """``{"total": n, "offset": n}`` next to the image, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[int, int] | None:
        try:
            data = json.loads(self.path.read_text())
            return int(data["total"]), int(data["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, total: int, offset: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"total": total, "offset": offset}))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _write_error(exc: OSError, path: Path) -> PermanentError:
    if exc.errno == errno.ENOSPC:
        return PermanentError(
            f"writing {path}: no space left on device",
            system="local",
            hint="free space where the image is written, then resume",
        )
    return PermanentError(f"writing {path}: {exc.strerror or exc}", system="local")


class LocalSparseFileSink:
    """A raw image file; skipped zero regions stay holes, so it is as sparse as the data."""

    def __init__(self, path: Path, *, state_path: Path | None = None, durable: bool = True) -> None:
        self.path = path
        self._progress = _ProgressFile(state_path or path.with_name(path.name + ".progress"))
        self._durable = durable
        self._fd = -1
        self._total = 0

    def resume_offset(self) -> int:
        state = self._progress.read()
        if state is None or not self.path.exists() or self.path.stat().st_size != state[0]:
            return 0
        return state[1]

    def size(self, total: int, *, keep: int = 0) -> None:
        self._total = total
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if keep:
                if keep > self.resume_offset():
                    raise PermanentError(
                        f"{self.path}: cannot keep {keep} bytes, only {self.resume_offset()} "
                        "are recorded as written",
                        system="local",
                        hint="restart from 0",
                    )
                self._fd = os.open(self.path, os.O_RDWR)
            else:
                self._progress.clear()
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
            os.ftruncate(self._fd, total)
        except OSError as exc:
            raise _write_error(exc, self.path) from exc

    def write_at(self, offset: int, data: memoryview) -> None:
        try:
            while data:
                written = os.pwrite(self._fd, data, offset)
                data, offset = data[written:], offset + written
        except OSError as exc:
            raise _write_error(exc, self.path) from exc

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def checkpoint(self, offset: int) -> None:
        try:
            if self._durable:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise _write_error(exc, self.path) from exc
        self._progress.write(self._total, offset)

    def finish(self) -> SinkResult:
        try:
            if self._durable:
                os.fsync(self._fd)
        except OSError as exc:
            raise _write_error(exc, self.path) from exc
        finally:
            self.abort()
        self._progress.clear()
        st = self.path.stat()
        return SinkResult(str(self.path), "raw", self._total, st.st_size, st.st_blocks * 512)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class QemuNbdSink:
    """A new qcow2, VHD (vpc dynamic) or raw image written while the data streams in.

    qemu-nbd serves the fresh image; unwritten clusters stay unallocated, so the result is
    as sparse as ``qemu-img convert`` would make it, without staging a raw copy first.
    """

    def __init__(
        self, path: Path, fmt: ImageFormat, *, state_path: Path | None = None, durable: bool = True
    ) -> None:
        self.path = path
        self.format = fmt
        self._progress = _ProgressFile(state_path or path.with_name(path.name + ".progress"))
        # "unsafe" ignores flushes: only for scratch images and benchmarks, never for a target.
        self._cache = "writeback" if durable else "unsafe"
        self._server: QemuNbd | None = None
        self._client: NbdClient | None = None
        self._total = 0

    def resume_offset(self) -> int:
        state = self._progress.read()
        if state is None or not self.path.exists():
            return 0
        try:
            if qemu.image_info(self.path, self.format).virtual_size != state[0]:
                return 0
        except PermanentError:
            return 0  # a damaged half-written image: start again
        return state[1]

    def size(self, total: int, *, keep: int = 0) -> None:
        self._total = total
        if keep:
            if keep > self.resume_offset():
                raise PermanentError(
                    f"{self.path}: cannot keep {keep} bytes, only {self.resume_offset()} "
                    "are recorded as written",
                    system="qemu",
                    hint="restart from 0",
                )
        else:
            self._progress.clear()
            qemu.create_image(self.path, self.format, total)
        self._server = QemuNbd(str(self.path), fmt=self.format, read_only=False, cache=self._cache)
        self._client = self._server.start()
        if self._client.size != total:
            self.abort()
            raise PermanentError(
                f"{self.path}: a {self.format} image of {total} bytes came out as {self._client.size} bytes",
                system="qemu",
                hint="the format cannot hold this exact size; choose raw or qcow2",
            )

    def _nbd(self) -> NbdClient:
        if self._client is None:
            raise RuntimeError("size() must be called first")
        return self._client

    def write_at(self, offset: int, data: memoryview) -> None:
        self._nbd().write(offset, data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self._nbd().read(offset, length)

    def checkpoint(self, offset: int) -> None:
        self._nbd().flush()
        self._progress.write(self._total, offset)

    def finish(self) -> SinkResult:
        self._nbd().flush()
        self.abort()  # qemu-nbd closes the image cleanly when its client leaves
        self._progress.clear()
        st = self.path.stat()
        return SinkResult(str(self.path), self.format, self._total, st.st_size, st.st_blocks * 512)

    def abort(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server, self._client = None, None
