"""Hand-assembled boot code that proves a migrated disk booted: it prints one known line on COM1.

Two programs, both written out byte by byte so the lab needs no assembler, compiler or
signed loader:

* ``mbr_boot_code``: x86 real-mode code for a BIOS master boot record. The BIOS loads sector 0
  at 0000:7C00 and jumps to it; the code polls the 16550 UART's line status register and
  writes the message to COM1 (I/O port 0x3F8), then halts with interrupts off.
* ``efi_application``: a minimal PE32+ EFI application (x86-64, subsystem 10). UEFI calls its
  entry point with the Microsoft x64 ABI (RCX = ImageHandle, RDX = SystemTable); it calls
  ``SystemTable->ConOut->OutputString`` with a UCS-2 copy of the message, which OVMF's
  terminal driver mirrors to the serial port, then sleeps in a ``hlt`` loop. It is
  position independent (RIP-relative addressing) and so needs no relocation table.

Both print ``"\\r\\n" + serial_line(tag) + "\\r\\n"`` so a checker can match a whole line.
"""

from __future__ import annotations

import re
import struct
import unicodedata

BOOT_MARKER = "MIGRATE-LAB-BOOT-OK"
MBR_CODE_SIZE = 440  # bytes before the disk signature at 0x1B8
_TAG_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def ascii_tag(name: str) -> str:
    """An ASCII-safe boot tag for a VM name: accents dropped, other runs of odd characters -> '-'.

    >>> ascii_tag("Žluťoučký kůň / db")
    'Zlutoucky-kun-db'
    """
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", folded).strip("-")
    return tag[:64] or "disk"


def serial_line(tag: str) -> str:
    """The exact line a boot disk built for ``tag`` prints on the serial port."""
    if not _TAG_RE.fullmatch(tag):
        raise ValueError(f"boot tag must be 1-64 characters of A-Z a-z 0-9 . _ - (got {tag!r})")
    return f"{BOOT_MARKER} {tag}"


# -- BIOS: real-mode MBR code --------------------------------------------------------------

# Offsets are from 0x7C00; the message follows the code at _MBR_MSG.
_MBR_MSG = 35
_MBR_CODE = bytes(
    [
        0xFA,              # 00 cli
        0x31, 0xC0,        # 01 xor ax, ax
        0x8E, 0xD8,        # 03 mov ds, ax            ; DS=0, so [si] is a linear address
        0xFC,              # 05 cld                   ; lodsb walks forwards
        0xBE, *struct.pack("<H", 0x7C00 + _MBR_MSG),  # 06 mov si, msg
        0xAC,              # 09 next: lodsb           ; al = [si++]
        0x84, 0xC0,        # 0A test al, al
        0x74, 0x12,        # 0C jz done (0x20)        ; NUL ends the message
        0x88, 0xC3,        # 0E mov bl, al            ; keep the byte while polling
        0xBA, 0xFD, 0x03,  # 10 mov dx, 0x3FD         ; COM1 line status register
        0xEC,              # 13 wait: in al, dx
        0xA8, 0x20,        # 14 test al, 0x20         ; transmit holding register empty?
        0x74, 0xFB,        # 16 jz wait (0x13)
        0x88, 0xD8,        # 18 mov al, bl
        0xBA, 0xF8, 0x03,  # 1A mov dx, 0x3F8         ; COM1 data register
        0xEE,              # 1D out dx, al
        0xEB, 0xE9,        # 1E jmp next (0x09)
        0xF4,              # 20 done: hlt             ; interrupts are off: stays here
        0xEB, 0xFD,        # 21 jmp done              ; (an NMI would resume here)
    ]
)  # fmt: skip
assert len(_MBR_CODE) == _MBR_MSG


def mbr_boot_code(message: str) -> bytes:
    """The first 440 bytes of an MBR that prints ``message`` (CRLF framed) on COM1 and halts."""
    text = f"\r\n{message}\r\n".encode("ascii") + b"\0"
    code = _MBR_CODE + text
    if len(code) > MBR_CODE_SIZE:
        raise ValueError(f"boot message too long for an MBR ({len(text)} bytes; at most 400)")
    return code.ljust(MBR_CODE_SIZE, b"\0")


