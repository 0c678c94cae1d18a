"""VMDK descriptors and chains: parsing what vSphere writes, rendering what qemu reads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from migrate.disks.vmdk import (
    NO_PARENT,
    Chain,
    ChainLink,
    DatastorePath,
    Descriptor,
    Extent,
    localize,
    parse_descriptor,
    parse_sparse_header,
    render_descriptor,
    resolve_parent,
    split_datastore_path,
    validate_chain,
)
from migrate.errors import PermanentError

ESXI_FLAT = b"""# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=5d8a3f21
parentCID=ffffffff
isNativeSnapshot="no"
createType="vmfs"

# Extent description
RW 41943040 VMFS "web01-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "2610"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "0b1c2d3e4f5a6b7c8d9e0f1a5d8a3f21"
ddb.thinProvisioned = "1"
ddb.uuid = "60 00 C2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6"
ddb.virtualHWVersion = "19"
"""

ESXI_DELTA = b"""# Disk DescriptorFile\r
version=1\r
encoding="UTF-8"\r
CID=77aa0011\r
parentCID=5d8a3f21\r
isNativeSnapshot="no"\r
createType="vmfsSparse"\r
parentFileNameHint="web01.vmdk"\r
# Extent description\r
RW 41943040 VMFSSPARSE "web01-000001-delta.vmdk"\r
\r
# The Disk Data Base \r
#DDB\r
\r
ddb.longContentID = "aa11bb22cc33dd44ee55ff6677aa0011"\r
"""


def _link(path: str, raw: bytes) -> ChainLink:
    p = split_datastore_path(path)
    return ChainLink(p, parse_descriptor(raw, where=str(p)))


def test_parses_an_esxi_flat_descriptor() -> None:
    """A thin VMFS disk's descriptor gives its CID, type, one 20 GiB extent and every ddb key."""
    d = parse_descriptor(ESXI_FLAT)
    assert (d.create_type, d.cid, d.parent_cid, d.parent_hint) == ("vmfs", 0x5D8A3F21, NO_PARENT, None)
    assert d.extents == (Extent("RW", 41943040, "VMFS", "web01-flat.vmdk"),)
    assert d.capacity_bytes == 20 * 2**30
    assert d.is_flat and not d.has_parent
    assert d.ddb_value("ddb.thinProvisioned") == "1"
    assert d.ddb_value("ddb.uuid") == "60 00 C2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6"
    assert ("isNativeSnapshot", "no") in d.header


def test_parses_a_crlf_snapshot_delta() -> None:
    """A Windows-edited delta (CRLF) keeps its parent link and sparse extent type."""
    d = parse_descriptor(ESXI_DELTA)
    assert d.create_type == "vmfsSparse" and d.parent_cid == 0x5D8A3F21
    assert d.parent_hint == "web01.vmdk" and d.has_parent and not d.is_flat
    assert d.extents[0].kind == "VMFSSPARSE"


def test_tolerates_spacing_bare_values_comments_and_many_extents() -> None:
    """Spaces around '=', unquoted values, trailing comments, tabs and several extents all parse."""
    raw = (
        b"\xef\xbb\xbf# written by hand\n"
        b"version = 1\n"
        b"CID = 0000abcd   # content id\n"
        b"parentCID=ffffffff\n"
        b"createType = twoGbMaxExtentFlat\n"
        b'RW 4192256 FLAT "big-f001.vmdk" 0\n'
        b'RW\t4192256\tFLAT\t"big-f002.vmdk"\t0\n'
        b"RDONLY 2048 ZERO\n"
        b"RW 2048 flat bare-name.vmdk 16\n"
        b'ddb.adapterType="pvscsi"\n'
    )
    d = parse_descriptor(raw)
    assert d.cid == 0xABCD and d.create_type == "twoGbMaxExtentFlat"
    assert [e.kind for e in d.extents] == ["FLAT", "FLAT", "ZERO", "FLAT"]
    assert d.extents[2] == Extent("RDONLY", 2048, "ZERO", None)
    assert d.extents[3].filename == "bare-name.vmdk" and d.extents[3].offset_bytes == 16 * 512
    assert d.capacity_bytes == (2 * 4192256 + 2 * 2048) * 512
    assert d.ddb_value("ddb.adapterType") == "pvscsi"


