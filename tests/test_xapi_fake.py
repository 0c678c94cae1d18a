"""The XAPI fake answers as XAPI does: checked against xenapi.json, through the real XenAPI client."""

from __future__ import annotations

import hashlib
import os
import random
import ssl
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import XenAPI

from migrate.errors import LabError
from migrate.lab.certs import make_certs
from migrate.lab.xapi_fake import SEED, XapiFake, datamodel
from migrate.lab.xapi_fake.launch import start_xapi

MiB = 1024**2
GiB = 1024**3


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XapiFake]:
    with XapiFake(tmp_path_factory.mktemp("xapi")) as running:
        yield running


@pytest.fixture(autouse=True)
def _no_leftover_faults(fake: XapiFake) -> Iterator[None]:
    yield
    fake.faults.clear()


def _session(fake: XapiFake) -> Any:
    assert fake.ca_file is not None
    ctx = ssl.create_default_context(cafile=str(fake.ca_file))
    session = XenAPI.Session(fake.url, transport=xmlrpc.client.SafeTransport(context=ctx))
    session.login_with_password("root", fake.password, "2.21", "tests")
    return session


@pytest.fixture
def session(fake: XapiFake) -> Iterator[Any]:
    logged_in = _session(fake)
    yield logged_in
    logged_in.xenapi.session.logout()


@pytest.fixture
def api(session: Any) -> Any:
    return session.xenapi


def _raw_proxy(fake: XapiFake) -> xmlrpc.client.ServerProxy:
    assert fake.ca_file is not None
    ctx = ssl.create_default_context(cafile=str(fake.ca_file))
    return xmlrpc.client.ServerProxy(fake.url, context=ctx)


def _failure(call: Any, *args: Any) -> list[str]:
    with pytest.raises(XenAPI.Failure) as caught:
        call(*args)
    return list(caught.value.details)


def _one(api: Any, cls: str, name: str) -> str:
    refs = getattr(api, cls).get_by_name_label(name)
    assert len(refs) == 1, (cls, name, refs)
    return str(refs[0])


def _new_vdi(api: Any, size: int, sr: str = "nfs-sr", name: str = "test disk") -> str:
    return str(
        api.VDI.create(
            {
                "name_label": name,
                "name_description": "",
                "SR": _one(api, "SR", sr),
                "virtual_size": str(size),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
                "xenstore_data": {},
                "sm_config": {},
                "tags": [],
            }
        )
    )


def _put(fake: XapiFake, session: Any, vdi: str, body: Any, fmt: str = "raw") -> tuple[int, str]:
    """PUT /import_raw_vdi with a task made by task.create; returns (HTTP status, task ref)."""
    task = str(session.xenapi.task.create("import", ""))
    params = {"session_id": session.handle, "vdi": vdi, "format": fmt, "task_id": task}
    resp = requests.put(
        f"{fake.url}import_raw_vdi", params=params, data=body, verify=str(fake.ca_file), timeout=30
    )
    return resp.status_code, task


