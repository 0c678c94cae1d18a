"""The XCP-ng connector against the XAPI fake: discovery, the Target protocol, faults at the border."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from migrate.connectors.base import DiskSpec, Intent, NicSpec, Target, VmSpec
from migrate.connectors.xcpng import XcpngTarget
from migrate.errors import AuthError, PermanentError, TlsError, TransientError, UnreachableError
from migrate.inventory import XcpngSpec
from migrate.lab.xapi_fake import SEED, XapiFake
from migrate.model import (
    ExistingVm,
    Storage,
    TargetNetwork,
    TargetNode,
    TargetSnapshot,
    TargetTemplate,
    target_to_dict,
)
from migrate.secrets import Secret

MiB = 1024**2
GiB = 1024**3
SNAPSHOT_CALLS = [
    f"{cls}.get_all_records" for cls in ("pool", "host", "host_metrics", "SR", "PBD", "network", "PIF", "VM")
]


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[XapiFake]:
    with XapiFake(tmp_path / "xapi") as running:
        yield running


def _spec(fake: XapiFake, **changes: Any) -> XcpngSpec:
    values: dict[str, Any] = {
        "type": "xcpng",
        "url": fake.url,
        "user": "root",
        "ca_file": fake.ca_file,
        "password": Secret(fake.password, "env:XCPNG_PASSWORD"),
    }
    values.update(changes)
    return XcpngSpec(**values)


@pytest.fixture
def target(fake: XapiFake) -> Iterator[XcpngTarget]:
    with XcpngTarget("lab-xcp", _spec(fake)) as connected:
        yield connected


def _uuid(fake: XapiFake, cls: str, name: str) -> str:
    (record,) = fake.find(cls, name_label=name).values()
    return str(record["uuid"])


def _expected(fake: XapiFake) -> TargetSnapshot:
    """The seed's pool as the planner should see it, computed from SEED, not by the connector's code."""
    nodes = tuple(
        TargetNode(h["name_label"], h["cpus"], h["memory_total"], h["memory_total"] - h["memory_free"])
        for h in SEED["hosts"]
    )
    storages = tuple(
        Storage(
            s["name_label"],
            s["type"],
            s["physical_size"],
            s["physical_size"] - s["physical_utilisation"],
            shared=s.get("shared", False),
            nodes=() if s.get("shared") else (s["host"],),
            uuid=_uuid(fake, "SR", s["name_label"]),
        )
        for s in SEED["srs"]
        if s["content_type"] != "iso"
    )
    networks = tuple(
        TargetNetwork(
            n["name_label"], "xapi", vlan=n.get("vlan"), uuid=_uuid(fake, "network", n["name_label"])
        )
        for n in SEED["networks"]
        if not n.get("internal")
    )
    vms = tuple(
        ExistingVm(
            v["name_label"],
            node=v["host"] if v["power_state"] == "Running" else "",
            uuid=_uuid(fake, "VM", v["name_label"]),
            tags=tuple(sorted(v["tags"])),
        )
        for v in SEED["vms"]
    )
    templates = tuple(
        TargetTemplate(t["name_label"], _uuid(fake, "VM", t["name_label"])) for t in SEED["templates"]
    )
    sw = SEED["software_version"]
    major, minor = SEED["api_version"]
    return TargetSnapshot(
        name="lab-xcp",
        kind="xcpng",
        endpoint=fake.url,
        version=sw["product_version"],
        nodes=tuple(sorted(nodes, key=lambda n: n.name)),
        storages=tuple(sorted(storages, key=lambda s: s.name)),
        networks=tuple(sorted(networks, key=lambda n: n.name)),
        vms=tuple(sorted(vms, key=lambda v: v.name)),
        templates=tuple(sorted(templates, key=lambda t: t.name)),
        pool=SEED["pool"]["name_label"],
        extra=(
            ("api_version", f"{major}.{minor}"),
            ("default_sr", SEED["pool"]["default_SR"]),
            ("master", SEED["pool"]["master"]),
            ("pool_uuid", _uuid(fake, "pool", "lab-pool")),
            ("product_brand", sw["product_brand"]),
            ("xapi", sw["xapi"]),
        ),
    )


# -- discovery --------------------------------------------------------------------------------


def test_snapshot_matches_the_seed_in_one_call_per_class(fake: XapiFake, target: XcpngTarget) -> None:
    """snapshot() is exactly the seeded pool (sorted, ISO/tools SRs and the internal network left out),
    read with one get_all_records per class."""
    before = len(fake.calls)
    snapshot = target.snapshot()
    assert fake.calls[before:] == SNAPSHOT_CALLS
    assert snapshot == _expected(fake)
    again = target.snapshot()
    assert json.dumps(target_to_dict(again)) == json.dumps(target_to_dict(snapshot))


def test_connector_is_a_target(target: XcpngTarget) -> None:
    """XcpngTarget satisfies the executor's Target protocol."""
    assert isinstance(target, Target) and target.kind == "xcpng"