@pytest.mark.parametrize("encoding", ["UTF-8", "windows-1252", "Shift_JIS"])
def test_non_ascii_names_round_trip_in_the_declared_encoding(encoding: str) -> None:
    """A non-ASCII file name survives parse -> render -> parse, byte for byte in its encoding."""
    name = "Žluťoučký-flat.vmdk" if encoding != "Shift_JIS" else "ディスク-flat.vmdk"
    if encoding == "windows-1252":
        name = "Café-Müller-flat.vmdk"
    raw = (
        f'version=1\nencoding="{encoding}"\nCID=00000001\nparentCID=ffffffff\ncreateType="vmfs"\n'
        f'RW 2048 VMFS "{name}"\n'
    ).encode(encoding)
    d = parse_descriptor(raw)
    assert d.extents[0].filename == name and d.encoding == encoding
    rendered = render_descriptor(d)
    assert name.encode(encoding) in rendered
    assert parse_descriptor(rendered) == d


def test_undecodable_bytes_survive_a_round_trip() -> None:
    """Bytes that are not valid in the declared encoding come back out unchanged."""
    raw = (
        b'version=1\nencoding="UTF-8"\nCID=1\nparentCID=ffffffff\ncreateType="vmfs"\n'
        b'RW 8 VMFS "bad\xff\xfe-flat.vmdk"\n'
    )
    rendered = render_descriptor(parse_descriptor(raw))
    assert b'"bad\xff\xfe-flat.vmdk"' in rendered


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'version=1\nRW 8 VMFS "a"\n', "descriptor: has no createType line"),
        (b'createType="vmfs"\n', "lists no extents"),
        (b'createType="vmfs"\nCID=xyz\nRW 8 VMFS "a"\n', "CID='xyz' is not 8 hex digits"),
        (b'createType="vmfs"\nRW 8 TAPE "a"\n', "descriptor:2: unknown extent type 'TAPE'"),
        (b'createType="vmfs"\nRW 8 VMFS\n', "descriptor:2: VMFS extent has no file name"),
        (b'createType="vmfs"\nthis is not a descriptor\n', "descriptor:2: cannot read line"),
        (b"KDMV\x01\x00\x00\x00", "is a binary sparse extent"),
    ],
)
def test_bad_descriptors_say_where_and_what(raw: bytes, expected: str) -> None:
    """Each malformed descriptor raises a PermanentError naming the line and the problem."""
    with pytest.raises(PermanentError) as err:
        parse_descriptor(raw)
    assert expected in str(err.value)


def test_rendered_descriptor_opens_in_qemu_where_the_original_does_not(tmp_path: Path) -> None:
    """qemu rejects 'createType = "vmfs"' (spaces); our rendering of it opens with the right size."""
    flat = tmp_path / "d-flat.vmdk"
    flat.write_bytes(b"\x01" * 4096)
    original = b'version=1\nCID=12345678\nparentCID=ffffffff\ncreateType = "vmfs"\nRW 8 VMFS "d-flat.vmdk"\n'
    (tmp_path / "orig.vmdk").write_bytes(original)
    refused = subprocess.run(
        ["qemu-img", "info", "-f", "vmdk", str(tmp_path / "orig.vmdk")], capture_output=True, text=True
    )
    assert refused.returncode != 0
    (tmp_path / "ours.vmdk").write_bytes(render_descriptor(parse_descriptor(original)))
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "vmdk", str(tmp_path / "ours.vmdk")],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert info["virtual-size"] == 4096
    assert info["format-specific"]["data"]["cid"] == 0x12345678


