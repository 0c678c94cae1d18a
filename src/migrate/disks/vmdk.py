"""VMDK descriptors and snapshot chains, as data. PURE: bytes in, dataclasses and bytes out.

A vSphere disk is a small text *descriptor* (``createType``, ``CID``/``parentCID``,
``parentFileNameHint``, extent lines, ``ddb.*`` keys) plus the *extents* that hold the bytes.
A snapshot adds a delta whose descriptor names its parent; the guest sees the consolidation
of the chain. This module parses what VMware and other tools actually write (comments, CRLF,
spaces around ``=``, quoted or bare values, several extents, non-ASCII names in the declared
encoding, descriptors embedded in hosted sparse files), checks a chain the way VMware would
refuse to open it, and renders descriptors in the one strict spelling qemu's vmdk driver can
read (it finds ``CID``, ``createType="`` and ``parentFileNameHint="`` with ``strstr``).
"""

from __future__ import annotations

import codecs
import posixpath
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from migrate.errors import PermanentError

SECTOR = 512
NO_PARENT = 0xFFFFFFFF
MAX_DESCRIPTOR_BYTES = (1 << 20) - 1  # qemu reads at most this much of a descriptor file
MAX_CHAIN = 255

FLAT_KINDS = frozenset({"FLAT", "VMFS"})
# Extent kinds whose bytes need a sparse-format reader (qemu's vmdk driver).
SPARSE_KINDS = frozenset({"SPARSE", "VMFSSPARSE", "SESPARSE"})
# Extent kinds that cannot be read as datastore files at all.
DEVICE_KINDS = frozenset({"VMFSRDM", "VMFSRAW", "VMFSPASSTHROUGHRAWDEVICEMAP", "VMFSRAWDEVICEMAP"})
KNOWN_KINDS = FLAT_KINDS | SPARSE_KINDS | DEVICE_KINDS | {"ZERO", "VSANSPARSE"}

_KEY_VALUE = re.compile(r"^([A-Za-z_][\w.:-]*)\s*=\s*(.*?)\s*$")
_EXTENT = re.compile(
    r"^(?P<access>RW|RDONLY|NOACCESS)\s+(?P<sectors>\d+)\s+(?P<kind>[A-Za-z]+)"
    r'(?:\s+(?:"(?P<qname>[^"]*)"|(?P<bname>\S+))(?:\s+(?P<offset>\d+))?(?P<extra>.*))?$',
    re.IGNORECASE,
)
_DATASTORE_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")


def _problem(where: str, message: str, hint: str | None = None) -> PermanentError:
    return PermanentError(f"{where}: {message}", system="vmdk", hint=hint)


