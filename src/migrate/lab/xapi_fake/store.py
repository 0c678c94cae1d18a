"""The fake's database: one table per datamodel class, rows keyed by ``OpaqueRef:...``.

Rows hold every field of their class (defaults from the datamodel, zero values otherwise),
in internal form (ints as ints). The "many" side of XAPI's one-to-many relations (``VM.VBDs``,
``SR.VDIs``, ``host.resident_VMs``...) is never stored: it is computed from the other side
when read, as xapi's database does, so it cannot drift.
"""

from __future__ import annotations

import copy
import json
import threading
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from migrate.errors import LabError
from migrate.lab.xapi_fake.datamodel import NULL_REF, Datamodel, XapiError

# (class, set field) -> (class, ref field) pointing back; from xapi's datamodel ``all_relations``.
RELATIONS: Final[dict[tuple[str, str], tuple[str, str]]] = {
    ("VM", "snapshots"): ("VM", "snapshot_of"),
    ("VM", "children"): ("VM", "parent"),
    ("VM", "VBDs"): ("VBD", "VM"),
    ("VM", "VIFs"): ("VIF", "VM"),
    ("VM", "VTPMs"): ("VTPM", "VM"),
    ("VM", "consoles"): ("console", "VM"),
    ("VM", "crash_dumps"): ("crashdump", "VM"),
    ("VM", "VGPUs"): ("VGPU", "VM"),
    ("VDI", "snapshots"): ("VDI", "snapshot_of"),
    ("VDI", "VBDs"): ("VBD", "VDI"),
    ("VDI", "crash_dumps"): ("crashdump", "VDI"),
    ("SR", "VDIs"): ("VDI", "SR"),
    ("SR", "PBDs"): ("PBD", "SR"),
    ("host", "PBDs"): ("PBD", "host"),
    ("host", "PIFs"): ("PIF", "host"),
    ("host", "resident_VMs"): ("VM", "resident_on"),
    ("host", "host_CPUs"): ("host_cpu", "host"),
    ("network", "VIFs"): ("VIF", "network"),
    ("network", "PIFs"): ("PIF", "network"),
    ("PIF", "VLAN_slave_of"): ("VLAN", "tagged_PIF"),
    ("task", "subtasks"): ("task", "subtask_of"),
}


def new_ref() -> str:
    return f"OpaqueRef:{uuidlib.uuid4()}"


class Store:
    """Tables of rows; callers hold ``lock`` around anything that reads then writes."""

    def __init__(self, dm: Datamodel) -> None:
        self.dm = dm
        self.tables: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in dm.classes}
        self.lock = threading.RLock()

    # -- rows ---------------------------------------------------------------------------------

    def create(self, cls: str, values: dict[str, Any] | None = None, *, ref: str | None = None) -> str:
        """A new row with ``values`` over the datamodel defaults; returns its reference."""
        values = copy.deepcopy(values or {})  # no row shares a map or set with another
        fields = self.dm.classes[cls].fields
        unknown = set(values) - set(fields)
        if unknown:
            raise LabError(f"XAPI fake: {cls} has no field(s) {sorted(unknown)}")
        row: dict[str, Any] = {}
        for name, f in fields.items():
            if name in values:
                row[name] = values[name]
            elif f.default is not None:
                row[name] = self.dm.parse_default(f.ty, f.default)
            else:
                row[name] = self.dm.zero(f.ty)
        if "uuid" in row and not row["uuid"]:
            row["uuid"] = str(uuidlib.uuid4())
        ref = ref or new_ref()
        with self.lock:
            self.tables[cls][ref] = row
        return ref

    def exists(self, cls: str, ref: str) -> bool:
        return ref in self.tables.get(cls, {})

    def row(self, cls: str, ref: str) -> dict[str, Any]:
        """The stored row (mutable); HANDLE_INVALID as xapi answers for a reference it does not know."""
        try:
            return self.tables[cls][ref]
        except KeyError:
            raise XapiError("HANDLE_INVALID", cls, ref) from None

    def get(self, cls: str, ref: str, name: str) -> Any:
        row = self.row(cls, ref)
        back = RELATIONS.get((cls, name))
        if back:
            return self.pointing_at(back[0], back[1], ref)
        return copy.deepcopy(row[name])

    def record(self, cls: str, ref: str) -> dict[str, Any]:
        row = copy.deepcopy(self.row(cls, ref))
        for (owner, name), (child, fk) in RELATIONS.items():
            if owner == cls and name in row:
                row[name] = self.pointing_at(child, fk, ref)
        return row

    def set(self, cls: str, ref: str, name: str, value: Any) -> None:
        self.row(cls, ref)[name] = value

    def destroy(self, cls: str, ref: str) -> None:
        self.row(cls, ref)
        del self.tables[cls][ref]

    # -- queries ------------------------------------------------------------------------------

    def refs(self, cls: str) -> list[str]:
        return list(self.tables[cls])

    def items(self, cls: str) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from list(self.tables[cls].items())

    def where(self, cls: str, **equal: Any) -> list[str]:
        return [
            ref for ref, row in self.tables[cls].items() if all(row.get(k) == v for k, v in equal.items())
        ]

    def one(self, cls: str, **equal: Any) -> str:
        found = self.where(cls, **equal)
        if len(found) != 1:
            raise LabError(f"XAPI fake: expected one {cls} with {equal}, found {len(found)}")
        return found[0]

    def by_uuid(self, cls: str, uuid: str) -> str:
        for ref, row in self.tables[cls].items():
            if row.get("uuid") == uuid:
                return ref
        raise XapiError("UUID_INVALID", cls, uuid)

    def pointing_at(self, cls: str, fk: str, ref: str) -> list[str]:
        if ref == NULL_REF:
            return []
        return [r for r, row in self.tables.get(cls, {}).items() if row.get(fk) == ref]

    # -- persistence --------------------------------------------------------------------------

    def dump(self, path: Path) -> None:
        with self.lock:
            data = {cls: rows for cls, rows in self.tables.items() if rows}
            text = json.dumps(data, sort_keys=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    def load(self, path: Path) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        with self.lock:
            for cls, rows in data.items():
                if cls in self.tables:
                    self.tables[cls] = rows
