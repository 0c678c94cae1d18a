"""A small, reproducible FAT16 file system image, enough for an EFI system partition.

Pure Python so the lab needs neither dosfstools nor mtools, and byte-for-byte deterministic
(fixed volume id and timestamps) so a disk's expected sha256 never changes between runs.
Only what an ESP needs: 8.3 upper-case names, nested directories, one sector per cluster.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

SECTOR = 512
_ROOT_ENTRIES = 512
_RESERVED = 1
_FATS = 2
_EOC = 0xFFFF
_DATE_2024_01_01 = ((2024 - 1980) << 9) | (1 << 5) | 1
_ATTR_DIR = 0x10
_ATTR_ARCHIVE = 0x20
_ATTR_VOLUME = 0x08


@dataclass
class _Dir:
    children: dict[str, _Dir | bytes] = field(default_factory=dict)


def _short_name(name: str) -> bytes:
    stem, _, ext = name.upper().partition(".")
    if not (1 <= len(stem) <= 8 and len(ext) <= 3) or not (stem + ext).isascii():
        raise ValueError(f"FAT name must be 8.3 ASCII (got {name!r})")
    return stem.ljust(8).encode("ascii") + ext.ljust(3).encode("ascii")


def _entry(name: bytes, attr: int, cluster: int, size: int) -> bytes:
    return struct.pack(
        "<11sBBBHHHHHHHI",
        name, attr, 0, 0, 0, _DATE_2024_01_01, _DATE_2024_01_01, 0, 0, _DATE_2024_01_01, cluster, size,
    )  # fmt: skip


def _tree(files: Mapping[str, bytes]) -> _Dir:
    root = _Dir()
    for path, data in sorted(files.items()):
        parts = [p for p in path.replace("\\", "/").split("/") if p]
        node = root
        for part in parts[:-1]:
            child = node.children.setdefault(part.upper(), _Dir())
            if not isinstance(child, _Dir):
                raise ValueError(f"{path}: {part} is a file, not a directory")
            node = child
        node.children[parts[-1].upper()] = data
    return root


def fat16_image(
    files: Mapping[str, bytes], *, size_bytes: int, hidden_sectors: int, volume_id: int, label: str = "ESP"
) -> bytes:
    """A FAT16 volume of ``size_bytes`` holding ``files`` ({"EFI/BOOT/BOOTX64.EFI": b"..."})."""
    total = size_bytes // SECTOR
    root_sectors = _ROOT_ENTRIES * 32 // SECTOR
    # Microsoft's FAT spec formula for the FAT size, one sector per cluster.
    fat_sectors = -(-(total - _RESERVED - root_sectors) // (256 + _FATS))
    data_start = _RESERVED + _FATS * fat_sectors + root_sectors
    clusters = total - data_start
    if not 4085 <= clusters < 65525 or total >= 0x10000:
        raise ValueError(f"{size_bytes} bytes is not a FAT16 size with 512-byte clusters (4-32 MiB)")

    fat = [0xFFF8, 0xFFFF]
    data: dict[int, bytes] = {}

    def allocate(payload: bytes) -> int:
        count = max(1, -(-len(payload) // SECTOR))
        first = len(fat)
        fat.extend(range(first + 1, first + count))
        fat.append(_EOC)
        data[first] = payload
        return first

    def write_dir(node: _Dir, own: int, parent: int) -> bytes:
        entries = []
        if own:  # sub-directories start with "." and ".."; the root has neither
            entries += [_entry(b".".ljust(11), _ATTR_DIR, own, 0),
                        _entry(b"..".ljust(11), _ATTR_DIR, parent, 0)]
        for name, child in node.children.items():
            if isinstance(child, _Dir):
                slots = 2 + len(child.children)
                cluster = allocate(bytes(slots * 32))
                data[cluster] = write_dir(child, cluster, own)
                entries.append(_entry(_short_name(name), _ATTR_DIR, cluster, 0))
            else:
                entries.append(_entry(_short_name(name), _ATTR_ARCHIVE, allocate(child) if child else 0,
                                      len(child)))
        return b"".join(entries)

    root = _entry(label.upper().ljust(11).encode("ascii")[:11], _ATTR_VOLUME, 0, 0) + write_dir(
        _tree(files), 0, 0
    )
    if len(root) > _ROOT_ENTRIES * 32 or len(fat) > clusters + 2:
        raise ValueError("files do not fit in the FAT16 volume")

    boot = bytearray(SECTOR)
    boot[0:3] = b"\xeb\x3c\x90"  # jmp over the BPB, as every FAT boot sector starts
    struct.pack_into(
        "<8sHBHBHHBHHHII", boot, 3,
        b"MIGRATE ", SECTOR, 1, _RESERVED, _FATS, _ROOT_ENTRIES, total, 0xF8, fat_sectors,
        63, 255, hidden_sectors, 0,
    )  # fmt: skip
    struct.pack_into("<BBBI11s8s", boot, 36, 0x80, 0, 0x29, volume_id,
                     label.upper().ljust(11).encode("ascii")[:11], b"FAT16   ")
    boot[510:512] = b"\x55\xaa"

    fat_bytes = struct.pack(f"<{len(fat)}H", *fat).ljust(fat_sectors * SECTOR, b"\0")
    image = bytearray(total * SECTOR)
    image[0:SECTOR] = boot
    for i in range(_FATS):
        start = (_RESERVED + i * fat_sectors) * SECTOR
        image[start : start + len(fat_bytes)] = fat_bytes
    root_at = (_RESERVED + _FATS * fat_sectors) * SECTOR
    image[root_at : root_at + len(root)] = root
    for cluster, payload in data.items():
        at = (data_start + cluster - 2) * SECTOR
        image[at : at + len(payload)] = payload
    return bytes(image)
