"""ProxmoxTarget against the lab cluster: the snapshot is the seed, faults arrive as migrate's errors."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import fixtures_pve
from migrate import model
from migrate.connectors.nodeshell import NodeShell
from migrate.connectors.proxmox import ProxmoxTarget
from migrate.errors import (
    AuthError,
    NotFoundError,
    PermanentError,
    TlsError,
    TransientError,
    UnreachableError,
)
from migrate.inventory import ProxmoxSpec
from migrate.lab.certs import CertPaths
from migrate.lab.pve import PveSeed, RunningPve, default_seed, start_pve
from migrate.lab.sshd import start_sshd

MiB = 1024 * 1024


certs = fixtures_pve.certs
cluster = fixtures_pve.cluster


@pytest.fixture
def fresh(tmp_path: Path, certs: CertPaths) -> Iterator[RunningPve]:
    """A cluster of its own, for tests that change it or inject faults."""
    running = start_pve(tmp_path / "lab", certs)
    yield running
    running.stop()


def _spec(cluster: RunningPve, tmp: Path, **overrides: Any) -> ProxmoxSpec:
    key = tmp / "id_dummy"
    key.write_text("not used by these tests\n")
    entry = cluster.inventory_entry({"key_file": str(key)})
    entry.update(overrides)
    return ProxmoxSpec.model_validate({k: v for k, v in entry.items() if v is not None})


def _target(cluster: RunningPve, tmp: Path, **overrides: Any) -> ProxmoxTarget:
    return ProxmoxTarget("lab", _spec(cluster, tmp, **overrides))


def _expected(seed: PveSeed, endpoint: str) -> model.TargetSnapshot:
    """The snapshot the seed describes, built from the seed alone."""
    every = seed.node_names()
    storages = []
    for st in seed.storages:
        seen = st.nodes or every
        for nodes in [seen] if st.shared else [(n,) for n in seen]:
            storages.append(model.Storage(st.name, st.type, st.total_bytes, st.free_bytes, st.shared,
                                          tuple(sorted(st.content)), tuple(sorted(nodes))))
    bridges = [model.TargetNetwork(b.name, "bridge", tuple(sorted(b.nodes or every)), vlan_aware=b.vlan_aware)
               for b in seed.bridges]
    zones = {z.name: z for z in seed.zones}
    vnets = [model.TargetNetwork(v.name, "vnet", tuple(sorted(zones[v.zone].nodes or every)), vlan=v.tag)
             for v in seed.vnets]
    return model.TargetSnapshot(
        name="lab", kind="proxmox", endpoint=endpoint, version=seed.version,
        nodes=tuple(model.TargetNode(n.name, n.cpus, n.memory_bytes, n.memory_used_bytes)
                    for n in seed.nodes),
        storages=tuple(sorted(storages, key=lambda s: (s.name, s.nodes))),
        networks=tuple(sorted(bridges, key=lambda n: n.name)) + tuple(sorted(vnets, key=lambda n: n.name)),
        vms=tuple(model.ExistingVm(v.name, v.vmid, v.node,
                                   tags=tuple(sorted(dict(v.config)["tags"].split(";")))) for v in seed.vms),
        next_vmid=max(v.vmid for v in seed.vms) + 1,
    )  # fmt: skip


# -- reading ----------------------------------------------------------------------------------


def test_snapshot_is_exactly_the_seed(cluster: RunningPve, tmp_path: Path) -> None:
    """Nodes, storages per node and shared, bridges, vnet, existing VM and next VMID match the seed."""
    snapshot = _target(cluster, tmp_path).snapshot()
    assert snapshot == _expected(default_seed(), cluster.url)
    # Spot checks against the literal seed, in case the expectation builder shares a blind spot.
    assert [s.nodes for s in snapshot.storages if s.name == "local"] == [("pve1",), ("pve2",), ("pve3",)]
    assert next(s for s in snapshot.storages if s.name == "ceph-vm").nodes == ("pve1", "pve2")
    assert snapshot.vms == (model.ExistingVm("legacy-app01", 100, "pve1", tags=("legacy", "prod")),)
    assert snapshot.next_vmid == 101


def test_snapshot_is_deterministic_few_round_trips_and_json_safe(cluster: RunningPve, tmp_path: Path) -> None:
    """Two snapshots are equal, survive a JSON round trip, and cost 4 calls plus one per online node."""
    target = _target(cluster, tmp_path)
    cluster.control("requests", clear=True)
    first = target.snapshot()
    calls = cluster.control("requests", clear=True)
    assert sorted(path.removeprefix("/api2/json/") for _method, path in calls) == [
        "cluster/nextid", "cluster/resources", "cluster/sdn/vnets",
        "nodes/pve1/network", "nodes/pve2/network", "nodes/pve3/network", "version"]
    assert target.snapshot() == first
    assert model.target_from_dict(model.target_to_dict(first)) == first


def test_offline_node_is_reported_and_not_asked(fresh: RunningPve, tmp_path: Path) -> None:
    """An offline node shows online=False, its local storages inactive, and no bridges are read from it."""
    fresh.control("node_offline", node="pve3")
    snapshot = _target(fresh, tmp_path).snapshot()
    assert [(n.name, n.online) for n in snapshot.nodes] == [("pve1", True), ("pve2", True), ("pve3", False)]
    local3 = next(s for s in snapshot.storages if s.name == "local" and s.nodes == ("pve3",))
    assert (local3.active, local3.free_bytes) == (False, 0)
    assert next(n for n in snapshot.networks if n.name == "vmbr0").nodes == ("pve1", "pve2")


def test_find_vms_by_vmid_name_and_tag(cluster: RunningPve, tmp_path: Path) -> None:
    """find_vms filters on every criterion given; a miss is an empty tuple."""
    target = _target(cluster, tmp_path)
    legacy = model.ExistingVm("legacy-app01", 100, "pve1", tags=("legacy", "prod"))
    assert target.find_vms(vmid=100) == (legacy,)
    assert target.find_vms(name="legacy-app01", tag="PROD") == (legacy,)
    assert target.find_vms(tag="wave1") == ()
    assert target.vmid_free(100) is False and target.vmid_free(4242) is True


def test_import_location_names_volume_and_node_path(cluster: RunningPve, tmp_path: Path) -> None:
    """A directory storage with 'import' content gives the volid and path; LVM-thin is refused with a fix."""
    target = _target(cluster, tmp_path)
    assert target.import_location("local", "web-disk0.raw") == (
        "local:import/web-disk0.raw", f"{cluster.node_root}/var/lib/vz/import/web-disk0.raw")
    with pytest.raises(PermanentError, match="cannot hold disk images to import") as info:
        target.import_location("local-lvm", "x.raw")
    assert info.value.hint and "pvesm set local-lvm" in info.value.hint


# -- logins, TLS, reachability ----------------------------------------------------------------


def test_password_login_works_and_bad_password_is_auth_error(cluster: RunningPve, tmp_path: Path) -> None:
    """user + password logs in; a wrong password is an AuthError that never shows the password."""
    good = tmp_path / "good.pass"
    good.write_text(cluster.password_file.read_text())
    bad = tmp_path / "bad.pass"
    bad.write_text("wrong-password\n")
    login = {"token_id": None, "token_secret": None, "user": "migrate@pve"}
    assert _target(cluster, tmp_path, **login, password=f"file:{good}").version() == "9.0.10"
    with pytest.raises(AuthError, match="refused the login migrate@pve") as info:
        _target(cluster, tmp_path, **login, password=f"file:{bad}").version()
    assert "wrong-password" not in str(info.value)


def test_bad_token_is_auth_error_naming_the_token(cluster: RunningPve, tmp_path: Path) -> None:
    """A wrong token secret gives AuthError with the token id and a fix, not the secret."""
    secret = tmp_path / "token"
    secret.write_text("00000000-0000-0000-0000-000000000000\n")
    with pytest.raises(AuthError) as info:
        _target(cluster, tmp_path, token_secret=f"file:{secret}").snapshot()
    assert "migrate@pve!lab" in str(info.value) and "00000000-0000" not in str(info.value)
    assert info.value.hint and "token_secret" in info.value.hint


def test_tls_is_verified_without_the_lab_ca_it_fails(cluster: RunningPve, tmp_path: Path) -> None:
    """Without ca_file the system store cannot verify the lab certificate: TlsError with a fix."""
    with pytest.raises(TlsError, match="TLS verification of Proxmox VE lab") as info:
        _target(cluster, tmp_path, ca_file=None).version()
    assert info.value.hint and "ca_file" in info.value.hint


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_tls_false_works_and_logs_a_warning(cluster: RunningPve, tmp_path: Path) -> None:
    """Opting out of verification is explicit and leaves a tls_verification_disabled warning event."""
    with capture_logs() as logs:
        assert _target(cluster, tmp_path, ca_file=None, verify_tls=False).version() == "9.0.10"
    assert [e["log_level"] for e in logs if e["event"] == "tls_verification_disabled"] == ["warning"]


def test_connection_refused_is_unreachable(cluster: RunningPve, tmp_path: Path) -> None:
    """Nothing listening on the port: UnreachableError naming host and port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(UnreachableError, match=f"127.0.0.1:{port}"):
            _target(cluster, tmp_path, port=port).version()


