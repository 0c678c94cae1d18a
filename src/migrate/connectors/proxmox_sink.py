"""The ``DiskSink`` into a Proxmox landing: sequential bytes in, (offset, data) records out.

Writes are cut into 64 KiB blocks aligned to absolute offsets; all-zero blocks are never sent
(the landing is sparse and was reset to zeros from the start offset). Each run of other
blocks becomes one (offset, data) record (small runs are gathered up to 1 MiB), fed through
a small bounded queue to a ``NodeShell.write_ranges`` running on its own thread.

``flush()`` ends that stream (the receiver fsyncs the file), records the durable length
next to the landing and returns it: only that is safe to report as progress, because a
resumed transfer is refused beyond it. ``close()`` flushes and checks the whole disk arrived;
``abort()`` drops what is queued and keeps the file for a resume.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import Final, cast

import structlog

from migrate.connectors.base import DiskLanding
from migrate.connectors.nodeshell import NodeShell, TransferResult
from migrate.connectors.proxmox_landing import mark_durable
from migrate.errors import MigrateError, PermanentError, TransientError

log = structlog.get_logger(__name__)

BLOCK: Final = 64 * 1024  # zero detection granularity, aligned to absolute offsets
PIECE: Final = 1024 * 1024  # runs smaller than SMALL are gathered into records of about this size
SMALL: Final = 256 * 1024
DEPTH: Final = 4  # records queued ahead of the SSH channel (each at most one write, or PIECE)
_ZEROS: Final = bytes(BLOCK)
_PUT_POLL: Final = 0.5


class _Stop(MigrateError):
    """Ends a stream early on ``abort()``; never leaves this module."""


_END: Final = object()
_ABORT: Final = object()


class _Stream:
    """One ``write_ranges`` call on its own thread, fed record by record through a bounded queue."""

    def __init__(self, shell: NodeShell, path: str, size: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=DEPTH)
        self._shell, self._path, self._size = shell, path, size
        self.result: TransferResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"landing:{path}", daemon=True)
        self._thread.start()

    def _records(self) -> Iterator[tuple[int, bytes]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Stop("aborted")
            yield cast(tuple[int, bytes], item)

    def _run(self) -> None:
        try:
            self.result = self._shell.write_ranges(
                self._path, self._records(), size=self._size, make_dirs=False
            )
        except BaseException as exc:  # handed to the writing thread by put() / finish()
            self.error = exc

    def put(self, item: object) -> None:
        while True:
            if self.error is not None or not self._thread.is_alive():
                raise self._failure()
            try:
                self._queue.put(item, timeout=_PUT_POLL)
                return
            except queue.Full:
                continue

    def _failure(self) -> BaseException:
        if self.error is not None:
            return self.error
        return TransientError(f"the stream into {self._path} ended early", system=self._shell.node)

    def finish(self) -> TransferResult:
        self.put(_END)
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def abort(self, timeout: float = 30.0) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(_ABORT, timeout=_PUT_POLL)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):  # make room: what is queued is dropped anyway
                    self._queue.get_nowait()
        self._thread.join(timeout)


class LandingSink:
    """A ``DiskSink`` into a landing from ``offset``; sequential writes, zero blocks skipped.

    ``flush()`` returns the length that is durable on the node; only that is safe to record as
    progress. ``close()`` flushes and checks the whole disk arrived; ``abort()`` keeps the file.
    """

    def __init__(self, shell: NodeShell, landing: DiskLanding, offset: int) -> None:
        self._shell = shell
        self.landing = landing
        self.position = offset
        self.durable = offset
        self.bytes_sent = 0
        self.zero_bytes_skipped = 0
        self._pending = bytearray()
        self._pending_at = offset
        self._stream: _Stream | None = None
        self._queued = 0  # payload bytes handed to the current stream
        self._state = "open"
        self._started = time.monotonic()

    def _check_open(self) -> None:
        if self._state != "open":
            raise PermanentError(
                f"landing {self.landing.ref} is {self._state}; no more writes", system=self.landing.node
            )

    def write(self, data: bytes, /) -> int:
        self._check_open()
        size = len(data)
        if self.position + size > self.landing.size_bytes:
            raise PermanentError(
                f"{self.position + size} bytes written to landing {self.landing.ref}, more than the disk's "
                f"{self.landing.size_bytes}",
                system=self.landing.node,
            )
        buf = data if isinstance(data, bytes) else bytes(data)
        base, run, start = self.position, -1, 0
        while start < size:
            # Blocks are aligned to absolute offsets, so a resumed transfer skips the same ones.
            end = min(size, start + BLOCK - (base + start) % BLOCK)
            # startswith compares in place and stops at the first difference: no copy, no full scan.
            if buf.startswith(_ZEROS if end - start == BLOCK else _ZEROS[: end - start], start, end):
                if run >= 0:
                    self._queue_run(base + run, buf[run:start])
                    run = -1
                self.zero_bytes_skipped += end - start
            elif run < 0:
                run = start
            start = end
        if run >= 0:
            self._queue_run(base + run, buf[run:size])  # the whole write, when it has no zero block: no copy
        self.position += size
        return size

    def _queue_run(self, offset: int, data: bytes) -> None:
        if self._pending and self._pending_at + len(self._pending) != offset:
            self._send_pending()
        if not self._pending and len(data) >= SMALL:
            self._put(offset, data)
            return
        # Small runs (small writes) are gathered, so that records stay large.
        if not self._pending:
            self._pending_at = offset
        self._pending += data
        if len(self._pending) >= PIECE:
            self._send_pending()

    def _send_pending(self) -> None:
        if self._pending:
            self._put(self._pending_at, bytes(self._pending))
            self._pending.clear()

    def _put(self, offset: int, data: bytes) -> None:
        if self._stream is None:
            self._stream = _Stream(self._shell, self.landing.ref, self.landing.size_bytes)
            self._queued = 0
        self._stream.put((offset, data))
        self._queued += len(data)
        self.bytes_sent += len(data)

    def flush(self) -> int:
        """Make everything written so far durable on the node; returns that length."""
        self._flush()
        return self.durable

    def _flush(self) -> tuple[int, int] | None:
        """As ``flush``; returns the file's (size, allocated bytes) when it recorded a new length."""
        self._check_open()
        self._send_pending()
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                result = stream.finish()
            except BaseException:
                self._state = "failed"
                raise
            if result.bytes_sent != self._queued:
                self._state = "failed"
                raise TransientError(
                    f"node {self.landing.node} took {result.bytes_sent} of {self._queued} "
                    f"bytes into {self.landing.ref}",
                    system=self.landing.node,
                )
        if self.position == self.durable:
            return None
        seen = mark_durable(self._shell, self.landing.ref, self.position)
        self.durable = self.position
        return seen

    def close(self) -> None:
        if self._state == "closed":
            return
        seen = self._flush() or mark_durable(self._shell, self.landing.ref, self.durable)
        self._state = "closed"
        if self.position != self.landing.size_bytes:
            raise PermanentError(
                f"landing {self.landing.ref} closed after {self.position} of {self.landing.size_bytes} bytes",
                system=self.landing.node,
                hint="the source ended early; resume the run to send the rest",
            )
        size, allocated = seen
        if size != self.landing.size_bytes:
            raise PermanentError(
                f"landing {self.landing.ref} on node {self.landing.node} is {size} bytes, expected "
                f"{self.landing.size_bytes}",
                system=self.landing.node,
            )
        seconds = time.monotonic() - self._started
        log.info(
            "landing_received",
            node=self.landing.node,
            path=self.landing.ref,
            bytes=self.position,
            sent=self.bytes_sent,
            zero_skipped=self.zero_bytes_skipped,
            allocated=allocated,
            s=round(seconds, 3),
        )

    def abort(self) -> None:
        """Stop sending; what reached the node stays, the sidecar keeps the last durable length."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._pending.clear()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()
        log.info(
            "landing_aborted",
            node=self.landing.node,
            path=self.landing.ref,
            durable=self.durable,
            position=self.position,
        )
