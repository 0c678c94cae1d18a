"""The streaming engine: read -> sha256 + zero scan -> write, overlapped, with flat memory.

Three threads share at most ``depth`` chunks (a semaphore is taken before a chunk is read
and given back once it is written), so memory stays at ``depth * chunk_size`` whatever the
disk size. hashlib, ssl and os.pwrite release the GIL, so the stages really overlap.

Zeros are found per ``zero_block`` (4 KiB) and never written: the sink is empty there.
On resume from ``start`` the guest-visible sha256 still covers the whole disk: the kept
prefix is read back from the sink and hashed first (the source is not read again), or, when
a server ignored Range and sent everything from byte 0, hashed as it passes by unwritten.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from migrate.disks.sinks import Readback, Sink, SinkResult

log = structlog.get_logger(__name__)

CHUNK = 8 << 20
DEPTH = 4
ZERO_BLOCK = 4096
CHECKPOINT = 512 << 20
_POLL = 0.2

Progress = Callable[[int, int], None]


class Reader(Protocol):
    # Guest offset the data starts at, final once Source.open returns: the asked start, or 0
    # when the source could not seek (a server ignoring Range) and sends everything.
    offset: int
    bytes_read: int  # bytes taken from the source (network or local), discarded ones included

    def read(self, size: int) -> bytes | bytearray:
        """Next ``size`` bytes (fewer only at a segment or disk end); b"" at the end."""
        ...

    def close(self) -> None: ...


class Source(Protocol):
    total: int

    def open(self, start: int) -> Reader: ...


@dataclass(frozen=True, slots=True)
class StreamResult:
    sha256: str | None
    total: int
    start_offset: int
    bytes_read: int
    bytes_written: int
    zero_bytes_skipped: int
    seconds: float
    sink: SinkResult
    # (stage, seconds working) for read, hash (+ zero scan) and write: the largest is the bottleneck.
    busy: tuple[tuple[str, float], ...] = ()


def nonzero_runs(data: bytes | bytearray, block: int = ZERO_BLOCK) -> list[tuple[int, int]]:
    """[start, end) ranges of ``data`` holding any non-zero byte, at ``block`` granularity."""
    n = len(data)
    if n <= len(_ZEROS) and _ZEROS.startswith(data):  # memcmp against zeros, no copy
        return []
    zero = _ZEROS[:block]
    starts = data.startswith
    runs: list[tuple[int, int]] = []
    run_start = -1
    for i in range(0, n, block):
        is_zero = starts(zero, i) if n - i >= block else starts(_ZEROS[: n - i], i)
        if is_zero:
            if run_start >= 0:
                runs.append((run_start, i))
                run_start = -1
        elif run_start < 0:
            run_start = i
    if run_start >= 0:
        runs.append((run_start, n))
    return runs


_ZEROS = bytes(CHUNK)


class _Failed(Exception):
    pass


class _Done:
    """The reader of a disk already complete: nothing left to read."""

    def __init__(self, total: int) -> None:
        self.offset = total
        self.bytes_read = 0

    def read(self, size: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _hash_prefix(sha: hashlib._Hash, sink: Sink, upto: int, chunk_size: int) -> bool:
    """Hash the kept bytes [0, upto) by reading them back from the sink; False if it cannot."""
    if not isinstance(sink, Readback):
        log.warning("resume_without_digest", reason="the sink cannot be read back", kept=upto)
        return False
    for offset in range(0, upto, chunk_size):
        sha.update(sink.read_at(offset, min(chunk_size, upto - offset)))
    return True


def stream(
    source: Source,
    sink: Sink,
    *,
    start_offset: int | None = None,
    chunk_size: int = CHUNK,
    depth: int = DEPTH,
    zero_block: int = ZERO_BLOCK,
    checkpoint_bytes: int = CHECKPOINT,
    progress: Progress | None = None,
    digest: bool = True,
) -> StreamResult:
    """Copy ``source`` into ``sink`` from ``start_offset`` (default: the sink's resume point)."""
    if chunk_size % zero_block or chunk_size > len(_ZEROS) or depth < 2:
        raise ValueError("chunk_size must be a multiple of zero_block, at most 8 MiB; depth at least 2")
    total = source.total
    resume = sink.resume_offset()
    start = resume if start_offset is None else start_offset
    if start > resume or start > total or start < 0:
        raise ValueError(
            f"start_offset {start} is beyond what the sink holds ({resume}) or the disk ({total})"
        )
    began = time.monotonic()
    sink.size(total, keep=start)
    sha = hashlib.sha256() if digest else None
    try:
        reader: Reader = source.open(start) if start < total else _Done(total)
    except BaseException:
        sink.abort()
        raise
    if sha is not None and start > 0:
        try:
            if reader.offset == start:
                if not _hash_prefix(sha, sink, start, chunk_size):
                    sha = None
            elif reader.offset != 0:
                sha = None  # the source restarted mid-way: the prefix cannot be hashed in order
        except BaseException:
            reader.close()
            sink.abort()
            raise

    slots = threading.Semaphore(depth)
    to_hash: queue.Queue[tuple[int, bytes | bytearray] | None] = queue.Queue()
    to_write: queue.Queue[tuple[int, bytes | bytearray, list[tuple[int, int]]] | None] = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []
    # Seconds each stage spent working (not waiting): the largest is the bottleneck.
    busy = {"read": 0.0, "hash": 0.0, "write": 0.0}

    def fail(exc: BaseException) -> None:
        if not errors:
            errors.append(exc)
        stop.set()

    def fetch() -> None:
        try:
            position = reader.offset
            while position < total:
                while not slots.acquire(timeout=_POLL):
                    if stop.is_set():
                        raise _Failed
                if stop.is_set():
                    raise _Failed
                t0 = time.perf_counter()
                data = reader.read(min(chunk_size, total - position))
                busy["read"] += time.perf_counter() - t0
                if not data:
                    raise RuntimeError(f"source ended at {position} of {total} bytes")
                to_hash.put((position, data))
                position += len(data)
        except _Failed:
            pass
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            fail(exc)
        finally:
            reader.close()
            to_hash.put(None)

    def scan() -> None:
        try:
            while (item := to_hash.get()) is not None:
                if stop.is_set():
                    slots.release()
                    continue
                position, data = item
                t0 = time.perf_counter()
                if sha is not None:
                    sha.update(data)
                runs = nonzero_runs(data, zero_block) if position + len(data) > start else []
                busy["hash"] += time.perf_counter() - t0
                to_write.put((position, data, runs))
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            fail(exc)
        finally:
            to_write.put(None)

    threads = [
        threading.Thread(target=fetch, name="disk-fetch", daemon=True),
        threading.Thread(target=scan, name="disk-scan", daemon=True),
    ]
    for t in threads:
        t.start()
    written = skipped = 0
    next_checkpoint = start + checkpoint_bytes
    try:
        while (item := to_write.get()) is not None:
            position, data, runs = item
            try:
                if stop.is_set():
                    continue
                end = position + len(data)
                low = max(start - position, 0)  # bytes below ``start`` are kept, not rewritten
                view = memoryview(data)
                t0 = time.perf_counter()
                here = 0
                for a, b in runs:
                    a = max(a, low)
                    if a < b:
                        sink.write_at(position + a, view[a:b])
                        here += b - a
                written += here
                skipped += max(len(data) - low, 0) - here
                if next_checkpoint <= end < total:
                    sink.checkpoint(end)
                    next_checkpoint = end + checkpoint_bytes
                busy["write"] += time.perf_counter() - t0
                if progress is not None:
                    progress(end, total)
            finally:
                slots.release()
    except BaseException as exc:  # stop the other stages; re-raised below once they ended
        fail(exc)
        while to_write.get() is not None:  # until the scanner ends, giving back the slots its chunks hold
            slots.release()
    for t in threads:
        t.join(timeout=120)
    if errors:
        sink.abort()
        raise errors[0]
    result = sink.finish()
    seconds = time.monotonic() - began
    log.info(
        "disk_streamed",
        total=total,
        start=start,
        read=reader.bytes_read,
        written=written,
        zero_skipped=skipped,
        s=round(seconds, 3),
        mib_s=round((total - start) / max(seconds, 1e-9) / 2**20, 1),
        **{f"{stage}_busy_s": round(s, 3) for stage, s in busy.items()},
    )
    return StreamResult(
        sha.hexdigest() if sha is not None else None,
        total,
        start,
        reader.bytes_read,
        written,
        skipped,
        seconds,
        result,
        tuple(busy.items()),
    )
