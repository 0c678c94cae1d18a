"""The fake's dispatcher: one XML-RPC call in, one xapi response out, in xapi's order.

As xapi's generated server does: find the message (MESSAGE_METHOD_UNKNOWN), count the
parameters (MESSAGE_PARAMETER_COUNT_MISMATCH), unmarshal each against its datamodel type
(INTERNAL_ERROR), check the session (SESSION_INVALID), then run it, where a reference
that does not exist is HANDLE_INVALID. Messages the datamodel marks implicit (getters,
setters, map/set updates, get_record, get_all_records, create, destroy...) are served
generically from the datamodel; the rest have a hand-written handler in ``handlers``, or
answer NOT_IMPLEMENTED.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from migrate.lab.xapi_fake import wire
from migrate.lab.xapi_fake.datamodel import NULL_REF, Datamodel, Message, Ty, XapiError
from migrate.lab.xapi_fake.faults import Faults
from migrate.lab.xapi_fake.store import Store

log = structlog.get_logger(__name__)

Handler = Callable[..., Any]
# Reference parameters where xapi gives NULL a meaning ("the same SR as now").
NULLABLE: Final = frozenset({("VM", "copy", "sr")})
HANDLERS: dict[tuple[str, str], Handler] = {}


def handler(cls: str, name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[(cls, name)] = fn
        return fn

    return register


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H:%M:%SZ")


@dataclass
class Xapi:
    """The fake's state and behaviour, shared by the XML-RPC and HTTP handlers."""

    dm: Datamodel
    store: Store
    vdi_dir: Path
    users: dict[str, str]
    faults: Faults = field(default_factory=Faults)
    calls: list[str] = field(default_factory=list)
    # VDI refs with an import under way: they cannot be destroyed meanwhile.
    busy_vdis: set[str] = field(default_factory=set)

    # -- entry point --------------------------------------------------------------------------

    def call(self, method: str, params: list[Any]) -> dict[str, Any]:
        """Run one call; the xapi response struct (Success/Failure) to marshal back."""
        with self.store.lock:
            self.calls.append(method)
            if len(self.calls) > 100_000:  # a long-lived lab process keeps the recent half
                del self.calls[:50_000]
            try:
                return wire.success(self._call(method, params))
            except XapiError as exc:
                return wire.failure(exc.description)
            except Exception as exc:  # as xapi does: any other fault is an INTERNAL_ERROR
                log.exception("xapi_fake_internal_error", method=method)
                return wire.failure(["INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"])

    def _call(self, method: str, params: list[Any]) -> Any:
        is_async = method.startswith("Async.")
        name = method[len("Async.") :] if is_async else method
        msg = self.dm.message(name)
        if msg is None:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", name)
        args = self._unmarshal(msg, params)
        session = args.pop(0) if msg.has_session else None
        if session is not None:
            self.check_session(session)
        if msg.removed:
            raise XapiError("MESSAGE_REMOVED")
        if is_async:
            if msg.implicit or msg.cls == "session":
                raise XapiError("Fault", f"No async mode for this operation (rpc: {msg.wire_name})")
            return self._run_async(msg, session, args)
        return self.dm.to_wire(msg.result, self.run(msg, session, args))

    def _unmarshal(self, msg: Message, params: list[Any]) -> list[Any]:
        mandatory = [p for p in msg.params if not p.has_default]
        optional = [p for p in msg.params if p.has_default]
        if not len(mandatory) <= len(params) <= len(msg.params):
            offset = 1 if msg.has_session else 0
            raise XapiError(
                "MESSAGE_PARAMETER_COUNT_MISMATCH",
                msg.wire_name,
                len(mandatory) - offset,
                len(params) - offset,
            )
        values = [self.dm.from_wire(p.ty, v) for p, v in zip(mandatory + optional, params, strict=False)]
        values += [p.default for p in optional[len(params) - len(mandatory) :]]
        return values

    def check_session(self, ref: str) -> str:
        if not self.store.exists("session", ref):
            raise XapiError("SESSION_INVALID", ref)
        if self.faults.take("session_invalid"):
            self.store.destroy("session", ref)
            log.info("xapi_fake_fault", fault="session_invalid", session=ref[-8:])
            raise XapiError("SESSION_INVALID", ref)
        self.store.set("session", ref, "last_active", now())
        return ref

    def run(self, msg: Message, session: str | None, args: list[Any]) -> Any:
        self._check_handles(msg, args)
        custom = HANDLERS.get((msg.cls, msg.name))
        if custom is not None:
            return custom(self, session, *args)
        result = self.generic(msg, args)
        if result is NotImplemented:
            raise XapiError("NOT_IMPLEMENTED", f"{msg.wire_name} (not in the migrate XAPI fake)")
        return result

    def _check_handles(self, msg: Message, args: list[Any]) -> None:
        for param, value in zip(msg.args, args, strict=True):
            ty = param.ty
            if ty.kind == "ref":
                nullable = msg.name.startswith("set_") or (msg.cls, msg.name, param.name) in NULLABLE
                if value == NULL_REF and nullable:
                    continue  # clearing a reference field (affinity, suspend_SR...) is allowed
                if ty.name == "session":
                    self.check_session(value)
                elif not self.store.exists(ty.name, value):
                    raise XapiError("HANDLE_INVALID", ty.name, value)
            elif ty.kind == "record":
                for fname, f in self.dm.classes[ty.name].fields.items():
                    ref = value.get(fname)
                    if (
                        f.ty.kind == "ref"
                        and ref not in (None, NULL_REF, "")
                        and not self.store.exists(f.ty.name, ref)
                    ):
                        raise XapiError("HANDLE_INVALID", f.ty.name, ref)

    def _run_async(self, msg: Message, session: str | None, args: list[Any]) -> str:
        task = self.new_task(f"Async.{msg.wire_name}", "")
        try:
            value = self.dm.to_wire(msg.result, self.run(msg, session, args))
        except XapiError as exc:
            self.finish_task(task, error=exc.description)
        else:
            self.finish_task(task, result=wire.value_xml(value))
        return task

    # -- generic messages ---------------------------------------------------------------------

    def generic(self, msg: Message, args: list[Any]) -> Any:
        """Implicit messages, served from the datamodel; NotImplemented if ``msg`` is not one."""
        cls, name, store = msg.cls, msg.name, self.store
        if name == "get_record":
            return store.record(cls, args[0])
        if name == "get_by_uuid":
            return store.by_uuid(cls, args[0])
        if name == "get_all":
            return store.refs(cls)
        if name == "get_all_records":
            return {ref: store.record(cls, ref) for ref in store.refs(cls)}
        if name == "get_by_name_label":
            return store.where(cls, name_label=args[0])
        if name == "create":
            return store.create(cls, args[0])
        if name == "destroy":
            store.destroy(cls, args[0])
            return None
        fields = self.dm.classes[cls].fields
        for prefix in ("get_", "set_", "add_to_", "remove_from_", "add_", "remove_"):
            target = name[len(prefix) :]
            if not name.startswith(prefix) or target not in fields:
                continue
            ref = args[0]
            if prefix == "get_":
                return store.get(cls, ref, target)
            value = store.row(cls, ref)[target]
            if prefix == "set_":
                store.set(cls, ref, target, args[1])
            elif prefix == "add_to_":
                if args[1] in value:
                    raise XapiError(
                        "MAP_DUPLICATE_KEY", cls, target, store.row(cls, ref).get("uuid", ref), args[1]
                    )
                value[args[1]] = args[2]
            elif prefix == "remove_from_":
                value.pop(args[1], None)
            elif prefix == "add_":
                if args[1] not in value:
                    value.append(args[1])
            elif args[1] in value:
                value.remove(args[1])
            return None
        return NotImplemented

    # -- helpers for handlers and the HTTP side -----------------------------------------------

    def master(self) -> str:
        pools = self.store.refs("pool")
        return self.store.row("pool", pools[0])["master"] if pools else NULL_REF

    def new_task(self, label: str, description: str) -> str:
        return self.store.create(
            "task",
            {
                "name_label": label,
                "name_description": description,
                "status": "pending",
                "progress": 0.0,
                "created": now(),
                "resident_on": self.master(),
                "allowed_operations": ["cancel"],
            },
        )

    def finish_task(self, task: str, *, result: str = "", error: list[str] | None = None) -> None:
        with self.store.lock:
            if not self.store.exists("task", task):
                return  # the client destroyed it meanwhile
            row = self.store.row("task", task)
            if error is None:
                row.update(status="success", result=result, progress=1.0)
            elif error[0] == "TASK_CANCELLED":
                row.update(status="cancelled", error_info=error)
            else:
                row.update(status="failure", error_info=error)
            row.update(finished=now(), allowed_operations=[])

    def result_type(self, cls: str, name: str) -> Ty | None:
        return self.dm.classes[cls].messages[name].result