def test_logout_always_happens(fake: XapiFake) -> None:
    """Leaving the context logs out even when the body raised."""
    with pytest.raises(RuntimeError), XcpngTarget("lab-xcp", _spec(fake)):
        raise RuntimeError("boom")
    assert fake.calls[-1] == "session.logout"
    assert fake.objects("session") == {}


# -- faults at the border ---------------------------------------------------------------------


def test_bad_password_is_auth_error(fake: XapiFake) -> None:
    """Refused credentials are AuthError naming the target, with a fix, and without the password."""
    spec = _spec(fake, password=Secret("not-the-password", "env:XCPNG_PASSWORD"))
    with pytest.raises(AuthError) as caught, XcpngTarget("lab-xcp", spec):
        pass
    text = str(caught.value)
    assert "lab-xcp" in text and "targets.lab-xcp.user" in text and "not-the-password" not in text


def test_tls_is_verified_against_the_ca_file(fake: XapiFake) -> None:
    """Without the lab CA the certificate is refused (TlsError); verify_tls: false works, with a warning."""
    with (
        pytest.raises(TlsError, match="certificate not trusted"),
        XcpngTarget("lab-xcp", _spec(fake, ca_file=None)),
    ):
        pass
    with capture_logs() as logs, XcpngTarget("lab-xcp", _spec(fake, ca_file=None, verify_tls=False)) as t:
        assert t.snapshot().pool == "lab-pool"
    assert any(e["event"] == "tls_verification_disabled" and e["log_level"] == "warning" for e in logs)


