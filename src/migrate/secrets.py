"""Secret references (``env:NAME``, ``file:path``) and a value type that never prints itself.

Inventories hold references, never secrets. A reference is resolved only when a connector
needs the value; the resolved ``Secret`` renders as ``'***'`` in repr, str, logs and
tracebacks, and the log redactor (``migrate.log``) masks every revealed value it has seen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

_revealed: set[str] = set()  # values handed out, so the log redactor can mask them anywhere

REFERENCE_HELP: Final = (
    "write a reference instead of the secret: 'env:VARIABLE' (read from the environment) or "
    "'file:/path/to/file' (first line of the file, relative paths from the inventory's folder)"
)


class Secret:
    """A resolved secret. Only ``reveal()`` gives the value; everything else shows ``***``."""

    __slots__ = ("_reference", "_value")

    def __init__(self, value: str, reference: str = "") -> None:
        self._value = value
        self._reference = reference

    def reveal(self) -> str:
        if self._value:
            _revealed.add(self._value)
        return self._value

    @property
    def reference(self) -> str:
        return self._reference

    def __repr__(self) -> str:
        return f"Secret({self._reference or '***'})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._reference == self._reference

    def __hash__(self) -> int:
        return hash(self._reference)

    def __reduce__(self) -> str | tuple[object, ...]:  # never pickle the value (into a worker, a dump)
        raise TypeError("Secret cannot be pickled")


def is_reference(text: str) -> bool:
    return text.startswith(("env:", "file:"))


def resolve(reference: str, base_dir: Path | None = None) -> Secret:
    """Turn ``env:NAME`` or ``file:path`` into a Secret; raise ValueError with a fix on failure."""
    if reference.startswith("env:"):
        name = reference[4:]
        if not name:
            raise ValueError("'env:' needs a variable name, e.g. env:VSPHERE_PASSWORD")
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set; export {name}=... before running")
        return Secret(os.environ[name], reference)
    if reference.startswith("file:"):
        raw = reference[5:]
        if not raw:
            raise ValueError("'file:' needs a path, e.g. file:~/.config/migrate/vsphere.pass")
        path = Path(raw).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
        if not lines or not lines[0]:
            raise ValueError(f"secret file {path} is empty; put the secret on its first line")
        return Secret(lines[0], reference)
    raise ValueError(f"a literal secret is not allowed here; {REFERENCE_HELP}")


def revealed_values() -> frozenset[str]:
    return frozenset(_revealed)