# -- descriptors ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent line: ``RW 2097152 VMFS "disk-flat.vmdk"`` or ``RW 8192 FLAT "x" 2048``."""

    access: str
    sectors: int
    kind: str
    filename: str | None = None
    offset: int = 0  # sectors into the file, FLAT extents only
    extra: str = ""  # anything after, e.g. an RDM partition UUID; kept for rendering

    @property
    def size_bytes(self) -> int:
        return self.sectors * SECTOR

    @property
    def offset_bytes(self) -> int:
        return self.offset * SECTOR


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A parsed descriptor. Unknown header keys and ``ddb.*`` keys are kept, in order."""

    create_type: str
    extents: tuple[Extent, ...]
    cid: int = NO_PARENT
    parent_cid: int = NO_PARENT
    parent_hint: str | None = None
    version: int = 1
    encoding: str = "UTF-8"
    header: tuple[tuple[str, str], ...] = ()
    ddb: tuple[tuple[str, str], ...] = ()

    @property
    def capacity_bytes(self) -> int:
        return sum(e.size_bytes for e in self.extents)

    @property
    def has_parent(self) -> bool:
        return self.parent_cid != NO_PARENT or bool(self.parent_hint)

    @property
    def is_flat(self) -> bool:
        """True when every byte is a plain range of a file (or zeros): streamable over HTTP."""
        return all(e.kind in FLAT_KINDS or e.kind == "ZERO" for e in self.extents)

    def ddb_value(self, key: str) -> str | None:
        return dict(self.ddb).get(key)


def _unquote(value: str) -> str:
    if value.startswith('"'):
        end = value.find('"', 1)
        return value[1:end] if end > 0 else value[1:]
    # A trailing comment after a bare value: ``CID=fffffffe  # comment``.
    return value.split("#", 1)[0].strip()


def _codec(name: str) -> str | None:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode(raw: bytes) -> tuple[str, str]:
    """Decode descriptor bytes in their declared ``encoding`` (default UTF-8), losslessly.

    Returns (text, encoding name as written). Bytes the codec cannot decode survive as
    surrogates so that rendering writes them back unchanged.
    """
    declared = "UTF-8"
    match = re.search(rb'^\s*encoding\s*=\s*"?([^"\r\n]+)"?', raw, re.MULTILINE)
    if match:
        declared = match.group(1).decode("ascii", "replace").strip()
    codec = _codec(declared) or "utf-8"
    try:
        return raw.decode(codec), declared
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape"), declared


def parse_descriptor(raw: bytes | str, *, where: str = "descriptor") -> Descriptor:
    """Parse descriptor text; ``where`` (a file name) prefixes every error message."""
    if isinstance(raw, bytes):
        if raw[:4] in (b"KDMV", b"COWD"):
            raise _problem(
                where,
                "is a binary sparse extent, not a text descriptor",
                "read its embedded descriptor with parse_sparse_header() first",
            )
        text, encoding = decode(raw.split(b"\0", 1)[0])
    else:
        text, encoding = raw, "UTF-8"
    keys: dict[str, str] = {}
    header: list[tuple[str, str]] = []
    ddb: list[tuple[str, str]] = []
    extents: list[Extent] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        extent = _EXTENT.match(line)
        if extent:
            extents.append(_extent(extent, f"{where}:{number}"))
            continue
        kv = _KEY_VALUE.match(line)
        if not kv:
            raise _problem(
                f"{where}:{number}",
                f"cannot read line {line[:80]!r}",
                "expected 'key = value' or an extent line such as 'RW 2048 VMFS \"x-flat.vmdk\"'",
            )
        key, value = kv.group(1), _unquote(kv.group(2))
        if key.lower().startswith("ddb."):
            ddb.append((key, value))
        else:
            keys[key.lower()] = value
            if key.lower() not in _KNOWN_HEADER:
                header.append((key, value))
    if "createtype" not in keys:
        raise _problem(where, "has no createType line; this is not a VMDK descriptor")
    if not extents:
        raise _problem(
            where, "lists no extents", "a descriptor needs at least one 'RW <sectors> <type> \"file\"' line"
        )
    return Descriptor(
        create_type=keys["createtype"],
        extents=tuple(extents),
        cid=_cid(keys.get("cid", "ffffffff"), where, "CID"),
        parent_cid=_cid(keys.get("parentcid", "ffffffff"), where, "parentCID"),
        parent_hint=keys.get("parentfilenamehint") or None,
        version=_int(keys.get("version", "1"), where, "version"),
        encoding=keys.get("encoding", encoding),
        header=tuple(header),
        ddb=tuple(ddb),
    )


_KNOWN_HEADER = frozenset({"version", "encoding", "cid", "parentcid", "createtype", "parentfilenamehint"})


def _extent(m: re.Match[str], where: str) -> Extent:
    kind = m.group("kind").upper()
    name = m.group("qname") if m.group("qname") is not None else m.group("bname")
    if kind not in KNOWN_KINDS:
        raise _problem(
            where,
            f"unknown extent type {m.group('kind')!r}",
            f"known types: {', '.join(sorted(KNOWN_KINDS))}",
        )
    if kind != "ZERO" and not name:
        raise _problem(where, f"{kind} extent has no file name")
    sectors = int(m.group("sectors"))
    if sectors <= 0:
        raise _problem(where, f"extent of {sectors} sectors; must be at least 1")
    return Extent(
        access=m.group("access").upper(),
        sectors=sectors,
        kind=kind,
        filename=name,
        offset=int(m.group("offset") or 0),
        extra=(m.group("extra") or "").strip(),
    )


def _cid(value: str, where: str, key: str) -> int:
    try:
        cid = int(value, 16)
    except ValueError:
        raise _problem(where, f"{key}={value!r} is not 8 hex digits") from None
    if not 0 <= cid <= 0xFFFFFFFF:
        raise _problem(where, f"{key}={value!r} does not fit in 32 bits")
    return cid


def _int(value: str, where: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _problem(where, f"{key}={value!r} is not an integer") from None


def render_descriptor(desc: Descriptor) -> bytes:
    """Render in the strict spelling qemu and VMware both read, in ``desc.encoding``.

    CID comes before parentCID and nothing above it contains "CID": qemu looks the two up
    with ``strstr`` and would otherwise read the wrong one.
    """
    lines = [
        "# Disk DescriptorFile",
        f"version={desc.version}",
        f'encoding="{desc.encoding}"',
        f"CID={desc.cid:08x}",
        f"parentCID={desc.parent_cid:08x}",
    ]
    lines += [f'{key}="{value}"' for key, value in desc.header]
    lines.append(f'createType="{desc.create_type}"')
    if desc.parent_hint:
        lines.append(f'parentFileNameHint="{desc.parent_hint}"')
    lines += ["", "# Extent description"]
    for e in desc.extents:
        line = f"{e.access} {e.sectors} {e.kind}"
        if e.filename is not None:
            line += f' "{e.filename}"'
            if e.kind == "FLAT":
                line += f" {e.offset}"
        if e.extra:
            line += f" {e.extra}"
        lines.append(line)
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    lines += [f'{key} = "{value}"' for key, value in desc.ddb]
    codec = _codec(desc.encoding) or "utf-8"
    return ("\n".join(lines) + "\n").encode(codec, "surrogateescape")


# -- hosted sparse headers (descriptor embedded in the extent) ------------------------------

_KDMV = struct.Struct("<4sIIQQQQIQQQB4sH")
_COWD = struct.Struct("<4sIIIIIIIIII")


@dataclass(frozen=True, slots=True)
class SparseHeader:
    """The first sector of a hosted sparse (``KDMV``) or ESX 3 delta (``COWD``) extent."""

    magic: str
    version: int
    capacity_sectors: int
    grain_sectors: int
    descriptor_offset: int = 0  # sectors; 0 when no descriptor is embedded
    descriptor_size: int = 0  # sectors

    @property
    def descriptor_range(self) -> tuple[int, int] | None:
        """Byte range [start, end) of the embedded descriptor, if any."""
        if self.descriptor_offset and self.descriptor_size:
            start = self.descriptor_offset * SECTOR
            return start, start + min(self.descriptor_size * SECTOR, MAX_DESCRIPTOR_BYTES)
        return None


def parse_sparse_header(first_sector: bytes, *, where: str = "extent") -> SparseHeader | None:
    """Return the header if ``first_sector`` starts a binary sparse extent, else None (text)."""
    if first_sector[:4] == b"KDMV":
        if len(first_sector) < _KDMV.size:
            raise _problem(where, "sparse header is truncated")
        _magic, version, _flags, capacity, grain, desc_off, desc_size, *_ = _KDMV.unpack_from(first_sector)
        return SparseHeader("KDMV", version, capacity, grain, desc_off, desc_size)
    if first_sector[:4] == b"COWD":
        if len(first_sector) < _COWD.size:
            raise _problem(where, "COWD header is truncated")
        _m, version, _flags, sectors, grain, *_ = _COWD.unpack_from(first_sector)
        return SparseHeader("COWD", version, sectors, grain)
    return None


# -- datastore paths and chains -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatastorePath:
    """``[datastore] folder/file.vmdk`` split in two; ``path`` is POSIX, relative to the root."""

    datastore: str
    path: str

    def __str__(self) -> str:
        return f"[{self.datastore}] {self.path}"

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def sibling(self, relative: str) -> DatastorePath:
        joined = posixpath.normpath(posixpath.join(self.folder, relative))
        if joined.startswith("../") or joined == "..":
            raise _problem(str(self), f"{relative!r} points above the datastore root")
        return DatastorePath(self.datastore, joined.lstrip("/"))


def split_datastore_path(text: str) -> DatastorePath:
    """Parse ``[ds1] vm/vm.vmdk``; raise a PermanentError naming the expected form."""
    m = _DATASTORE_PATH.match(text.strip())
    if not m or not m.group("path"):
        raise _problem(repr(text), "is not a datastore path", 'expected "[datastore] folder/disk.vmdk"')
    return DatastorePath(m.group("ds").strip(), m.group("path").strip().lstrip("/"))


def resolve_parent(
    child: DatastorePath, hint: str, volumes: Mapping[str, str] | None = None
) -> DatastorePath:
    """Where a ``parentFileNameHint`` points: relative to the child's folder, or absolute.

    Absolute hints look like ``/vmfs/volumes/<uuid or name>/folder/base.vmdk``; ``volumes``
    maps volume UUIDs (from a datastore's ``ds:///vmfs/volumes/<uuid>/`` URL) to names.
    """
    if not hint.startswith("/"):
        return child.sibling(hint)
    parts = hint.split("/")
    if len(parts) >= 5 and parts[1] == "vmfs" and parts[2] == "volumes":
        volume = parts[3]
        datastore = (volumes or {}).get(volume, volume)
        return DatastorePath(datastore, "/".join(parts[4:]))
    raise _problem(
        str(child),
        f"parent hint {hint!r} is an absolute path outside /vmfs/volumes",
        "pass the chain explicitly (Disk.chain from vSphere's layoutEx)",
    )


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One disk in a chain: where its descriptor lives and what it says.

    ``embedded`` is True when the descriptor sits inside a hosted sparse file, which is then
    also the link's only extent.
    """

    path: DatastorePath
    descriptor: Descriptor
    embedded: bool = False

    def extent_paths(self) -> tuple[DatastorePath | None, ...]:
        if self.embedded:
            return (self.path,)
        return tuple(self.path.sibling(e.filename) if e.filename else None for e in self.descriptor.extents)


@dataclass(frozen=True, slots=True)
class Chain:
    """Links from the base disk (index 0) up to the top the VM runs on."""

    links: tuple[ChainLink, ...]

    @property
    def base(self) -> ChainLink:
        return self.links[0]

    @property
    def top(self) -> ChainLink:
        return self.links[-1]

    @property
    def capacity_bytes(self) -> int:
        return self.top.descriptor.capacity_bytes

    @property
    def is_single_flat(self) -> bool:
        """No snapshots and every extent a plain file range: stream it, no staging."""
        return len(self.links) == 1 and not self.base.embedded and self.base.descriptor.is_flat


def validate_chain(chain: Chain) -> None:
    """Refuse chains VMware itself would refuse, with a message saying which link and why."""
    if not chain.links:
        raise _problem("chain", "is empty")
    if len(chain.links) > MAX_CHAIN:
        raise _problem(
            str(chain.top.path),
            f"chain of {len(chain.links)} links is longer than {MAX_CHAIN}",
            "a loop in parentFileNameHint? consolidate snapshots in vSphere",
        )
    seen: set[DatastorePath] = set()
    for link in chain.links:
        if link.path in seen:
            raise _problem(str(link.path), "appears twice in the chain", "parentFileNameHint loops back")
        seen.add(link.path)
    capacity = chain.base.descriptor.capacity_bytes
    for index, link in enumerate(chain.links):
        d, where = link.descriptor, str(link.path)
        for e in d.extents:
            if e.kind in DEVICE_KINDS:
                raise _problem(
                    where,
                    f"is a raw device mapping ({e.kind}); its bytes are on a LUN, not the datastore",
                    "migrate RDM disks by copying inside the guest, or convert the RDM to a virtual disk",
                )
            if e.kind == "VSANSPARSE":
                raise _problem(
                    where,
                    "is a vSAN sparse delta, which no local tool can read",
                    "consolidate or delete the VM's snapshots in vSphere, then retry",
                )
        if d.capacity_bytes != capacity:
            raise _problem(
                where,
                f"capacity {d.capacity_bytes} bytes differs from the base disk's {capacity}",
                "disks cannot be resized under snapshots; consolidate snapshots in vSphere",
            )
        if index == 0:
            if d.parent_cid != NO_PARENT:
                raise _problem(
                    where,
                    f"is the base of the chain but names a parent (parentCID={d.parent_cid:08x})",
                    "the chain is missing its lower links; pass the full chain",
                )
            if any(e.kind in ("VMFSSPARSE", "SESPARSE") for e in d.extents):
                raise _problem(
                    where,
                    "is a snapshot delta but has no parent in the chain",
                    "the chain is missing its lower links; pass the full chain",
                )
            continue
        parent = chain.links[index - 1].descriptor
        if d.parent_cid == NO_PARENT:
            raise _problem(where, "is a snapshot delta without a parentCID", "the descriptor is damaged")
        if d.parent_cid != parent.cid:
            raise _problem(
                where,
                f"expects its parent {chain.links[index - 1].path.name} to have CID {d.parent_cid:08x} "
                f"but it has {parent.cid:08x}: the parent changed after the snapshot was taken",
                "the chain is inconsistent; repair or consolidate it in vSphere before migrating",
            )


def qemu_create_type(desc: Descriptor) -> str:
    """A createType qemu accepts for these extents (it refuses e.g. vmfsThin, custom)."""
    kinds = {e.kind for e in desc.extents}
    if "SESPARSE" in kinds:
        return "seSparse"
    if kinds & {"SPARSE", "VMFSSPARSE"}:
        return "vmfsSparse" if "VMFSSPARSE" in kinds else "twoGbMaxExtentSparse"
    return "vmfs"


def localize(
    desc: Descriptor, extent_names: Sequence[str | None], zero_name: str | None, parent_name: str | None
) -> Descriptor:
    """The descriptor rewritten for local, staged copies that qemu will open.

    ``extent_names[i]`` replaces extent i's file name. qemu silently *skips* RDONLY/NOACCESS
    and ZERO extents, which would shift every later extent, so all extents become RW and a
    ZERO extent becomes a FLAT range of ``zero_name`` (a sparse file of zeros).
    """
    if len(extent_names) != len(desc.extents):
        raise ValueError("one local name per extent")
    extents = []
    for e, name in zip(desc.extents, extent_names, strict=True):
        if e.kind == "ZERO":
            if zero_name is None:
                raise ValueError("a ZERO extent needs zero_name")
            extents.append(Extent("RW", e.sectors, "FLAT", zero_name, 0))
        else:
            kind = "FLAT" if e.kind == "VMFS" and e.offset else e.kind  # qemu refuses VMFS with an offset
            extents.append(replace(e, access="RW", kind=kind, filename=name, extra=""))
    local = replace(desc, extents=tuple(extents), parent_hint=parent_name, encoding="UTF-8")
    return replace(local, create_type=qemu_create_type(local))
