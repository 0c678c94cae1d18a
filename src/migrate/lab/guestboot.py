"""Lab guests that really boot: a started VM's boot disk runs under QEMU (TCG) in the background.

The lab's fakes (fakepve in ``pve_fake``, the XAPI fake in ``xapi_fake.guests``) call
``GuestBoots.boot`` when a VM starts and ``stop`` when it stops or goes away. QEMU boots the
bytes the migration landed, with the command line of ``disks.bootcheck`` (``snapshot=on``: the
image is never written), and its serial port is watched for the line the lab's boot disks print
(``MIGRATE-LAB-BOOT-OK <tag>``). Once that line appears, ``on_booted`` tells the fake, which
then makes the guest agent answer, as a real guest's qemu-ga or XCP-ng tools would. A disk
that does not boot never gets there, and its serial output (SeaBIOS's own messages are sent
to COM1 too) says why.

Booting under TCG is CPU-bound, so at most ``slots`` guests boot at once and the rest queue; a
booted lab guest halts its CPU and costs nothing but memory, so it keeps its QEMU (the VM is
running) without holding a slot. No QEMU outlives the fake: ``stop`` and ``close`` kill and
reap it, and QEMU gets SIGKILL from the kernel if the thread that started it dies with the
fake (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import codecs
import itertools
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from migrate.disks.bootcheck import OVMF_VARS, QEMU, qemu_command
from migrate.lab.bootcode import BOOT_MARKER

log = structlog.get_logger(__name__)

BOOT_SLOTS = 2  # the lab's machines have two cores; TCG keeps one busy per booting guest
BOOT_TIMEOUT = 120.0  # seconds from QEMU's start to the line; an OVMF boot takes ~5 s alone
SERIAL_KEEP = 64 * 1024  # characters of serial output kept per guest
# CSI sequences, and two-character escapes such as OVMF's and SeaBIOS's "ESC c" (reset).
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-~])")
_EOL = re.compile(r"\r\n?|\n")
_UTF8 = codecs.getincrementaldecoder("utf-8")

Firmware = Literal["bios", "efi"]
Phase = Literal["queued", "booting", "booted", "failed", "stopped"]


@dataclass(frozen=True, slots=True)
class GuestDisk:
    """What a started VM boots: its boot disk's bytes, their format, the firmware, the line to see."""

    image: Path
    fmt: str  # raw, qcow2, vmdk, vhd (bootcheck's names)
    firmware: Firmware
    expect: str  # the whole serial line meaning "this guest booted", e.g. "MIGRATE-LAB-BOOT-OK web-01"


@dataclass(frozen=True, slots=True)
class GuestStatus:
    """A guest's boot as the lab's control endpoints show it."""

    phase: Phase
    generation: int
    expect: str
    image: str
    firmware: str
    reason: str  # why it failed or stopped; "" while all is well
    serial: str  # what the guest printed, ANSI escapes stripped
    seconds: float  # from QEMU's start to the verdict, or to now while booting (0 while queued)
    pid: int | None  # QEMU's, while it runs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class _Boot:
    key: str
    generation: int
    disk: GuestDisk | None
    phase: Phase = "queued"
    reason: str = ""
    text: str = ""  # complete lines, escapes stripped, the last SERIAL_KEEP characters
    partial: str = ""  # the line being printed
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: _UTF8("replace"))
    started: float = 0.0
    decided: float = 0.0  # when it booted or failed
    timeout: float = 0.0  # seconds it has to print its line, fixed when QEMU starts
    proc: subprocess.Popen[bytes] | None = None
    slot_free: bool = False  # its boot slot was given back
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def decide(self, phase: Phase, reason: str) -> None:
        self.phase, self.reason, self.decided = phase, reason, time.monotonic()

    def serial(self) -> str:
        return (self.text + _ANSI.sub("", self.partial))[-SERIAL_KEEP:]

    def status(self) -> GuestStatus:
        proc = self.proc
        running = proc is not None and proc.returncode is None
        return GuestStatus(
            phase=self.phase,
            generation=self.generation,
            expect=self.disk.expect if self.disk else "",
            image=str(self.disk.image) if self.disk else "",
            firmware=self.disk.firmware if self.disk else "",
            reason=self.reason,
            serial=self.serial(),
            seconds=round((self.decided or time.monotonic()) - self.started, 3) if self.started else 0.0,
            pid=proc.pid if running and proc is not None else None,
        )


OnBooted = Callable[[str, int], None]


