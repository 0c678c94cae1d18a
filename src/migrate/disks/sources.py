"""Sources of guest-visible bytes for the streaming engine.

* ``FlatSource``: a disk whose extents are plain file ranges (thick/thin ``-flat.vmdk``,
  ``monolithicFlat``, split ``twoGbMaxExtentFlat``, ZERO extents) read with ranged GETs
  straight from the datastore, no staging.
* ``NbdSource``: anything qemu can open (a staged snapshot chain, a finished qcow2/VHD),
  read through a private read-only qemu-nbd.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import structlog

from migrate.disks import formats
from migrate.disks.datastore import DatastoreFiles, RangeStream
from migrate.disks.nbd import NbdClient, QemuNbd
from migrate.disks.vmdk import DatastorePath, Descriptor
from migrate.errors import PermanentError

log = structlog.get_logger(__name__)

_ZEROS = bytes(8 << 20)


@dataclass(frozen=True, slots=True)
class Segment:
    """Guest bytes [start, start + length) are ``file`` bytes from ``file_offset`` (zeros if no file)."""

    start: int
    length: int
    file: DatastorePath | None
    file_offset: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


def flat_segments(descriptor_path: DatastorePath, descriptor: Descriptor) -> tuple[Segment, ...]:
    if not descriptor.is_flat:
        raise ValueError("only FLAT, VMFS and ZERO extents map to plain file ranges")
    segments, at = [], 0
    for e in descriptor.extents:
        file = descriptor_path.sibling(e.filename) if e.kind != "ZERO" and e.filename else None
        segments.append(Segment(at, e.size_bytes, file, e.offset_bytes))
        at += e.size_bytes
    return tuple(segments)


class FlatSource:
    """A flat disk read from the datastore with ranged GETs, segment after segment."""

    def __init__(self, files: DatastoreFiles, segments: tuple[Segment, ...]) -> None:
        self._files = files
        self.segments = segments
        self.total = segments[-1].end if segments else 0

    def files_for(self, path: DatastorePath) -> DatastoreFiles:
        return (
            self._files
            if path.datastore == self._files.datastore
            else self._files.for_datastore(path.datastore)
        )

    def check(self) -> None:
        """Fail early, with the file named, if an extent file is shorter than the descriptor says."""
        for seg in self.segments:
            if seg.file is None:
                continue
            size = self.files_for(seg.file).size(seg.file.path)
            if size < seg.file_offset + seg.length:
                raise PermanentError(
                    f"{seg.file}: {size} bytes, but the descriptor needs {seg.file_offset + seg.length}",
                    system="vsphere",
                    hint="the disk's extent file is truncated or the descriptor is wrong",
                )

    def open(self, start: int) -> _FlatReader:
        return _FlatReader(self, start)


class _FlatReader:
    def __init__(self, source: FlatSource, start: int) -> None:
        self._source = source
        self.offset = start
        self.bytes_read = 0
        self._pos = start
        self._stream: RangeStream | None = None
        self._index = next(
            (i for i, s in enumerate(source.segments) if s.start <= start < s.end), len(source.segments)
        )
        self._first = True
        # Open now, not on the first read: ``offset`` must be final when open() returns.
        if self._index < len(source.segments) and source.segments[self._index].file is not None:
            self._stream = self._open(source.segments[self._index])

    def _open(self, seg: Segment) -> RangeStream:
        assert seg.file is not None
        want = seg.file_offset + (self._pos - seg.start)
        stream = self._source.files_for(seg.file).read_range(
            seg.file.path, want, seg.file_offset + seg.length
        )
        if stream.offset != want:
            # The server ignored Range. At the very start of the disk we can take the whole
            # body (the engine hashes the prefix from it); elsewhere skip up to where we are.
            if self._first and seg.start == 0 and seg.file_offset == 0:
                self.offset = self._pos = 0
            else:
                skip = want - stream.offset
                while skip > 0:
                    dropped = stream.read(min(skip, 8 << 20))
                    self.bytes_read += len(dropped)
                    skip -= len(dropped)
            stream.end = min(stream.end, seg.file_offset + seg.length)
        self._first = False
        return stream

    def read(self, size: int) -> bytes:
        segments = self._source.segments
        if self._index >= len(segments):
            return b""
        seg = segments[self._index]
        n = min(size, seg.end - self._pos)
        if seg.file is None:
            data = _ZEROS if n == len(_ZEROS) else bytes(n)
        else:
            if self._stream is None:
                self._stream = self._open(seg)
                n = min(size, seg.end - self._pos)
            data = self._stream.read(n)
            self.bytes_read += len(data)
        self._pos += len(data)
        if self._pos >= seg.end:
            self.close()
            self._index += 1
        return data

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class NbdSource:
    """Any image qemu opens (``image`` may be a ``json:`` chain spec), read via qemu-nbd.

    Use as a context manager; one reader at a time.
    """

    def __init__(self, image: str, fmt: str | None) -> None:
        self._server = QemuNbd(image, fmt=fmt, read_only=True)
        self._client: NbdClient | None = None
        self.total = 0

    def __enter__(self) -> NbdSource:
        self._client = self._server.start()
        self.total = self._client.size
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.close()
        self._client = None

    def open(self, start: int) -> _NbdReader:
        if self._client is None:
            raise RuntimeError("use NbdSource as a context manager")
        return _NbdReader(self._client, start, self.total)


class _NbdReader:
    def __init__(self, client: NbdClient, start: int, total: int) -> None:
        self._client = client
        self._total = total
        self.offset = start
        self.bytes_read = 0
        self._pos = start

    def read(self, size: int) -> bytearray:
        n = min(size, self._total - self._pos)
        if n <= 0:
            return bytearray()
        buf = bytearray(n)
        self._client.read_into(self._pos, memoryview(buf))
        self._pos += n
        self.bytes_read += n
        return buf

    def close(self) -> None:
        pass


def chain_image(descriptors: list[str]) -> str:
    """The qemu file name opening a local vmdk chain (base first) with explicit backing files."""
    return formats.json_filename(formats.vmdk_chain_spec(descriptors))
