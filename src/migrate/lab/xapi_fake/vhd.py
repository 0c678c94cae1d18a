"""A streaming VHD reader (Microsoft's Virtual Hard Disk Image Format Specification), for
``import_raw_vdi?format=vhd``: fixed and dynamic disks are decoded to raw bytes as they
arrive, never seeking backwards, as xapi's vhd-tool does.

Dynamic layout as qemu-img and XCP-ng write it: a footer copy, the dynamic header, the block
allocation table (BAT), then data blocks in file order, each a sector bitmap followed by the
block's sectors, and the footer again at the end. A fixed disk is the raw bytes followed by
the footer. Differencing disks need their parent and are refused.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from migrate.lab.xapi_fake.rawfile import SparseWriter, VdiOverflow

SECTOR = 512
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
UNUSED = 0xFFFFFFFF


class VhdError(ValueError):
    """The stream is not a VHD this importer can decode."""


@dataclass(frozen=True, slots=True)
class Footer:
    data_offset: int
    current_size: int
    disk_type: int


def checksum(data: bytes, skip: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field at ``skip`` read as zero."""
    total = sum(data[:skip]) + sum(data[skip + 4 :])
    return ~total & 0xFFFFFFFF


def parse_footer(data: bytes) -> Footer | None:
    if len(data) != SECTOR or data[:8] != FOOTER_COOKIE:
        return None
    (stored,) = struct.unpack_from(">I", data, 64)
    if stored != checksum(data, 64):
        raise VhdError("VHD footer checksum mismatch")
    (data_offset,) = struct.unpack_from(">Q", data, 16)
    (current,) = struct.unpack_from(">Q", data, 48)
    (disk_type,) = struct.unpack_from(">I", data, 60)
    return Footer(data_offset, current, disk_type)


class _Stream:
    """Forward-only reads with a position, over a ``read(n)`` callable."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self.pos = 0

    def exact(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = self._read(min(left, 1024 * 1024))
            if not chunk:
                raise EOFError(f"VHD stream ended at byte {self.pos} while {left} more were expected")
            parts.append(chunk)
            left -= len(chunk)
            self.pos += len(chunk)
        return b"".join(parts)

    def skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise VhdError(
                f"VHD structure at byte {offset} is behind the stream (at {self.pos}); "
                "blocks must follow the BAT in file order"
            )
        while self.pos < offset:
            self.exact(min(offset - self.pos, 1024 * 1024))


def decode(
    read: Callable[[int], bytes],
    length: int,
    writer: SparseWriter,
    progress: Callable[[int], None] = lambda _n: None,
) -> int:
    """Decode a ``length``-byte VHD from ``read`` into ``writer``; returns the disk's virtual size."""
    stream = _Stream(read)
    first = stream.exact(SECTOR)
    footer = parse_footer(first)
    if footer is not None and footer.disk_type == DIFFERENCING:
        raise VhdError("a differencing VHD needs its parent; send the merged (dynamic or fixed) disk")
    if footer is not None and footer.disk_type == DYNAMIC:
        size = _dynamic(stream, footer, length, writer, progress)
    else:
        size = _fixed(stream, first, length, writer, progress)
    return size


def _fixed(
    stream: _Stream, first: bytes, length: int, writer: SparseWriter, progress: Callable[[int], None]
) -> int:
    data_len = length - SECTOR
    if data_len < 0 or data_len % SECTOR:
        raise VhdError(f"not a VHD: {length} bytes is not whole sectors plus a footer")
    if data_len > writer.limit:
        raise VdiOverflow(f"the VHD holds {data_len} bytes, more than the VDI's virtual_size {writer.limit}")
    head = first if data_len else b""
    if head:
        writer.write_at(0, head)
    while stream.pos < data_len:
        chunk = stream.exact(min(1024 * 1024, data_len - stream.pos))
        writer.write_at(stream.pos - len(chunk), chunk)
        progress(stream.pos)
    footer = parse_footer(stream.exact(SECTOR) if data_len else first)
    if footer is None or footer.disk_type != FIXED:
        raise VhdError("not a VHD: no fixed-disk footer at the end of the stream")
    if footer.current_size != data_len:
        raise VhdError(f"fixed VHD footer says {footer.current_size} bytes but {data_len} came")
    return data_len


def _dynamic(
    stream: _Stream, footer: Footer, length: int, writer: SparseWriter, progress: Callable[[int], None]
) -> int:
    if footer.current_size > writer.limit:
        raise VdiOverflow(f"the VHD's virtual size {footer.current_size} exceeds the VDI's {writer.limit}")
    stream.skip_to(footer.data_offset)
    header = stream.exact(1024)
    if header[:8] != HEADER_COOKIE:
        raise VhdError("dynamic VHD without its 'cxsparse' header")
    (stored,) = struct.unpack_from(">I", header, 36)
    if stored != checksum(header, 36):
        raise VhdError("VHD dynamic header checksum mismatch")
    table_offset, _version, entries, block_size = struct.unpack_from(">QIII", header, 16)
    if block_size == 0 or block_size % SECTOR:
        raise VhdError(f"VHD block size {block_size} is not a whole number of sectors")
    stream.skip_to(table_offset)
    bat = struct.unpack(f">{entries}I", stream.exact(4 * entries))
    sectors = block_size // SECTOR
    bitmap_len = -(-sectors // 8 // SECTOR) * SECTOR or SECTOR
    for file_offset, index in sorted((e * SECTOR, i) for i, e in enumerate(bat) if e != UNUSED):
        stream.skip_to(file_offset)
        bitmap = stream.exact(bitmap_len)
        data = stream.exact(block_size)
        base = index * block_size
        full = sectors % 8 == 0 and bitmap[: sectors // 8] == b"\xff" * (sectors // 8)
        if full and base + block_size <= footer.current_size:
            writer.write_at(base, data)  # the common case: every sector of the block is present
            progress(stream.pos)
            continue
        run_start = None
        for s in range(sectors + 1):
            present = (
                s < sectors and base + s * SECTOR < footer.current_size and bitmap[s >> 3] & (0x80 >> (s & 7))
            )
            if present and run_start is None:
                run_start = s
            elif not present and run_start is not None:
                writer.write_at(base + run_start * SECTOR, data[run_start * SECTOR : s * SECTOR])
                run_start = None
        progress(stream.pos)
    stream.skip_to(length - SECTOR)
    trailer = parse_footer(stream.exact(SECTOR))
    if trailer is None or trailer.current_size != footer.current_size:
        raise VhdError("dynamic VHD without a matching footer at its end")
    return footer.current_size