# -- UEFI: PE32+ application ---------------------------------------------------------------

_FILE_ALIGN = 0x200
_SECTION_ALIGN = 0x1000
_TEXT_RVA = 0x1000
_EFI_MSG = 24  # offset of the UCS-2 message inside .text (8-byte aligned)
_EFI_CODE = bytes(
    [
        0x48, 0x83, 0xEC, 0x28,        # 00 sub rsp, 0x28          ; shadow space, 16-byte alignment
        0x48, 0x8B, 0x4A, 0x40,        # 04 mov rcx, [rdx+0x40]    ; SystemTable->ConOut
        0x48, 0x8D, 0x15, *struct.pack("<i", _EFI_MSG - 15),  # 08 lea rdx, [rip+msg]
        0xFF, 0x51, 0x08,              # 0F call [rcx+0x08]        ; ConOut->OutputString(ConOut, msg)
        0xF4,                          # 12 halt: hlt              ; wakes on the timer tick...
        0xEB, 0xFD,                    # 13 jmp halt               ; ...and sleeps again
    ]
)  # fmt: skip
# EFI_SYSTEM_TABLE: Hdr (24) FirmwareVendor (8) FirmwareRevision (4+4 pad) ConsoleInHandle (8)
# ConIn (8) ConsoleOutHandle (8) ConOut at 0x40. EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL: Reset at 0,
# OutputString at 8.


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def efi_application(message: str) -> bytes:
    """A PE32+ EFI application (for \\EFI\\BOOT\\BOOTX64.EFI) that prints ``message`` and idles."""
    text = _EFI_CODE.ljust(_EFI_MSG, b"\xcc") + f"\r\n{message}\r\n".encode("utf-16-le") + b"\0\0"
    raw_size = _align(len(text), _FILE_ALIGN)
    image_size = _TEXT_RVA + _align(len(text), _SECTION_ALIGN)

    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x40)  # e_lfanew: the PE header follows at once
    coff = struct.pack(
        "<HHIIIHH",
        0x8664,  # Machine: x86-64
        1,  # NumberOfSections
        0, 0, 0,  # TimeDateStamp, symbol table, symbols: 0 keeps the bytes reproducible
        240,  # SizeOfOptionalHeader: PE32+ with 16 data directories
        0x0022,  # EXECUTABLE_IMAGE | LARGE_ADDRESS_AWARE; relocs not "stripped", there are none
    )
    optional = struct.pack(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
        0x20B,  # PE32+
        0, 0,  # linker version
        raw_size, 0, 0,  # SizeOfCode, SizeOfInitializedData, SizeOfUninitializedData
        _TEXT_RVA,  # AddressOfEntryPoint
        _TEXT_RVA,  # BaseOfCode
        0x400000,  # ImageBase: the firmware loads wherever it likes; the code is PIC
        _SECTION_ALIGN, _FILE_ALIGN,
        0, 0, 0, 0, 0, 0,  # OS, image and subsystem versions
        0,  # Win32VersionValue
        image_size,
        _FILE_ALIGN,  # SizeOfHeaders
        0,  # CheckSum (UEFI does not check it)
        10,  # Subsystem: EFI_APPLICATION
        0,  # DllCharacteristics
        0x10000, 0x1000, 0x10000, 0x1000,  # stack and heap reserve/commit
        0,  # LoaderFlags
        16,  # NumberOfRvaAndSizes
    ) + bytes(16 * 8)  # fmt: skip
    section = struct.pack(
        "<8sIIIIIIHHI",
        b".text",
        len(text),  # VirtualSize
        _TEXT_RVA,
        raw_size,  # SizeOfRawData
        _FILE_ALIGN,  # PointerToRawData
        0, 0, 0, 0,
        0x60000020,  # CNT_CODE | MEM_EXECUTE | MEM_READ
    )  # fmt: skip
    headers = (bytes(dos) + b"PE\0\0" + coff + optional + section).ljust(_FILE_ALIGN, b"\0")
    return headers + text.ljust(raw_size, b"\0")