# -- faults -----------------------------------------------------------------------------------


def test_http_faults_are_classified(fresh: RunningPve, tmp_path: Path) -> None:
    """No quorum (500) and 503 are transient, 403 permanent with a hint, a dropped connection transient."""
    target = _target(fresh, tmp_path)
    fresh.control("fail", method="GET", suffix="/cluster/nextid", status=500,
                  message="cluster not ready - no quorum?", times=1)
    with pytest.raises(TransientError, match="no quorum"):
        target.next_vmid()
    assert target.next_vmid() == 101  # the fault was for one request only
    fresh.control("fail", method="GET", suffix="/version", status=503, message="Service Unavailable", times=1)
    with pytest.raises(TransientError, match="503"):
        target.version()
    fresh.control("fail", method="GET", suffix="/version", status=403,
                  message="Permission check failed (/, Sys.Audit)", times=1)
    with pytest.raises(PermanentError, match=r"Sys\.Audit") as info:
        target.version()
    assert not isinstance(info.value, TransientError) and info.value.hint
    fresh.control("flaky_network", drop_rate=1.0, seed=1)
    try:
        with pytest.raises(TransientError, match="broke"):
            _target(fresh, tmp_path).version()
    finally:
        fresh.control("flaky_network", drop_rate=0.0)
    assert target.version() == "9.0.10"


