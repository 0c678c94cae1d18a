"""Start OpenSSH's sshd on 127.0.0.1 as the Proxmox node's shell, with keys made for the occasion.

The daemon runs as the current user with a config of its own in a work directory: its host key,
one client key pair allowed to log in, a known_hosts file for the client, its pid and log. Nothing
outside the work directory is touched, except that sshd run as root insists on its privilege
separation directory (/run/sshd), which Debian's service unit normally creates; we create it too.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from migrate.errors import LabError
from migrate.lab.process import end_process, stop_pid_file

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 15.0
_BIND_TRIES = 5


@dataclass
class RunningSshd:
    """A started sshd; ``stop()`` ends it (detached ones too, by the pid recorded in ``pid_file``)."""

    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    pid_file: Path
    log_file: Path
    key_passphrase: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return int(self.pid_file.read_text().strip())

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process)
            return
        stop_pid_file(self.pid_file)


def _keygen(path: Path, comment: str, passphrase: str = "") -> None:
    if path.exists():
        return
    proc = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(path)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise LabError(f"ssh-keygen failed for {path}: {proc.stderr.strip()}",
                       hint="apt-get install openssh-client")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _config(workdir: Path, host: str, port: int, user: str) -> str:
    sftp = str(SFTP_SERVER) if SFTP_SERVER.exists() else "internal-sftp"
    return "\n".join([
        f"Port {port}",
        f"ListenAddress {host}",
        f"HostKey {workdir / 'ssh_host_ed25519_key'}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
        f"AllowUsers {user}",
        # A work directory under /tmp fails sshd's ownership checks for non-root users.
        "StrictModes no",
        # PAM needs root and a service file; keys are all the lab uses.
        "UsePAM no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "AuthenticationMethods publickey",
        "PrintMotd no",
        "UseDNS no",
        "MaxStartups 64:30:128",
        "MaxSessions 64",
        "LogLevel VERBOSE",
        f"Subsystem sftp {sftp}",
        "",
    ])  # fmt: skip


def _wait_listening(proc: subprocess.Popen[bytes], host: str, port: int, log_file: Path) -> bool:
    """True once the port accepts; False if sshd exited first (the caller reads why from its log)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    end_process(proc)
    raise LabError(f"sshd did not listen on {host}:{port} within {START_TIMEOUT:.0f}s; see {log_file}")


def start_sshd(
    workdir: Path,
    *,
    detach: bool = False,
    host: str = "127.0.0.1",
    key_passphrase: str | None = None,
) -> RunningSshd:
    """Start sshd on ``host`` and a free port; keys and files live in ``workdir`` (reused if present).

    ``key_passphrase`` encrypts the client key (to exercise passphrase handling). ``detach`` lets
    the daemon outlive this process; ``stop()`` then works from the pid file.
    """
    if not SSHD.exists():
        raise LabError(f"{SSHD} not found", hint="apt-get install openssh-server")
    workdir.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    _keygen(workdir / "ssh_host_ed25519_key", "migrate-lab-node")
    key_file = workdir / "id_ed25519"
    _keygen(key_file, f"migrate-lab-client@{user}", key_passphrase or "")
    shutil.copyfile(key_file.with_suffix(".pub"), workdir / "authorized_keys")
    (workdir / "authorized_keys").chmod(0o600)
    log_file = workdir / "sshd.log"
    pid_file = workdir / "sshd.pid"
    config = workdir / "sshd_config"
    last_log = ""
    for _ in range(_BIND_TRIES):
        # The port is free now; if another process takes it before sshd binds, try another one.
        port = _free_port(host)
        config.write_text(_config(workdir, host, port, user))
        log_file.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-f", str(config), "-E", str(log_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=detach,
        )  # fmt: skip
        if _wait_listening(proc, host, port, log_file):
            break
        last_log = log_file.read_text(errors="replace").strip() if log_file.exists() else ""
        if "Address already in use" not in last_log:
            raise LabError(f"sshd exited with code {proc.returncode} before listening:\n{last_log}")
    else:
        raise LabError(f"sshd found no free port after {_BIND_TRIES} tries:\n{last_log}")
    host_pub = (workdir / "ssh_host_ed25519_key.pub").read_text().split()
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[{host}]:{port} {host_pub[0]} {host_pub[1]}\n")
    pid_file.write_text(f"{proc.pid}\n")  # sshd writes it too; ours is there before anyone reads it
    return RunningSshd(
        host=host, port=port, user=user, key_file=key_file, known_hosts=known_hosts,
        pid_file=pid_file, log_file=log_file, key_passphrase=key_passphrase,
        process=None if detach else proc,
    )  # fmt: skip
