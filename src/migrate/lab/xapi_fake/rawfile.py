"""VDI contents as sparse raw files: writes skip all-zero blocks, copies move only data extents,
so a 40 GiB seeded disk or a mostly empty upload costs almost no space or time."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

BLOCK = 64 * 1024
_ZEROS = bytes(BLOCK)


class VdiOverflow(Exception):
    """More bytes than the VDI's virtual_size."""


class SparseWriter:
    """Writes into a file that already reads as zeros, leaving holes where the data is zero."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self.file = file
        self.limit = limit
        self.pos = 0
        self.written = 0  # data bytes actually stored (not skipped as zeros)

    def write(self, data: bytes | memoryview) -> None:
        self.write_at(self.pos, data)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        end = offset + len(view)
        if end > self.limit:
            raise VdiOverflow(f"write up to byte {end} past the VDI's virtual_size {self.limit}")
        i = 0
        while i < len(view):
            # Align pieces to BLOCK so hole detection matches the file system's view.
            step = min(BLOCK - (offset + i) % BLOCK, len(view) - i)
            piece = view[i : i + step]
            if piece != _ZEROS[:step]:
                self.file.seek(offset + i)
                self.file.write(piece)
                self.written += step
            i += step
        self.pos = end


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` (same size), reading only the extents that hold data."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        fd = fin.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos: the rest is a hole
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            left = end - start
            while left:
                chunk = fin.read(min(left, 1024 * 1024))
                fout.write(chunk)
                left -= len(chunk)
            pos = end


def allocated_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0