def test_missing_vm_is_not_found(cluster: RunningPve, tmp_path: Path) -> None:
    """Reading a VM that does not exist is NotFoundError (permanent), not something to retry."""
    with pytest.raises(NotFoundError, match="does not exist"):
        _target(cluster, tmp_path).vm_config("pve1", 4242)


# -- writing ----------------------------------------------------------------------------------


def test_vm_lifecycle_with_disk_import(fresh: RunningPve, tmp_path: Path) -> None:
    """Land a sparse disk over SSH, create with import-from, attach a second disk, start, stop, destroy."""
    sshd = start_sshd(tmp_path / "sshd")
    try:
        spec = ProxmoxSpec.model_validate(fresh.inventory_entry(sshd))
        target = ProxmoxTarget("lab", spec)
        volid, path = target.import_location("local", "web01-disk0.raw")
        content = os.urandom(MiB) + bytes(2 * MiB)
        with NodeShell.for_node(spec.ssh, "pve2") as shell:
            shell.write_ranges(path, [(0, content[:MiB])], size=len(content))
            _check_lifecycle(fresh, target, shell, volid, content)
    finally:
        sshd.stop()


def _check_lifecycle(fresh: RunningPve, target: ProxmoxTarget, shell: NodeShell, volid: str,
                     content: bytes) -> None:
    vmid = target.next_vmid()
    target.create_vm("pve2", vmid, {
        "name": "web01", "memory": 2048, "cores": 2, "scsihw": "virtio-scsi-single", "ostype": "l26",
        "scsi0": f"local-lvm:0,import-from={volid},discard=on", "net0": "virtio,bridge=vmbr1,tag=20",
        "tags": "migrate;wave1", "agent": True,
    })  # fmt: skip
    config = target.vm_config("pve2", vmid)
    assert config["scsi0"] == f"local-lvm:vm-{vmid}-disk-0,discard=on,size=3M"
    assert (config["agent"], config["tags"], config["boot"]) == ("1", "migrate;wave1", "order=scsi0;net0")
    volume = fresh.node_root / f"dev/pve/vm-{vmid}-disk-0"
    assert shell.sha256(str(volume)) == hashlib.sha256(content).hexdigest()
    second = target.attach_disk("pve2", vmid, "scsi1", "nfs-shared", volid, options={"ssd": True})
    assert second == f"nfs-shared:{vmid}/vm-{vmid}-disk-0.raw,size=3M,ssd=1"
    migrated = model.ExistingVm("web01", vmid, "pve2", tags=("migrate", "wave1"))
    assert target.find_vms(tag="wave1") == (migrated,)
    target.start_vm("pve2", vmid)
    assert target.vm_status("pve2", vmid) == "running"
    target.stop_vm("pve2", vmid)
    assert target.vm_status("pve2", vmid) == "stopped"
    assert target.destroy_vm("pve2", vmid) is not None
    assert target.find_vms(vmid=vmid) == () and not volume.exists()
    assert target.destroy_vm("pve2", vmid) is None  # already gone: nothing to do
    assert fresh.state()["storages"]["local-lvm"]["volumes"].keys() == {"vm-100-disk-0"}