def _wait_task(api: Any, task: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record: dict[str, Any] = api.task.get_record(task)
        if record["status"] not in ("pending", "cancelling"):
            return record
        time.sleep(0.02)
    raise AssertionError(f"task {task} still pending")


def _disk_image(path: Path, size: int) -> bytes:
    """A disk with data islands between zero runs, so sparse handling matters."""
    data = bytearray(size)
    rng = random.Random(7)
    for offset in range(0, size, 1536 * 1024):
        chunk = rng.randbytes(200 * 1024)
        data[offset : offset + len(chunk)] = chunk[: max(0, min(len(chunk), size - offset))]
    path.write_bytes(data)
    return bytes(data)


def _sha(path_or_bytes: Path | bytes) -> str:
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return hashlib.sha256(data).hexdigest()


# -- datamodel conformance ------------------------------------------------------------------


def test_unknown_message_is_message_method_unknown(api: Any) -> None:
    """A message xenapi.json does not define fails with MESSAGE_METHOD_UNKNOWN and its name."""
    assert _failure(api.VM.frobnicate, "x") == ["MESSAGE_METHOD_UNKNOWN", "VM.frobnicate"]
    assert _failure(api.Frobnicator.get_all) == ["MESSAGE_METHOD_UNKNOWN", "Frobnicator.get_all"]


def test_wrong_arity_is_parameter_count_mismatch(api: Any) -> None:
    """Too many or too few parameters fail with the expected and received counts (session excluded)."""
    vm = _one(api, "VM", "legacy-app-01")
    assert _failure(api.VM.get_record, vm, "extra") == [
        "MESSAGE_PARAMETER_COUNT_MISMATCH",
        "VM.get_record",
        "1",
        "2",
    ]
    assert _failure(api.VM.start, vm) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.start", "3", "1"]


def test_bad_handle_is_handle_invalid(api: Any) -> None:
    """A reference to no object fails with HANDLE_INVALID, the class and the reference."""
    bogus = "OpaqueRef:00000000-0000-0000-0000-000000000000"
    assert _failure(api.VM.get_record, bogus) == ["HANDLE_INVALID", "VM", bogus]
    assert _failure(api.SR.get_physical_size, "OpaqueRef:NULL") == ["HANDLE_INVALID", "SR", "OpaqueRef:NULL"]


def test_enum_values_are_checked_case_insensitively(api: Any) -> None:
    """An enum value outside the datamodel is refused as xapi's unmarshaller does; case does not matter."""
    vm = _one(api, "VM", "legacy-app-01")
    details = _failure(api.VM.set_actions_after_crash, vm, "explode")
    assert details == ["INTERNAL_ERROR", 'Failure("Unknown tag/contents")']
    api.VM.set_actions_after_crash(vm, "DESTROY")
    assert api.VM.get_actions_after_crash(vm) == "destroy"
    api.VM.set_actions_after_crash(vm, "restart")


def test_wrongly_typed_parameter_fails(api: Any) -> None:
    """An int where the datamodel says string fails with ocaml-rpc's unmarshalling message."""
    vm = _one(api, "VM", "legacy-app-01")
    assert _failure(api.VM.set_name_label, vm, 5) == [
        "INTERNAL_ERROR",
        "Failure(\"Expected string, got 'I(5)'\")",
    ]


def test_removed_message_is_message_removed(api: Any) -> None:
    """A message the datamodel marks removed answers MESSAGE_REMOVED."""
    vm = _one(api, "VM", "legacy-app-01")
    assert _failure(api.VM.get_is_snapshot_from_vmpp, vm) == ["MESSAGE_REMOVED"]


def test_wire_format_is_xapis(fake: XapiFake) -> None:
    """Raw XML-RPC: results in a Status/Value struct, ints as decimal text, failures as ErrorDescription."""
    proxy = _raw_proxy(fake)
    login = proxy.session.login_with_password("root", fake.password)  # 2 params: xapi's defaults fill in
    assert login["Status"] == "Success" and str(login["Value"]).startswith("OpaqueRef:")
    session = login["Value"]
    metrics = proxy.host_metrics.get_all_records(session)["Value"]
    totals = sorted(m["memory_total"] for m in metrics.values())
    assert totals == sorted(str(h["memory_total"]) for h in SEED["hosts"])
    assert proxy.VM.get_all(session + "x") == {
        "Status": "Failure",
        "ErrorDescription": ["SESSION_INVALID", session + "x"],
    }
    bad = proxy.session.login_with_password("root", "wrong", "2.21", "t")
    assert bad == {
        "Status": "Failure",
        "ErrorDescription": ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"],
    }
    proxy.session.logout(session)
    assert proxy.pool.get_all(session)["ErrorDescription"] == ["SESSION_INVALID", session]


def test_every_datamodel_class_is_served(api: Any) -> None:
    """get_all_records answers for every class in xenapi.json; the generic layer covers the whole API."""
    dm = datamodel.load()
    served = {
        name: getattr(api, name).get_all_records()
        for name, cls in dm.classes.items()
        if "get_all_records" in cls.messages and not cls.messages["get_all_records"].removed
    }
    assert len(served) > 50
    assert len(served["host"]) == len(SEED["hosts"])
    assert served["Cluster"] == {}


def test_generic_map_and_set_messages_follow_the_datamodel(api: Any) -> None:
    """add_to_/remove_from_ maps and add_/remove_ sets work on any field; a duplicate key is refused."""
    sr = _one(api, "SR", "nfs-sr")
    api.SR.add_to_other_config(sr, "owner", "tests")
    assert _failure(api.SR.add_to_other_config, sr, "owner", "again")[:1] == ["MAP_DUPLICATE_KEY"]
    api.SR.add_tags(sr, "fast")
    assert api.SR.get_tags(sr) == ["fast"] and api.SR.get_other_config(sr) == {"owner": "tests"}
    api.SR.remove_tags(sr, "fast")
    api.SR.remove_from_other_config(sr, "owner")
    assert api.SR.get_record(sr)["tags"] == [] and api.SR.get_record(sr)["other_config"] == {}


# -- VM lifecycle -----------------------------------------------------------------------------


def test_template_to_running_vm(api: Any) -> None:
    """Clone, provision, disks, NICs, start, shutdown, destroy, with xapi's checks on the way."""
    template = _one(api, "VM", "Debian Bookworm 12")
    vm = api.VM.clone(template, "lifecycle-vm")
    assert api.VM.get_is_a_template(vm) is True and api.VM.get_is_default_template(vm) is False
    # The template's provisioning spec names no SR; xapi refuses it until a caller fills one in.
    assert _failure(api.VM.provision, vm) == ["UUID_INVALID", "sr", ""]
    nfs_uuid = api.SR.get_uuid(_one(api, "SR", "nfs-sr"))
    disks = api.VM.get_other_config(vm)["disks"].replace('sr=""', f'sr="{nfs_uuid}"')
    api.VM.remove_from_other_config(vm, "disks")
    api.VM.add_to_other_config(vm, "disks", disks)
    api.VM.provision(vm)
    assert api.VM.get_is_a_template(vm) is False and "disks" not in api.VM.get_other_config(vm)
    assert "disks" in api.VM.get_other_config(template)  # the clone shares nothing with its template
    (vbd,) = api.VM.get_VBDs(vm)
    assert api.VDI.get_virtual_size(api.VBD.get_VDI(vbd)) == str(10 * GiB)
    extra = _new_vdi(api, 64 * MiB)
    vbd_args = {
        "VM": vm,
        "VDI": extra,
        "userdevice": "0",
        "bootable": False,
        "mode": "RW",
        "type": "Disk",
        "empty": False,
        "other_config": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
    }
    assert _failure(api.VBD.create, vbd_args) == ["DEVICE_ALREADY_EXISTS", "0"]
    api.VBD.create(dict(vbd_args, userdevice="1"))
    net = _one(api, "network", "apps-vlan20")
    vif_args = {
        "device": "0",
        "network": net,
        "VM": vm,
        "MAC": "not-a-mac",
        "MTU": "1500",
        "other_config": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
    }
    assert _failure(api.VIF.create, vif_args) == ["MAC_INVALID", "not-a-mac"]
    api.VIF.create(dict(vif_args, MAC="00:50:56:01:02:03"))
    assert api.VM.get_allowed_VIF_devices(vm)[:2] == ["1", "2"]
    api.VM.set_memory_limits(vm, str(GiB), str(4 * GiB), str(4 * GiB), str(4 * GiB))
    assert _failure(api.VM.set_VCPUs_at_startup, vm, "8")[0] == "VCPU_CONSTRAINT_VIOLATION"
    api.VM.set_VCPUs_max(vm, "4")
    api.VM.set_VCPUs_at_startup(vm, "4")

    api.VM.start(vm, False, False)
    host = api.VM.get_resident_on(vm)
    assert api.VM.get_power_state(vm) == "Running" and api.host.get_name_label(host) == "xcp-host-1"
    assert all(api.VBD.get_currently_attached(b) for b in api.VM.get_VBDs(vm))
    assert _failure(api.VM.destroy, vm) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert _failure(api.VM.start, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert _failure(api.VDI.destroy, extra) == ["VDI_IN_USE", extra, "destroy"]
    api.VM.hard_shutdown(vm)
    vbds = api.VM.get_VBDs(vm)
    api.VM.destroy(vm)
    assert _failure(api.VBD.get_record, vbds[0])[:2] == ["HANDLE_INVALID", "VBD"]
    api.VDI.destroy(extra)  # VDIs outlive their VM, as in xapi


def test_template_cannot_start(api: Any) -> None:
    """Starting a template is VM_IS_TEMPLATE."""
    template = _one(api, "VM", "Other install media")
    assert _failure(api.VM.start, template, False, False) == ["VM_IS_TEMPLATE", template]


def test_async_call_returns_a_task(api: Any) -> None:
    """Async.VM.clone answers a task whose result is the new VM's reference, XML-encoded like xapi's."""
    task = api.Async.VM.clone(_one(api, "VM", "Rocky Linux 9"), "async-clone")
    record = _wait_task(api, task)
    assert record["status"] == "success"
    new_vm = record["result"].removeprefix("<value>").removesuffix("</value>")
    assert api.VM.get_name_label(new_vm) == "async-clone"
    api.VM.destroy(new_vm)
    api.task.destroy(task)


# -- imports ----------------------------------------------------------------------------------


def test_raw_import_is_stored_sparse_and_exact(
    fake: XapiFake, session: Any, api: Any, tmp_path: Path
) -> None:
    """A raw PUT lands byte for byte; zero runs stay holes; the task's result is the VDI."""
    size = 12 * MiB
    data = _disk_image(tmp_path / "disk.raw", 10 * MiB)  # shorter than the VDI: the rest reads as zeros
    vdi = _new_vdi(api, size)
    status, task = _put(fake, session, vdi, data)
    assert status == 200
    record = _wait_task(api, task)
    assert (record["status"], record["result"]) == ("success", f"<value>{vdi}</value>")
    path = fake.vdi_path(api.VDI.get_uuid(vdi))
    assert _sha(path) == _sha(data + bytes(size - len(data)))
    assert path.stat().st_blocks * 512 < 5 * MiB  # about 1.4 MiB of data in 12 MiB
    assert int(api.VDI.get_physical_utilisation(vdi)) == path.stat().st_blocks * 512


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_vhd_import_decodes_to_the_raw_disk(
    fake: XapiFake, session: Any, api: Any, tmp_path: Path, subformat: str
) -> None:
    """A VHD made by qemu-img (dynamic or fixed) is decoded to exactly the raw disk it came from."""
    raw = tmp_path / "disk.raw"
    data = _disk_image(raw, 9 * MiB)
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
            f"subformat={subformat},force_size=on",
            str(raw),
            str(image),
        ],
        check=True,
        capture_output=True,
    )
    vdi = _new_vdi(api, len(data))
    with open(image, "rb") as body:
        status, task = _put(fake, session, vdi, body, fmt="vhd")
    assert status == 200
    assert _wait_task(api, task)["status"] == "success"
    assert _sha(fake.vdi_path(api.VDI.get_uuid(vdi))) == _sha(data)


