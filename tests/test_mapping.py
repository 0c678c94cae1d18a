"""The PURE mapping tables: guest ids, devices, firmware, formats and names."""

from __future__ import annotations

import re

import pytest

from migrate import mapping
from migrate.mapping import GUEST_OS, guest_os

GUESTS = [
    # guest id, family, Proxmox ostype, first XCP-ng template
    ("winXPProGuest", "windows", "wxp", "Other install media"),
    ("winNetStandard64Guest", "windows", "w2k3", "Other install media"),
    ("winLonghorn64Guest", "windows", "w2k8", "Windows Server 2008 (64-bit)"),
    ("windows7_64Guest", "windows", "win7", "Windows 7 (64-bit)"),
    ("windows7Server64Guest", "windows", "win7", "Windows Server 2008 R2 (64-bit)"),
    ("windows8_64Guest", "windows", "win8", "Windows 8.1 (64-bit)"),
    ("windows8Server64Guest", "windows", "win8", "Windows Server 2012 R2 (64-bit)"),
    ("windows9_64Guest", "windows", "win10", "Windows 10 (64-bit)"),
    ("windows9Server64Guest", "windows", "win10", "Windows Server 2016 (64-bit)"),
    ("windows2019srv_64Guest", "windows", "win10", "Windows Server 2019 (64-bit)"),
    ("windows2019srvNext_64Guest", "windows", "win11", "Windows Server 2022 (64-bit)"),
    ("windows2022srvNext_64Guest", "windows", "win11", "Windows Server 2025 (64-bit)"),
    ("windows11_64Guest", "windows", "win11", "Windows 11"),
    ("rhel9_64Guest", "linux", "l26", "Red Hat Enterprise Linux 9"),
    ("rhel8_64Guest", "linux", "l26", "Red Hat Enterprise Linux 8"),
    ("rhel7_64Guest", "linux", "l26", "Red Hat Enterprise Linux 7"),
    ("centos8_64Guest", "linux", "l26", "CentOS 8"),
    ("centos7_64Guest", "linux", "l26", "CentOS 7"),
    ("rockylinux_64Guest", "linux", "l26", "Rocky Linux 9"),
    ("almalinux_64Guest", "linux", "l26", "AlmaLinux 9"),
    ("debian12_64Guest", "linux", "l26", "Debian Bookworm 12"),
    ("debian11_64Guest", "linux", "l26", "Debian Bullseye 11"),
    ("debian10_64Guest", "linux", "l26", "Debian Buster 10"),
    ("ubuntu64Guest", "linux", "l26", "Ubuntu Noble Numbat 24.04"),
    ("sles15_64Guest", "linux", "l26", "SUSE Linux Enterprise Server 15 (64-bit)"),
    ("sles12_64Guest", "linux", "l26", "SUSE Linux Enterprise Server 12 SP5 (64-bit)"),
    ("other5xLinux64Guest", "linux", "l26", "Generic Linux BIOS"),
    ("other24xLinuxGuest", "linux", "l24", "Generic Linux BIOS"),
    ("solaris11_64Guest", "other", "solaris", "Other install media"),
    ("otherGuest64", "other", "other", "Other install media"),
]


@pytest.mark.parametrize(("guest_id", "family", "ostype", "template"), GUESTS)
def test_guest_table(guest_id: str, family: str, ostype: str, template: str) -> None:
    """Each documented guest id maps to its family, Proxmox ostype and preferred XCP-ng template."""
    row, reason = guest_os(guest_id)
    assert (row.family, row.ostype) == (family, ostype)
    assert mapping.xcp_template_candidates(row, "bios")[0] == template
    assert guest_id in reason


@pytest.mark.parametrize(
    ("guest_id", "full_name", "family", "ostype"),
    [
        ("windows2030srv_64Guest", "", "windows", "win11"),
        ("winFutureGuest", "", "windows", "win10"),
        ("fedora64Guest", "", "linux", "l26"),
        ("amazonlinux3_64Guest", "", "linux", "l26"),
        ("freebsd14_64Guest", "", "other", "other"),
        ("vmkernel8Guest", "Microsoft Windows 12", "windows", "win10"),
        ("vmkernel8Guest", "Some Linux thing", "linux", "l26"),
        ("", "", "other", "other"),
    ],
)
def test_unknown_guest_ids_fall_back_by_pattern(
    guest_id: str, full_name: str, family: str, ostype: str
) -> None:
    """Ids missing from the table are classified by their shape or the guest's full name."""
    row, reason = guest_os(guest_id, full_name)
    assert (row.family, row.ostype) == (family, ostype)
    assert "not in the table" in reason or "unknown" in reason