def test_creating_over_an_existing_vmid_is_permanent(cluster: RunningPve, tmp_path: Path) -> None:
    """VMID 100 is taken: PermanentError saying so, never overwritten."""
    with pytest.raises(PermanentError, match="already exists") as info:
        _target(cluster, tmp_path).create_vm("pve1", 100, {"name": "intruder", "memory": 512})
    assert not isinstance(info.value, TransientError)
    assert cluster.state()["vms"][0]["name"] == "legacy-app01"


def test_lock_timeout_in_a_task_is_transient(fresh: RunningPve, tmp_path: Path) -> None:
    """A config change while another task holds the VM lock fails its task with a lock timeout: transient."""
    target = _target(fresh, tmp_path)
    fresh.control("hold_config_lock", vmid=100)
    with pytest.raises(TransientError, match="got timeout") as info:
        target.set_config("pve1", 100, {"description": "migrated"})
    assert "task log" in str(info.value) and info.value.vm == "100"
    fresh.control("release_config_lock", vmid=100)
    target.set_config("pve1", 100, {"description": "migrated"})
    assert target.vm_config("pve1", 100)["description"] == "migrated"


def test_failed_start_is_permanent_with_the_task_log(fresh: RunningPve, tmp_path: Path) -> None:
    """A start task ending in TASK ERROR is a PermanentError quoting the task's exit status."""
    target = _target(fresh, tmp_path)
    target.stop_vm("pve1", 100)
    fresh.control("vm_set", vmid=100, start_error="volume 'local-lvm:vm-100-disk-0' has no storage")
    with pytest.raises(PermanentError, match="has no storage") as info:
        target.start_vm("pve1", 100)
    assert not isinstance(info.value, TransientError)
    assert "TASK ERROR" in str(info.value)


def test_task_wait_rides_out_a_failed_poll(fresh: RunningPve, tmp_path: Path) -> None:
    """A slow task whose status poll fails once with 503 is still awaited to its OK end."""
    target = _target(fresh, tmp_path)
    target.stop_vm("pve1", 100)
    fresh.control("set", time_scale=0.01)
    fresh.control("vm_set", vmid=100, start_secs=40)  # 0.4 s of real time
    fresh.control("fail", method="GET", suffix="/status", status=503, message="Service Unavailable", times=1)
    target.start_vm("pve1", 100)
    assert target.vm_status("pve1", 100) == "running"
    polls = [p for _m, p in fresh.control("requests") if p.endswith("/status") and "/tasks/" in p]
    assert len(polls) >= 3  # it waited, with at least one poll after the failed one
