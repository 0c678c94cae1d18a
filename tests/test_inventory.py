"""Inventory files: every malformed one fails with file:line, the field, a fix, and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from migrate.errors import ConfigError
from migrate.inventory import load_inventory

BAD = Path(__file__).parent / "data" / "bad_inventories"
EXAMPLE = Path(__file__).parents[1] / "inventories" / "example.yaml"

# file -> (line, $.path, words the message must contain)
CASES = {
    "01_literal_password.yaml": (6, "$.sources.vc.password", "literal secret is not allowed"),
    "02_bad_yaml.yaml": (4, "$", "not valid YAML"),
    "03_unknown_field.yaml": (5, "$.sources.vc.usr", "unknown field"),
    "04_port_range.yaml": (5, "$.sources.vc.port", "less than or equal to 65535 (got 70000)"),
    "05_missing_env.yaml": (6, "$.sources.vc.password", "MIGRATE_TEST_UNSET_VARIABLE is not set"),
    "06_unknown_type.yaml": (2, "$.targets.hv", "unknown type 'hyperv'; use one of: proxmox, xcpng"),
    "07_token_and_password.yaml": (2, "$.targets.pve", "either token_id + token_secret"),
    "08_duplicate_key.yaml": (7, "$.sources.vc", "duplicate key"),
    "09_missing_secret_file.yaml": (6, "$.targets.xcp.password", "cannot read secret file"),
    "10_bad_url_and_verify.yaml": (4, "$.targets.xcp.url", "should match pattern"),
    "11_empty.yaml": (1, "$", "the file is empty"),
    "12_ssh_key_missing.yaml": (8, "$.targets.pve.ssh.key_file", "does not exist"),
}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIGRATE_TEST_PASSWORD", "correct horse battery staple")
    monkeypatch.delenv("MIGRATE_TEST_UNSET_VARIABLE", raising=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_inventory_names_file_line_and_field(name: str) -> None:
    """Each malformed inventory raises ConfigError pointing at the right file, line and field."""
    line, path, words = CASES[name]
    with pytest.raises(ConfigError) as info:
        load_inventory(BAD / name)
    rendered = str(info.value)
    assert f"{BAD / name}:{line} {path}" in rendered, rendered
    assert words in rendered, rendered


def test_all_problems_are_reported_at_once() -> None:
    """A file with two mistakes reports both, not just the first."""
    with pytest.raises(ConfigError) as info:
        load_inventory(BAD / "10_bad_url_and_verify.yaml")
    paths = {p.path for p in info.value.problems}
    assert paths == {"$.targets.xcp.url", "$.targets.xcp.verify_tls"}


def test_literal_secret_never_echoed() -> None:
    """The refused literal password is not repeated in the error message."""
    with pytest.raises(ConfigError) as info:
        load_inventory(BAD / "01_literal_password.yaml")
    assert "hunter2" not in str(info.value)


def test_example_inventory_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The shipped example loads once its references and files exist."""
    text = EXAMPLE.read_text()
    for var in ("VSPHERE_PASSWORD", "XCP_PASSWORD"):
        monkeypatch.setenv(var, "x")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pve-cluster-a.token").write_text("s3cr3t-t0ken-value\n")
    key = tmp_path / "key"
    key.write_text("k")
    ca = tmp_path / "ca.pem"
    ca.write_text("c")
    text = (
        text.replace("~/.ssh/migrate_ed25519", str(key))
        .replace("~/.ssh/known_hosts", str(key))
        .replace("/etc/migrate/vcenter-ca.pem", str(ca))
    )
    copy = tmp_path / "example.yaml"
    copy.write_text(text)
    inv = load_inventory(copy)
    assert set(inv.sources) == {"vcenter-paris"}
    assert set(inv.targets) == {"pve-cluster-a", "xcp-pool-b"}
    assert inv.targets["pve-cluster-a"].ssh.address("pve-a2") == "192.0.2.12"  # type: ignore[union-attr]
    assert "s3cr3t-t0ken-value" not in repr(inv)


@pytest.mark.parametrize(
    "name", ["01_literal_password.yaml", "04_port_range.yaml", "12_ssh_key_missing.yaml"]
)
def test_cli_exits_2_without_contacting_anything(name: str, tmp_path: Path) -> None:
    """`migrate discover` on a bad inventory prints file:line and exits 2 before any connection."""
    env = dict(os.environ, MIGRATE_TEST_PASSWORD="x", MIGRATE_STATE_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "migrate", "discover", "-i", str(BAD / name)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    line, path, _ = CASES[name]
    assert f"{name}:{line} {path}" in proc.stderr
    assert "Traceback" not in proc.stderr
