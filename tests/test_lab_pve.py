"""The lab's Proxmox VE: fakepve in a child process, seeded like a small cluster, TLS with the lab CA."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

import fixtures_pve
from migrate.errors import LabError
from migrate.lab.certs import CertPaths
from migrate.lab.pve import MIGRATE_PRIVILEGES, RunningPve, start_pve

MiB = 1024 * 1024


certs = fixtures_pve.certs
cluster = fixtures_pve.cluster


def _api(cluster: RunningPve, method: str, path: str, **params: Any) -> requests.Response:
    token = f"PVEAPIToken={cluster.token_id}={cluster.token_secret_file.read_text().strip()}"
    where = {"params": params} if method == "GET" else {"data": params}
    return requests.request(method, f"{cluster.url}/api2/json/{path}", headers={"Authorization": token},
                            verify=str(cluster.ca_file), timeout=30, **where)  # type: ignore[arg-type]


def _get(cluster: RunningPve, path: str, **params: Any) -> Any:
    resp = _api(cluster, "GET", path, **params)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def test_cluster_answers_over_tls_verified_by_the_lab_ca(cluster: RunningPve) -> None:
    """The API answers on 127.0.0.1 with the lab certificate; the token secret file is private."""
    assert cluster.url == f"https://127.0.0.1:{cluster.port}"
    assert _get(cluster, "version")["version"] == "9.0.10"
    assert cluster.token_id == "migrate@pve!lab"
    assert cluster.token_secret_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{cluster.url}/api2/json/version", timeout=10)  # system CAs do not know the lab CA


def test_directory_storages_live_under_the_lab_node_root(cluster: RunningPve) -> None:
    """Dir and NFS storage paths point into <workdir>/node, where the sshd 'node' can write."""
    local = _get(cluster, "storage/local")
    nfs = _get(cluster, "storage/nfs-shared")
    assert local["path"] == str(cluster.node_root / "var/lib/vz")
    assert nfs["path"] == str(cluster.node_root / "mnt/pve/nfs-shared")
    assert (Path(local["path"]) / "import").is_dir() and (Path(nfs["path"]) / "images").is_dir()
    assert set(local["content"].split(",")) >= {"images", "import", "iso"}


def test_network_lists_the_seeded_bridges_and_vnets_per_node(cluster: RunningPve) -> None:
    """Each node lists its own bridges (vmbr2 only on pve1), vnets with any_bridge, its own address."""
    pve1 = _get(cluster, "nodes/pve1/network", type="any_bridge")
    pve3 = _get(cluster, "nodes/pve3/network", type="any_bridge")
    assert [(i["iface"], i["type"]) for i in pve1] == [
        ("vmbr0", "bridge"), ("vmbr1", "bridge"), ("vmbr2", "bridge"), ("vnet100", "vnet")]
    assert [i["iface"] for i in pve3] == ["vmbr0", "vmbr1", "vnet100"]
    assert [i.get("bridge_vlan_aware", 0) for i in pve3[:2]] == [0, 1]
    assert _get(cluster, "nodes/pve2/network", type="bridge")[0]["address"] == "192.0.2.12"
    assert _get(cluster, "cluster/sdn/vnets")[0] | {"digest": ""} == {
        "vnet": "vnet100", "type": "vnet", "zone": "lab", "tag": 100, "alias": "app", "digest": ""}


def test_migrate_token_holds_exactly_the_documented_privileges(cluster: RunningPve) -> None:
    """The lab grants migrate@pve the role the documentation recommends, nothing more."""
    held = _get(cluster, "access/permissions")
    assert list(held) == ["/"]
    assert sorted(held["/"]) == sorted(MIGRATE_PRIVILEGES)


def test_control_endpoint_refuses_without_its_secret(cluster: RunningPve) -> None:
    """/_lab/* answers only with the control secret; with it, state shows the seeded VM."""
    for header in ({}, {"X-Lab-Control": "guess"}):
        resp = requests.post(f"{cluster.url}/_lab/state", json={}, headers=header,
                             verify=str(cluster.ca_file), timeout=10)
        assert resp.status_code == 401
    vms = cluster.state()["vms"]
    assert [(v["vmid"], v["name"], v["node"], v["status"]) for v in vms] == [
        (100, "legacy-app01", "pve1", "running")]
    with pytest.raises(LabError, match="no control action"):
        cluster.control("explode")


def test_import_from_converts_the_landed_image_into_the_volume(cluster: RunningPve, tmp_path: Path) -> None:
    """A qcow2 landed in local:import becomes a raw volume holding exactly the guest's bytes."""
    raw = tmp_path / "disk.raw"
    content = os.urandom(MiB) + bytes(3 * MiB) + os.urandom(MiB)
    raw.write_bytes(content)
    landed = cluster.node_root / "var/lib/vz/import/import-test.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(landed)], check=True)
    vmid = int(_get(cluster, "cluster/nextid"))
    resp = _api(cluster, "POST", "nodes/pve2/qemu", vmid=vmid, name="import-test", memory=512,
                scsi0="local-lvm:0,import-from=local:import/import-test.qcow2,discard=on")
    assert resp.status_code == 200, resp.text
    config = _get(cluster, f"nodes/pve2/qemu/{vmid}/config")
    assert config["scsi0"] == f"local-lvm:vm-{vmid}-disk-0,discard=on,size=5M"
    volume = cluster.node_root / f"dev/pve/vm-{vmid}-disk-0"
    assert hashlib.sha256(volume.read_bytes()).hexdigest() == hashlib.sha256(content).hexdigest()
    missing = _api(cluster, "POST", "nodes/pve2/qemu", vmid=vmid + 1, name="no-source",
                   scsi0="local-lvm:0,import-from=local:import/absent.raw")
    assert missing.status_code == 500 and "does not exist" in missing.json()["message"]
    absolute = _api(cluster, "POST", "nodes/pve2/qemu", vmid=vmid + 1, name="abs-path",
                    scsi0=f"local-lvm:0,import-from={landed}")
    assert absolute.status_code == 403  # only root@pam may import from a bare path, as on PVE


def test_detached_cluster_outlives_its_handle_and_stops_by_pid(tmp_path: Path, certs: CertPaths) -> None:
    """A detached fake runs in its own session; stop() ends it through the recorded pid."""
    running = start_pve(tmp_path, certs, detach=True)
    try:
        assert running.process is None
        assert int((tmp_path / "pve" / "pve.pid").read_text()) == running.pid
        assert os.getsid(running.pid) == running.pid
        assert _get(running, "cluster/nextid") == "101"
    finally:
        running.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(running.pid):
        time.sleep(0.05)
    assert not _alive(running.pid)


def test_a_child_that_cannot_start_is_a_lab_error_with_its_log(tmp_path: Path, certs: CertPaths) -> None:
    """A certificate that is not there makes the child exit; the LabError quotes why."""
    broken = CertPaths(ca=certs.ca, cert=tmp_path / "missing.pem", key=certs.key)
    with pytest.raises(LabError, match="exited with code 1 before listening") as info:
        start_pve(tmp_path, broken)
    assert "missing.pem" in str(info.value) or "No such file" in str(info.value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_only_the_lab_child_imports_fakepve() -> None:
    """fakepve (AGPL) is loaded by the child alone: migrate's connector and the launcher never import it."""
    code = ("import sys, migrate.connectors.proxmox, migrate.lab.pve; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fakepve', 'aiohttp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
