"""``python -m migrate.lab.xapi_fake --state DIR [--port N]``: the XAPI fake as a lab process.

Prints one JSON line, ``{"url": ..., "port": ..., "pid": ...}``, once it listens, then nothing
more (a detached parent may be gone). The password, the control secret and the lab CA live
in the state directory unless given; SIGTERM stops it and saves the pool to ``db.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from migrate import log
from migrate.errors import LabError
from migrate.lab.certs import CertPaths, make_certs
from migrate.lab.xapi_fake.server import XapiFake


def _secret_file(path: Path) -> str:
    if not path.exists():
        path.write_text(secrets.token_urlsafe(18) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m migrate.lab.xapi_fake", description=__doc__)
    parser.add_argument("--state", required=True, type=Path, help="directory for VDIs, secrets and db.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--plain", action="store_true", help="HTTP instead of HTTPS")
    parser.add_argument(
        "--certs", type=Path, help="directory with ca.pem, server.pem, server.key (made if missing)"
    )
    parser.add_argument("--user", default="root")
    parser.add_argument("--password-file", type=Path, help="first line is the password (made if missing)")
    parser.add_argument("--control-secret-file", type=Path, help="secret for POST /_lab/* (made if missing)")
    parser.add_argument("--seed", type=Path, help="a JSON seed instead of the built-in lab pool")
    parser.add_argument(
        "--datamodel", type=Path, help="xenapi.json (default: $MIGRATE_XAPI_DATAMODEL or ../shared)"
    )
    args = parser.parse_args(argv)
    # stdout carries exactly one line, the JSON the launcher reads; logs go to stderr.
    log.configure(None, console=True, level="info")

    state: Path = args.state
    state.mkdir(parents=True, exist_ok=True)
    certs: CertPaths | None = None if args.plain else make_certs(args.certs or state / "certs")
    password = _secret_file(args.password_file or state / "root.password")
    secret = _secret_file(args.control_secret_file or state / "control.secret")
    seed_data = json.loads(args.seed.read_text()) if args.seed else None
    try:
        fake = XapiFake(
            state,
            tls=certs is not None,
            certs=certs,
            user=args.user,
            password=password,
            seed_data=seed_data,
            datamodel_path=args.datamodel,
            host=args.host,
            port=args.port,
            control_secret=secret,
        ).start()
    except LabError as exc:
        sys.exit(f"xapi fake: {exc}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(json.dumps({"url": fake.url, "port": fake.port, "pid": os.getpid()}), flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    stop.wait()
    fake.stop()


if __name__ == "__main__":
    main()
