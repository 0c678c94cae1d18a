"""The disk pipeline against vcsim over verified TLS: flat streaming, resume, chains, faults."""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect

from migrate.disks.datastore import DatastoreFiles, session_cookie
from migrate.disks.pipeline import Staging, image_sha256, transfer_disk, transfer_vm_disk
from migrate.disks.sinks import LocalSparseFileSink, QemuNbdSink
from migrate.disks.vmdk import Descriptor, Extent, render_descriptor
from migrate.errors import (
    AuthError,
    NotFoundError,
    PermanentError,
    TlsError,
    TransientError,
    UnreachableError,
)
from migrate.lab import certs, vcsim
from migrate.model import Disk

MiB = 2**20
DC, DS = "DC0", "LocalDS_0"
FOLDER = "Žluťoučký kůň"  # non-ASCII and a space: the URL must be quoted right


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[vcsim.RunningVcsim, certs.CertPaths, str]]:
    paths = certs.make_certs(tmp_path_factory.mktemp("certs"))
    server = vcsim.start(vcsim.VcsimOptions(tls_cert=str(paths.cert), tls_key=str(paths.key)))
    try:
        si = SmartConnect(
            host=server.host,
            port=server.port,
            user="user",
            pwd="pass",
            sslContext=ssl.create_default_context(cafile=str(paths.ca)),
        )
        cookie = si._stub.cookie
        yield server, paths, cookie
        Disconnect(si)
    finally:
        server.stop()


@pytest.fixture
def files(lab: tuple[vcsim.RunningVcsim, certs.CertPaths, str]) -> Iterator[DatastoreFiles]:
    server, paths, cookie = lab
    with DatastoreFiles(server.url, cookie, datacenter=DC, datastore=DS, ca_file=paths.ca) as f:
        yield f


