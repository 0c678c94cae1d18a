"""NodeShell over the lab's sshd: commands, byte-exact uploads, sparse ranged writes, host keys checked."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from migrate.connectors.nodeshell import NodeShell
from migrate.errors import AuthError, PermanentError, TransientError, UnreachableError
from migrate.inventory import SshSpec
from migrate.lab.sshd import RunningSshd, start_sshd
from migrate.secrets import Secret

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSshd]:
    running = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def shell(sshd: RunningSshd) -> Iterator[NodeShell]:
    with NodeShell(sshd.host, node="pve1", port=sshd.port, user=sshd.user, key_file=sshd.key_file,
                   known_hosts=sshd.known_hosts) as connected:
        yield connected


def _shell(sshd: RunningSshd, **kw: object) -> NodeShell:
    options: dict[str, object] = {"port": sshd.port, "user": sshd.user, "key_file": sshd.key_file,
                                  "known_hosts": sshd.known_hosts, "node": "pve1"}
    options.update(kw)
    return NodeShell(sshd.host, **options)  # type: ignore[arg-type]


def test_run_captures_exit_status_stdout_and_stderr(shell: NodeShell) -> None:
    """A command's exit status, stdout and stderr come back separately; a list is shell-quoted."""
    result = shell.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (result.exit_status, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert shell.run(["printf", "%s", "it's $HOME"]).text == "it's $HOME"
    assert shell.run("cat", stdin=b"fed through stdin").stdout == b"fed through stdin"


def test_failed_command_raises_with_its_stderr(shell: NodeShell) -> None:
    """check=True turns a non-zero exit into PermanentError carrying the command's stderr tail."""
    with pytest.raises(PermanentError, match=r"exit 2\): .*No such file or directory") as info:
        shell.run(["ls", "/nonexistent/migrate"])
    assert not isinstance(info.value, TransientError) and info.value.system == "pve1"


def test_stalled_command_is_transient(shell: NodeShell) -> None:
    """A command silent for longer than its timeout fails as transient, saying so."""
    with pytest.raises(TransientError, match="made no progress for 1s"):
        shell.run("sleep 5", timeout=1)


@pytest.mark.parametrize("via", ["exec", "sftp"])
def test_upload_lands_exact_bytes(shell: NodeShell, tmp_path: Path, via: str) -> None:
    """A file object streamed by exec or SFTP lands byte for byte; local and remote SHA-256 agree."""
    content = os.urandom(3 * MiB + 123)
    target = tmp_path / via / "disk.raw"  # parent created on the node
    seen: list[int] = []
    result = shell.upload(io.BytesIO(content), str(target), via=via, progress=seen.append)  # type: ignore[arg-type]
    assert result.bytes_sent == len(content) == sum(seen)
    assert result.sha256 == hashlib.sha256(content).hexdigest() == shell.sha256(str(target))
    stat = shell.stat(str(target))
    assert stat is not None and (stat.size, stat.is_file) == (len(content), True)


def test_upload_from_a_chunk_iterator(shell: NodeShell, tmp_path: Path) -> None:
    """An iterator of byte chunks uploads as their concatenation, replacing an older file."""
    target = tmp_path / "chunks.bin"
    target.write_bytes(b"old content that is longer than the new one" * 100)
    result = shell.upload(iter([b"abc", b"", b"def" * 1000]), str(target))
    assert target.read_bytes() == b"abc" + b"def" * 1000
    assert result.sha256 == hashlib.sha256(target.read_bytes()).hexdigest()


def test_upload_into_a_missing_directory_reports_the_remote_error(shell: NodeShell, tmp_path: Path) -> None:
    """When the remote side cannot write, the error is the command's own stderr, not a broken pipe."""
    target = tmp_path / "no" / "such" / "dir" / "disk.raw"
    chunks = (bytes(MiB) for _ in range(64))  # more than the channel buffers, so sending hits the closed end
    with pytest.raises(PermanentError, match="No such file or directory") as info:
        shell.upload(chunks, str(target), make_dirs=False)
    assert not isinstance(info.value, TransientError)


def test_a_failing_local_source_is_not_blamed_on_ssh(shell: NodeShell, tmp_path: Path) -> None:
    """An exception from the caller's data is a PermanentError about reading it."""
    def broken() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError(5, "Input/output error")

    with pytest.raises(PermanentError, match=r"reading the data for .* failed: .*Input/output error"):
        shell.upload(broken(), str(tmp_path / "partial.raw"))


def test_ranged_writes_make_a_sparse_file_with_the_right_content(shell: NodeShell, tmp_path: Path) -> None:
    """Two pieces into a 64 MiB disk: only they cross the wire, the rest stays holes, content is exact."""
    size = 64 * MiB
    head, tail = os.urandom(MiB), os.urandom(MiB // 2)
    target = str(tmp_path / "node" / "sparse.raw")
    result = shell.write_ranges(target, [(0, head), (40 * MiB, tail)], size=size)
    assert (result.bytes_sent, result.records) == (len(head) + len(tail), 2)
    stat = shell.stat(target)
    assert stat is not None and stat.size == size
    assert stat.allocated_bytes <= 4 * MiB  # holes, not 64 MiB of written zeros
    expected = hashlib.sha256()
    expected.update(head)
    expected.update(bytes(40 * MiB - len(head)))
    expected.update(tail)
    expected.update(bytes(size - 40 * MiB - len(tail)))
    assert shell.sha256(target) == expected.hexdigest()


def test_ranged_writes_resume_without_losing_earlier_pieces(shell: NodeShell, tmp_path: Path) -> None:
    """A second call (a resumed transfer) keeps what the first wrote; zero pieces can be skipped."""
    target = tmp_path / "resumed.raw"
    first = shell.write_ranges(str(target), [(0, b"A" * 4096)], size=64 * 1024)
    second = shell.write_ranges(str(target), [(8192, b"B" * 4096), (16384, bytes(4096))], size=64 * 1024,
                                skip_zeros=True)
    assert (first.records, second.records, second.bytes_sent) == (1, 1, 4096)
    data = target.read_bytes()
    assert data == b"A" * 4096 + bytes(4096) + b"B" * 4096 + bytes(64 * 1024 - 12288)


def test_ranged_writes_without_python_on_the_node_use_dd(sshd: RunningSshd, tmp_path: Path) -> None:
    """The dd fallback (nodes without python3) produces the same sparse file."""
    shell = _shell(sshd)
    shell._has_python = False  # as if `command -v python3` had failed on the node
    target = tmp_path / "dd.raw"
    with shell:
        shell.write_ranges(str(target), [(MiB, b"x" * 1000), (3 * MiB, b"y" * 10)], size=4 * MiB)
    data = target.read_bytes()
    assert len(data) == 4 * MiB
    assert data[MiB:MiB + 1000] == b"x" * 1000 and data[3 * MiB:3 * MiB + 10] == b"y" * 10
    assert data.count(0) == 4 * MiB - 1010
    assert os.stat(target).st_blocks * 512 < 4 * MiB


def test_stat_of_a_missing_file_is_none(shell: NodeShell, tmp_path: Path) -> None:
    """stat() answers None for a path that does not exist, instead of failing."""
    assert shell.stat(str(tmp_path / "absent")) is None


# -- host keys, logins, reachability ----------------------------------------------------------


def test_unknown_host_key_is_rejected_with_a_fix(sshd: RunningSshd, tmp_path: Path) -> None:
    """A node missing from known_hosts is refused; the hint says how to check and add its key."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(PermanentError, match=r"is not in .*refusing to connect") as info:
        _shell(sshd, known_hosts=empty).connect()
    assert info.value.hint and "ssh-keyscan" in info.value.hint


def test_changed_host_key_is_rejected(sshd: RunningSshd, tmp_path: Path) -> None:
    """A known_hosts line with another key for the node is refused as a possible man in the middle."""
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    algo, key = other.with_suffix(".pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {algo} {key}\n")
    with pytest.raises(PermanentError, match="does not match") as info:
        _shell(sshd, known_hosts=wrong).connect()
    assert "in the middle" in str(info.value)


def test_disabling_host_key_checks_is_explicit_and_logged(sshd: RunningSshd, tmp_path: Path) -> None:
    """verify_host_key=False connects to an unknown node and leaves a warning event behind."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with capture_logs() as logs, _shell(sshd, known_hosts=empty, verify_host_key=False) as shell:
        assert shell.run("echo ok").text == "ok\n"
    assert [e["log_level"] for e in logs if e["event"] == "ssh_host_key_verification_disabled"] == ["warning"]


def test_unauthorised_key_is_auth_error(sshd: RunningSshd, tmp_path: Path) -> None:
    """A key the node does not know is refused as AuthError with a hint about authorized_keys."""
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(AuthError, match="was refused") as info:
        _shell(sshd, key_file=stranger).connect()
    assert info.value.hint and "authorized_keys" in info.value.hint


def test_encrypted_key_needs_its_passphrase(tmp_path: Path) -> None:
    """A passphrase-protected key fails clearly without the passphrase and works with it."""
    node = start_sshd(tmp_path / "sshd", key_passphrase="correct horse")
    try:
        with pytest.raises(AuthError, match="encrypted and no passphrase"):
            _shell(node).connect()
        with pytest.raises(AuthError, match="cannot load SSH key"):
            _shell(node, key_passphrase=Secret("wrong horse")).connect()
        with _shell(node, key_passphrase=Secret("correct horse")) as shell:
            assert shell.run("echo ok").text == "ok\n"
    finally:
        node.stop()


def test_connection_refused_is_unreachable(sshd: RunningSshd) -> None:
    """Nothing listening: UnreachableError naming the node and address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(UnreachableError, match=f"node pve1 .*127.0.0.1:{port}"):
            _shell(sshd, port=port).connect()


def test_for_node_reads_the_inventory_ssh_section(sshd: RunningSshd, tmp_path: Path) -> None:
    """NodeShell.for_node maps the node name through ssh.hosts and uses the spec's key and known_hosts."""
    spec = SshSpec(user=sshd.user, port=sshd.port, key_file=sshd.key_file, known_hosts=sshd.known_hosts,
                   hosts={"pve2": sshd.host})
    with NodeShell.for_node(spec, "pve2") as shell:
        assert shell.where == f"node pve2 ({sshd.user}@{sshd.host}:{sshd.port})"
        assert shell.run(["id", "-un"]).text.strip() == sshd.user


# -- the lab's sshd ---------------------------------------------------------------------------


def test_detached_sshd_is_stopped_by_its_pid_file(tmp_path: Path) -> None:
    """A detached sshd keeps running without a handle and stop() ends it through sshd.pid."""
    node = start_sshd(tmp_path, detach=True)
    assert node.process is None and node.pid > 0
    assert (tmp_path / "known_hosts").read_text().startswith(f"[127.0.0.1]:{node.port} ssh-ed25519 ")
    with _shell(node) as shell:
        assert shell.run("echo up").text == "up\n"
    node.stop()
    with pytest.raises(UnreachableError):
        _shell(node).connect()
