"""qemu-img argument builders and format choice, checked against the real qemu-img 7.2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from migrate.disks import formats, qemu
from migrate.errors import PermanentError


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _sparse_raw(path: Path, size: int, data_at: dict[int, bytes]) -> bytes:
    """A sparse raw file with ``data_at`` written; returns the full content for hashing."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in data_at.items():
            f.seek(offset)
            f.write(data)
            content[offset : offset + len(data)] = data
    return bytes(content)


def test_convert_args_keep_sparseness_and_format_options() -> None:
    """qcow2 and VHD conversions carry -S 4k, -W, -m and the format's -o options."""
    args = formats.convert_args("in.raw", "out.qcow2", source_format="raw", target_format="qcow2")
    assert args[:6] == ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
    assert "-o" in args and "compat=1.1,cluster_size=65536,preallocation=off" in args
    assert args[args.index("-S") + 1] == "4k" and "-W" in args and args[-2:] == ["in.raw", "out.qcow2"]
    vhd = formats.convert_args("in.raw", "out.vhd", source_format="raw", target_format="vpc")
    assert "subformat=dynamic,force_size=on" in vhd
    stream_vmdk = formats.convert_args("a", "b", source_format=None, target_format="vmdk")
    assert "-W" not in stream_vmdk and "-f" not in stream_vmdk


def test_existing_target_options() -> None:
    """-n/--target-is-zero go together, and --target-is-zero alone is refused."""
    args = formats.convert_args(
        "a",
        "/dev/vg/vm-100-disk-0",
        source_format="qcow2",
        target_format="raw",
        existing_target=True,
        target_is_zero=True,
    )
    assert "-n" in args and "--target-is-zero" in args and "-o" not in args
    with pytest.raises(ValueError, match="needs existing_target"):
        formats.convert_args("a", "b", source_format="raw", target_format="raw", target_is_zero=True)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vpc"])
def test_conversion_keeps_content_exact_size_and_sparseness(tmp_path: Path, fmt: formats.ImageFormat) -> None:
    """Converting a mostly-empty raw gives the same bytes, the exact size, and a small file."""
    size = 32 * 2**20 + 3 * 512  # not a CHS geometry: VHD keeps it only with force_size=on
    source = tmp_path / "src.raw"
    content = _sparse_raw(
        source, size, {0: os.urandom(65536), 20 * 2**20: b"\x7f" * 4096, size - 512: b"e" * 512}
    )
    target = tmp_path / f"out{formats.file_suffix(fmt)}"
    _run(formats.convert_args(str(source), str(target), source_format="raw", target_format=fmt))
    info = formats.parse_info(_run(formats.info_args(str(target), fmt)))[0]
    assert info.virtual_size == size and info.format == fmt
    assert target.stat().st_blocks * 512 < 2 * 2**20  # 76 KiB of data, not 32 MiB
    back = tmp_path / "back.raw"
    _run(formats.convert_args(str(target), str(back), source_format=fmt, target_format="raw"))
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(content).digest()


def test_create_and_map_report_allocation(tmp_path: Path) -> None:
    """A new qcow2 has no data; after one write, map reports exactly that cluster as data."""
    image = tmp_path / "new.qcow2"
    _run(formats.create_args(str(image), "qcow2", 8 * 2**20))
    assert formats.data_bytes(formats.parse_map(_run(formats.map_args(str(image), "qcow2")))) == 0
    _run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 1M 64k", str(image)])
    extents = formats.parse_map(_run(formats.map_args(str(image), "qcow2")))
    assert formats.data_bytes(extents) == 65536
    assert [e.start for e in extents if e.data] == [2**20]


