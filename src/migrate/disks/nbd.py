"""Read and write any image qemu understands, at byte offsets, through ``qemu-nbd``.

``qemu-img`` can only convert whole images; ``qemu-nbd`` serves an image (qcow2, vpc, a
vmdk snapshot chain...) over the NBD protocol, so we can stream into a new qcow2 while the
bytes are still arriving from vSphere, and read a chain's consolidated content to hash it.
The client speaks the small part of NBD we need (fixed newstyle handshake, READ, WRITE,
FLUSH, DISC; simple replies), over a unix socket private to this process.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import structlog

from migrate.disks import formats
from migrate.errors import PermanentError

log = structlog.get_logger(__name__)

_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054
_FLAG_FIXED_NEWSTYLE = 1
_FLAG_NO_ZEROES = 2
_OPT_EXPORT_NAME = 1
_REQUEST_MAGIC = 0x25609513
_REPLY_MAGIC = 0x67446698
_CMD_READ, _CMD_WRITE, _CMD_DISC, _CMD_FLUSH = 0, 1, 2, 3
_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
MAX_REQUEST = 16 << 20  # qemu-nbd accepts up to 32 MiB per request


def _nbd_error(code: int, what: str) -> PermanentError:
    name = errno.errorcode.get(code, str(code))
    if code == errno.ENOSPC:
        return PermanentError(
            f"{what}: no space left on the target storage (NBD {name})",
            system="qemu",
            hint="free space on the target storage or pick another one, then resume",
        )
    return PermanentError(f"{what}: the image server answered {name}", system="qemu")


class NbdClient:
    """One NBD connection; not thread safe (one thread drives it)."""

    def __init__(self, socket_path: str, *, timeout: float = 120.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(socket_path)
        self._handle = 0
        self.size, self.flags = self._handshake()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            k = self._sock.recv_into(view[got:])
            if k == 0:
                raise PermanentError("the NBD image server closed the connection", system="qemu")
            got += k

    def _handshake(self) -> tuple[int, int]:
        magic, opt_magic, server_flags = struct.unpack(">8sQH", self._recv_exact(18))
        if magic != _NBDMAGIC or opt_magic != _IHAVEOPT or not server_flags & _FLAG_FIXED_NEWSTYLE:
            raise PermanentError("qemu-nbd did not speak fixed-newstyle NBD", system="qemu")
        no_zeroes = bool(server_flags & _FLAG_NO_ZEROES)
        self._sock.sendall(struct.pack(">I", _FLAG_FIXED_NEWSTYLE | (_FLAG_NO_ZEROES if no_zeroes else 0)))
        self._sock.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_EXPORT_NAME, 0))  # default export ""
        size, flags = struct.unpack(">QH", self._recv_exact(10))
        if not no_zeroes:
            self._recv_exact(124)
        return size, flags

    def _send(self, command: int, offset: int, length: int, payload: memoryview | bytes | None = None) -> int:
        self._handle += 1
        header = _REQUEST.pack(_REQUEST_MAGIC, 0, command, self._handle, offset, length)
        if payload is None:
            self._sock.sendall(header)
        else:
            self._sock.sendall(header)
            self._sock.sendall(payload)
        return self._handle

    def _reply(self, handle: int, what: str) -> None:
        magic, error, got = _REPLY.unpack(self._recv_exact(_REPLY.size))
        if magic != _REPLY_MAGIC or got != handle:
            raise PermanentError(
                f"{what}: NBD reply out of step (magic {magic:#x}, handle {got})", system="qemu"
            )
        if error:
            raise _nbd_error(error, what)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the image's bytes from ``offset``."""
        done = 0
        while done < len(view):
            n = min(MAX_REQUEST, len(view) - done)
            handle = self._send(_CMD_READ, offset + done, n)
            self._reply(handle, f"reading {n} bytes at {offset + done}")
            self._recv_into(view[done : done + n])
            done += n

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = min(MAX_REQUEST, len(view) - done)
            handle = self._send(_CMD_WRITE, offset + done, n, view[done : done + n])
            self._reply(handle, f"writing {n} bytes at {offset + done}")
            done += n

    def flush(self) -> None:
        self._reply(self._send(_CMD_FLUSH, 0, 0), "flushing the image")

    def disconnect(self) -> None:
        try:
            self._send(_CMD_DISC, 0, 0)
        except OSError:
            pass
        finally:
            self._sock.close()


class QemuNbd:
    """A private ``qemu-nbd`` serving one image to one client; use as a context manager."""

    def __init__(
        self,
        image: str,
        *,
        fmt: str | None,
        read_only: bool,
        image_opts: bool = False,
        cache: str = "writeback",
        start_timeout: float = 30.0,
    ) -> None:
        self._image = image
        self._args = (fmt, read_only, image_opts, cache)
        self._start_timeout = start_timeout
        self._dir = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr_path: Path | None = None
        self.client: NbdClient | None = None

    def start(self) -> NbdClient:
        if shutil.which(formats.QEMU_NBD) is None:
            raise PermanentError(
                "qemu-nbd is not installed", system="qemu", hint="apt-get install qemu-utils"
            )
        fmt, read_only, image_opts, cache = self._args
        self._dir = tempfile.mkdtemp(prefix="migrate-nbd-")
        sock = os.path.join(self._dir, "nbd.sock")
        self._stderr_path = Path(self._dir) / "stderr"
        argv = formats.nbd_args(
            self._image, sock, fmt=fmt, read_only=read_only, cache=cache, image_opts=image_opts
        )
        with open(self._stderr_path, "wb") as err:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._process.poll() is not None:
                message = self.stderr()
                self.close()
                raise PermanentError(f"qemu-nbd could not open {self._image}: {message}", system="qemu")
            if os.path.exists(sock):
                try:
                    self.client = NbdClient(sock)
                    return self.client
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                self.close()
                raise PermanentError(
                    f"qemu-nbd did not start serving {self._image} within {self._start_timeout:.0f} s",
                    system="qemu",
                )
            time.sleep(0.005)

    def stderr(self) -> str:
        if self._stderr_path and self._stderr_path.exists():
            return self._stderr_path.read_text(errors="replace").strip()[-2000:]
        return ""

    def close(self, *, timeout: float = 60.0) -> None:
        """Disconnect; qemu-nbd then closes the image cleanly and exits."""
        if self.client is not None:
            self.client.disconnect()
            self.client = None
        if self._process is not None:
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.terminate()
                self._process.wait(timeout=10)
            code = self._process.returncode
            self._process = None
            if code not in (0, None):
                log.warning("qemu_nbd_exit", image=self._image, code=code, stderr=self.stderr())
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def __enter__(self) -> NbdClient:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