def _disk_bytes(size: int, seed: int) -> bytes:
    """Every third MiB random, the rest zeros, plus one 4 KiB island inside a zero MiB."""
    rng = random.Random(seed)
    data = bytearray(size)
    for mib in range(0, size // MiB, 3):
        data[mib * MiB : (mib + 1) * MiB] = rng.randbytes(MiB)
    if size >= 5 * MiB:
        data[4 * MiB + 8192 : 4 * MiB + 12288] = rng.randbytes(4096)
    return bytes(data)


def _nonzero(data: bytes) -> int:
    return sum(4096 for i in range(0, len(data), 4096) if data[i : i + 4096].count(0) != 4096)


def _put_flat(files: DatastoreFiles, name: str, data: bytes, cid: int = 0x0BADC0DE) -> str:
    desc = Descriptor(
        "vmfs",
        (Extent("RW", len(data) // 512, "VMFS", f"{name}-flat.vmdk"),),
        cid=cid,
        ddb=(("ddb.adapterType", "lsilogic"),),
    )
    files.put(f"{FOLDER}/{name}.vmdk", render_descriptor(desc))
    files.put(f"{FOLDER}/{name}-flat.vmdk", data)
    return f"[{DS}] {FOLDER}/{name}.vmdk"


class Proxy:
    """A TLS reverse proxy in front of vcsim, as a load balancer would be: counts body bytes per
    file, and can drop Range, cut the connection after ``cut_after`` body bytes of a response,
    or answer every request with ``status`` instead of forwarding it."""

    def __init__(
        self,
        server: vcsim.RunningVcsim,
        paths: certs.CertPaths,
        *,
        honour_range: bool = True,
        cut_after: int | None = None,
        status: int | None = None,
    ) -> None:
        self.served: dict[str, int] = {}
        proxy = self
        upstream_ctx = ssl.create_default_context(cafile=str(paths.ca))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self, method: str) -> None:
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("cookie", "range")}
                if not honour_range:
                    headers.pop("Range", None)
                up = http.client.HTTPSConnection(server.host, server.port, context=upstream_ctx)
                up.request(method, self.path, headers=headers)
                resp = up.getresponse()
                self.send_response(resp.status)
                for key in ("Content-Length", "Content-Range", "Content-Type", "Accept-Ranges"):
                    if resp.getheader(key):
                        self.send_header(key, resp.getheader(key))
                self.end_headers()
                name = self.path.split("?", 1)[0]
                sent = 0
                try:
                    while method == "GET" and (chunk := resp.read(MiB)):
                        if cut_after is not None and sent + len(chunk) > cut_after:
                            self.wfile.write(chunk[: cut_after - sent])
                            self.wfile.flush()
                            self.connection.shutdown(socket.SHUT_RDWR)  # a reset mid-body
                            self.close_connection = True
                            break
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        proxy.served[name] = proxy.served.get(name, 0) + len(chunk)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    self.close_connection = True
                finally:
                    up.close()

            def do_GET(self) -> None:
                self._forward("GET")

            def do_HEAD(self) -> None:
                self._forward("HEAD")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(paths.cert, paths.key)
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def bytes_for(self, suffix: str) -> int:
        return sum(n for path, n in self.served.items() if path.endswith(suffix))

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def proxy_factory(lab: tuple[vcsim.RunningVcsim, certs.CertPaths, str]) -> Iterator[object]:
    server, paths, cookie = lab
    made: list[tuple[Proxy, DatastoreFiles]] = []

    def make(honour_range: bool = True, **faults: int) -> tuple[Proxy, DatastoreFiles]:
        proxy = Proxy(server, paths, honour_range=honour_range, **faults)
        made.append((proxy, DatastoreFiles(proxy.url, cookie, datacenter=DC, datastore=DS, ca_file=paths.ca)))
        return made[-1]

    yield make
    for proxy, f in made:
        f.close()
        proxy.close()


class CutSink(LocalSparseFileSink):
    """A sparse raw sink whose connection 'drops' after ``cut`` bytes were written."""

    def __init__(self, path: Path, cut: int) -> None:
        super().__init__(path)
        self.cut, self.written = cut, 0

    def write_at(self, offset: int, data: memoryview) -> None:
        if self.written + len(data) > self.cut:
            raise TransientError("simulated reset while writing")
        super().write_at(offset, data)
        self.written += len(data)


# -- flat disks -------------------------------------------------------------------------------


def test_flat_disk_streams_to_raw_qcow2_and_vhd_with_equal_digest_and_stays_sparse(
    files: DatastoreFiles, tmp_path: Path
) -> None:
    """One flat disk gives the same guest sha256 in raw, qcow2 and VHD, each taking ~only its data."""
    data = _disk_bytes(24 * MiB, seed=1)
    path = _put_flat(files, "web01", data)
    expected, data_bytes = hashlib.sha256(data).hexdigest(), _nonzero(data)
    sinks = [
        LocalSparseFileSink(tmp_path / "web01.raw"),
        QemuNbdSink(tmp_path / "web01.qcow2", "qcow2"),
        QemuNbdSink(tmp_path / "web01.vhd", "vpc"),
    ]
    for sink in sinks:
        result = transfer_disk(files, path, sink, chunk_size=MiB, checkpoint_bytes=4 * MiB)
        assert result.method == "stream" and result.sha256 == expected
        assert (result.bytes_total, result.bytes_read, result.start_offset) == (len(data), len(data), 0)
        assert result.bytes_written == data_bytes
        assert result.zero_bytes_skipped == len(data) - data_bytes
        assert result.sink.virtual_size == len(data)
        assert image_sha256(result.sink.path, result.sink.format) == expected
        assert data_bytes <= result.sink.allocated_bytes <= data_bytes + MiB, result.sink
        assert not Path(result.sink.path + ".progress").exists()
    assert (tmp_path / "web01.raw").read_bytes() == data


def test_interrupted_transfer_resumes_reading_only_the_remainder(
    files: DatastoreFiles, proxy_factory: object, tmp_path: Path
) -> None:
    """After a cut, a new sink on the same file resumes at its checkpoint and reads only the rest."""
    data = _disk_bytes(24 * MiB, seed=2)
    path = _put_flat(files, "db01", data)
    target = tmp_path / "db01.raw"
    with pytest.raises(TransientError, match="simulated reset"):
        transfer_disk(files, path, CutSink(target, cut=5 * MiB), chunk_size=MiB, checkpoint_bytes=4 * MiB)
    kept = LocalSparseFileSink(target).resume_offset()
    assert 4 * MiB <= kept < len(data)

    proxy, counted = proxy_factory(True)  # type: ignore[operator]
    seen: list[tuple[int, int]] = []
    result = transfer_disk(
        counted,
        path,
        LocalSparseFileSink(target),
        chunk_size=MiB,
        checkpoint_bytes=4 * MiB,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result.start_offset == kept
    assert result.bytes_read == len(data) - kept
    assert proxy.bytes_for("db01-flat.vmdk") == len(data) - kept  # counted by the server side too
    assert result.bytes_written == _nonzero(data[kept:])
    assert result.sha256 == hashlib.sha256(data).hexdigest()  # the kept prefix was hashed from the sink
    assert target.read_bytes() == data
    assert seen[-1] == (len(data), len(data)) and seen[0][0] > kept


def test_resume_through_a_proxy_that_ignores_range_is_still_exact(
    files: DatastoreFiles, proxy_factory: object, tmp_path: Path
) -> None:
    """If Range is ignored on resume, the whole body is read, hashed, and only the rest written."""
    data = _disk_bytes(16 * MiB, seed=3)
    path = _put_flat(files, "app01", data)
    target = tmp_path / "app01.raw"
    with pytest.raises(TransientError):
        transfer_disk(files, path, CutSink(target, cut=4 * MiB), chunk_size=MiB, checkpoint_bytes=2 * MiB)
    kept = LocalSparseFileSink(target).resume_offset()
    assert kept > 0
    _proxy, ignoring = proxy_factory(False)  # type: ignore[operator]
    result = transfer_disk(ignoring, path, LocalSparseFileSink(target), chunk_size=MiB)
    assert result.start_offset == kept and result.bytes_read == len(data)
    assert result.bytes_written == _nonzero(data[kept:])
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert target.read_bytes() == data


def test_download_restarts_cleanly_when_range_is_not_honoured(
    files: DatastoreFiles, proxy_factory: object, tmp_path: Path
) -> None:
    """A partial local file resumes with Range; if Range is ignored it is rewritten from byte 0."""
    data = _disk_bytes(8 * MiB, seed=4)
    files.put(f"{FOLDER}/blob.bin", data)
    dest = tmp_path / "blob.bin"
    dest.write_bytes(data[: 3 * MiB])
    _p, honouring = proxy_factory(True)  # type: ignore[operator]
    resumed = honouring.download(f"{FOLDER}/blob.bin", dest)
    assert (resumed.resumed_from, resumed.bytes_read, resumed.restarted) == (3 * MiB, 5 * MiB, False)
    assert dest.read_bytes() == data

    dest.write_bytes(b"\xee" * (3 * MiB))  # a stale prefix: only a clean restart gets it right
    _q, ignoring = proxy_factory(False)  # type: ignore[operator]
    restarted = ignoring.download(f"{FOLDER}/blob.bin", dest)
    assert (restarted.resumed_from, restarted.bytes_read, restarted.restarted) == (0, 8 * MiB, True)
    assert dest.read_bytes() == data
    assert honouring.download(f"{FOLDER}/blob.bin", dest).bytes_read == 0  # complete: nothing read


def test_multi_extent_flat_disk_with_a_zero_extent_streams(files: DatastoreFiles, tmp_path: Path) -> None:
    """FLAT extents with offsets, a ZERO extent and a VMFS extent stream in guest order."""
    a, b, c = _disk_bytes(4 * MiB, 5), _disk_bytes(5 * MiB, 6), os.urandom(2 * MiB)
    for name, blob in (("split-a.vmdk", a), ("split-b.vmdk", b), ("split-c.vmdk", c)):
        files.put(f"{FOLDER}/{name}", blob)
    desc = Descriptor(
        "twoGbMaxExtentFlat",
        (
            Extent("RW", 4 * MiB // 512, "FLAT", "split-a.vmdk", 0),
            Extent("RW", 2 * MiB // 512, "ZERO"),
            Extent("RW", 4 * MiB // 512, "FLAT", "split-b.vmdk", MiB // 512),
            Extent("RW", 2 * MiB // 512, "VMFS", "split-c.vmdk"),
        ),
        cid=5,
    )
    files.put(f"{FOLDER}/split.vmdk", render_descriptor(desc))
    expected = a + bytes(2 * MiB) + b[MiB:] + c
    result = transfer_disk(files, f"[{DS}] {FOLDER}/split.vmdk", LocalSparseFileSink(tmp_path / "s.raw"))
    assert result.method == "stream" and result.bytes_total == len(expected)
    assert result.bytes_read == len(expected) - 2 * MiB  # the ZERO extent is not fetched
    assert (tmp_path / "s.raw").read_bytes() == expected
    assert result.sha256 == hashlib.sha256(expected).hexdigest()


# -- snapshot chains --------------------------------------------------------------------------


def write_cowd(path: Path, capacity_sectors: int, grain_sectors: int, grains: dict[int, bytes]) -> None:
    """An ESX vmfsSparse ("COWD") delta holding ``grains`` (grain index -> bytes)."""
    gt_entries = 4096
    l1_size = -(-capacity_sectors // (gt_entries * grain_sectors))
    l1_sector = 4
    next_sector = l1_sector + -(-l1_size * 4 // 512)
    tables: dict[int, tuple[int, list[int]]] = {}
    for g in sorted(grains):
        if g // gt_entries not in tables:
            tables[g // gt_entries] = (next_sector, [0] * gt_entries)
            next_sector += gt_entries * 4 // 512
    placed: list[tuple[int, bytes]] = []
    for g, blob in sorted(grains.items()):
        assert len(blob) == grain_sectors * 512
        tables[g // gt_entries][1][g % gt_entries] = next_sector
        placed.append((next_sector, blob))
        next_sector += grain_sectors
    l1 = [0] * l1_size
    for index, (sector, _entries) in tables.items():
        l1[index] = sector
    with open(path, "wb") as f:
        f.write(
            struct.pack(
                "<4sIIIIIIIIII",
                b"COWD",
                1,
                3,
                capacity_sectors,
                grain_sectors,
                l1_sector,
                l1_size,
                next_sector,
                0,
                0,
                0,
            ).ljust(2048, b"\0")
        )
        f.seek(l1_sector * 512)
        f.write(struct.pack(f"<{l1_size}I", *l1))
        for sector, entries in tables.values():
            f.seek(sector * 512)
            f.write(struct.pack(f"<{gt_entries}I", *entries))
        for sector, blob in placed:
            f.seek(sector * 512)
            f.write(blob)
        f.truncate(next_sector * 512)


def _make_chain(local: Path, size: int) -> tuple[dict[str, bytes], bytes]:
    """base (vmfs flat) <- COWD delta (vmfsSparse) <- monolithicSparse top; returns files and content."""
    base = _disk_bytes(size, seed=7)
    sectors = size // 512
    (local / "vm1-flat.vmdk").write_bytes(base)
    (local / "vm1.vmdk").write_bytes(
        render_descriptor(
            Descriptor("vmfs", (Extent("RW", sectors, "VMFS", "vm1-flat.vmdk"),), cid=0x1111AAAA)
        )
    )
    grain = 128  # 64 KiB grains
    rng = random.Random(8)
    grains = {g: rng.randbytes(grain * 512) for g in (0, 5, 6, 47, sectors // grain - 1)}
    grains[70] = bytes(grain * 512)  # a delta grain of zeros hides base data: must read as zeros
    write_cowd(local / "vm1-000001-delta.vmdk", sectors, grain, grains)
    (local / "vm1-000001.vmdk").write_bytes(
        render_descriptor(
            Descriptor(
                "vmfsSparse",
                (Extent("RW", sectors, "VMFSSPARSE", "vm1-000001-delta.vmdk"),),
                cid=0x2222BBBB,
                parent_cid=0x1111AAAA,
                parent_hint="vm1.vmdk",
            )
        )
    )
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "vm1-000001.vmdk",
            "-F",
            "vmdk",
            str(local / "vm1-000002.vmdk"),
        ],
        check=True,
        cwd=local,
    )
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "vmdk",
            "-c",
            "write -P 0x5a 3M 256k",
            "-c",
            "write -z 1M 64k",
            str(local / "vm1-000002.vmdk"),
        ],
        check=True,
        capture_output=True,
        cwd=local,
    )
    content = bytearray(base)
    for g, blob in grains.items():
        content[g * grain * 512 : (g + 1) * grain * 512] = blob
    content[3 * MiB : 3 * MiB + 256 * 1024] = b"\x5a" * 256 * 1024
    content[MiB : MiB + 65536] = bytes(65536)
    names = ["vm1.vmdk", "vm1-flat.vmdk", "vm1-000001.vmdk", "vm1-000001-delta.vmdk", "vm1-000002.vmdk"]
    return {n: (local / n).read_bytes() for n in names}, bytes(content)


def test_snapshot_chain_consolidates_like_qemu_img_convert_locally(
    files: DatastoreFiles, tmp_path: Path
) -> None:
    """flat <- COWD <- sparse: staged result == qemu-img convert of the chain == the expected bytes."""
    local = tmp_path / "local"
    local.mkdir()
    blobs, content = _make_chain(local, 12 * MiB)
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", "vm1-000002.vmdk", "consolidated.raw"], cwd=local, check=True
    )
    reference = (local / "consolidated.raw").read_bytes()
    assert reference == content  # our COWD writer and qemu's reader agree on what the guest sees
    for name, blob in blobs.items():
        files.put(f"{FOLDER}/{name}", blob)

    staging, staged = tmp_path / "staging", []
    result = transfer_disk(
        files,
        f"[{DS}] {FOLDER}/vm1-000002.vmdk",
        QemuNbdSink(tmp_path / "vm1.qcow2", "qcow2"),
        staging=Staging(staging, keep=True, progress=lambda done, total: staged.append((done, total))),
    )
    assert result.method == "staged" and result.bytes_total == len(content)
    assert result.sha256 == hashlib.sha256(reference).hexdigest()
    assert image_sha256(tmp_path / "vm1.qcow2", "qcow2") == result.sha256
    assert result.bytes_read == sum(
        len(b) for n, b in blobs.items() if n not in ("vm1.vmdk", "vm1-000001.vmdk")
    )

    # Staging resumes per file: a complete file is not fetched again, a cut one only from its end.
    with open(staging / "d0-e0.vmdk", "r+b") as cut:
        cut.truncate(5 * MiB)
    chain = [f"[{DS}] {FOLDER}/{n}" for n in ("vm1.vmdk", "vm1-000001.vmdk", "vm1-000002.vmdk")]
    again = transfer_disk(
        files, chain[-1], LocalSparseFileSink(tmp_path / "vm1.raw"), chain=chain, staging=Staging(staging)
    )
    assert staged[-1] == (result.bytes_read, result.bytes_read)
    assert again.bytes_read == 12 * MiB - 5 * MiB
    assert (tmp_path / "vm1.raw").read_bytes() == content
    assert not staging.exists()


def test_chain_with_a_modified_parent_is_refused(files: DatastoreFiles, tmp_path: Path) -> None:
    """A delta whose parentCID no longer matches its parent stops before any byte is staged."""
    data = _disk_bytes(2 * MiB, seed=9)
    _put_flat(files, "old", data, cid=0x12345678)
    files.put(
        f"{FOLDER}/old-000001.vmdk",
        render_descriptor(
            Descriptor(
                "vmfsSparse",
                (Extent("RW", len(data) // 512, "VMFSSPARSE", "old-000001-delta.vmdk"),),
                cid=2,
                parent_cid=0x0DDBA11,
                parent_hint="old.vmdk",
            )
        ),
    )
    with pytest.raises(PermanentError, match="the parent changed after the snapshot was taken"):
        transfer_disk(
            files,
            f"[{DS}] {FOLDER}/old-000001.vmdk",
            LocalSparseFileSink(tmp_path / "x.raw"),
            staging=Staging(tmp_path / "staging"),
        )
    assert not (tmp_path / "staging").exists()


# -- faults -----------------------------------------------------------------------------------


def test_missing_disk_is_a_clear_permanent_error(files: DatastoreFiles, tmp_path: Path) -> None:
    """A 404 becomes NotFoundError naming the file, datastore and datacenter, with a fix."""
    with pytest.raises(NotFoundError) as err:
        transfer_disk(files, f"[{DS}] nowhere/ghost.vmdk", LocalSparseFileSink(tmp_path / "g.raw"))
    assert isinstance(err.value, PermanentError)
    message = str(err.value)
    assert "nowhere/ghost.vmdk" in message and "HTTP 404" in message and "datacenter DC0" in message
    assert "check the disk path" in message


def test_untrusted_certificate_and_closed_port_are_named(
    lab: tuple[vcsim.RunningVcsim, certs.CertPaths, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No CA -> TlsError, closed port -> UnreachableError; REQUESTS_CA_BUNDLE cannot override ca_file."""
    server, paths, cookie = lab
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    with DatastoreFiles(server.url, cookie, datacenter=DC, datastore=DS, ca_file=paths.ca) as trusted:
        trusted.put("ping.txt", b"pong")
        assert trusted.size("ping.txt") == 4
    with (
        DatastoreFiles(server.url, cookie, datacenter=DC, datastore=DS) as untrusted,
        pytest.raises(TlsError, match="TLS failed"),
    ):
        untrusted.size("ping.txt")
    with (
        DatastoreFiles("https://127.0.0.1:9", cookie, datacenter=DC, datastore=DS) as closed,
        pytest.raises(UnreachableError, match="cannot connect"),
    ):
        closed.size("ping.txt")


def test_session_cookie_keeps_vcenter_quoting_and_never_prints() -> None:
    """vCenter's quoted cookie is sent exactly as given, and its repr hides the value."""
    cookie = session_cookie('vmware_soap_session="52a3f0e1c2"; Path=/; HttpOnly; Secure;')
    assert cookie.reveal() == 'vmware_soap_session="52a3f0e1c2"'
    assert "52a3" not in repr(cookie) and "52a3" not in str(cookie)


def test_reset_mid_body_is_transient_and_the_transfer_resumes(
    files: DatastoreFiles, proxy_factory: object, tmp_path: Path
) -> None:
    """A connection cut mid-body raises TransientError; the next attempt resumes and is exact."""
    data = _disk_bytes(16 * MiB, seed=10)
    path = _put_flat(files, "cut01", data)
    _proxy, cutting = proxy_factory(cut_after=9 * MiB)  # type: ignore[operator]
    target = tmp_path / "cut01.qcow2"
    with pytest.raises(TransientError, match=r"cut01-flat\.vmdk") as err:
        transfer_disk(cutting, path, QemuNbdSink(target, "qcow2"), chunk_size=MiB, checkpoint_bytes=2 * MiB)
    assert "connection failed" in str(err.value) and "datacenter DC0" in str(err.value)
    kept = QemuNbdSink(target, "qcow2").resume_offset()
    assert 2 * MiB <= kept <= 9 * MiB
    result = transfer_disk(files, path, QemuNbdSink(target, "qcow2"), chunk_size=MiB)
    assert result.start_offset == kept and result.bytes_read == len(data) - kept
    assert result.sha256 == hashlib.sha256(data).hexdigest() == image_sha256(target, "qcow2")


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        (503, TransientError, "HTTP 503"),
        (500, TransientError, "HTTP 500"),
        (401, AuthError, "log in again"),
        (403, AuthError, "HTTP 403"),
        (400, PermanentError, "HTTP 400"),
    ],
)
def test_http_statuses_map_to_retry_or_not(
    proxy_factory: object, tmp_path: Path, status: int, error: type[Exception], text: str
) -> None:
    """5xx are TransientError (retried), 401/403 AuthError, other 4xx PermanentError."""
    _proxy, failing = proxy_factory(status=status)  # type: ignore[operator]
    with pytest.raises(error, match=text) as err:
        transfer_disk(failing, f"[{DS}] {FOLDER}/any.vmdk", LocalSparseFileSink(tmp_path / "a.raw"))
    assert isinstance(err.value, PermanentError) == (status < 500)


def test_a_discovered_disk_transfers_by_its_model(files: DatastoreFiles, tmp_path: Path) -> None:
    """transfer_vm_disk takes a model Disk (path + chain); an RDM disk is refused up front."""
    data = _disk_bytes(3 * MiB, seed=11)
    path = _put_flat(files, "model01", data)
    disk = Disk(
        key=2000,
        label="Hard disk 1",
        controller="pvscsi",
        bus=0,
        unit=0,
        capacity_bytes=len(data),
        datastore=DS,
        path=path,
        chain=(path,),
    )
    result = transfer_vm_disk(files, disk, LocalSparseFileSink(tmp_path / "m.raw"))
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.bytes_total == disk.capacity_bytes
    rdm = Disk(
        key=2001,
        label="Hard disk 2",
        controller="pvscsi",
        bus=0,
        unit=1,
        capacity_bytes=len(data),
        datastore=DS,
        path=path,
        backing="rdm",
        rdm=True,
    )
    with pytest.raises(PermanentError, match="raw device mapping"):
        transfer_vm_disk(files, rdm, LocalSparseFileSink(tmp_path / "r.raw"))