def test_every_table_row_is_consistent() -> None:
    """Every row has a valid Proxmox ostype and Windows rows are exactly the win* ids."""
    ostypes = {
        "other",
        "wxp",
        "w2k",
        "w2k3",
        "w2k8",
        "wvista",
        "win7",
        "win8",
        "win10",
        "win11",
        "l24",
        "l26",
        "solaris",
    }
    for guest_id, row in GUEST_OS.items():
        assert row.ostype in ostypes, guest_id
        assert (row.family == "windows") == guest_id.startswith("win"), guest_id


@pytest.mark.parametrize(
    ("firmware", "expected"),
    [
        (
            "efi",
            (
                "Red Hat Enterprise Linux 9",
                "Rocky Linux 9",
                "AlmaLinux 9",
                "Red Hat Enterprise Linux 8",
                "Generic Linux UEFI",
                "Other install media",
            ),
        ),
        (
            "bios",
            (
                "Red Hat Enterprise Linux 9",
                "Rocky Linux 9",
                "AlmaLinux 9",
                "Red Hat Enterprise Linux 8",
                "Generic Linux BIOS",
                "Other install media",
            ),
        ),
    ],
)
def test_linux_templates_end_with_generic_by_firmware(firmware: str, expected: tuple[str, ...]) -> None:
    """Linux candidates end with the generic template matching the firmware, then install media."""
    assert mapping.xcp_template_candidates(guest_os("rhel9_64Guest")[0], firmware) == expected


@pytest.mark.parametrize(
    ("guest_id", "mode", "bus", "scsihw", "nic"),
    [
        ("rhel9_64Guest", "safe", "scsi", "virtio-scsi-single", "virtio"),
        ("ubuntu64Guest", "virtio", "scsi", "virtio-scsi-single", "virtio"),
        ("windows2019srvNext_64Guest", "safe", "sata", None, "e1000e"),
        ("windows9_64Guest", "safe", "sata", None, "e1000e"),
        ("windows8Server64Guest", "safe", "sata", None, "e1000e"),
        ("windows7Server64Guest", "safe", "sata", None, "e1000"),
        ("winNetStandard64Guest", "safe", "sata", None, "e1000"),
        ("windows2019srvNext_64Guest", "virtio", "scsi", "virtio-scsi-single", "virtio"),
        ("other24xLinuxGuest", "safe", "ide", None, "e1000"),
        ("otherGuest64", "safe", "sata", None, "e1000"),
        ("freebsd13_64Guest", "virtio", "sata", None, "e1000"),
    ],
)
def test_proxmox_devices(
    guest_id: str, mode: mapping.WindowsMode, bus: str, scsihw: str | None, nic: str
) -> None:
    """Disk bus, SCSI controller and NIC model follow guest family and Windows first-boot mode."""
    dev = mapping.proxmox_devices(guest_os(guest_id)[0], mode)
    assert (dev.bus, dev.scsihw, dev.nic) == (bus, scsihw, nic)
    assert dev.reason


def test_vhd_too_large_becomes_raw() -> None:
    """A disk over VHD's 2040 GiB goes to an XCP-ng VHD SR as raw, saying why; smaller ones stay VHD."""
    assert mapping.disk_format("xcpng", "nfs", {}, 2040 * 1024**3)[0] == "vhd"
    fmt, reason = mapping.disk_format("xcpng", "nfs", {}, 2041 * 1024**3)
    assert fmt == "raw" and "2040 GiB" in reason
    assert mapping.disk_format("proxmox", "dir", {}, 4096 * 1024**3)[0] == "qcow2"


