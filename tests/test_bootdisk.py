"""The lab's boot disks really boot under QEMU and print their line; broken or wrong disks do not."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from migrate.disks.bootcheck import boot_check
from migrate.errors import StepError
from migrate.lab import bootcode, bootdisk
from migrate.lab.bootdisk import MIB, Chunk, Layout


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(MIB):
            digest.update(piece)
    return digest.hexdigest()


def _convert(src: Path, dst: Path, fmt: str) -> Path:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(src), str(dst)], check=True)
    return dst


def _blkid(path: Path, offset: int = 0) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", "-O", str(offset), str(path)],
                         check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_bios_disk_boots_from_raw_and_vhd(tmp_path: Path) -> None:
    """A BIOS disk boots under SeaBIOS as raw and as VHD and prints exactly its VM's line."""
    disk = bootdisk.bios_disk("web-01", 32)
    raw = tmp_path / "web-01.raw"
    assert bootdisk.write_image(disk, raw) == _sha256(raw)
    assert disk.serial_line == "MIGRATE-LAB-BOOT-OK web-01"

    result = boot_check(raw, fmt="raw", firmware="bios", expect="MIGRATE-LAB-BOOT-OK web-01", timeout=30)
    assert result.line == "MIGRATE-LAB-BOOT-OK web-01"
    assert "\nMIGRATE-LAB-BOOT-OK web-01\r" in result.serial  # what the boot sector sent, framed
    vhd = _convert(raw, tmp_path / "web-01.vhd", "vpc")
    boot_check(vhd, fmt="vhd", firmware="bios", expect="MIGRATE-LAB-BOOT-OK web-01", timeout=30)
    assert _sha256(raw) == disk.sha256()  # snapshot=on: booting did not write to the image


def test_efi_disk_boots_from_qcow2(tmp_path: Path) -> None:
    """A GPT disk with a FAT16 ESP and the hand-built BOOTX64.EFI boots under OVMF (q35) from qcow2."""
    disk = bootdisk.efi_disk("win-app-01", 48)
    raw = tmp_path / "win.raw"
    bootdisk.write_image(disk, raw)
    assert _blkid(raw)["PTTYPE"] == "gpt"  # libblkid checks both headers' CRCs
    esp = _blkid(raw, offset=MIB)
    assert (esp["TYPE"], esp["VERSION"], esp["LABEL"]) == ("vfat", "FAT16", "ESP")

    qcow2 = _convert(raw, tmp_path / "win.qcow2", "qcow2")
    result = boot_check(qcow2, fmt="qcow2", firmware="efi", expect="MIGRATE-LAB-BOOT-OK win-app-01",
                        timeout=90)
    assert result.firmware == "efi" and result.seconds < 90


def test_corrupted_boot_sector_does_not_boot(tmp_path: Path) -> None:
    """Without the 0x55AA signature the BIOS refuses the disk: boot_check raises with the serial tail."""
    disk = bootdisk.bios_disk("app-02", 16)
    raw = tmp_path / "broken.raw"
    bootdisk.write_image(disk, raw)
    with open(raw, "r+b") as f:
        f.seek(510)
        f.write(b"\0\0")
    with pytest.raises(StepError) as err:
        boot_check(raw, fmt="raw", firmware="bios", expect="MIGRATE-LAB-BOOT-OK app-02", timeout=2)
    assert "not seen within 2 s" in str(err.value) and err.value.step == "boot_check"


def test_a_different_line_is_not_the_expected_one(tmp_path: Path) -> None:
    """A disk printing "<tag>.pre-snapshot" does not satisfy "<tag>" (lines match whole) and fails fast."""
    disk = bootdisk.bios_disk("web-01", 16, message_tag="web-01.pre-snapshot")
    raw = tmp_path / "base.raw"
    bootdisk.write_image(disk, raw)
    with pytest.raises(StepError) as err:
        boot_check(raw, fmt="raw", firmware="bios", expect="MIGRATE-LAB-BOOT-OK web-01", timeout=60,
                   fail_prefix="MIGRATE-LAB-BOOT-OK")
    assert "it printed 'MIGRATE-LAB-BOOT-OK web-01.pre-snapshot' instead" in str(err.value)


def test_wrong_format_fails_fast_with_qemu_message(tmp_path: Path) -> None:
    """Asking QEMU to read a raw image as qcow2 fails at once, and the error carries QEMU's reason."""
    raw = tmp_path / "disk.raw"
    bootdisk.write_image(bootdisk.data_disk("d", 8), raw)
    with pytest.raises(StepError, match="not in qcow2 format"):
        boot_check(raw, fmt="qcow2", firmware="bios", expect="x", timeout=30)


def test_disks_have_holes_islands_and_tail_data() -> None:
    """A disk is mostly zeros, with data at the start, 4 KiB islands in the middle and data near the end."""
    disk = bootdisk.data_disk("data-1", 32)
    starts = [c.offset for c in disk.layout.chunks]
    assert starts[0] == 0 and disk.layout.data_bytes() < disk.size // 8
    assert any(len(c.data) == 4096 and 8 * MIB < c.offset < 28 * MIB for c in disk.layout.chunks)
    assert disk.layout.chunks[-1].end > disk.size - MIB
    assert all(c.data.count(0) < len(c.data) // 2 for c in disk.layout.chunks)


def test_content_is_deterministic_per_tag() -> None:
    """The same tag always yields the same bytes; another tag yields other bytes."""
    assert bootdisk.efi_disk("a", 24).sha256() == bootdisk.efi_disk("a", 24).sha256()
    assert bootdisk.bios_disk("a", 16).sha256() != bootdisk.bios_disk("b", 16).sha256()


def test_layout_overlay_and_read_match_a_bytearray_model() -> None:
    """Layout.overlay/read/iter_bytes agree with applying the same writes to a plain bytearray."""
    base = Layout(64 * 1024, (Chunk(0, b"\x11" * 1000), Chunk(8192, b"\x22" * 4096),
                              Chunk(60000, b"\x33" * 5536)))
    writes = [Chunk(512, b"\xaa" * 1024), Chunk(7680, b"\xbb" * 1024), Chunk(30000, b"\xcc" * 10),
              Chunk(61000, bytes(16))]
    model = bytearray(b"".join(base.iter_bytes(block=4096)))
    assert len(model) == base.size
    for w in writes:
        model[w.offset : w.end] = w.data
    merged = base.overlay(writes)
    assert b"".join(merged.iter_bytes(block=3000)) == bytes(model)
    assert merged.read(7000, 2000) == bytes(model[7000:9000])
    assert merged.sha256() == hashlib.sha256(model).hexdigest()


def test_boot_tags_are_ascii_and_checked() -> None:
    """VM names map to ASCII boot tags; a tag the boot code cannot print is refused."""
    assert bootcode.ascii_tag("Žluťoučký kůň / db") == "Zlutoucky-kun-db"
    with pytest.raises(ValueError, match="boot tag"):
        bootcode.serial_line("kůň")
