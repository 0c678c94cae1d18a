"""Raw disk images for the lab that really boot, and whose every byte is known in advance.

A disk is described as a ``Layout``: its size and a few non-overlapping chunks of bytes; the
rest is zeros. That is what a sparse-aware pipeline meets in the wild (boot code at the
start, a region of data, large holes, a little data near the end) and it lets the lab
stream a 64 MiB flat extent without holding it in memory, write it sparsely to a file, and
know its sha256 before anything moved.

* ``bios_disk``: MBR with boot code (see ``bootcode``) and one bootable Linux partition.
* ``efi_disk``: protective MBR + GPT, a FAT16 EFI system partition with
  ``\\EFI\\BOOT\\BOOTX64.EFI``, and a second (data) partition.
* ``data_disk``: no partition table, just data and zeros.

The data is SHAKE-256 output seeded by the tag, so the same tag always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from migrate.lab import bootcode
from migrate.lab.fat import fat16_image

SECTOR = 512
MIB = 1024 * 1024
DiskKind = Literal["bios", "efi", "data"]

_ESP_TYPE = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
_BASIC_DATA_TYPE = uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")
_GPT_ENTRIES = 128
_GPT_ENTRY_SIZE = 128
_GPT_ENTRY_SECTORS = _GPT_ENTRIES * _GPT_ENTRY_SIZE // SECTOR  # 32
_ESP_BYTES = 8 * MIB


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    data: bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True, slots=True)
class Layout:
    """A disk image: ``size`` bytes, zero except for ``chunks`` (sorted, non-overlapping)."""

    size: int
    chunks: tuple[Chunk, ...]

    def __post_init__(self) -> None:
        end = 0
        for chunk in self.chunks:
            if chunk.offset < end or chunk.end > self.size:
                raise ValueError(f"chunk at {chunk.offset} overlaps another or runs past {self.size}")
            end = chunk.end

    def iter_bytes(self, block: int = MIB) -> Iterator[bytes]:
        """The whole image in pieces of at most ``block`` bytes (zeros included)."""
        pos = 0
        zeros = bytes(block)
        for chunk in (*self.chunks, Chunk(self.size, b"")):
            while pos < chunk.offset:
                n = min(block, chunk.offset - pos)
                yield zeros[:n]
                pos += n
            for i in range(0, len(chunk.data), block):
                yield chunk.data[i : i + block]
            pos = chunk.end

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the image."""
        out = bytearray(length)
        for chunk in self.chunks:
            lo, hi = max(offset, chunk.offset), min(offset + length, chunk.end)
            if lo < hi:
                out[lo - offset : hi - offset] = chunk.data[lo - chunk.offset : hi - chunk.offset]
        return bytes(out)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for piece in self.iter_bytes():
            digest.update(piece)
        return digest.hexdigest()

    def data_bytes(self) -> int:
        """How many bytes the chunks cover (an upper bound of what is not zero)."""
        return sum(len(c.data) for c in self.chunks)

    def overlay(self, writes: Iterable[Chunk]) -> Layout:
        """This layout with ``writes`` applied on top, as a guest's writes would land."""
        edits = sorted(writes, key=lambda c: c.offset)
        merged: list[list[int]] = []
        for lo, hi in sorted((c.offset, c.end) for c in (*self.chunks, *edits)):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        pieces = []
        for lo, hi in merged:
            data = bytearray(self.read(lo, hi - lo))
            for edit in edits:
                a, b = max(lo, edit.offset), min(hi, edit.end)
                if a < b:
                    data[a - lo : b - lo] = edit.data[a - edit.offset : b - edit.offset]
            pieces.append(Chunk(lo, bytes(data)))
        return Layout(self.size, tuple(pieces))

    def write_raw(self, path: Path) -> None:
        """Write the image to ``path`` as a sparse file (holes where the layout has zeros)."""
        with open(path, "wb") as f:
            for chunk in self.chunks:
                f.seek(chunk.offset)
                f.write(chunk.data)
            f.truncate(self.size)


@dataclass(frozen=True, slots=True)
class BootDisk:
    """A built disk: its layout, what it prints when booted (None for data disks), its sha256."""

    kind: DiskKind
    tag: str
    layout: Layout
    serial_line: str | None
    data_region: tuple[int, int]  # (offset, length) of the pseudo-random region

    @property
    def firmware(self) -> Literal["bios", "efi"] | None:
        return None if self.kind == "data" else self.kind

    @property
    def size(self) -> int:
        return self.layout.size

    def sha256(self) -> str:
        return self.layout.sha256()