def test_chain_spec_opens_a_vmdk_chain_with_explicit_backing(tmp_path: Path) -> None:
    """The json: spec reads a child through a parent its hint does not name."""
    _run(["qemu-img", "create", "-q", "-f", "vmdk", str(tmp_path / "base.vmdk"), "4M"])
    _run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 1M", str(tmp_path / "base.vmdk")])
    _run(
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
            str(tmp_path / "top.vmdk"),
        ]
    )
    _run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x22 512k 1M", str(tmp_path / "top.vmdk")])
    (tmp_path / "base.vmdk").rename(tmp_path / "renamed.vmdk")  # the hint in top.vmdk now points nowhere
    spec = formats.json_filename(
        formats.vmdk_chain_spec([str(tmp_path / "renamed.vmdk"), str(tmp_path / "top.vmdk")])
    )
    _run(formats.convert_args(spec, str(tmp_path / "out.raw"), source_format=None, target_format="raw"))
    data = (tmp_path / "out.raw").read_bytes()
    assert data[: 512 * 1024] == b"\x11" * 512 * 1024
    assert data[512 * 1024 : 1536 * 1024] == b"\x22" * 2**20
    assert data[1536 * 1024 :] == bytes(len(data) - 1536 * 1024)
    assert json.loads(spec[5:])["backing"]["file"]["filename"].endswith("renamed.vmdk")


def test_parse_info_backing_chain(tmp_path: Path) -> None:
    """--backing-chain output parses into one ImageInfo per layer, top first."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "1M"])
    _run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(tmp_path / "t.qcow2")]
    )
    infos = formats.parse_info(_run(formats.info_args(str(tmp_path / "t.qcow2"), backing_chain=True)))
    assert [Path(i.filename).name for i in infos] == ["t.qcow2", "b.qcow2"]
    assert infos[0].backing_filename is not None and infos[0].backing_filename.endswith("b.qcow2")
    assert infos[0].cluster_size == 65536 and infos[1].virtual_size == 2**20


@pytest.mark.parametrize(
    ("kind", "storage", "expected"),
    [
        ("proxmox", "dir", "qcow2"),
        ("proxmox", "nfs", "qcow2"),
        ("proxmox", "lvmthin", "raw"),
        ("proxmox", "zfspool", "raw"),
        ("proxmox", "rbd", "raw"),
        ("xcpng", "lvm", "vpc"),
        ("xcpng", "", "vpc"),
    ],
)
def test_target_format_by_target_and_storage(kind: str, storage: str, expected: str) -> None:
    """File storages get qcow2, block/pool storages raw, XCP-ng VHD."""
    assert formats.target_format(kind, storage) == expected


def test_target_format_rejects_unknown_targets() -> None:
    """An unknown target kind is an error naming the accepted ones."""
    with pytest.raises(ValueError, match="expected 'proxmox' or 'xcpng'"):
        formats.target_format("hyperv")


def test_formats_module_imports_no_sdk() -> None:
    """disks/formats stays pure: importing it loads no HTTP client, SDK or connector."""
    code = (
        "import sys, migrate.disks.formats; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('requests','urllib3','pyVmomi','proxmoxer','XenAPI','paramiko') "
        "or m.startswith('migrate.connectors')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_convert_image_turns_a_staged_sparse_raw_into_vhd(tmp_path: Path) -> None:
    """qemu.convert_image makes a dynamic VHD of the exact size that stays as small as its data."""
    source = tmp_path / "staged.raw"
    content = _sparse_raw(source, 64 * 2**20, {2**20: os.urandom(2**20)})
    info = qemu.convert_image(source, tmp_path / "disk.vhd", source_format="raw", target_format="vpc")
    assert info.virtual_size == len(content) and info.format == "vpc"
    assert qemu.allocated_bytes(tmp_path / "disk.vhd") < 4 * 2**20
    _run(
        formats.convert_args(
            str(tmp_path / "disk.vhd"), str(tmp_path / "back.raw"), source_format="vpc", target_format="raw"
        )
    )
    assert (tmp_path / "back.raw").read_bytes() == content


def test_qemu_failures_become_permanent_errors_quoting_qemu(tmp_path: Path) -> None:
    """A qemu-img failure raises PermanentError carrying qemu's own explanation."""
    with pytest.raises(PermanentError, match=r"qemu-img convert failed: .*No such file") as err:
        qemu.convert_image(
            tmp_path / "missing.raw", tmp_path / "x.qcow2", source_format="raw", target_format="qcow2"
        )
    assert err.value.system == "qemu"
