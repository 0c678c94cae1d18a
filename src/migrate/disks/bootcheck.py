"""Boot a disk image under QEMU (TCG, no KVM needed) and wait for a known line on the serial port.

This is the end-to-end proof that a converted disk is the right disk and still boots: the
lab's boot disks print ``MIGRATE-LAB-BOOT-OK <tag>`` on COM1 (see ``migrate.lab.bootcode``).
The image is opened with ``snapshot=on`` so the check never writes to it; QEMU is killed as
soon as the line appears, or when the timeout runs out.

``expect`` must appear as a whole line (framed by CR/LF or the start of output), after ANSI
escape sequences from OVMF's terminal are stripped: "... web-01" must not be satisfied by
"... web-01.pre-snapshot". With ``fail_prefix`` (e.g. "MIGRATE-LAB-BOOT-OK"), a whole line
with that prefix other than ``expect`` fails the check at once: the disk booted, but it is
another disk, or the state before a snapshot.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from migrate.errors import StepError

log = structlog.get_logger(__name__)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
QEMU = "qemu-system-x86_64"
# Our names for formats -> QEMU's driver names.
_QEMU_FORMATS = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vpc": "vpc", "vhdx": "vhdx"}
_ANSI = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")
_TAIL = 2000


@dataclass(frozen=True, slots=True)
class BootResult:
    """What a successful boot check saw."""

    image: str
    firmware: Literal["bios", "efi"]
    line: str
    seconds: float
    serial: str  # everything read from the serial port, escapes stripped


def _lines(serial: bytes) -> list[str]:
    """Complete lines seen so far (the last, unterminated piece is left out)."""
    clean = _ANSI.sub(b"", serial).decode("utf-8", "replace")
    return re.split(r"[\r\n]", clean)[:-1]


def _verdict(serial: bytes, expect: str, fail_prefix: str | None) -> str | None:
    """``expect`` if it was printed, another line starting with ``fail_prefix``, or None."""
    for line in _lines(serial):
        if line == expect or (fail_prefix and line.startswith(fail_prefix)):
            return line
    return None


def qemu_command(
    image: Path, *, fmt: str, firmware: Literal["bios", "efi"], vars_file: Path | None
) -> list[str]:
    """The QEMU command line for a boot check (exposed so a failure report can show it)."""
    driver = _QEMU_FORMATS.get(fmt)
    if driver is None:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {sorted(_QEMU_FORMATS)}")
    cmd = [
        QEMU, "-accel", "tcg",
        "-machine", "q35" if firmware == "efi" else "pc",
        "-m", "256" if firmware == "efi" else "32",
        # No default NIC, VGA, floppy or CD: nothing to try before the disk, and OVMF's console
        # goes to the serial port only.
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-no-reboot",
        # QEMU's option syntax escapes a comma in a value by doubling it.
        "-drive", f"if=none,id=disk0,file={str(image).replace(',', ',,')},format={driver},snapshot=on",
        "-device", "ide-hd,drive=disk0,bus=ide.0,bootindex=0",
    ]  # fmt: skip
    if firmware == "efi":
        assert vars_file is not None
        cmd += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
        ]  # fmt: skip
    return cmd


def boot_check(
    image: Path,
    *,
    fmt: str,
    firmware: Literal["bios", "efi"],
    expect: str,
    timeout: float = 60,
    fail_prefix: str | None = None,
) -> BootResult:
    """Boot ``image`` and return once ``expect`` is printed as a line; raise StepError otherwise."""
    if shutil.which(QEMU) is None:
        raise StepError(
            f"cannot boot-check {image}: {QEMU} is not installed",
            step="boot_check",
            hint="apt-get install qemu-system-x86 ovmf",
        )
    if firmware == "efi" and not (OVMF_CODE.exists() and OVMF_VARS.exists()):
        raise StepError(
            f"cannot boot-check {image} with UEFI: {OVMF_CODE} or {OVMF_VARS} is missing",
            step="boot_check",
            hint="apt-get install ovmf",
        )
    if not image.exists():
        raise StepError(f"cannot boot-check {image}: no such file", step="boot_check")

    with tempfile.TemporaryDirectory(prefix="migrate-bootcheck-") as work:
        vars_file = None
        if firmware == "efi":
            # OVMF writes boot entries into its variable store: give it a private copy.
            vars_file = Path(work) / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_file)
        cmd = qemu_command(image, fmt=fmt, firmware=firmware, vars_file=vars_file)
        errors = Path(work) / "qemu.stderr"
        started = time.monotonic()
        with open(errors, "wb") as stderr:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        serial, seen = _watch(proc, expect, fail_prefix, deadline=started + timeout)
        seconds = time.monotonic() - started
        stderr_text = errors.read_text(errors="replace").strip()

    text = _ANSI.sub(b"", serial).decode("utf-8", "replace")
    if seen == expect:
        log.info("boot_check_passed", image=str(image), firmware=firmware, s=round(seconds, 2))
        return BootResult(str(image), firmware, expect, seconds, text)
    if seen is not None:
        why = f"it printed {seen!r} instead"
    elif proc.returncode not in (None, -9):
        why = f"QEMU exited with code {proc.returncode}"
    else:
        why = f"not seen within {timeout:g} s"
    detail = f"\n  qemu stderr: {stderr_text[-_TAIL:]}" if stderr_text else ""
    raise StepError(
        f"boot check of {image} ({fmt}, {firmware}) failed: {why}; expected the serial line "
        f"{expect!r}\n  serial tail: {text[-_TAIL:]!r}{detail}",
        step="boot_check",
        hint="check that the disk converted is the boot disk, the firmware (bios/efi) matches the "
        "source VM, and the image format is right",
    )


def _watch(
    proc: subprocess.Popen[bytes], expect: str, fail_prefix: str | None, *, deadline: float
) -> tuple[bytes, str | None]:
    """Read QEMU's serial output until a verdict, QEMU's exit, or the deadline."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    serial = bytearray()
    seen: str | None = None
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        try:
            while seen is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not sel.select(timeout=min(left, 0.5)):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:  # QEMU exited
                    break
                serial += chunk
                seen = _verdict(bytes(serial), expect, fail_prefix)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
    return bytes(serial), seen