@pytest.mark.parametrize(
    ("kind", "storage_type", "overrides", "fmt"),
    [
        ("proxmox", "lvmthin", {}, "raw"),
        ("proxmox", "lvm", {}, "raw"),
        ("proxmox", "zfspool", {}, "raw"),
        ("proxmox", "rbd", {}, "raw"),
        ("proxmox", "btrfs", {}, "raw"),
        ("proxmox", "dir", {}, "qcow2"),
        ("proxmox", "nfs", {}, "qcow2"),
        ("proxmox", "cifs", {}, "qcow2"),
        ("proxmox", "dir", {"dir": "raw"}, "raw"),
        ("proxmox", "weird", {}, "raw"),
        ("xcpng", "nfs", {}, "vhd"),
        ("xcpng", "ext", {}, "vhd"),
        ("xcpng", "lvm", {}, "vhd"),
        ("xcpng", "lvmoiscsi", {}, "vhd"),
        ("xcpng", "lvm", {"lvm": "raw"}, "raw"),
        ("xcpng", "mystery", {}, "raw"),
    ],
)
def test_disk_format_table(kind: str, storage_type: str, overrides: dict[str, str], fmt: str) -> None:
    """The image format per target kind and storage type, with playbook overrides winning."""
    got, reason = mapping.disk_format(kind, storage_type, overrides)
    assert got == fmt
    assert storage_type in reason


PVE_DNS = re.compile(
    r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
    r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])$"
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("web-01", "web-01"),
        ("Žluťoučký kůň / db", "Zlutoucky-kun-db"),
        ("Straße_Ærø", "Strasse-AEro"),
        ("db01.example.com", "db01.example.com"),
        ("  spaces  and__underscores  ", "spaces-and-underscores"),
        ("-leading.-dots-.", "leading.dots"),
        ("日本語", ""),
        ("a" * 70, "a" * 63),
    ],
)
def test_proxmox_names_are_dns_safe(raw: str, expected: str) -> None:
    """Names are transliterated and squeezed into Proxmox's DNS-name rule, deterministically."""
    got = mapping.proxmox_name(raw)
    assert got == expected
    if got:
        assert PVE_DNS.match(got)


def test_xcp_names_keep_unicode_but_not_control_characters() -> None:
    """XCP-ng takes any name label; only control characters are replaced."""
    assert mapping.xcp_name("Žluťoučký kůň / db") == "Žluťoučký kůň / db"
    assert mapping.xcp_name("a\tb\nc") == "a b c"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("virtio", "00:50:56:aa:bb:cc", "vmbr0", None, True), "virtio=00:50:56:AA:BB:CC,bridge=vmbr0"),
        (("e1000e", "00:50:56:aa:bb:cc", "vmbr1", 20, True), "e1000e=00:50:56:AA:BB:CC,bridge=vmbr1,tag=20"),
        (("virtio", None, "vmbr0", None, False), "virtio,bridge=vmbr0,link_down=1"),
    ],
)
def test_pve_net_strings(args: tuple[str, str | None, str, int | None, bool], expected: str) -> None:
    """net0 values are in Proxmox API syntax: model=MAC, bridge, optional tag and link state."""
    assert mapping.pve_net(*args) == expected


def test_firmware_strings() -> None:
    """EFI gets q35 and an efidisk with keys only when Secure Boot was on; BIOS stays on i440fx."""
    assert mapping.proxmox_machine("efi")[0] == "q35"
    assert mapping.proxmox_machine("bios")[0] == "pc"
    assert (
        mapping.proxmox_efidisk("local-lvm", "raw", True)
        == "local-lvm:1,format=raw,efitype=4m,pre-enrolled-keys=1"
    )
    assert (
        mapping.proxmox_efidisk("nfs", "qcow2", False) == "nfs:1,format=qcow2,efitype=4m,pre-enrolled-keys=0"
    )
    assert mapping.proxmox_tpm("local-lvm") == "local-lvm:1,version=v2.0"


@pytest.mark.parametrize(
    ("bus", "fmt", "expected"),
    [
        ("scsi", "raw", "format=raw,discard=on,iothread=1"),
        ("sata", "qcow2", "format=qcow2,discard=on"),
        ("ide", "raw", "format=raw,discard=on"),
    ],
)
def test_drive_options(bus: mapping.Bus, fmt: str, expected: str) -> None:
    """IO threads only where virtio-scsi-single provides them; discard everywhere for thin storage."""
    assert mapping.drive_options(bus, fmt) == expected
