"""VMDK files as ESXi writes them on a VMFS datastore: flat descriptors and vmfsSparse deltas.

A base disk is two files: a text descriptor (``web-01.vmdk``, createType ``vmfs``, or
``monolithicFlat`` for a disk brought over from a hosted product) and its flat extent
(``web-01-flat.vmdk``, the raw bytes). A snapshot adds ``web-01-000001.vmdk`` (createType
``vmfsSparse``, ``parentFileNameHint`` naming the base) and its extent
``web-01-000001-delta.vmdk`` in the COWD ("copy on write disk") format:

    sector 0-3   header (2048 bytes, below)
    sector 4...  grain directory: one uint32 sector offset per 4096 grains (0 = none)
    then         grain tables of 4096 uint32 sector offsets of grains (0 = read the parent)
    then         grains: one sector each (ESXi's vmfsSparse grain size)

qemu reads both (block/vmdk.c: VMFS, FLAT and VMFSSPARSE extents), which is how the lab
checks that base + delta consolidate to the expected bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from migrate.lab.bootdisk import SECTOR, Chunk

_GT_ENTRIES = 4096
_HEADER_SECTORS = 4


@dataclass(frozen=True, slots=True)
class DiskIds:
    """The identity fields of a descriptor, derived from a seed so reruns write the same bytes."""

    cid: int
    long_content_id: str
    uuid: str  # ddb.uuid, "60 00 C2 .." form

    @classmethod
    def from_seed(cls, seed: str) -> DiskIds:
        digest = hashlib.sha256(f"migrate-lab/vmdk/{seed}".encode()).digest()
        cid = int.from_bytes(digest[:4], "little") & 0xFFFFFFFE or 2
        # ESXi's disk UUIDs start 60 00 C2 (VMware's NAA prefix), the rest lower-case hex.
        text = "60 00 C2 " + " ".join(f"{b:02x}" for b in digest[4:17])
        return cls(cid=cid, long_content_id=digest[16:32].hex()[:24] + f"{cid:08x}",
                   uuid=text[:23] + "-" + text[24:])

    @property
    def vsphere_uuid(self) -> str:
        """The same UUID as a vSphere disk backing shows it: 6000C29x-xxxx-xxxx-xxxx-xxxxxxxxxxxx."""
        h = self.uuid.replace(" ", "").replace("-", "")
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _adapter_type(controller: str) -> str:
    known = {"ide": "ide", "sata": "ide", "buslogic": "buslogic", "pvscsi": "pvscsi"}
    return known.get(controller, "lsilogic")


def _geometry(capacity: int, controller: str) -> tuple[int, int, int]:
    heads, sectors = (16, 63) if _adapter_type(controller) == "ide" else (255, 63)
    return min(capacity // SECTOR // (heads * sectors), 65535), heads, sectors


def flat_descriptor(
    *,
    extent_name: str,
    capacity: int,
    ids: DiskIds,
    controller: str = "pvscsi",
    create_type: str = "vmfs",
    thin: bool = False,
    hw_version: int = 19,
) -> bytes:
    """The descriptor of a base disk whose bytes live in ``extent_name`` (same folder)."""
    if capacity % SECTOR:
        raise ValueError(f"capacity must be a multiple of {SECTOR} (got {capacity})")
    if create_type == "vmfs":
        extent = f'RW {capacity // SECTOR} VMFS "{extent_name}"'
    elif create_type == "monolithicFlat":
        extent = f'RW {capacity // SECTOR} FLAT "{extent_name}" 0'
    else:
        raise ValueError(f"createType must be vmfs or monolithicFlat (got {create_type!r})")
    cyl, heads, sectors = _geometry(capacity, controller)
    ddb: dict[str, str | None] = {
        "ddb.adapterType": _adapter_type(controller),
        "ddb.geometry.cylinders": str(cyl),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": str(sectors),
        "ddb.longContentID": ids.long_content_id,
        "ddb.thinProvisioned": "1" if thin else None,
        "ddb.uuid": ids.uuid,
        "ddb.virtualHWVersion": str(hw_version),
    }
    return _descriptor(ids.cid, 0xFFFFFFFF, create_type, None, extent, ddb)


def delta_descriptor(
    *, extent_name: str, capacity: int, ids: DiskIds, parent_cid: int, parent_name: str
) -> bytes:
    """The descriptor of a vmfsSparse snapshot delta on top of ``parent_name``."""
    extent = f'RW {capacity // SECTOR} VMFSSPARSE "{extent_name}"'
    ddb: dict[str, str | None] = {"ddb.longContentID": ids.long_content_id}
    return _descriptor(ids.cid, parent_cid, "vmfsSparse", parent_name, extent, ddb)


def _descriptor(cid: int, parent_cid: int, create_type: str, parent: str | None, extent: str,
                ddb: dict[str, str | None]) -> bytes:
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        f"parentCID={parent_cid:08x}",
        'isNativeSnapshot="no"',
        f'createType="{create_type}"',
    ]
    if parent is not None:
        lines.append(f'parentFileNameHint="{parent}"')
    lines += ["", "# Extent description", extent, "", "# The Disk Data Base", "#DDB", ""]
    lines += [f'{key} = "{value}"' for key, value in ddb.items() if value is not None]
    return ("\n".join(lines) + "\n").encode("utf-8")


def cowd_delta(capacity: int, writes: Iterable[Chunk], *, parent_name: str = "") -> bytes:
    """A COWD (vmfsSparse) extent holding ``writes``; unwritten sectors read from the parent.

    Writes must be sector aligned. A write of zeros is kept as an allocated grain of zeros,
    as ESXi does: it hides the parent's data there.
    """
    sectors = capacity // SECTOR
    gd_entries = -(-sectors // _GT_ENTRIES)
    gd_sectors = -(-gd_entries * 4 // SECTOR)
    grains: dict[int, bytes] = {}
    for write in writes:
        if write.offset % SECTOR or len(write.data) % SECTOR or write.end > capacity:
            raise ValueError(f"delta write at {write.offset} (+{len(write.data)}) is not sector aligned")
        for i in range(0, len(write.data), SECTOR):
            grains[write.offset // SECTOR + i // SECTOR] = write.data[i : i + SECTOR]

    tables = sorted({lba // _GT_ENTRIES for lba in grains})
    next_free = _HEADER_SECTORS + gd_sectors
    gd = [0] * gd_entries
    gt_at: dict[int, int] = {}
    for table in tables:
        gd[table] = next_free
        gt_at[table] = next_free
        next_free += _GT_ENTRIES * 4 // SECTOR
    gts = {table: [0] * _GT_ENTRIES for table in tables}
    body = bytearray()
    grain_start = next_free
    for lba in sorted(grains):
        gts[lba // _GT_ENTRIES][lba % _GT_ENTRIES] = next_free
        body += grains[lba]
        next_free += 1

    header = bytearray(_HEADER_SECTORS * SECTOR)
    # magic, version 1, flags 3, capacity, grain size, GD offset, GD entries, next free sector
    struct.pack_into("<4sIIIIIII", header, 0, b"COWD", 1, 3, sectors, 1, _HEADER_SECTORS, gd_entries,
                     next_free)
    # A child's header carries its parent's name in the union that a root uses for geometry.
    struct.pack_into("<1024sI", header, 32, parent_name.encode("utf-8")[:1023], 0)
    struct.pack_into("<I", header, 32 + 1028, 1)  # generation
    out = bytearray(header)
    out += struct.pack(f"<{gd_entries}I", *gd).ljust(gd_sectors * SECTOR, b"\0")
    for table in tables:
        assert len(out) == gt_at[table] * SECTOR
        out += struct.pack(f"<{_GT_ENTRIES}I", *gts[table])
    assert len(out) == grain_start * SECTOR
    return bytes(out + body)
