"""Read (and, for the lab, write) datastore files over vCenter/ESXi's ``/folder`` HTTPS door.

``GET https://host/folder/<path>?dcPath=<datacenter>&dsName=<datastore>`` with the API
session cookie (``vmware_soap_session``) returns a file's bytes; ``Range`` reads a part.
Every requests/urllib3/ssl fault is translated here, at the border:

* resets, timeouts, truncated bodies, 5xx, 429 -> TransientError (retry, resume);
* 401/403 -> AuthError; 404 -> NotFoundError; bad certificate -> TlsError;
  refused/DNS -> UnreachableError; other 4xx -> PermanentError.

Range is verified, not trusted: a resumed read must come back ``206`` with a
``Content-Range`` that starts where we asked; a proxy that answers ``200`` with the whole
file is detected and the caller restarts cleanly from byte 0.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NoReturn, Protocol
from urllib.parse import quote, urlencode, urlsplit

import requests
import structlog
import urllib3

from migrate.errors import (
    AuthError,
    MigrateError,
    NotFoundError,
    PermanentError,
    TlsError,
    TransientError,
    UnreachableError,
)
from migrate.secrets import Secret

log = structlog.get_logger(__name__)

SESSION_COOKIE = "vmware_soap_session"
DEFAULT_CHUNK = 8 << 20
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


class SizedReader(Protocol):
    """A body to upload whose length is known up front, so requests sends a Content-Length
    (ESXi refuses chunked uploads) while the bytes stream."""

    def read(self, size: int = -1, /) -> bytes: ...

    def __len__(self) -> int: ...


def session_cookie(raw: str) -> Secret:
    """The ``name=value`` pair from a Set-Cookie style string such as pyvmomi's
    ``si._stub.cookie`` (``vmware_soap_session="52a3..."; Path=/; HttpOnly``)."""
    for part in raw.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name.strip() == SESSION_COOKIE:
            return Secret(f"{SESSION_COOKIE}={value.strip()}", reference="vsphere session cookie")
    first = raw.split(";", 1)[0].strip()
    return Secret(first, reference="vsphere session cookie")


@dataclass(frozen=True, slots=True)
class DownloadResult:
    bytes_read: int
    resumed_from: int
    restarted: bool  # the server ignored Range and the file was fetched again from byte 0
    size: int


class RangeStream:
    """A ranged GET being read: the body covers [``offset``, ``end``) of the file.

    ``offset`` may be lower than asked (0) when the server ignored Range; the caller decides
    whether to skip or restart. Close it (or use ``with``) to return the connection.
    """

    def __init__(
        self,
        files: DatastoreFiles,
        path: str,
        response: requests.Response,
        offset: int,
        end: int,
        total: int | None,
    ) -> None:
        self._files = files
        self._path = path
        self._response = response
        self.offset = offset
        self.end = end
        self.total = total  # the whole file's size, when the server said
        self.position = offset

    @property
    def honoured(self) -> bool:
        return self._response.status_code == 206

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" only at the end of the range. Faults are translated."""
        if self.position >= self.end:
            return b""
        want = min(size, self.end - self.position)
        try:
            data: bytes = self._response.raw.read(want, decode_content=False)
        except Exception as exc:
            self._files.translate(exc, self._path, "reading")
        if not data:
            raise TransientError(
                f"{self._files.describe(self._path)}: connection closed at byte {self.position} "
                f"of {self.end}",
                system="vsphere",
                hint="the transfer resumes from the last completed byte",
            )
        self.position += len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(DEFAULT_CHUNK):
            yield chunk

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> RangeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DatastoreFiles:
    """Files of one datastore in one datacenter, reached through a vCenter or ESXi host."""

    def __init__(
        self,
        base_url: str,
        cookie: Secret | str | None,
        *,
        datacenter: str,
        datastore: str,
        ca_file: str | Path | None = None,
        verify: bool = True,
        timeout: float = 60.0,
        session: requests.Session | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise ValueError(f"base_url must look like https://vcenter.example:443 (got {base_url!r})")
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self.datacenter = datacenter
        self.datastore = datastore
        self._cookie = session_cookie(cookie) if isinstance(cookie, str) else cookie
        # Passed on every request: requests would otherwise let REQUESTS_CA_BUNDLE override it.
        self._verify: str | bool = str(ca_file) if ca_file else verify
        self._timeout = timeout
        self._session = session or requests.Session()
        self._owns_session = session is None

    # -- plumbing ---------------------------------------------------------------------------

    def for_datastore(self, datastore: str) -> DatastoreFiles:
        """The same connection, another datastore of the same datacenter (linked clones)."""
        other = DatastoreFiles(
            self.base_url,
            self._cookie,
            datacenter=self.datacenter,
            datastore=datastore,
            verify=True,
            timeout=self._timeout,
            session=self._session,
        )
        other._verify = self._verify
        other._owns_session = False
        return other

    def url(self, path: str) -> str:
        query = urlencode({"dcPath": self.datacenter, "dsName": self.datastore})
        return f"{self.base_url}/folder/{quote(path.lstrip('/'), safe='/')}?{query}"

    def describe(self, path: str) -> str:
        return f"[{self.datastore}] {path} (datacenter {self.datacenter}, {self.base_url})"

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._cookie is not None:
            headers["Cookie"] = self._cookie.reveal()
        return headers

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        data: bytes | BinaryIO | SizedReader | None = None,
    ) -> requests.Response:
        try:
            response = self._session.request(
                method,
                self.url(path),
                headers=self._headers(headers),
                stream=stream,
                data=data,
                verify=self._verify,
                timeout=self._timeout,
                allow_redirects=False,
            )
        except Exception as exc:
            self.translate(exc, path, method)
        if response.status_code >= 300:
            try:
                self._status_error(response, path, method)
            finally:
                response.close()
        return response

    def _status_error(self, response: requests.Response, path: str, method: str) -> NoReturn:
        code, where = response.status_code, self.describe(path)
        if code in (401, 403):
            raise AuthError(
                f"{method} {where}: HTTP {code}, the session was refused",
                system="vsphere",
                hint="log in again: the vSphere session cookie expired or lacks Datastore.Browse",
            )
        if code == 404:
            raise NotFoundError(
                f"{method} {where}: HTTP 404, no such file",
                system="vsphere",
                hint="check the disk path, and that datacenter and datastore names are right",
            )
        if code == 416:
            raise PermanentError(
                f"{method} {where}: HTTP 416, requested range is beyond the end of the file",
                system="vsphere",
                hint="the file shrank or the resume offset is wrong; restart",
            )
        if code >= 500 or code in (408, 429):
            raise TransientError(f"{method} {where}: HTTP {code} {response.reason}", system="vsphere")
        raise PermanentError(f"{method} {where}: HTTP {code} {response.reason}", system="vsphere")

    def translate(self, exc: BaseException, path: str, doing: str) -> NoReturn:
        """Raise the migrate error for a transport fault while ``doing`` something to ``path``."""
        where = self.describe(path)
        if isinstance(exc, MigrateError):
            raise exc
        chain = _causes(exc)
        if isinstance(exc, requests.exceptions.SSLError) or any(
            isinstance(e, ssl.SSLCertVerificationError) for e in chain
        ):
            raise TlsError(
                f"{doing} {where}: TLS failed ({_root(exc)})",
                system="vsphere",
                hint="give the vCenter CA bundle (ca_file) instead of turning verification off",
            ) from exc
        if isinstance(exc, requests.exceptions.Timeout) or any(
            isinstance(e, TimeoutError | socket.timeout) for e in chain
        ):
            raise TransientError(f"{doing} {where}: timed out", system="vsphere") from exc
        if isinstance(exc, requests.exceptions.ConnectionError) and any(
            isinstance(e, ConnectionRefusedError | socket.gaierror) for e in chain
        ):
            raise UnreachableError(
                f"{doing} {where}: cannot connect ({_root(exc)})",
                system="vsphere",
                hint="check the host name, port and firewall",
            ) from exc
        if isinstance(
            exc,
            requests.exceptions.RequestException
            | urllib3.exceptions.HTTPError
            | http.client.HTTPException
            | OSError,
        ):
            raise TransientError(
                f"{doing} {where}: connection failed ({_root(exc)})", system="vsphere"
            ) from exc
        raise exc

    # -- API --------------------------------------------------------------------------------

    def size(self, path: str) -> int:
        """The file's size in bytes: HEAD, or a one-byte ranged GET where HEAD is not served."""
        try:
            response = self._request("HEAD", path)
        except PermanentError as exc:
            if isinstance(exc, AuthError | NotFoundError):
                raise
            response = None
        if response is not None:
            response.close()
            length = response.headers.get("Content-Length")
            if length is not None:
                return int(length)
        with self.read_range(path, 0, 1) as stream:
            if stream.total is None:
                raise PermanentError(
                    f"{self.describe(path)}: the server reports no file size", system="vsphere"
                )
            return stream.total

    def read_range(self, path: str, start: int = 0, end: int | None = None) -> RangeStream:
        """Open a GET for bytes [start, end) (to the end of the file when ``end`` is None).

        The returned stream's ``offset`` is where its body really starts: ``start`` when the
        server honoured Range, 0 when it sent the whole file instead.
        """
        headers: dict[str, str] = {"Accept-Encoding": "identity"}
        if start > 0 or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        response = self._request("GET", path, headers=headers, stream=True)
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != start:
                response.close()
                raise TransientError(
                    f"GET {self.describe(path)}: asked for bytes from {start}, server answered "
                    f"Content-Range {response.headers.get('Content-Range')!r}",
                    system="vsphere",
                )
            total = None if match.group(3) == "*" else int(match.group(3))
            return RangeStream(self, path, response, start, int(match.group(2)) + 1, total)
        length = int(response.headers.get("Content-Length", "-1"))
        if length < 0:
            response.close()
            raise PermanentError(
                f"GET {self.describe(path)}: no Content-Length in the answer", system="vsphere"
            )
        if "Range" in headers:
            log.warning("range_not_honoured", path=path, asked=start, status=response.status_code)
        return RangeStream(self, path, response, 0, length, length)

    def read_bytes(self, path: str, start: int = 0, end: int | None = None, limit: int = 16 << 20) -> bytes:
        """A small file or range, whole, in memory (descriptors, sparse headers)."""
        with self.read_range(path, start, end) as stream:
            stop = stream.end if end is None else min(end, stream.end)
            if stop - start > limit:
                raise PermanentError(
                    f"{self.describe(path)}: {stop - start} bytes is too much to read whole (limit {limit})",
                    system="vsphere",
                )
            parts, position = [], stream.offset
            while position < stop and (chunk := stream.read(min(DEFAULT_CHUNK, stop - position))):
                lo = max(start - position, 0)
                if lo < len(chunk):
                    parts.append(chunk[lo:])
                position += len(chunk)
            return b"".join(parts)

    def download(
        self,
        path: str,
        dest: Path,
        *,
        resume: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> DownloadResult:
        """Copy a file to ``dest``, resuming at the local file's size; zeros become holes.

        Whole runs of zeros (64 KiB aligned) are seeked over, so a staged thin disk takes
        only its data's space. A complete local file (same size) is not read again.
        """
        total = self.size(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = dest.stat().st_size if resume and dest.exists() else 0
        if have == total and dest.exists():
            return DownloadResult(0, have, False, total)
        if have > total:
            log.warning("staged_file_larger_than_source", path=path, local=have, remote=total)
            have = 0
        with open(dest, "r+b" if have else "wb") as out:
            if not have:
                out.truncate(0)
            stream = self.read_range(path, have, None) if have else self.read_range(path)
            restarted = have > 0 and stream.offset != have
            if restarted:
                log.warning("download_restarted", path=path, had=have, reason="range not honoured")
                out.truncate(0)
            read = _copy_sparse(stream, out, stream.offset, total, progress)
            out.flush()
            os.fsync(out.fileno())
        if read + stream.offset != total:
            raise TransientError(
                f"GET {self.describe(path)}: got {read + stream.offset} of {total} bytes", system="vsphere"
            )
        return DownloadResult(read, 0 if restarted else have, restarted, total)

    def put(self, path: str, data: bytes | BinaryIO | SizedReader | Path) -> None:
        """Upload a file (the lab seeds datastores with it; vSphere accepts PUT on /folder too)."""
        if isinstance(data, Path):
            with open(data, "rb") as body:
                self._request(
                    "PUT", path, data=body, headers={"Content-Type": "application/octet-stream"}
                ).close()
            return
        self._request("PUT", path, data=data, headers={"Content-Type": "application/octet-stream"}).close()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> DatastoreFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_HOLE = 64 << 10
_ZERO_HOLE = bytes(_HOLE)


def _copy_sparse(
    stream: RangeStream, out: BinaryIO, offset: int, total: int, progress: Callable[[int, int], None] | None
) -> int:
    read = 0
    out.seek(offset)
    while chunk := stream.read(DEFAULT_CHUNK):
        read += len(chunk)
        view, position = memoryview(chunk), 0
        while position < len(chunk):
            step = min(_HOLE, len(chunk) - position)
            if step == _HOLE and chunk.startswith(_ZERO_HOLE, position):
                out.seek(step, os.SEEK_CUR)
            else:
                out.write(view[position : position + step])
            position += step
        out.truncate(out.tell())  # the file's size is the resume point, even after a hole
        if progress:
            progress(offset + read, total)
    return read


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
        if current is None and seen[-1].args and isinstance(seen[-1].args[0], BaseException):
            current = seen[-1].args[0]
    # urllib3 keeps the real reason on .reason of MaxRetryError/ProtocolError.
    for e in list(seen):
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException) and reason not in seen:
            seen.extend(_causes(reason))
    return seen


def _root(exc: BaseException) -> str:
    return str(_causes(exc)[-1]) or type(exc).__name__
