"""The lab's sample estate: the YAML description (``examples/lab-estate.yaml``) and what seeding
it produced (``SeededEstate``, written as JSON for tests and ``migrate lab``).

Loading is pure: it validates the file and reports every problem with its line. Seeding
into vcsim lives in ``migrate.lab.seeder``; the bytes of every disk in ``migrate.lab.estatedisks``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from migrate.lab.bootcode import ascii_tag
from migrate.yamlsource import load, validate

SCHEMA = 1
DEFAULT_ESTATE = Path(__file__).parents[3] / "examples" / "lab-estate.yaml"

ScsiController = Literal["pvscsi", "lsilogic", "lsilogic-sas", "buslogic"]
NicModel = Literal["vmxnet3", "vmxnet2", "e1000", "e1000e", "pcnet32"]


class _Spec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class DiskSpec(_Spec):
    size_mib: int = Field(ge=8, le=4096)
    boot: bool = False
    controller: ScsiController = "pvscsi"
    bus: int = Field(default=0, ge=0, le=3)
    unit: int = Field(default=0, ge=0, le=15)
    thin: bool = False
    eager_zero: bool = False
    create_type: Literal["vmfs", "monolithicFlat"] = "vmfs"
    # Size of the pseudo-random data region at the start of the disk (after any boot area).
    data_kib: int = Field(default=2048, ge=4, le=65536)

    @pydantic.model_validator(mode="after")
    def _check(self) -> DiskSpec:
        if self.unit == 7:
            raise ValueError("unit 7 is the SCSI controller's own; use another unit number")
        if self.thin and self.eager_zero:
            raise ValueError("a disk is either thin or eager-zeroed thick, not both")
        return self


class NicSpec(_Spec):
    model: NicModel = "vmxnet3"
    network: str = Field(min_length=1)
    # Set: a manual MAC (vSphere addressType "manual"); unset: vCenter generates one.
    mac: Annotated[str, Field(pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")] | None = None
    start_connected: bool = True


class SnapshotSpec(_Spec):
    name: str = Field(min_length=1)
    description: str = ""


class VmSpec(_Spec):
    name: str = Field(min_length=1, max_length=80)
    folder: str = ""
    guest_id: str = Field(min_length=1)
    firmware: Literal["bios", "efi"] = "bios"
    secure_boot: bool = False
    cpus: int = Field(default=1, ge=1, le=64)
    cores_per_socket: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=1024, ge=4, le=1048576)
    hw_version: Annotated[str, Field(pattern=r"^vmx-\d+$")] = "vmx-19"
    annotation: str = ""
    attributes: dict[str, str] = Field(default_factory=dict)
    power_state: Literal["poweredOn", "poweredOff"] = "poweredOff"
    template: bool = False
    disks: list[DiskSpec] = Field(min_length=1)
    nics: list[NicSpec] = Field(default_factory=list)
    snapshots: list[SnapshotSpec] = Field(default_factory=list)
    cdrom: str | None = None

    @pydantic.model_validator(mode="after")
    def _check(self) -> VmSpec:
        if self.secure_boot and self.firmware != "efi":
            raise ValueError("secure_boot needs firmware: efi")
        if self.cpus % self.cores_per_socket:
            raise ValueError(
                f"cpus ({self.cpus}) must be a multiple of cores_per_socket ({self.cores_per_socket})"
            )
        if self.template and self.power_state == "poweredOn":
            raise ValueError("a template cannot be powered on")
        if sum(d.boot for d in self.disks) > 1:
            raise ValueError("at most one disk can have boot: true")
        slots = Counter((d.bus, d.unit) for d in self.disks)
        if dup := [f"{bus}:{unit}" for (bus, unit), n in slots.items() if n > 1]:
            raise ValueError(f"two disks on the same SCSI bus:unit {', '.join(dup)}")
        for bus in {d.bus for d in self.disks}:
            kinds = {d.controller for d in self.disks if d.bus == bus}
            if len(kinds) > 1:
                raise ValueError(f"SCSI bus {bus} has one controller; disks name {sorted(kinds)}")
        return self

    @property
    def tag(self) -> str:
        """The ASCII-safe name the boot disk prints (``MIGRATE-LAB-BOOT-OK <tag>``)."""
        return ascii_tag(self.name)

    @property
    def inventory_name(self) -> str:
        """The name as vCenter stores and reports it: '%' and '/' and '\\' escaped."""
        return escape_name(self.name)


class EstateSpec(_Spec):
    datacenter: str = "DC0"
    cluster: str = "DC0_C0"
    datastore: str = "LocalDS_0"
    custom_attributes: list[str] = Field(default_factory=list)
    isos: list[str] = Field(default_factory=list)
    vms: list[VmSpec] = Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _check(self) -> EstateSpec:
        names = Counter(vm.name for vm in self.vms)
        if dup := [n for n, c in names.items() if c > 1]:
            raise ValueError(f"VM names must be unique; repeated: {', '.join(dup)}")
        tags = Counter(vm.tag for vm in self.vms)
        if dup := [n for n, c in tags.items() if c > 1]:
            raise ValueError(
                f"VM names must differ in their ASCII form (boot tags); repeated: {', '.join(dup)}"
            )
        for vm in self.vms:
            if unknown := sorted(set(vm.attributes) - set(self.custom_attributes)):
                raise ValueError(
                    f"VM {vm.name!r} sets attributes not in custom_attributes: {', '.join(unknown)}"
                )
            if vm.cdrom and vm.cdrom not in self.isos:
                raise ValueError(f"VM {vm.name!r} mounts {vm.cdrom!r}, which is not listed under isos")
        return self

    def vm(self, name: str) -> VmSpec:
        return next(vm for vm in self.vms if vm.name == name)


def escape_name(name: str) -> str:
    """vCenter's escaping of an inventory name ('%' -> %25, '/' -> %2f, '\\' -> %5c)."""
    return name.replace("%", "%25").replace("/", "%2f").replace("\\", "%5c")


