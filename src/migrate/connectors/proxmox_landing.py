"""Disk landings on a Proxmox VE node: where they go, and the shell commands that make them.

A landing is ``<storage path>/import/<vm>-<disk key>-<run tag>.raw`` on an active directory
storage with the ``import`` content type, on the VM's node. A node-local storage is chosen
before a shared one (the bytes cross the network once and the import reads locally), then
the one with most room. The file is created at the disk's full size so that every offset is
valid and unwritten regions stay holes (``proxmox_sink`` writes into it).

Next to it, ``<landing>.progress`` holds the length known to be on disk (written after each
fsync). ``reset`` refuses to continue beyond it: a transfer record claiming more would leave
zeros where the guest had data.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from migrate.connectors.base import DiskLanding
from migrate.connectors.nodeshell import NodeShell
from migrate.errors import PermanentError


def progress_path(path: str) -> str:
    return path + ".progress"


@dataclass(frozen=True, slots=True)
class ImportStorage:
    """A directory storage on a node that can hold files to import (content 'import')."""

    name: str
    path: str
    shared: bool
    avail: int

    @property
    def directory(self) -> str:
        return self.path.rstrip("/") + "/import"


def import_storages(
    listing: Iterable[Mapping[str, Any]], config: Mapping[str, Mapping[str, Any]]
) -> list[ImportStorage]:
    """The active storages of a node listing (GET /nodes/{node}/storage?content=import) that have a
    directory in the storage config (GET /storage)."""
    out = []
    for item in listing:
        name = str(item.get("storage", ""))
        path = config.get(name, {}).get("path")
        if item.get("active") and path:
            out.append(ImportStorage(name, str(path), bool(item.get("shared")), int(item.get("avail") or 0)))
    return sorted(out, key=lambda s: s.name)


def choose(stores: list[ImportStorage], size: int, preferred: str, where: str, system: str) -> ImportStorage:
    """The storage for a new landing of ``size`` bytes; ``preferred`` (the inventory's choice) if set."""
    if preferred:
        chosen = next((s for s in stores if s.name == preferred), None)
        if chosen is None:
            raise PermanentError(
                f"landing storage {preferred} is not an active directory storage with content 'import' "
                f"on {where}",
                system=system,
                hint=f"pvesm set {preferred} --content ...,import, or choose another landing storage",
            )
        return chosen
    roomy = sorted((s for s in stores if s.avail >= size), key=lambda s: (s.shared, -s.avail, s.name))
    if not roomy:
        have = ", ".join(f"{s.name} ({s.avail} bytes free)" for s in stores) or "none"
        raise PermanentError(
            f"no storage on {where} can take a {size}-byte landing (import storages: {have})",
            system=system,
            hint="free space, or add 'import' to the content of a directory storage with room "
            "(pvesm set <storage> --content ...,import)",
        )
    return roomy[0]


def volid(path: str, config: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The volume id (``local:import/x.raw``) of the landing at ``path``, None if no storage holds it."""
    directory, _, filename = path.rpartition("/")
    for name, conf in sorted(config.items()):
        content = str(conf.get("content", "")).split(",")
        if (
            "import" in content
            and conf.get("path")
            and str(conf["path"]).rstrip("/") + "/import" == directory
        ):
            return f"{name}:import/{filename}"
    return None


# -- shell commands ---------------------------------------------------------------------------

# Keep [0, offset) of an earlier attempt, make the rest holes. An offset beyond what the
# sidecar says is durable would leave zeros where the guest had data: refuse (exit 4).
_RESET: Final = r"""
p=$1 o=$2 s=$3
mkdir -p -- "$(dirname -- "$p")" || exit 1
if [ "$o" -gt 0 ]; then
  [ -f "$p" ] || { echo "missing" >&2; exit 3; }
  d=$(cat -- "$p.progress" 2>/dev/null || echo 0)
  [ "$d" -ge "$o" ] 2>/dev/null || { echo "$d" >&2; exit 4; }
fi
truncate -s "$o" -- "$p" && truncate -s "$s" -- "$p" || exit 1
printf '%s\n' "$o" > "$p.progress.tmp" && mv -f -- "$p.progress.tmp" "$p.progress"
"""
# Record the durable length, then report the file's size and allocation ("size blocks blocksize").
_DURABLE: Final = r"""[ -f "$1" ] || { echo "$1 is gone" >&2; exit 1; }
printf '%s\n' "$2" > "$1.progress.tmp" && mv -f -- "$1.progress.tmp" "$1.progress" &&
stat -L -c '%s %b %B' -- "$1" """
# Reuse the first candidate that exists, else make the new one ($2; "" for none): print which.
_ENSURE: Final = r"""size=$1 new=$2; shift 2
for p in "$@"; do
  if [ -f "$p" ]; then truncate -s "$size" -- "$p" && printf 'found %s\n' "$p"; exit; fi
done
[ -n "$new" ] || exit 0
mkdir -p -- "$(dirname -- "$new")" && truncate -s "$size" -- "$new" && printf 'made %s\n' "$new" """
_FIND: Final = r"""pat=$1; shift
for d in "$@"; do [ -d "$d" ] && find "$d" -maxdepth 1 -type f -name "$pat" -print; done; exit 0"""


def sh(script: str, *args: str | int) -> str:
    """A ``sh -c`` command line running ``script`` with ``args`` as $1, $2, ..."""
    return shlex.join(["sh", "-c", script, "sh", *(str(a) for a in args)])


def ensure(shell: NodeShell, candidates: list[str], new: str, size: int) -> tuple[str, bool]:
    """The landing among ``candidates`` that exists (resized to ``size``, bytes kept), else ``new``
    made at that size; (path, found). ("", False) when none exists and ``new`` is ""."""
    out = shell.run(sh(_ENSURE, size, new, *candidates)).text.strip()
    how, _, path = out.partition(" ")
    return path, how == "found"


def find(shell: NodeShell, directories: list[str], pattern: str) -> list[str]:
    if not directories:
        return []
    return sorted(line for line in shell.run(sh(_FIND, pattern, *directories)).text.splitlines() if line)


def delete(shell: NodeShell, path: str) -> None:
    shell.run(["rm", "-f", "--", path, progress_path(path), progress_path(path) + ".tmp"])


def reset(shell: NodeShell, landing: DiskLanding, offset: int) -> None:
    """Prepare ``landing`` to receive bytes from ``offset``: keep what is before, drop what is after."""
    result = shell.run(sh(_RESET, landing.ref, offset, landing.size_bytes), check=False)
    if result.exit_status == 0:
        return
    said = result.stderr.decode(errors="replace").strip()
    where = f"landing {landing.ref} on node {landing.node}"
    if result.exit_status == 3:
        raise PermanentError(
            f"{where} is gone; it cannot continue at byte {offset}",
            system=landing.node,
            hint="resume the run: the transfer starts again into a new landing",
        )
    if result.exit_status == 4:
        raise PermanentError(
            f"{where} holds {said or 0} bytes known to be on disk, less than the {offset} the transfer "
            "record claims; continuing would leave zeros in the disk",
            system=landing.node,
            hint="roll this VM back (its landing is removed) and run it again",
        )
    raise PermanentError(f"preparing {where} failed (exit {result.exit_status}): {said}", system=landing.node)


def mark_durable(shell: NodeShell, path: str, length: int) -> tuple[int, int]:
    """Record that [0, length) of the landing is on disk (after the receiver's fsync); returns the
    file's (size, allocated bytes)."""
    out = shell.run(sh(_DURABLE, path, length)).text
    try:
        size, blocks, block_size = (int(word) for word in out.split())
    except ValueError:
        raise PermanentError(f"stat of {path} on {shell.where} said {out!r}", system=shell.node) from None
    return size, blocks * block_size
