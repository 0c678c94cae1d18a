"""Find a disk's snapshot chain on the datastore, and copy it locally for qemu to consolidate.

Descriptors are tiny and read into memory; extents are downloaded into a staging folder
(each file resumable where it stopped, zeros left as holes), renamed to plain ASCII names,
and the descriptors rewritten to point at them. qemu then opens the top with every backing
given explicitly, so hints that are absolute, on another datastore or inside a binary file
do not matter.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from migrate.disks.datastore import DatastoreFiles
from migrate.disks.sources import chain_image
from migrate.disks.vmdk import (
    MAX_CHAIN,
    MAX_DESCRIPTOR_BYTES,
    Chain,
    ChainLink,
    DatastorePath,
    localize,
    parse_descriptor,
    parse_sparse_header,
    render_descriptor,
    resolve_parent,
    split_datastore_path,
    validate_chain,
)
from migrate.errors import PermanentError

log = structlog.get_logger(__name__)

_PEEK = 64 << 10


def _files_for(files: DatastoreFiles, path: DatastorePath) -> DatastoreFiles:
    return files if path.datastore == files.datastore else files.for_datastore(path.datastore)


def read_link(files: DatastoreFiles, path: DatastorePath) -> ChainLink:
    """Read one descriptor: a text file, or the descriptor embedded in a hosted sparse file."""
    where = str(path)
    store = _files_for(files, path)
    head = store.read_bytes(path.path, 0, _PEEK, limit=_PEEK)
    header = parse_sparse_header(head[:512], where=where)
    if header is None and b"\0" in head:
        raise PermanentError(
            f"{where}: holds binary data, not a VMDK descriptor",
            system="vmdk",
            hint="name the disk's .vmdk descriptor, not its -flat/-delta extent file",
        )
    if header is None:
        if len(head) == _PEEK:  # a long descriptor (many extents): read the rest, within qemu's limit
            head = store.read_bytes(path.path, 0, MAX_DESCRIPTOR_BYTES, limit=MAX_DESCRIPTOR_BYTES)
        return ChainLink(path, parse_descriptor(head, where=where))
    span = header.descriptor_range
    if header.magic == "COWD" or span is None:
        raise PermanentError(
            f"{where}: is a bare {header.magic} sparse extent without a descriptor",
            system="vmdk",
            hint="pass the .vmdk descriptor that lists this extent, not the extent",
        )
    text = store.read_bytes(path.path, span[0], span[1], limit=MAX_DESCRIPTOR_BYTES)
    return ChainLink(path, parse_descriptor(text, where=where), embedded=True)


def discover_chain(
    files: DatastoreFiles,
    top: DatastorePath | str,
    *,
    chain: Sequence[str] = (),
    volumes: Mapping[str, str] | None = None,
) -> Chain:
    """Read the chain under ``top``: from ``chain`` (base first, e.g. ``Disk.chain``) when given,
    else by following ``parentFileNameHint``. Validated before it is returned."""
    top_path = split_datastore_path(top) if isinstance(top, str) else top
    if chain:
        paths = [split_datastore_path(p) for p in chain]
        if paths[-1] != top_path:
            raise PermanentError(
                f"chain ends at {paths[-1]}, not at the disk {top_path}",
                system="vmdk",
                hint="list the chain from the base disk up to the disk's current file",
            )
        links = [read_link(files, p) for p in paths]
        for child, parent in zip(links[1:], links[:-1], strict=True):
            hint = child.descriptor.parent_hint
            if hint and resolve_parent(child.path, hint, volumes).name != parent.path.name:
                log.warning("parent_hint_mismatch", disk=str(child.path), hint=hint, parent=str(parent.path))
    else:
        links = [read_link(files, top_path)]
        while links[0].descriptor.has_parent:
            hint = links[0].descriptor.parent_hint
            if not hint:
                raise PermanentError(
                    f"{links[0].path}: is a delta with no parentFileNameHint",
                    system="vmdk",
                    hint="pass the chain explicitly (Disk.chain)",
                )
            if len(links) > MAX_CHAIN:
                break  # validate_chain names the problem
            links.insert(0, read_link(files, resolve_parent(links[0].path, hint, volumes)))
    result = Chain(tuple(links))
    validate_chain(result)
    return result


@dataclass(frozen=True, slots=True)
class StagedChain:
    directory: Path
    descriptors: tuple[Path, ...]  # base first; what qemu opens for each link
    bytes_read: int

    def image(self) -> str:
        return chain_image([str(p) for p in self.descriptors])


def stage_chain(
    files: DatastoreFiles,
    chain: Chain,
    directory: Path,
    *,
    limit_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StagedChain:
    """Download every extent of ``chain`` into ``directory`` (resumable), write local descriptors."""
    directory.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[DatastorePath, Path]] = []
    descriptors: list[Path] = []
    for i, link in enumerate(chain.links):
        local_desc = directory / f"d{i}.vmdk"
        if link.embedded:
            plan.append((link.path, local_desc))
            descriptors.append(local_desc)
            continue
        names: list[str | None] = []
        zero_name = None
        for j, (extent, remote) in enumerate(zip(link.descriptor.extents, link.extent_paths(), strict=True)):
            if extent.kind == "ZERO" or remote is None:
                zero_name = f"d{i}-e{j}.zero"
                with open(directory / zero_name, "wb") as zero:
                    zero.truncate(extent.size_bytes)  # a hole: reads as zeros, takes no space
                names.append(zero_name)
                continue
            name = f"d{i}-e{j}.vmdk"
            plan.append((remote, directory / name))
            names.append(name)
        parent = f"d{i - 1}.vmdk" if i else None
        text = render_descriptor(localize(link.descriptor, names, zero_name, parent))
        _write_atomic(local_desc, text)
        descriptors.append(local_desc)

    sizes = [_files_for(files, remote).size(remote.path) for remote, _ in plan]
    need = sum(sizes)
    have = sum(local.stat().st_size for _, local in plan if local.exists())
    if limit_bytes is not None and need > limit_bytes:
        raise PermanentError(
            f"staging {chain.top.path} needs {need} bytes, more than the staging limit of {limit_bytes}",
            system="local",
            hint="raise the staging limit, or consolidate the VM's snapshots in vSphere so "
            "the disk streams without staging",
        )
    free = shutil.disk_usage(directory).free
    if need - have > free:
        log.warning("staging_may_not_fit", need=need - have, free=free, directory=str(directory))

    done, read = 0, 0
    for (remote, local), size in zip(plan, sizes, strict=True):
        base = done

        def report(position: int, _total: int, base: int = base) -> None:
            if progress:
                progress(base + position, need)

        result = _files_for(files, remote).download(remote.path, local, progress=report)
        read += result.bytes_read
        done += size
        log.info(
            "extent_staged",
            remote=str(remote),
            local=local.name,
            bytes=result.bytes_read,
            resumed_from=result.resumed_from,
            restarted=result.restarted,
        )
    return StagedChain(directory, tuple(descriptors), read)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
