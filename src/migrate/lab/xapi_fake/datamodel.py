"""XAPI's published datamodel (``xenapi.json``) as the fake's single source of truth.

Every class, field, message, parameter type and enum the fake knows comes from that file,
so a call the real XAPI would refuse is refused here the same way. Values are checked the
way XAPI's generated dispatcher unmarshals them (ocaml-rpc): an ``int`` may arrive as an
XML-RPC int or as a decimal string, an enum is matched case-insensitively, and a value of
the wrong shape is an ``INTERNAL_ERROR`` carrying OCaml's ``Failure(...)`` text.
"""

from __future__ import annotations

import json
import os
import xmlrpc.client
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal

from migrate.errors import LabError

DATAMODEL_ENV: Final = "MIGRATE_XAPI_DATAMODEL"
NULL_REF: Final = "OpaqueRef:NULL"
EPOCH: Final = "19700101T00:00:00Z"

Kind = Literal["string", "int", "float", "bool", "datetime", "ref", "enum", "set", "map", "record", "opaque"]


class XapiError(Exception):
    """An XAPI failure: ``ErrorDescription`` on the wire, ``XenAPI.Failure.details`` in the client."""

    def __init__(self, code: str, *params: object) -> None:
        super().__init__(code, *params)
        self.code = code
        self.params = tuple(str(p) for p in params)

    @property
    def description(self) -> list[str]:
        return [self.code, *self.params]


def internal(text: str) -> XapiError:
    # What xapi's ExnHelper makes of an OCaml ``Failure text`` raised while unmarshalling.
    return XapiError("INTERNAL_ERROR", f'Failure("{text}")')


@dataclass(frozen=True, slots=True)
class Ty:
    """A datamodel type such as ``(string -> enum vm_operations) map`` or ``VDI ref set``."""

    kind: Kind
    name: str = ""  # class of a ref/record, name of an enum
    of: Ty | None = None  # element of a set, value of a map
    key: Ty | None = None  # key of a map


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    ty: Ty
    qualifier: str  # RW, RO/constructor, RO/runtime
    default: str | None  # datamodel default (OCaml value syntax) or None
    removed: bool = False

    @property
    def in_constructor(self) -> bool:
        return self.qualifier in ("RW", "RO/constructor")


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    ty: Ty
    default: Any = None
    has_default: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    cls: str
    name: str
    params: tuple[Param, ...]
    result: Ty | None
    implicit: bool
    removed: bool
    errors: tuple[str, ...] = ()

    @property
    def wire_name(self) -> str:
        return f"{self.cls}.{self.name}"

    @property
    def has_session(self) -> bool:
        return bool(self.params) and self.params[0].ty == Ty("ref", "session")

    @property
    def args(self) -> tuple[Param, ...]:
        """Parameters after the session reference."""
        return self.params[1:] if self.has_session else self.params


@dataclass(frozen=True, slots=True)
class ClassDef:
    name: str
    fields: dict[str, Field]
    messages: dict[str, Message]
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)


# xenapi.json leaves out parameter defaults; XAPI's datamodel gives login_with_password two
# (clients commonly send just user and password), so they are restated here.
_PARAM_DEFAULTS: Final[dict[tuple[str, str], dict[str, Any]]] = {
    ("session", "login_with_password"): {"version": "1.1", "originator": ""},
}


def default_path() -> Path:
    if env := os.environ.get(DATAMODEL_ENV):
        return Path(env)
    # src/migrate/lab/xapi_fake/ -> the repository root, whose sibling ``shared`` holds the file.
    return Path(__file__).resolve().parents[4].parent / "shared" / "xapi" / "xenapi.json"


def parse_type(text: str) -> Ty:
    text = text.strip()
    if text.endswith(" set"):
        return Ty("set", of=parse_type(text[: -len(" set")]))
    if text.endswith(" map") and text.startswith("("):
        inner = text[1 : -len(") map")]
        depth = 0
        for i, ch in enumerate(inner):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and inner.startswith(" -> ", i):
                return Ty("map", key=parse_type(inner[:i]), of=parse_type(inner[i + 4 :]))
        raise LabError(f"xenapi.json: cannot parse map type {text!r}")
    if text.endswith(" ref"):
        return Ty("ref", text[: -len(" ref")])
    if text.endswith(" record"):
        return Ty("record", text[: -len(" record")])
    if text.startswith("enum "):
        return Ty("enum", text[len("enum ") :])
    if text in ("string", "int", "float", "bool", "datetime"):
        return Ty(text)  # type: ignore[arg-type]
    return Ty("opaque", text)