class GuestBoots:
    """The running lab guests of one fake, by key (a VMID, a VM reference).

    ``on_booted(key, generation)`` runs in a watcher thread once the expected line appears;
    the fake checks ``is_current(key, generation)`` under its own lock before it believes it,
    since the VM may have been stopped or restarted meanwhile. No lock of this class is held
    while it runs, so the fake may call back in.
    """

    def __init__(
        self,
        on_booted: OnBooted,
        *,
        slots: int = BOOT_SLOTS,
        timeout: float = BOOT_TIMEOUT,
        workdir: Path | None = None,
    ) -> None:
        self.on_booted = on_booted
        # Each running guest's scratch (OVMF variables, QEMU's stderr) lives under the fake's own
        # directory, so a fake that was killed leaves nothing in the system's temp directory.
        self.workdir = workdir
        self.timeout = timeout  # read when a guest's QEMU starts; the lab may change it
        self._slots = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()
        self._boots: dict[str, _Boot] = {}
        self._generations = itertools.count(1)
        self._closed = False

    # -- what the fakes call ------------------------------------------------------------------

    def boot(self, key: str, disk: GuestDisk) -> int:
        """Boot ``disk`` as guest ``key`` (stopping its previous boot); returns the boot's generation."""
        boot = self._replace(key, disk)
        if boot.phase == "queued":
            boot.thread = threading.Thread(target=self._run, args=(boot,), name=f"guest-{key}", daemon=True)
            boot.thread.start()
            log.info("lab_guest_queued", guest=key, image=str(disk.image), firmware=disk.firmware)
        return boot.generation

    def fail(self, key: str, reason: str) -> int:
        """Record that guest ``key`` started but has nothing to boot (no disk, no bytes)."""
        boot = self._replace(key, None, failed=reason)
        log.info("lab_guest_failed", guest=key, reason=reason)
        return boot.generation

    def stop(self, key: str, reason: str = "the VM stopped") -> None:
        """Kill guest ``key``'s QEMU (and reap it) or take it off the queue; its serial stays readable."""
        with self._lock:
            boot = self._boots.get(key)
        if boot is not None:
            self._halt(boot, reason)

    def forget(self, key: str) -> None:
        """Stop guest ``key`` and drop what is known of it (its VM is gone)."""
        with self._lock:
            boot = self._boots.pop(key, None)
        if boot is not None:
            self._halt(boot, "the VM was destroyed")

    def is_current(self, key: str, generation: int) -> bool:
        """True while boot ``generation`` is guest ``key``'s latest and has booted."""
        with self._lock:
            boot = self._boots.get(key)
        return boot is not None and boot.generation == generation and boot.phase == "booted"

    def status(self, key: str) -> GuestStatus | None:
        with self._lock:
            boot = self._boots.get(key)
        if boot is None:
            return None
        with boot.lock:
            return boot.status()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._boots)

    def statuses(self) -> dict[str, GuestStatus]:
        with self._lock:
            keys = sorted(self._boots)
        return {key: found for key in keys if (found := self.status(key)) is not None}

    def close(self) -> None:
        """Kill every guest's QEMU and wait for the watcher threads: nothing is left behind."""
        with self._lock:
            self._closed = True
            boots = list(self._boots.values())
        for boot in boots:
            self._halt(boot, "the lab stopped")
        for boot in boots:
            if boot.thread is not None:
                boot.thread.join(timeout=10)

    # -- inside -------------------------------------------------------------------------------

    def _replace(self, key: str, disk: GuestDisk | None, *, failed: str = "") -> _Boot:
        boot = _Boot(key, next(self._generations), disk)
        if failed:
            boot.phase, boot.reason = "failed", failed
        with self._lock:
            if self._closed:  # a VM started while the fake shuts down boots no more
                boot.phase, boot.reason = "stopped", "the lab stopped"
                return boot
            old = self._boots.get(key)
            self._boots[key] = boot
        if old is not None:
            self._halt(old, "the VM was started again")
        return boot

    def _halt(self, boot: _Boot, reason: str) -> None:
        with boot.lock:
            boot.cancel.set()
            if boot.phase in ("queued", "booting", "booted"):
                boot.phase, boot.reason = "stopped", reason
            proc = boot.proc
            if proc is not None and proc.poll() is None:
                proc.kill()
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("lab_guest_unkillable", guest=boot.key, pid=proc.pid)

    def _run(self, boot: _Boot) -> None:
        while not self._slots.acquire(timeout=0.2):
            if boot.cancel.is_set():
                return
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="guest-", dir=self.workdir))
        try:
            if self._spawn(boot, work):
                self._watch(boot, work)
        finally:
            self._free_slot(boot)
            proc = boot.proc
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
            shutil.rmtree(work, ignore_errors=True)

    def _spawn(self, boot: _Boot, work: Path) -> bool:
        assert boot.disk is not None
        disk = boot.disk
        vars_file = None
        if disk.firmware == "efi":
            # OVMF writes boot entries into its variable store: each guest gets a private copy.
            vars_file = work / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_file)
        cmd = qemu_command(disk.image, fmt=disk.fmt, firmware=disk.firmware, vars_file=vars_file)
        if disk.firmware == "bios":
            # SeaBIOS prints to COM1 only when told the port: then a disk that does not boot says
            # why ("Boot failed: not a bootable disk") on the serial the lab shows. QEMU warns
            # that the fw_cfg name lacks "opt/"; SeaBIOS reads exactly this name.
            port = work / "sercon-port"
            port.write_bytes((0x3F8).to_bytes(2, "little"))
            cmd += ["-fw_cfg", f"name=etc/sercon-port,file={port}"]
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "KILL", "--", *cmd]
        with boot.lock:
            if boot.cancel.is_set():
                return False
            try:
                with open(work / "qemu.stderr", "wb") as errors:
                    boot.proc = subprocess.Popen(
                        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
                    )
            except OSError as exc:
                boot.phase, boot.reason = "failed", f"cannot run {QEMU}: {exc}"
                return False
            boot.phase, boot.started = "booting", time.monotonic()
            boot.timeout = self.timeout
        log.info("lab_guest_booting", guest=boot.key, pid=boot.proc.pid, firmware=disk.firmware)
        return True

    def _watch(self, boot: _Boot, work: Path) -> None:
        """Read the serial port until QEMU ends; decide booted/failed on the way."""
        assert boot.proc is not None and boot.proc.stdout is not None and boot.disk is not None
        fd = boot.proc.stdout.fileno()
        os.set_blocking(fd, False)
        deadline = boot.started + boot.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic() if boot.phase == "booting" else 1.0
                if left <= 0:
                    self._fail(
                        boot, work, f"the line {boot.disk.expect!r} did not appear within {boot.timeout:g} s"
                    )
                    continue  # read what QEMU printed last, then EOF
                if not sel.select(timeout=min(left, 0.5)):
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                line = self._feed(boot, chunk)
                if line is None:
                    continue
                if line != boot.disk.expect:
                    # The disk booted, but it is another disk (or its state before a snapshot).
                    self._fail(boot, work, f"the guest printed {line!r}, not {boot.disk.expect!r}: "
                                           "the wrong bytes booted")  # fmt: skip
                    continue
                with boot.lock:
                    if boot.phase != "booting":
                        continue  # stopped meanwhile
                    boot.decide("booted", "")
                self._free_slot(boot)  # the guest idles from here on
                log.info("lab_guest_booted", guest=boot.key, s=round(boot.decided - boot.started, 2))
                try:
                    self.on_booted(boot.key, boot.generation)
                except Exception:  # the fake's bug must not leave its guest's QEMU unwatched
                    log.exception("lab_guest_on_booted_failed", guest=boot.key)
        code = boot.proc.wait()
        with boot.lock:
            if boot.phase == "booting":
                boot.decide("failed", f"QEMU exited with code {code} before the line {boot.disk.expect!r}")
                boot.reason += _tail(work)
                log.info("lab_guest_failed", guest=boot.key, reason=boot.reason)
            elif boot.phase == "booted":
                boot.phase, boot.reason = "stopped", f"QEMU exited with code {code} (the guest powered off)"

    def _feed(self, boot: _Boot, chunk: bytes) -> str | None:
        """Take serial output in; the first new line that settles the boot (a boot line), if any."""
        with boot.lock:
            data = boot.partial + boot.decoder.decode(chunk)
            # A CR at the end may be the first half of a CRLF still in flight.
            held = "\r" if data.endswith("\r") else ""
            pieces = _EOL.split(data[: len(data) - len(held)])
            boot.partial = pieces.pop() + held
            lines = [_ANSI.sub("", p) for p in pieces]
            if lines:
                boot.text = (boot.text + "".join(line + "\n" for line in lines))[-SERIAL_KEEP:]
            if boot.phase != "booting":
                return None
        return next((line for line in lines if line.startswith(BOOT_MARKER)), None)

    def _free_slot(self, boot: _Boot) -> None:
        with boot.lock:
            if boot.slot_free:
                return
            boot.slot_free = True
        self._slots.release()

    def _fail(self, boot: _Boot, work: Path, why: str) -> None:
        """Kill and reap QEMU, then call the boot failed: a failed guest has no QEMU left."""
        with boot.lock:
            if boot.phase != "booting" or boot.proc is None:
                return
            proc = boot.proc
            proc.kill()
        proc.wait()
        with boot.lock:
            if boot.phase != "booting":
                return  # stopped meanwhile
            boot.decide("failed", why + _tail(work))
        log.info("lab_guest_failed", guest=boot.key, reason=boot.reason)


def _tail(work: Path) -> str:
    try:
        text = (work / "qemu.stderr").read_text(errors="replace")
    except OSError:
        return ""
    # QEMU's warning about our fw_cfg name is expected noise, not a reason.
    lines = [line for line in text.splitlines() if line.strip() and "fw_cfg item names" not in line]
    return f"; QEMU said: {' / '.join(lines)[-1000:]}" if lines else ""