def test_import_larger_than_the_vdi_fails_the_task(fake: XapiFake, session: Any, api: Any) -> None:
    """More bytes than virtual_size: the HTTP answer is 200 (sent first, as xapi does) but the task fails."""
    vdi = _new_vdi(api, 1 * MiB)
    status, task = _put(fake, session, vdi, os.urandom(1 * MiB + 512))
    record = _wait_task(api, task)
    assert status == 200 and record["status"] == "failure"
    assert record["error_info"][0] == "VDI_IO_ERROR"


def test_chunked_upload_is_refused_like_xapi(fake: XapiFake, session: Any, api: Any) -> None:
    """A body without Content-Length (chunked) is refused: 404 and a failed task, as xapi answers."""
    vdi = _new_vdi(api, 1 * MiB)
    status, task = _put(fake, session, vdi, iter([b"x" * 1000]))
    assert status == 404
    assert _wait_task(api, task)["error_info"] == ["INTERNAL_ERROR", "Cannot handle encoding: chunked"]


def test_import_needs_a_valid_session(fake: XapiFake, api: Any) -> None:
    """Without a valid session_id the import is 401 Unauthorised."""
    vdi = _new_vdi(api, 1 * MiB)
    resp = requests.put(
        f"{fake.url}import_raw_vdi",
        params={"session_id": "OpaqueRef:nope", "vdi": vdi},
        data=b"x" * 512,
        verify=str(fake.ca_file),
        timeout=10,
    )
    assert resp.status_code == 401