class Datamodel:
    """Classes by name, with every enum of the API in one table."""

    def __init__(self, raw: list[dict[str, Any]], source: str = "") -> None:
        self.source = source
        self.classes: dict[str, ClassDef] = {}
        self.enums: dict[str, tuple[str, ...]] = {}
        for cls in raw:
            for enum in cls.get("enums", ()):
                self.enums[enum["name"]] = tuple(v["name"] for v in enum["values"])
        for cls in raw:
            name = cls["name"]
            fields = {
                f["name"]: Field(
                    f["name"],
                    parse_type(f["type"]),
                    f["qualifier"],
                    f.get("default"),
                    removed=f["lifecycle"]["state"] == "Removed_s",
                )
                for f in cls["fields"]
            }
            messages = {}
            for m in cls["messages"]:
                defaults = _PARAM_DEFAULTS.get((name, m["name"]), {})
                params = tuple(
                    Param(p["name"], parse_type(p["type"]), defaults.get(p["name"]), p["name"] in defaults)
                    for p in m["params"]
                )
                result = None if m["result"][0] == "void" else parse_type(m["result"][0])
                messages[m["name"]] = Message(
                    name,
                    m["name"],
                    params,
                    result,
                    bool(m["implicit"]),
                    m["lifecycle"]["state"] == "Removed_s",
                    tuple(e["name"] for e in m["errors"]),
                )
            self.classes[name] = ClassDef(name, fields, messages)

    def cls(self, name: str) -> ClassDef | None:
        return self.classes.get(name)

    def message(self, wire_name: str) -> Message | None:
        """``VM.get_record``, or XAPI's alternative spelling ``VM_get_record``."""
        cls, dot, msg = wire_name.partition(".")
        if dot:
            owner = self.classes.get(cls)
            return owner.messages.get(msg) if owner else None
        for name in sorted(self.classes, key=len, reverse=True):
            if wire_name.startswith(name + "_"):
                found = self.classes[name].messages.get(wire_name[len(name) + 1 :])
                if found:
                    return found
        return None

    # -- values in (XML-RPC, as xmlrpc.client decodes it) -------------------------------------

    def from_wire(self, ty: Ty, value: Any) -> Any:
        """Check and convert one decoded XML-RPC value as XAPI's dispatcher would."""
        kind = ty.kind
        if kind in ("string", "ref"):
            if isinstance(value, str):
                return value
            raise internal(f"Expected string, got '{_rpc_repr(value)}'")
        if kind == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value, 0) if value.lower().startswith(("0x", "0o", "0b")) else int(value)
                except ValueError:
                    raise XapiError("INTERNAL_ERROR", 'Failure("Int64.of_string")') from None
            raise internal(f"Expected int64, got '{_rpc_repr(value)}'")
        if kind == "float":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    raise XapiError("INTERNAL_ERROR", 'Failure("float_of_string")') from None
            raise internal(f"Expected float, got '{_rpc_repr(value)}'")
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise internal(f"Expected bool, got '{_rpc_repr(value)}'")
        if kind == "datetime":
            if isinstance(value, xmlrpc.client.DateTime):
                return value.value
            if isinstance(value, str):
                return value
            raise internal(f"Expected DateTime, got '{_rpc_repr(value)}'")
        if kind == "enum":
            return self.enum_value(ty.name, value)
        if kind == "set":
            if not isinstance(value, list):
                raise internal(f"Expected Rpc.Enum, but found '{_rpc_repr(value)}'")
            assert ty.of is not None
            return [self.from_wire(ty.of, v) for v in value]
        if kind == "map":
            if not isinstance(value, dict):
                raise internal(f"Expected Rpc.Dict, but found '{_rpc_repr(value)}'")
            assert ty.key is not None and ty.of is not None
            return {self.from_wire(ty.key, k): self.from_wire(ty.of, v) for k, v in value.items()}
        if kind == "record":
            if not isinstance(value, dict):
                raise XapiError("INTERNAL_ERROR", 'Failure("bad __structure")')
            return self.record_from_wire(ty.name, value)
        return value

    def enum_value(self, enum: str, value: Any) -> str:
        if isinstance(value, str):
            for candidate in self.enums.get(enum, ()):
                if candidate.lower() == value.lower():
                    return candidate
        raise internal("Unknown tag/contents")

    def record_from_wire(self, cls: str, value: dict[str, Any]) -> dict[str, Any]:
        """A constructor record: every RW/RO-constructor field, required unless it has a default."""
        out: dict[str, Any] = {}
        for f in self.classes[cls].fields.values():
            if not f.in_constructor:
                continue
            if f.name in value:
                out[f.name] = self.from_wire(f.ty, value[f.name])
            elif f.default is None:
                raise XapiError("INTERNAL_ERROR", f'Server_helpers.Dispatcher_FieldNotFound("{f.name}")')
            else:
                out[f.name] = self.parse_default(f.ty, f.default)
        return out

    # -- values out ---------------------------------------------------------------------------

    def to_wire(self, ty: Ty | None, value: Any) -> Any:
        """Internal value -> what xapi puts on the wire (ints as decimal strings, as xapi does)."""
        if ty is None:
            return ""
        kind = ty.kind
        if kind == "int":
            return str(int(value))
        if kind == "float":
            return float(value)
        if kind == "datetime":
            return xmlrpc.client.DateTime(value or EPOCH)
        if kind == "set":
            return [self.to_wire(ty.of, v) for v in value]
        if kind == "map":
            return {str(k): self.to_wire(ty.of, v) for k, v in value.items()}
        if kind == "record":
            return self.record_to_wire(ty.name, value)
        return value

    def record_to_wire(self, cls: str, record: dict[str, Any]) -> dict[str, Any]:
        fields = self.classes[cls].fields
        # Removed fields stay in records (xapi keeps them, e.g. host_metrics.memory_free);
        # only their messages are gone.
        return {name: self.to_wire(f.ty, record[name]) for name, f in fields.items()}

    # -- defaults -----------------------------------------------------------------------------

    def zero(self, ty: Ty) -> Any:
        """The value of a field nobody set: what xapi's database starts a row with."""
        kind = ty.kind
        if kind == "ref":
            return NULL_REF
        if kind == "enum":
            return self.enums[ty.name][0]
        if kind == "set":
            return []
        if kind == "map":
            return {}
        if kind == "datetime":
            return EPOCH
        return {"int": 0, "float": 0.0, "bool": False}.get(kind, "")

    def parse_default(self, ty: Ty, text: str) -> Any:
        """A datamodel default in OCaml value syntax (``"1.0"``, ``{}``, ``{"a" -> "b"}``, ``Null``)."""
        text = text.strip()
        kind = ty.kind
        if kind == "set":
            items = [t.strip() for t in _split_top(text[1:-1])] if text not in ("{}", "") else []
            assert ty.of is not None
            return [self.parse_default(ty.of, t) for t in items if t]
        if kind == "map":
            out = {}
            assert ty.key is not None and ty.of is not None
            for item in _split_top(text[1:-1]) if text != "{}" else []:
                k, _, v = item.partition("->")
                out[self.parse_default(ty.key, k)] = self.parse_default(ty.of, v)
            return out
        if kind == "ref":
            return NULL_REF if text in ("Null", "OpaqueRef:NULL", "{}") else text.strip("{}")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            return text == "true"
        if kind == "enum":
            return self.enum_value(ty.name, text.strip('"'))
        return text[1:-1] if text.startswith('"') else text


