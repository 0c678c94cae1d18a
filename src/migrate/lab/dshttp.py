"""The datastore's HTTP file interface (``/folder/<path>?dcPath=..&dsName=..``), for the lab.

vCenter, ESXi and vcsim all serve datastore files there: GET (with Range), HEAD and PUT,
authenticated by the SOAP session's ``vmware_soap_session`` cookie. Paths are relative to
the datastore root and may hold any character a VM name can ("Žluťoučký kůň %2f db/..."),
so they are percent-encoded here, once, in one place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import requests

from migrate.errors import LabError

_BLOCK = 1024 * 1024


class _IterReader:
    """A file-like view of an iterator of bytes with a known length, so requests sends a
    Content-Length (ESXi refuses chunked uploads) while streaming."""

    def __init__(self, pieces: Iterable[bytes], size: int) -> None:
        self._pieces: Iterator[bytes] = iter(pieces)
        self._piece = b""
        self._pos = 0  # read position in _piece: no re-slicing of a 1 MiB piece per 8 KiB read
        self._size = size

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        out = []
        want = n if n >= 0 else self._size
        while want > 0:
            if self._pos >= len(self._piece):
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._piece, self._pos = piece, 0
            take = self._piece[self._pos : self._pos + want]
            self._pos += len(take)
            want -= len(take)
            out.append(take)
        return b"".join(out)


class DatastoreHttp:
    """Files of one datastore over HTTPS, TLS verified against ``ca_file`` (or the system CAs)."""

    def __init__(
        self,
        folder_url: str,
        *,
        datacenter: str,
        datastore: str,
        cookie: str | None = None,
        ca_file: Path | str | None = None,
        timeout: float = 60,
    ) -> None:
        self.folder_url = folder_url.rstrip("/")
        self.query = urlencode({"dcPath": datacenter, "dsName": datastore})
        self.datastore = datastore
        self.timeout = timeout
        self.session = requests.Session()
        # Passed on every request: requests lets REQUESTS_CA_BUNDLE override Session.verify.
        self.verify: str | bool = str(ca_file) if ca_file else True
        if cookie:
            self.session.headers["Cookie"] = cookie

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DatastoreHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.folder_url}/{quote(path, safe='/')}?{self.query}"

    def _request(self, method: str, path: str, **kw: object) -> requests.Response:
        try:
            resp = self.session.request(method, self.url(path), timeout=self.timeout, verify=self.verify,
                                        **kw)  # type: ignore[arg-type]
        except requests.exceptions.SSLError as exc:
            raise LabError(f"TLS verification of {self.folder_url} failed: {exc}",
                           hint="pass the lab CA (ca.pem) as ca_file") from None
        except requests.RequestException as exc:
            raise LabError(f"{method} [{self.datastore}] {path} failed: {exc}") from None
        if resp.status_code >= 400 and not (method == "HEAD" and resp.status_code == 404):
            raise LabError(f"{method} [{self.datastore}] {path}: HTTP {resp.status_code} {resp.reason}")
        return resp

    def put(self, path: str, content: bytes | Iterable[bytes], size: int | None = None) -> None:
        """Upload a file; ``content`` is bytes or an iterator of pieces totalling ``size``."""
        if isinstance(content, bytes):
            body: bytes | _IterReader = content
        else:
            if size is None:
                raise ValueError("size is required when content is an iterator")
            body = _IterReader(content, size)
        self._request("PUT", path, data=body, headers={"Content-Type": "application/octet-stream"})

    def get(self, path: str) -> bytes:
        return self._request("GET", path).content

    def get_range(self, path: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)``; fails unless the server honours the Range."""
        resp = self._request("GET", path, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        if resp.status_code != 206:
            raise LabError(
                f"GET [{self.datastore}] {path} ignored the Range header (HTTP {resp.status_code})"
            )
        return resp.content

    def size(self, path: str) -> int | None:
        """The file's size, or None if there is no such file."""
        resp = self._request("HEAD", path)
        return None if resp.status_code == 404 else int(resp.headers.get("Content-Length", "0"))

    def sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self._request("GET", path, stream=True) as resp:
            for piece in resp.iter_content(_BLOCK):
                digest.update(piece)
        return digest.hexdigest()

    def download(self, path: str, target: Path) -> None:
        with self._request("GET", path, stream=True) as resp, open(target, "wb") as f:
            for piece in resp.iter_content(_BLOCK):
                f.write(piece)