# -- content -------------------------------------------------------------------------------


def pseudo_random(seed: str, label: str, length: int) -> bytes:
    """Deterministic bytes: SHAKE-256 of "seed/label", stable across Python versions."""
    return hashlib.shake_256(f"migrate-lab/{seed}/{label}".encode()).digest(length)


def _seeded_int(seed: str, label: str, bits: int = 32) -> int:
    return int.from_bytes(pseudo_random(seed, label, bits // 8), "little")


def _seeded_uuid(seed: str, label: str) -> uuid.UUID:
    return uuid.UUID(bytes=pseudo_random(seed, label, 16), version=4)


def _data_chunks(seed: str, size: int, start: int, data_bytes: int, reserved_tail: int) -> list[Chunk]:
    """A data region at ``start``, 4 KiB islands in the middle of the hole, data near the end."""
    if size < 8 * MIB or size % MIB:
        raise ValueError(f"disk size must be a whole number of MiB, at least 8 (got {size} bytes)")
    chunks = [Chunk(start, pseudo_random(seed, "region", data_bytes))]
    region_end = start + data_bytes
    tail = size - MIB // 2
    for i, fraction in enumerate((0.5, 0.625, 0.75)):
        at = int(size * fraction) // 4096 * 4096 + 8 * SECTOR * (i + 1)
        if region_end < at and at + 4096 < tail:
            chunks.append(Chunk(at, pseudo_random(seed, f"island{i}", 4096)))
    if tail + MIB // 4 > size - reserved_tail:
        raise ValueError("disk too small for its tail data")
    chunks.append(Chunk(tail, pseudo_random(seed, "tail", MIB // 4)))
    return sorted(chunks, key=lambda c: c.offset)


def _mbr(code: bytes, disk_signature: int, partitions: list[tuple[int, int, int, int]]) -> bytes:
    """A 512-byte MBR: code, signature, up to 4 (boot flag, type, first LBA, sectors) entries."""
    mbr = bytearray(SECTOR)
    mbr[: len(code)] = code
    struct.pack_into("<I", mbr, 0x1B8, disk_signature)
    for i, (flag, ptype, first, count) in enumerate(partitions):
        # CHS fields hold the "beyond CHS" marker, as every modern partitioner writes.
        struct.pack_into("<B3sB3sII", mbr, 0x1BE + 16 * i, flag, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff",
                         first, count)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def bios_disk(tag: str, size_mib: int, *, data_kib: int = 2048, message_tag: str | None = None) -> BootDisk:
    """A BIOS-bootable disk printing ``serial_line(message_tag or tag)``."""
    size = size_mib * MIB
    line = bootcode.serial_line(message_tag or tag)
    sectors = size // SECTOR
    mbr = _mbr(bootcode.mbr_boot_code(line), _seeded_int(tag, "disk-signature"),
               [(0x80, 0x83, 2048, sectors - 2048)])
    region = (2 * MIB, data_kib * 1024)
    chunks = [Chunk(0, mbr), *_data_chunks(tag, size, *region, 0)]
    return BootDisk("bios", tag, Layout(size, tuple(chunks)), line, region)


def _gpt_header(*, current: int, backup: int, last_usable: int, entries_lba: int, disk_guid: uuid.UUID,
                entries_crc: int) -> bytes:
    fields = (b"EFI PART", 0x00010000, 92, 0, 0, current, backup, 34, last_usable, disk_guid.bytes_le,
              entries_lba, _GPT_ENTRIES, _GPT_ENTRY_SIZE, entries_crc)
    fmt = "<8sIIIIQQQQ16sQIII"
    crc = zlib.crc32(struct.pack(fmt, *fields))
    header = struct.pack(fmt, *fields[:3], crc, *fields[4:])
    return header.ljust(SECTOR, b"\0")


def _gpt_entry(ptype: uuid.UUID, guid: uuid.UUID, first: int, last: int, name: str) -> bytes:
    return struct.pack("<16s16sQQQ72s", ptype.bytes_le, guid.bytes_le, first, last, 0,
                       name.encode("utf-16-le"))


def efi_disk(tag: str, size_mib: int, *, data_kib: int = 2048, message_tag: str | None = None) -> BootDisk:
    """A UEFI-bootable GPT disk whose ESP holds a BOOTX64.EFI printing ``serial_line(...)``."""
    size = size_mib * MIB
    line = bootcode.serial_line(message_tag or tag)
    sectors = size // SECTOR
    last = sectors - 1
    last_usable = last - _GPT_ENTRY_SECTORS - 1
    esp_first = 2048
    esp_last = esp_first + _ESP_BYTES // SECTOR - 1
    data_first = esp_last + 1
    data_last = (last_usable + 1) // 2048 * 2048 - 1  # keep the end 1 MiB aligned too
    if data_last <= data_first:
        raise ValueError(f"an EFI disk needs more than {size_mib} MiB")

    entries = (
        _gpt_entry(_ESP_TYPE, _seeded_uuid(tag, "esp"), esp_first, esp_last, "EFI system partition")
        + _gpt_entry(_BASIC_DATA_TYPE, _seeded_uuid(tag, "data"), data_first, data_last, "data")
    ).ljust(_GPT_ENTRIES * _GPT_ENTRY_SIZE, b"\0")
    crc = zlib.crc32(entries)
    disk_guid = _seeded_uuid(tag, "disk")
    primary = _gpt_header(current=1, backup=last, last_usable=last_usable, entries_lba=2,
                          disk_guid=disk_guid, entries_crc=crc)
    backup = _gpt_header(current=last, backup=1, last_usable=last_usable,
                         entries_lba=last - _GPT_ENTRY_SECTORS, disk_guid=disk_guid, entries_crc=crc)
    protective = _mbr(b"", 0, [(0, 0xEE, 1, min(sectors - 1, 0xFFFFFFFF))])
    esp = fat16_image({"EFI/BOOT/BOOTX64.EFI": bootcode.efi_application(line)},
                      size_bytes=_ESP_BYTES, hidden_sectors=esp_first,
                      volume_id=_seeded_int(tag, "volume-id"))
    region = ((data_first + 2048) * SECTOR, data_kib * 1024)
    chunks = [
        Chunk(0, protective + primary + entries),
        *_esp_chunks(esp, esp_first * SECTOR),
        *_data_chunks(tag, size, *region, (_GPT_ENTRY_SECTORS + 1) * SECTOR),
        Chunk((last - _GPT_ENTRY_SECTORS) * SECTOR, entries + backup),
    ]
    return BootDisk("efi", tag, Layout(size, tuple(sorted(chunks, key=lambda c: c.offset))), line, region)


def _esp_chunks(image: bytes, offset: int) -> list[Chunk]:
    """The FAT image without its long zero runs, so the ESP stays sparse."""
    chunks: list[Chunk] = []
    block = 64 * 1024
    zero = bytes(block)
    for i in range(0, len(image), block):
        piece = image[i : i + block]
        if piece == zero[: len(piece)]:
            continue
        if chunks and chunks[-1].end == offset + i:
            chunks[-1] = Chunk(chunks[-1].offset, chunks[-1].data + piece)
        else:
            chunks.append(Chunk(offset + i, piece))
    return chunks


def data_disk(tag: str, size_mib: int, *, data_kib: int = 2048) -> BootDisk:
    """A disk with no boot code: a data region from byte 0, holes, islands and tail data."""
    size = size_mib * MIB
    region = (0, data_kib * 1024)
    return BootDisk("data", tag, Layout(size, tuple(_data_chunks(tag, size, *region, 0))), None, region)


def build(kind: DiskKind, tag: str, size_mib: int, *, data_kib: int = 2048,
          message_tag: str | None = None) -> BootDisk:
    """Dispatch on ``kind``; the seeder calls this with what the estate file says."""
    if kind == "bios":
        return bios_disk(tag, size_mib, data_kib=data_kib, message_tag=message_tag)
    if kind == "efi":
        return efi_disk(tag, size_mib, data_kib=data_kib, message_tag=message_tag)
    return data_disk(tag, size_mib, data_kib=data_kib)


def write_image(disk: BootDisk, path: Path) -> str:
    """Write ``disk`` as a sparse raw file; return its sha256."""
    disk.layout.write_raw(path)
    return disk.sha256()
