"""PURE tables: how vSphere hardware and guest ids become Proxmox VE and XCP-ng settings.

Every function here is a lookup or a small deterministic transformation; the planner calls
them and records the ``reason`` strings they return, so a reviewer can see why a choice was
made. Nothing imports an SDK.

Guest OS table (vSphere ``guestId`` -> Proxmox ``ostype`` / XCP-ng template)
    Windows desktop   XP wxp, Vista wvista, 7 win7, 8/8.1 win8, 10 win10, 11 win11
    Windows Server    2003 w2k3, 2008 w2k8, 2008 R2 win7, 2012/R2 win8, 2016/2019 win10,
                      2022/2025 win11 (Proxmox groups them this way in its ostype docs)
    RHEL/CentOS/Rocky/Alma/Oracle, Debian, Ubuntu, SLES, other Linux: l26 (l24 for 2.4 kernels)
    Solaris: solaris; FreeBSD and anything unknown: other
    XCP-ng templates are listed most specific first; the planner takes the first one the
    target has, then falls back to "Generic Linux UEFI/BIOS" or "Other install media".

Disk formats by storage type
    Proxmox: raw on block storages (lvmthin, lvm, zfspool, zfs, rbd, iscsi, iscsidirect) and on
    btrfs (Proxmox's btrfs plugin stores raw files only); qcow2 on file storages (dir, nfs,
    cifs, glusterfs) so images stay thin and can take snapshots.
    XCP-ng: ``vhd`` (dynamic) for every VHD-based SR, file-based (ext, nfs, smb, file, xfs,
    zfs, ...) and LVM-based (lvm, lvmoiscsi, lvmohba: LVHD keeps VHDs inside logical volumes):
    ``import_raw_vdi?format=vhd`` sends only the allocated blocks, so a mostly empty disk
    crosses the wire small, and file SRs stay sparse. Unknown SR types get ``raw``, which
    every SR accepts; ``options.disk_format.xcpng`` overrides per SR type.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

Family = Literal["windows", "linux", "other"]
Bus = Literal["scsi", "sata", "ide", "virtio"]
WindowsMode = Literal["safe", "virtio"]
ProxmoxFormat = Literal["raw", "qcow2"]
XcpFormat = Literal["raw", "vhd"]

GiB: Final = 1 << 30
MiB: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class GuestOs:
    """What migrate knows about one vSphere guest id."""

    label: str
    family: Family
    ostype: str
    xcp_templates: tuple[str, ...] = ()
    # Windows 11 refuses to run without a TPM; the source's vTPM contents cannot be carried over.
    needs_tpm: bool = False


def _w(label: str, ostype: str, *templates: str, tpm: bool = False) -> GuestOs:
    return GuestOs(label, "windows", ostype, templates, tpm)


def _l(label: str, *templates: str, ostype: str = "l26") -> GuestOs:
    return GuestOs(label, "linux", ostype, templates)


_XP = _w("Windows XP", "wxp")
_2003 = _w("Windows Server 2003", "w2k3")
_VISTA = _w("Windows Vista", "wvista")
_2008 = _w("Windows Server 2008", "w2k8", "Windows Server 2008 (64-bit)")
_WIN7 = _w("Windows 7", "win7", "Windows 7 (64-bit)")
_2008R2 = _w("Windows Server 2008 R2", "win7", "Windows Server 2008 R2 (64-bit)")
_WIN8 = _w("Windows 8/8.1", "win8", "Windows 8.1 (64-bit)", "Windows 10 (64-bit)")
_2012 = _w(
    "Windows Server 2012/2012 R2", "win8", "Windows Server 2012 R2 (64-bit)", "Windows Server 2016 (64-bit)"
)
_WIN10 = _w("Windows 10", "win10", "Windows 10 (64-bit)")
_2016 = _w("Windows Server 2016", "win10", "Windows Server 2016 (64-bit)")
_2019 = _w("Windows Server 2019", "win10", "Windows Server 2019 (64-bit)", "Windows Server 2016 (64-bit)")
_2022 = _w("Windows Server 2022", "win11", "Windows Server 2022 (64-bit)", "Windows Server 2019 (64-bit)")
_2025 = _w("Windows Server 2025", "win11", "Windows Server 2025 (64-bit)", "Windows Server 2022 (64-bit)")
_WIN11 = _w("Windows 11", "win11", "Windows 11", "Windows 10 (64-bit)", tpm=True)
# RHEL rebuilds (Rocky, Alma) share the platform settings, so their templates are next best.
_RHEL9 = _l(
    "Red Hat Enterprise Linux 9",
    "Red Hat Enterprise Linux 9",
    "Rocky Linux 9",
    "AlmaLinux 9",
    "Red Hat Enterprise Linux 8",
)
_RHEL8 = _l("Red Hat Enterprise Linux 8", "Red Hat Enterprise Linux 8", "Rocky Linux 8", "AlmaLinux 8")
_RHEL7 = _l("Red Hat Enterprise Linux 7", "Red Hat Enterprise Linux 7")
_RHEL6 = _l("Red Hat Enterprise Linux 6", "Red Hat Enterprise Linux 6 (64-bit)")
_CENTOS9 = _l("CentOS Stream 9", "CentOS Stream 9", "Red Hat Enterprise Linux 9", "Rocky Linux 9")
_CENTOS8 = _l("CentOS 8", "CentOS 8", "CentOS Stream 8", "Rocky Linux 8")
_CENTOS7 = _l("CentOS 7", "CentOS 7")
_ROCKY = _l("Rocky Linux", "Rocky Linux 9", "Rocky Linux 8", "AlmaLinux 9", "Red Hat Enterprise Linux 9")
_ALMA = _l("AlmaLinux", "AlmaLinux 9", "AlmaLinux 8", "Rocky Linux 9", "Red Hat Enterprise Linux 9")
_OL9 = _l("Oracle Linux 9", "Oracle Linux 9", "Oracle Linux 8")
_OL8 = _l("Oracle Linux 8", "Oracle Linux 8")
_OL7 = _l("Oracle Linux 7", "Oracle Linux 7")
_DEB13 = _l("Debian 13", "Debian Trixie 13", "Debian Bookworm 12")
_DEB12 = _l("Debian 12", "Debian Bookworm 12")
_DEB11 = _l("Debian 11", "Debian Bullseye 11")
_DEB10 = _l("Debian 10", "Debian Buster 10")
_DEB9 = _l("Debian 9", "Debian Stretch 9.0")
_UBUNTU = _l(
    "Ubuntu", "Ubuntu Noble Numbat 24.04", "Ubuntu Jammy Jellyfish 22.04", "Ubuntu Focal Fossa 20.04"
)
_SLES15 = _l("SUSE Linux Enterprise Server 15", "SUSE Linux Enterprise Server 15 (64-bit)")
_SLES12 = _l("SUSE Linux Enterprise Server 12", "SUSE Linux Enterprise Server 12 SP5 (64-bit)")
_SLES11 = _l("SUSE Linux Enterprise Server 11", "SUSE Linux Enterprise Server 11 SP4 (64-bit)")
_LINUX = _l("Linux (2.6 or later kernel)")
_LINUX24 = _l("Linux 2.4 kernel", ostype="l24")
_SOLARIS = GuestOs("Solaris", "other", "solaris")
_FREEBSD = GuestOs("FreeBSD", "other", "other")
OTHER: Final = GuestOs("Other", "other", "other")

GUEST_OS: Final[Mapping[str, GuestOs]] = {
    **dict.fromkeys(("winXPProGuest", "winXPPro64Guest", "winXPHomeGuest"), _XP),
    **dict.fromkeys(
        (
            "winNetStandardGuest",
            "winNetStandard64Guest",
            "winNetEnterpriseGuest",
            "winNetEnterprise64Guest",
            "winNetDatacenterGuest",
            "winNetDatacenter64Guest",
            "winNetWebGuest",
            "winNetBusinessGuest",
        ),
        _2003,
    ),
    **dict.fromkeys(("winVistaGuest", "winVista64Guest"), _VISTA),
    **dict.fromkeys(("winLonghornGuest", "winLonghorn64Guest"), _2008),
    **dict.fromkeys(("windows7Guest", "windows7_64Guest"), _WIN7),
    "windows7Server64Guest": _2008R2,
    **dict.fromkeys(("windows8Guest", "windows8_64Guest"), _WIN8),
    **dict.fromkeys(("windows8Server64Guest", "windowsHyperVGuest"), _2012),
    **dict.fromkeys(("windows9Guest", "windows9_64Guest"), _WIN10),
    "windows9Server64Guest": _2016,
    "windows2019srv_64Guest": _2019,
    "windows2019srvNext_64Guest": _2022,
    "windows2022srvNext_64Guest": _2025,
    **dict.fromkeys(("windows11_64Guest", "windows12_64Guest"), _WIN11),
    **dict.fromkeys(("rhel9_64Guest",), _RHEL9),
    "rhel8_64Guest": _RHEL8,
    **dict.fromkeys(("rhel7Guest", "rhel7_64Guest"), _RHEL7),
    **dict.fromkeys(("rhel6Guest", "rhel6_64Guest"), _RHEL6),
    "centos9_64Guest": _CENTOS9,
    "centos8_64Guest": _CENTOS8,
    **dict.fromkeys(("centos7Guest", "centos7_64Guest"), _CENTOS7),
    "rockylinux_64Guest": _ROCKY,
    "almalinux_64Guest": _ALMA,
    "oracleLinux9_64Guest": _OL9,
    "oracleLinux8_64Guest": _OL8,
    **dict.fromkeys(("oracleLinux7Guest", "oracleLinux7_64Guest"), _OL7),
    "debian13_64Guest": _DEB13,
    "debian12_64Guest": _DEB12,
    "debian11_64Guest": _DEB11,
    "debian10_64Guest": _DEB10,
    "debian9_64Guest": _DEB9,
    **dict.fromkeys(("ubuntuGuest", "ubuntu64Guest"), _UBUNTU),
    **dict.fromkeys(("sles16_64Guest", "sles15_64Guest"), _SLES15),
    "sles12_64Guest": _SLES12,
    "sles11_64Guest": _SLES11,
    **dict.fromkeys(
        (
            "other6xLinux64Guest",
            "other6xLinuxGuest",
            "other5xLinux64Guest",
            "other5xLinuxGuest",
            "other4xLinux64Guest",
            "other4xLinuxGuest",
            "other3xLinux64Guest",
            "other3xLinuxGuest",
            "other26xLinux64Guest",
            "other26xLinuxGuest",
            "otherLinux64Guest",
            "otherLinuxGuest",
        ),
        _LINUX,
    ),
    **dict.fromkeys(("other24xLinuxGuest", "other24xLinux64Guest"), _LINUX24),
    **dict.fromkeys(("solaris10_64Guest", "solaris11_64Guest"), _SOLARIS),
    **dict.fromkeys(("otherGuest", "otherGuest64"), OTHER),
}

# Ids not in the table above still say what they are; newer Windows first so they get win11.
_PATTERNS: Final[tuple[tuple[re.Pattern[str], GuestOs], ...]] = (
    (re.compile(r"^windows20\d\d"), _w("Windows Server (newer than this table)", "win11")),
    (re.compile(r"^win"), _w("Windows (unrecognised version)", "win10")),
    (
        re.compile(
            r"^(rhel|centos|rocky|alma|oracle|debian|ubuntu|sles|suse|opensuse|fedora|photon|coreos|"
            r"amazonlinux|asianux|mandr|novell|turbo|redhat|other\d*x?linux|.*linux)",
            re.I,
        ),
        _LINUX,
    ),
    (re.compile(r"^freebsd", re.I), _FREEBSD),
    (re.compile(r"^solaris", re.I), _SOLARIS),
)


def guest_os(guest_id: str, full_name: str = "") -> tuple[GuestOs, str]:
    """The table row for a guest id, and a reason saying how it was found."""
    if guest_id in GUEST_OS:
        row = GUEST_OS[guest_id]
        return row, f"guest id {guest_id} is {row.label}"
    for pattern, row in _PATTERNS:
        if pattern.search(guest_id):
            return row, f"guest id {guest_id!r} is not in the table; its name says {row.label}"
    lowered = full_name.lower()
    if "windows" in lowered:
        return _PATTERNS[1][1], f"guest id {guest_id!r} unknown; guest name {full_name!r} says Windows"
    if "linux" in lowered:
        return _LINUX, f"guest id {guest_id!r} unknown; guest name {full_name!r} says Linux"
    return OTHER, f"guest id {guest_id!r} unknown; treated as other"


def xcp_template_candidates(os: GuestOs, firmware: str) -> tuple[str, ...]:
    """Templates to try on XCP-ng, most specific first, ending with a generic one."""
    generic: tuple[str, ...]
    if os.family == "linux":
        generic = ("Generic Linux UEFI" if firmware == "efi" else "Generic Linux BIOS", "Other install media")
    else:
        generic = ("Other install media",)
    return tuple(dict.fromkeys((*os.xcp_templates, *generic)))


# -- devices --------------------------------------------------------------------------------

MAX_DISKS: Final[Mapping[Bus, int]] = {"scsi": 31, "sata": 6, "ide": 4, "virtio": 16}
MAX_PVE_NICS: Final = 32
MAX_XCP_VBDS: Final = 16
MAX_XCP_VIFS: Final = 7


@dataclass(frozen=True, slots=True)
class Devices:
    """Disk bus, SCSI controller and NIC model for a Proxmox VM."""

    bus: Bus
    scsihw: str | None
    nic: str
    reason: str


# Windows 8/Server 2012 and later ship no driver for the plain e1000 (82540EM), only for e1000e.
_WINDOWS_E1000E: Final = frozenset({"win8", "win10", "win11"})


def proxmox_devices(os: GuestOs, mode: WindowsMode) -> Devices:
    """Which emulated hardware the guest can boot with on its first start under KVM."""
    if os.family == "linux" and os.ostype == "l26":
        return Devices(
            "scsi",
            "virtio-scsi-single",
            "virtio",
            "Linux has virtio drivers in the kernel: virtio-scsi-single disks, virtio NICs",
        )
    if os.family == "windows":
        if mode == "virtio":
            return Devices(
                "scsi",
                "virtio-scsi-single",
                "virtio",
                "Windows with virtio drivers installed: virtio-scsi-single disks, virtio NICs",
            )
        nic = "e1000e" if os.ostype in _WINDOWS_E1000E else "e1000"
        why = "Windows 8/2012 and later have no inbox e1000 driver" if nic == "e1000e" else "inbox driver"
        return Devices(
            "sata",
            None,
            nic,
            f"Windows safe first boot: SATA disks and {nic} NICs ({why}); switch to virtio "
            f"after installing the virtio drivers",
        )
    if os.ostype == "l24":
        return Devices("ide", None, "e1000", "Linux 2.4 kernel: IDE disks and e1000 NICs, no virtio drivers")
    return Devices(
        "sata",
        None,
        "e1000",
        "unknown guest OS: SATA disks and e1000 NICs, which nearly every OS has drivers for",
    )


def disk_slot(bus: Bus, index: int) -> str:
    return f"{bus}{index}"


def drive_options(bus: Bus, fmt: str) -> str:
    """Options after the volume in a Proxmox drive string; discard lets thin storage shrink."""
    parts = [f"format={fmt}", "discard=on"]
    if bus == "scsi":
        parts.append("iothread=1")  # one IO thread per disk needs virtio-scsi-single, which we set
    return ",".join(parts)


def pve_mac(mac: str) -> str:
    return mac.upper()


def pve_net(model: str, mac: str | None, bridge: str, vlan: int | None, connected: bool) -> str:
    head = f"{model}={pve_mac(mac)}" if mac else model
    parts = [head, f"bridge={bridge}"]
    if vlan is not None:
        parts.append(f"tag={vlan}")
    if not connected:
        parts.append("link_down=1")
    return ",".join(parts)


# -- firmware -------------------------------------------------------------------------------


def proxmox_machine(firmware: str) -> tuple[str, str]:
    if firmware == "efi":
        return "q35", "EFI guests need q35 for OVMF with Secure Boot and PCIe"
    return "pc", "BIOS guest: i440fx (Proxmox's default machine) is the closest to VMware's BIOS hardware"


def proxmox_efidisk(storage: str, fmt: str, secure_boot: bool) -> str:
    keys = 1 if secure_boot else 0
    return f"{storage}:1,format={fmt},efitype=4m,pre-enrolled-keys={keys}"


def proxmox_tpm(storage: str) -> str:
    return f"{storage}:1,version=v2.0"


# -- disk formats ---------------------------------------------------------------------------

PROXMOX_FORMATS: Final[Mapping[str, ProxmoxFormat]] = {
    **dict.fromkeys(("lvmthin", "lvm", "zfspool", "zfs", "rbd", "iscsi", "iscsidirect", "btrfs"), "raw"),
    **dict.fromkeys(("dir", "nfs", "cifs", "glusterfs"), "qcow2"),
}
XCP_FORMATS: Final[Mapping[str, XcpFormat]] = dict.fromkeys(
    (
        "lvm",
        "lvmoiscsi",
        "lvmohba",
        "lvmofcoe",
        "ext",
        "nfs",
        "smb",
        "file",
        "xfs",
        "zfs",
        "glusterfs",
        "cephfs",
        "moosefs",
    ),
    "vhd",
)


# A dynamic VHD addresses at most 2040 GiB; XCP-ng takes larger disks only as raw.
VHD_MAX_BYTES: Final = 2040 * 1024**3


def disk_format(
    kind: str, storage_type: str, overrides: Mapping[str, str], capacity_bytes: int = 0
) -> tuple[str, str]:
    """Image format for a storage type on a target kind (and a disk of that size), and why."""
    fmt, why = _table_format(kind, storage_type, overrides)
    if fmt == "vhd" and capacity_bytes > VHD_MAX_BYTES:
        return (
            "raw",
            f"{why}, but VHD stops at 2040 GiB and this disk has {capacity_bytes / 1024**3:.0f} GiB: raw",
        )
    return fmt, why


def _table_format(kind: str, storage_type: str, overrides: Mapping[str, str]) -> tuple[str, str]:
    if storage_type in overrides:
        return overrides[
            storage_type
        ], f"playbook options.disk_format sets {storage_type} -> {overrides[storage_type]}"
    table: Mapping[str, str] = PROXMOX_FORMATS if kind == "proxmox" else XCP_FORMATS
    if storage_type in table:
        fmt = table[storage_type]
        return fmt, f"{fmt} is the format for {storage_type} storage"
    return "raw", f"storage type {storage_type!r} is not in the table; raw works on every storage"


# -- names ----------------------------------------------------------------------------------

# Letters NFKD does not split into base letter + accent.
_TRANSLIT: Final = str.maketrans(
    {
        "ß": "ss",
        "Æ": "AE",
        "æ": "ae",
        "Ø": "O",
        "ø": "o",
        "Œ": "OE",
        "œ": "oe",
        "Ł": "L",
        "ł": "l",
        "Đ": "D",
        "đ": "d",
        "Þ": "Th",
        "þ": "th",
        "Ð": "D",
        "ð": "d",
        "ı": "i",
        "Ħ": "H",
        "ħ": "h",
    }
)


def transliterate(text: str) -> str:
    """ASCII look-alike of ``text``: accents dropped, a few letters spelled out, others removed."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_TRANSLIT))
    return "".join(c for c in decomposed if c.isascii())


def proxmox_name(text: str) -> str:
    """A name valid under Proxmox's DNS-name rule, or "" if nothing usable is left.

    Labels are [A-Za-z0-9-] without a leading or trailing hyphen, joined by dots, each at most
    63 characters; anything else becomes a single hyphen.
    """
    ascii_text = transliterate(text)
    labels = []
    for raw in ascii_text.split("."):
        label = re.sub(r"[^A-Za-z0-9]+", "-", raw).strip("-")[:63].strip("-")
        if label:
            labels.append(label)
    return ".".join(labels)[:253].strip(".-")


def xcp_name(text: str) -> str:
    """XCP-ng takes any text as a name label; only control characters are replaced."""
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in text).strip()


def gib(n: int | float) -> str:
    return f"{n / GiB:.1f} GiB"