def test_reads_the_descriptor_embedded_in_a_hosted_sparse_file(tmp_path: Path) -> None:
    """A qemu-made monolithicSparse child exposes its embedded descriptor and parent hint."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(tmp_path / "base.vmdk"), "1M"], check=True)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            str(tmp_path / "child.vmdk"),
        ],
        check=True,
    )

    def embedded(name: str) -> Descriptor:
        raw = (tmp_path / name).read_bytes()
        header = parse_sparse_header(raw[:512])
        assert header is not None and header.magic == "KDMV" and header.capacity_sectors == 2048
        assert header.descriptor_range is not None
        start, end = header.descriptor_range
        return parse_descriptor(raw[start:end])

    base, child = embedded("base.vmdk"), embedded("child.vmdk")
    assert child.create_type == "monolithicSparse" and child.extents[0].kind == "SPARSE"
    assert child.parent_hint == "base.vmdk" and child.parent_cid == base.cid != NO_PARENT
    assert parse_sparse_header(ESXI_FLAT[:512]) is None


def test_datastore_paths_and_parent_hints() -> None:
    """Relative, '..' and /vmfs/volumes hints resolve to the datastore file they name."""
    child = split_datastore_path("[ssd 01] web01/web01-000002.vmdk")
    assert (
        child == DatastorePath("ssd 01", "web01/web01-000002.vmdk")
        and str(child) == "[ssd 01] web01/web01-000002.vmdk"
    )
    assert resolve_parent(child, "web01-000001.vmdk") == DatastorePath("ssd 01", "web01/web01-000001.vmdk")
    assert resolve_parent(child, "../templates/base.vmdk") == DatastorePath("ssd 01", "templates/base.vmdk")
    assert resolve_parent(
        child, "/vmfs/volumes/5f1e-aa/tpl/base.vmdk", {"5f1e-aa": "nfs-gold"}
    ) == DatastorePath("nfs-gold", "tpl/base.vmdk")
    with pytest.raises(PermanentError, match="points above the datastore root"):
        resolve_parent(child, "../../../etc/passwd")
    with pytest.raises(PermanentError, match="is not a datastore path"):
        split_datastore_path("web01/web01.vmdk")


def test_a_consistent_chain_validates() -> None:
    """Base flat + delta whose parentCID matches the base's CID is accepted."""
    validate_chain(
        Chain((_link("[ds] web01/web01.vmdk", ESXI_FLAT), _link("[ds] web01/web01-000001.vmdk", ESXI_DELTA)))
    )


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda b, d: (b.replace(b"CID=5d8a3f21", b"CID=11111111"), d),
            "the parent changed after the snapshot",
        ),
        (lambda b, d: (b.replace(b"41943040", b"20971520"), d), "differs from the base disk's"),
        (lambda b, d: (b.replace(b"VMFS ", b"VMFSRDM "), d), "raw device mapping"),
        (lambda b, d: (b, d.replace(b"VMFSSPARSE", b"VSANSPARSE")), "vSAN sparse delta"),
        (lambda b, d: (d, d), "appears twice in the chain"),
    ],
)
def test_broken_chains_are_refused_with_a_reason(mutate: object, expected: str) -> None:
    """CID mismatch, resized disks, RDMs, vSAN deltas and loops each get a named refusal."""
    base, delta = mutate(ESXI_FLAT, ESXI_DELTA)  # type: ignore[operator]
    paths = ("[ds] web01/web01.vmdk", "[ds] web01/web01-000001.vmdk")
    if base == delta:
        paths = (paths[1], paths[1])
    with pytest.raises(PermanentError, match=expected):
        validate_chain(Chain((_link(paths[0], base), _link(paths[1], delta))))


def test_a_delta_alone_is_not_a_chain() -> None:
    """A snapshot delta without its base is refused: the chain is missing links."""
    with pytest.raises(PermanentError, match="missing its lower links"):
        validate_chain(Chain((_link("[ds] web01/web01-000001.vmdk", ESXI_DELTA),)))


def test_localize_makes_every_extent_readable_by_qemu() -> None:
    """RDONLY becomes RW, ZERO a FLAT range of a zero file, VMFS-with-offset FLAT, names replaced."""
    d = Descriptor(
        "vmfsEagerZeroedThick",
        (
            Extent("RDONLY", 8, "VMFS", "ü-flat.vmdk"),
            Extent("RW", 16, "ZERO"),
            Extent("NOACCESS", 8, "VMFS", "x.vmdk", offset=4),
        ),
        cid=1,
        parent_hint="old.vmdk",
        parent_cid=7,
        encoding="windows-1252",
    )
    local = localize(d, ["d0-e0.vmdk", None, "d0-e2.vmdk"], "zero.raw", "d-1.vmdk")
    assert local.extents == (
        Extent("RW", 8, "VMFS", "d0-e0.vmdk"),
        Extent("RW", 16, "FLAT", "zero.raw", 0),
        Extent("RW", 8, "FLAT", "d0-e2.vmdk", 4),
    )
    assert (local.create_type, local.parent_hint, local.encoding, local.cid) == (
        "vmfs",
        "d-1.vmdk",
        "UTF-8",
        1,
    )
    text = render_descriptor(local).decode()
    assert text.index("CID=") < text.index("parentCID=")
    assert 'parentFileNameHint="d-1.vmdk"' in text and 'RW 16 FLAT "zero.raw" 0' in text