# -- faults -----------------------------------------------------------------------------------


def test_dropped_upload_fails_the_task_and_keeps_the_bytes(fake: XapiFake, session: Any, api: Any) -> None:
    """drop_upload cuts the connection mid-body: the client sees it, the task fails, the first bytes stay."""
    fake.faults.arm(drop_upload=1, drop_after_bytes=1 * MiB)
    data = os.urandom(8 * MiB)
    vdi = _new_vdi(api, len(data))
    task = str(api.task.create("import", ""))
    with pytest.raises(requests.ConnectionError):
        requests.put(
            f"{fake.url}import_raw_vdi",
            data=data,
            verify=str(fake.ca_file),
            timeout=30,
            params={"session_id": session.handle, "vdi": vdi, "task_id": task},
        )
    assert _wait_task(api, task)["error_info"] == ["VDI_IO_ERROR", "Device I/O errors"]
    stored = fake.vdi_path(api.VDI.get_uuid(vdi)).read_bytes()
    assert stored[: 1 * MiB] == data[: 1 * MiB] and stored[1 * MiB :] == bytes(7 * MiB)


def test_sr_full_fault_and_a_really_full_sr(api: Any, fake: XapiFake) -> None:
    """sr_full makes the next VDI.create fail with SR_FULL; a thick SR refuses more than its free space."""
    fake.faults.arm(sr_full=1)
    assert _failure(_new_vdi, api, 1 * MiB)[0] == "SR_FULL"
    api.VDI.destroy(_new_vdi(api, 1 * MiB))  # one-shot: the next create works
    free = 500 * GiB - 120 * GiB
    assert _failure(_new_vdi, api, free + 1, "Local storage") == ["SR_FULL", str(free + 1), str(free)]