def _split_top(text: str) -> list[str]:
    parts, depth, start, quoted = [], 0, 0, False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "({":
            depth += 1
        elif not quoted and ch in ")}":
            depth -= 1
        elif not quoted and ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _rpc_repr(value: Any) -> str:
    """ocaml-rpc's ``Rpc.to_string`` of a decoded value, for faithful error texts."""
    if isinstance(value, bool):
        return f"B({str(value).lower()})"
    if isinstance(value, int):
        return f"I({value})"
    if isinstance(value, float):
        return f"F({value:g})"
    if isinstance(value, str):
        return f"S({value})"
    if isinstance(value, xmlrpc.client.DateTime):
        return f"D({value.value})"
    if isinstance(value, list):
        return "[" + ";".join(_rpc_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ";".join(f"{k}:{_rpc_repr(v)}" for k, v in value.items()) + "}"
    return "N"


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int) -> Datamodel:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read the XAPI datamodel {path}: {exc}") from None
    if not isinstance(raw, list) or not raw or "messages" not in raw[0]:
        raise LabError(f"{path} is not XAPI's xenapi.json (expected a list of classes with messages)")
    return Datamodel(raw, source=path)


def load(path: Path | None = None) -> Datamodel:
    """Load (once per file version) the datamodel, from ``path``, $MIGRATE_XAPI_DATAMODEL or ../shared."""
    path = path or default_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        raise LabError(
            f"the XAPI datamodel {path} is missing; the XAPI fake checks every call against it",
            hint=f"set {DATAMODEL_ENV}=/path/to/xenapi.json (xapi-project/xen-api publishes it with "
            "the SDK, as ocaml/sdk-gen/.../xenapi.json)",
        ) from None
    return _load_cached(str(path), mtime)
