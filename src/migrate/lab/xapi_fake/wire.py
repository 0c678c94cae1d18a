"""XML-RPC as xapi speaks it: calls parsed with the standard library, responses written the
way ocaml-rpc writes them (``<value>text</value>`` for strings and ints, ints as decimal
text, every result wrapped in ``{"Status": "Success", "Value": ...}`` or
``{"Status": "Failure", "ErrorDescription": [...]}``)."""

from __future__ import annotations

import xmlrpc.client
from typing import Any

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})


def parse_call(body: bytes) -> tuple[str, list[Any]]:
    """(method name, parameters) of an XML-RPC request; ValueError if it is not one."""
    try:
        params, method = xmlrpc.client.loads(body, use_builtin_types=False)
    except Exception as exc:  # expat and xmlrpc raise a zoo of types for bad input
        raise ValueError(f"not an XML-RPC call: {exc}") from None
    if not method:
        raise ValueError("XML-RPC call without a methodName")
    return method, list(params)


def _clean(text: str) -> str:
    # ocaml-rpc drops control characters XML cannot carry.
    return "".join(c for c in text if c >= " " or c in "\t\n\r").translate(_ESCAPES)


def value_xml(value: Any) -> str:
    if isinstance(value, bool):
        return f"<value><boolean>{int(value)}</boolean></value>"
    if isinstance(value, str):
        return f"<value>{_clean(value)}</value>"
    if isinstance(value, int):
        return f"<value>{value}</value>"
    if isinstance(value, float):
        return f"<value><double>{value:.16g}</double></value>"
    if isinstance(value, xmlrpc.client.DateTime):
        return f"<value><dateTime.iso8601>{value.value}</dateTime.iso8601></value>"
    if isinstance(value, (list, tuple)):
        return "<value><array><data>" + "".join(value_xml(v) for v in value) + "</data></array></value>"
    if isinstance(value, dict):
        members = "".join(
            f"<member><name>{_clean(str(k))}</name>{value_xml(v)}</member>" for k, v in value.items()
        )
        return f"<value><struct>{members}</struct></value>"
    if value is None:
        return "<value><nil/></value>"
    raise TypeError(f"cannot marshal {type(value).__name__}")


def response(value: Any) -> bytes:
    body = value_xml(value)
    head = '<?xml version="1.0"?><methodResponse><params><param>'
    return f"{head}{body}</param></params></methodResponse>".encode()


def success(value: Any) -> dict[str, Any]:
    return {"Status": "Success", "Value": value}


def failure(description: list[str]) -> dict[str, Any]:
    return {"Status": "Failure", "ErrorDescription": description}