def test_session_invalid_once_is_survived_by_relogin(fake: XapiFake) -> None:
    """session_invalid drops the session once; XenAPI's client logs in again and the call succeeds."""
    session = _session(fake)
    before = fake.calls.count("session.login_with_password")
    fake.faults.arm(session_invalid=1)
    assert len(session.xenapi.pool.get_all()) == 1
    assert fake.calls.count("session.login_with_password") == before + 1
    session.xenapi.session.logout()


def test_transient_task_failure(fake: XapiFake, session: Any, api: Any) -> None:
    """fail_task takes every byte, then fails the task with a transient SR backend error."""
    fake.faults.arm(fail_task=1)
    vdi = _new_vdi(api, 1 * MiB)
    status, task = _put(fake, session, vdi, os.urandom(1 * MiB))
    assert status == 200
    assert _wait_task(api, task)["error_info"][0] == "SR_BACKEND_FAILURE_46"


# -- the process and its state ----------------------------------------------------------------


def test_subprocess_fake_prints_its_url_and_takes_faults_by_control(tmp_path: Path) -> None:
    """python -m migrate.lab.xapi_fake prints its URL, obeys /_lab/fail and saves its pool on stop."""
    certs = make_certs(tmp_path / "certs")
    running = start_xapi(tmp_path / "state", certs)
    try:
        assert running.url.startswith("https://127.0.0.1:")
        running.control("fail", sr_full=2)
        assert running.control("faults")["sr_full"] == 2
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        session = XenAPI.Session(running.url, transport=xmlrpc.client.SafeTransport(context=ctx))
        session.login_with_password("root", running.password_file.read_text().strip(), "2.21", "t")
        session.xenapi.VM.clone(_one(session.xenapi, "VM", "Rocky Linux 9"), "kept-across-restart")
        assert _failure(_new_vdi, session.xenapi, 1)[0] == "SR_FULL"
        assert running.control("state")["faults"]["sr_full"] == 1
        refused = requests.post(
            f"{running.url}_lab/state", headers={"X-Lab-Control": "wrong"}, verify=str(certs.ca), timeout=10
        )
        assert refused.status_code == 403
    finally:
        running.stop()
    again = XapiFake(tmp_path / "state", certs=certs)
    assert again.find("VM", name_label="kept-across-restart")


def test_missing_datamodel_is_a_clear_lab_error(tmp_path: Path) -> None:
    """Without xenapi.json the fake does not start, and says which file and how to point at one."""
    with pytest.raises(LabError) as caught:
        datamodel.load(tmp_path / "nowhere.json")
    assert "nowhere.json" in str(caught.value) and "MIGRATE_XAPI_DATAMODEL" in str(caught.value)