def test_closed_port_is_unreachable(fake: XapiFake) -> None:
    """Nothing listening: UnreachableError."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UnreachableError, match="connection refused"):
        XcpngTarget("lab-xcp", _spec(fake, url=f"https://127.0.0.1:{port}/")).__enter__()


def test_session_invalid_relogs_in_once(fake: XapiFake, target: XcpngTarget) -> None:
    """One SESSION_INVALID: logged in again and the call repeated; twice in a row: TransientError."""
    fake.faults.arm(session_invalid=1)
    with capture_logs() as logs:
        assert target.snapshot().pool == "lab-pool"
    assert [e["event"] for e in logs].count("xcpng_session_renewed") == 1
    fake.faults.arm(session_invalid=2)
    with pytest.raises(TransientError, match="SESSION_INVALID"):
        target.snapshot()


def test_sr_full_is_permanent(fake: XapiFake, target: XcpngTarget) -> None:
    """SR_FULL is not retried: PermanentError with what to do."""
    fake.faults.arm(sr_full=1)
    vm, disk = _vm_spec(8 * MiB)
    with pytest.raises(PermanentError) as caught:
        target.prepare_disk(vm, disk, _intent(vm))
    assert not isinstance(caught.value, TransientError)
    assert "SR_FULL" in str(caught.value) and "another SR" in str(caught.value)


# -- the Target protocol ----------------------------------------------------------------------


def _vm_spec(size: int, *, landing: str = "raw") -> tuple[VmSpec, DiskSpec]:
    disk = DiskSpec(
        key="2000",
        label="Hard disk 1",
        size_bytes=size,
        source_path="[ds1] app01/app01.vmdk",
        storage="nfs-sr",
        slot="0",
        boot=True,
        landing_format=landing,
        name="app01 disk 0",
    )
    memory = str(2 * GiB)
    settings = (
        ("template", "Debian Bookworm 12"),
        ("name_label", "app01"),
        ("name_description", "from vc1"),
        ("vcpus_max", "4"),
        ("vcpus_at_startup", "4"),
        ("memory_static_min", memory),
        ("memory_static_max", memory),
        ("memory_dynamic_min", memory),
        ("memory_dynamic_max", memory),
        ("hvm_boot_policy", "BIOS order"),
        ("hvm_boot_params:order", "cn"),
        ("hvm_boot_params:firmware", "bios"),
        ("platform:cores-per-socket", "2"),
    )
    vm = VmSpec(
        key="vm-42",
        name="app01",
        source="vc1",
        source_moref="vm-42",
        target="lab-xcp",
        target_kind="xcpng",
        template="Debian Bookworm 12",
        settings=settings,
        disks=(disk,),
        nics=(NicSpec(key="4000", mac="00:50:56:AA:BB:CC", network="apps-vlan20", slot="0"),),
    )
    return vm, disk


def _intent(vm: VmSpec, notes: list[tuple[str, str]] | None = None) -> Intent:
    sink = notes if notes is not None else []
    return Intent(
        run_id="Run-7", vm=vm.key, kind="create_vm", key=vm.name, note=lambda k, v: sink.append((k, v))
    )


def _send(target: XcpngTarget, landing: Any, data: bytes, length: int | None = None) -> None:
    sink = target.receive_disk(landing, length=length)
    for i in range(0, len(data), 256 * 1024):
        sink.write(data[i : i + 256 * 1024])
    sink.close()


def test_a_vm_is_built_started_found_and_removed(fake: XapiFake, target: XcpngTarget) -> None:
    """create_vm, prepare/receive/attach, start: the VM on the fake is as planned and its disk holds the
    bytes sent; every step repeated is a no-op; list_tagged finds it all and remove deletes it all."""
    vm, disk = _vm_spec(8 * MiB)
    notes: list[tuple[str, str]] = []
    intent = _intent(vm, notes)
    handle, created = target.create_vm(vm, intent)
    assert (handle.name, handle.tags) == ("app01", ("migrate-run-7",))
    record = next(iter(fake.find("VM", uuid=handle.id).values()))
    assert (
        record["is_a_template"] is False and record["VBDs"] == []
    )  # the template's disks were not provisioned
    assert (record["VCPUs_max"], record["VCPUs_at_startup"], record["memory_static_max"]) == (4, 4, 2 * GiB)
    assert record["HVM_boot_params"] == {"order": "cn", "firmware": "bios"}
    assert record["platform"]["cores-per-socket"] == "2" and record["other_config"]["migrate-key"] == "vm-42"
    (vif,) = fake.find("VIF", VM=next(iter(fake.find("VM", uuid=handle.id)))).values()
    assert vif["MAC"] == "00:50:56:aa:bb:cc" and vif["device"] == "0"
    assert target.create_vm(vm, intent) == (handle, created)

    landing = target.prepare_disk(vm, disk, intent)
    assert target.prepare_disk(vm, disk, intent) == landing
    assert ("vm", handle.id) in notes and ("vdi", landing.ref) in notes
    data = os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB)
    _send(target, landing, data)
    assert hashlib.sha256(fake.vdi_path(landing.ref).read_bytes()).digest() == hashlib.sha256(data).digest()
    attached = target.attach_disks(handle, [(disk, landing)], intent)
    assert target.attach_disks(handle, [(disk, landing)], intent) == attached

    target.start_vm(handle, intent)
    target.start_vm(handle, intent)
    state = target.vm_state(handle)
    assert (state.power, state.disk_slots, state.nic_macs) == ("on", ("0",), ("00:50:56:aa:bb:cc",))
    assert target.find_vm(tag=intent.tag) == (target.find_vm(name="app01")[0],)
    tagged = target.list_tagged("Run-7")
    assert {(o.kind, o.id) for o in tagged} == {("vm", handle.id), ("landing", landing.ref)}

    target.remove([*created, *attached, *tagged])
    assert target.list_tagged("Run-7") == () and target.find_vm(name="app01") == ()
    assert not fake.vdi_path(landing.ref).exists()
    target.remove([*created, *tagged])  # already gone: not an error


def test_dropped_upload_is_transient_and_a_resend_succeeds(fake: XapiFake, target: XcpngTarget) -> None:
    """The pool cutting the upload is a TransientError; sending the whole disk again lands it."""
    vm, disk = _vm_spec(4 * MiB)
    landing = target.prepare_disk(vm, disk, _intent(vm))
    data = os.urandom(4 * MiB)
    fake.faults.arm(drop_upload=1, drop_after_bytes=MiB)
    with pytest.raises(TransientError):
        _send(target, landing, data)
    _send(target, landing, data)
    assert fake.vdi_path(landing.ref).read_bytes() == data
    assert fake.objects("task") == {}  # the connector cleans up its tasks


def test_failed_import_task_is_reported(fake: XapiFake, target: XcpngTarget) -> None:
    """All bytes sent but the task failed: close() raises with xapi's error (a transient one here)."""
    vm, disk = _vm_spec(1 * MiB)
    landing = target.prepare_disk(vm, disk, _intent(vm))
    fake.faults.arm(fail_task=1)
    with pytest.raises(TransientError, match="SR_BACKEND_FAILURE_46"):
        _send(target, landing, os.urandom(1 * MiB))


def test_short_upload_is_refused(fake: XapiFake, target: XcpngTarget) -> None:
    """Closing a sink before all announced bytes were written is an error, never a silent short disk."""
    vm, disk = _vm_spec(1 * MiB)
    landing = target.prepare_disk(vm, disk, _intent(vm))
    sink = target.receive_disk(landing)
    sink.write(b"x" * 1000)
    with pytest.raises(PermanentError, match="after 1000 of 1048576 bytes"):
        sink.close()


def test_vhd_landing_is_decoded_on_the_pool(fake: XapiFake, target: XcpngTarget, tmp_path: Path) -> None:
    """A vhd landing streams a VHD file; the VDI ends up holding the raw disk."""
    raw = tmp_path / "disk.raw"
    data = os.urandom(2 * MiB) + bytes(3 * MiB) + os.urandom(1 * MiB)
    raw.write_bytes(data)
    image = tmp_path / "disk.vhd"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            str(raw),
            str(image),
        ],
        check=True,
        capture_output=True,
    )
    vm, disk = _vm_spec(len(data), landing="vhd")
    landing = target.prepare_disk(vm, disk, _intent(vm))
    _send(target, landing, image.read_bytes(), length=image.stat().st_size)
    assert fake.vdi_path(landing.ref).read_bytes() == data