def load_estate(path: Path | str = DEFAULT_ESTATE) -> EstateSpec:
    """Read and validate an estate file; ConfigError lists every problem with its line."""
    return validate(EstateSpec, load(path))


# -- what seeding produced ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeededFile:
    """One file on the datastore, as uploaded."""

    path: str  # "[LocalDS_0] web-01/web-01-flat.vmdk"
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class SeededDisk:
    label: str
    key: int
    controller: str
    bus: int
    unit: int
    capacity_bytes: int
    # Descriptor of the disk's current backing (top of the chain) and the chain from the base up.
    descriptor: str
    chain: tuple[str, ...]
    # sha256 of what the guest sees: the base with every snapshot delta applied.
    sha256: str
    # sha256 of the base disk alone (differs from sha256 only when there are snapshots).
    base_sha256: str
    boot: bool
    firmware: Literal["bios", "efi"] | None
    # The serial line the consolidated disk prints when booted (boot disks only).
    serial_line: str | None
    # The line the base alone prints, when a snapshot changed it (so a lost delta shows).
    base_serial_line: str | None
    files: tuple[SeededFile, ...]
    thin: bool = False
    eager_zero: bool = False
    create_type: str = "vmfs"
    uuid: str = ""  # vSphere's backing.uuid, e.g. 6000C29a-...


@dataclass(frozen=True, slots=True)
class SeededVm:
    name: str  # the real name, "Žluťoučký kůň / db"
    inventory_name: str  # as vSphere reports it, "Žluťoučký kůň %2f db"
    moref: str
    tag: str
    folder: str
    vmx_path: str
    guest_id: str
    firmware: Literal["bios", "efi"]
    secure_boot: bool
    power_state: str
    template: bool
    serial_line: str | None
    disks: tuple[SeededDisk, ...]
    snapshots: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()

    @property
    def boot_disk(self) -> SeededDisk | None:
        return next((d for d in self.disks if d.boot), None)


@dataclass(frozen=True, slots=True)
class SeededEstate:
    """Everything a test needs to check a migration of the seeded estate."""

    sdk_url: str
    datastore_url: str  # https://host:port/folder (append "/<path>?dcPath=..&dsName=..")
    datacenter: str
    datastore: str
    vms: tuple[SeededVm, ...]
    # What this seeding run changed, in order; empty when the estate was already in place.
    changes: tuple[str, ...] = ()
    schema: int = SCHEMA

    def vm(self, name: str) -> SeededVm:
        for vm in self.vms:
            if name in (vm.name, vm.inventory_name, vm.tag):
                return vm
        raise KeyError(f"no VM {name!r} in the seeded estate ({', '.join(v.name for v in self.vms)})")

    def without_changes(self) -> SeededEstate:
        return replace(self, changes=())


_adapter: pydantic.TypeAdapter[SeededEstate] = pydantic.TypeAdapter(SeededEstate)


def seeded_to_dict(estate: SeededEstate) -> dict[str, Any]:
    return _adapter.dump_python(estate, mode="json")  # type: ignore[no-any-return]


def seeded_from_dict(data: Any) -> SeededEstate:
    return _adapter.validate_python(data)


def write_seeded(estate: SeededEstate, path: Path) -> None:
    path.write_text(json.dumps(seeded_to_dict(estate), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_seeded(path: Path) -> SeededEstate:
    return seeded_from_dict(json.loads(path.read_text(encoding="utf-8")))
