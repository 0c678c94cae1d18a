"""Run qemu-img (argv from ``formats``) and turn its failures into migrate errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import structlog

from migrate.disks import formats
from migrate.disks.formats import ImageFormat, ImageInfo
from migrate.errors import PermanentError

log = structlog.get_logger(__name__)


def run(argv: list[str], *, timeout: float | None = None) -> str:
    """Run a qemu tool; return stdout, or raise PermanentError quoting its stderr."""
    if shutil.which(argv[0]) is None:
        raise PermanentError(f"{argv[0]} is not installed", system="qemu", hint="apt-get install qemu-utils")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PermanentError(
            f"{' '.join(argv[:2])} did not finish within {timeout} s", system="qemu"
        ) from exc
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()[-2000:]
        hint = "free space on the target storage, then resume" if "No space left" in message else None
        raise PermanentError(f"{' '.join(argv[:2])} failed: {message}", system="qemu", hint=hint)
    return proc.stdout


def image_info(path: str | Path, fmt: str | None = None) -> ImageInfo:
    return formats.parse_info(run(formats.info_args(str(path), fmt)))[0]


def create_image(path: Path, fmt: ImageFormat, size_bytes: int) -> None:
    """A new empty image (an existing file is replaced)."""
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    run(formats.create_args(str(path), fmt, size_bytes))


def allocated_bytes(path: str | Path) -> int:
    """Bytes the file really takes on disk (``du``), not its apparent size."""
    return os.stat(path).st_blocks * 512


def convert_image(
    source: str | Path,
    target: Path,
    *,
    source_format: str | None,
    target_format: ImageFormat,
    source_image_opts: bool = False,
) -> ImageInfo:
    """``qemu-img convert`` keeping sparseness (zero runs are not written); returns the target's info.

    For a staged raw or a local vmdk chain this is the fastest whole-image conversion; the
    streaming pipeline is for bytes still on their way from vSphere.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    argv = formats.convert_args(
        str(source),
        str(target),
        source_format=source_format,
        target_format=target_format,
        source_image_opts=source_image_opts,
    )
    log.info("qemu_img_convert", source=str(source)[:200], target=str(target), format=target_format)
    run(argv)
    return image_info(target, target_format)
