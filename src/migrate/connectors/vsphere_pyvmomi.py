"""The reference discovery path: the same RetrievePropertiesEx through plain pyvmomi.

Slower (pyvmomi builds a typed object for every property of every device), but written
entirely with the SDK, so it is the yardstick the streaming path is tested against: both
must give identical inventories.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from pyVmomi import VmomiSupport, vim, vmodl

from migrate.connectors.vsphere_props import RawObject

_PropertyCollector: Any = vmodl.query.PropertyCollector  # pyvmomi ships no type hints
_wsdl_type: Any = VmomiSupport.GetWsdlType
_SKIP = frozenset({"dynamicType", "dynamicProperty"})


def filter_spec(view: vim.view.ContainerView, properties: Mapping[str, tuple[str, ...]],
                extra: tuple[Any, ...] = ()) -> Any:
    """The PropertyFilterSpec equivalent of ``vsphere_fast.filter_spec``."""
    traverse = _PropertyCollector.TraversalSpec(name="view", type=vim.view.ContainerView, path="view",
                                                skip=False)
    objects = [_PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[traverse])]
    objects += [_PropertyCollector.ObjectSpec(obj=obj, skip=False) for obj in extra]
    props = [
        _PropertyCollector.PropertySpec(type=_wsdl_type("urn:vim25", kind), all=False,
                                        pathSet=list(paths))
        for kind, paths in properties.items()
    ]
    return _PropertyCollector.FilterSpec(propSet=props, objectSet=objects)


def plain(value: Any) -> Any:
    """A pyvmomi value in the shape the streaming parser produces (see ``vsphere_convert``)."""
    if value is None or isinstance(value, (str, bool, int, float, datetime, bytes)):
        return value
    if isinstance(value, VmomiSupport.ManagedObject):
        return value._moId
    if isinstance(value, VmomiSupport.DataObject):
        out: dict[str, Any] = {"_type": type(value)._wsdlName}
        for prop in value._GetPropertyList():  # type: ignore[no-untyped-call]
            if prop.name in _SKIP:
                continue
            item = getattr(value, prop.name)
            if item is None or (isinstance(item, list) and not item):
                continue
            out[prop.name] = plain(item)
        return out
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def retrieve(collector: Any, spec: Any, page_size: int) -> Iterator[RawObject]:
    """Yield every object, following ContinueRetrievePropertiesEx tokens."""
    result = collector.RetrievePropertiesEx(specSet=[spec], options=_PropertyCollector.RetrieveOptions(
        maxObjects=page_size))
    while result is not None:
        for content in result.objects:
            yield RawObject(
                type=type(content.obj)._wsdlName,
                moref=content.obj._moId,
                props={prop.name: plain(prop.val) for prop in content.propSet},
            )
        if not result.token:
            return
        result = collector.ContinueRetrievePropertiesEx(token=result.token)
