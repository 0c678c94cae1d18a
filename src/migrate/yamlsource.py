"""YAML at the edge: load a file keeping each value's line, and turn validation errors into
``file:line $.path: message`` problems, all of them at once.

Pydantic does the validating; this module only knows where things are in the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from migrate.errors import ConfigError, Problem

PathKey = tuple[str | int, ...]
M = TypeVar("M", bound=pydantic.BaseModel)


class LoadedYaml:
    """Plain data plus a map from each value's path to its 1-based line."""

    def __init__(self, file: str, data: Any, lines: dict[PathKey, int]) -> None:
        self.file = file
        self.data = data
        self.lines = lines

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The line of ``path``, or of its nearest ancestor the file has."""
        key = tuple(path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), None)

    def problem(self, path: Sequence[str | int], message: str) -> Problem:
        return Problem(self.file, self.line_of(path), format_path(path), message)


def format_path(path: Iterable[str | int]) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _walk(
    node: yaml.Node, path: PathKey, lines: dict[PathKey, int], problems: list[Problem], file: str
) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            if key in out:
                problems.append(
                    Problem(
                        file,
                        key_node.start_mark.line + 1,
                        format_path((*path, key)),
                        "duplicate key; YAML would silently keep only the last one, remove one of them",
                    )
                )
            out[key] = _walk(value_node, (*path, key), lines, problems, file)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*path, i), lines, problems, file) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def load(path: Path | str) -> LoadedYaml:
    """Read a YAML file; any problem raises ConfigError naming the file and line."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(Problem(file, None, "$", "file not found; check the path")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(Problem(file, None, "$", f"cannot read the file: {exc}")) from None
    return loads(text, file)


def loads(text: str, file: str = "<string>") -> LoadedYaml:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(
            Problem(file, line, "$", f"not valid YAML: {exc.problem}; check indentation and quoting")
        ) from None
    if node is None:
        raise ConfigError(Problem(file, 1, "$", "the file is empty; see examples/ for a starting point"))
    lines: dict[PathKey, int] = {}
    problems: list[Problem] = []
    data = _walk(node, (), lines, problems, file)
    if problems:
        raise ConfigError(problems)
    return LoadedYaml(file, data, lines)


def _message(err: Any) -> str:
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        return "unknown field; check its spelling against examples/ and the README"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        expected = str(ctx.get("expected_tags", "")).replace("'", "")
        field = str(ctx.get("discriminator", "type")).strip("'")
        return f"unknown {field} {ctx.get('tag')!r}; use one of: {expected}"
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    if (
        kind not in ("value_error", "assertion_error")
        and given is not None
        and not isinstance(given, dict | list)
    ):
        msg += f" (got {given!r})"
    return msg


def _data_path(data: Any, loc: Sequence[str | int]) -> list[str | int]:
    """Drop what pydantic adds to a location that is not in the file (union tags, validators)."""
    out: list[str | int] = []
    current = data
    for part in loc:
        not_in_file = isinstance(part, str) and isinstance(current, dict) and part not in current
        if not_in_file and (current.get("type") == part or str(part).startswith("function-")):
            continue  # a discriminated union's tag, e.g. 'proxmox' in $.targets.pve.proxmox.port
        out.append(part)
        try:
            current = current[part]
        except (KeyError, IndexError, TypeError):
            current = None
    return out


def validate(model: type[M], loaded: LoadedYaml, context: dict[str, Any] | None = None) -> M:
    """Validate ``loaded.data`` against a pydantic model; raise every problem with its line."""
    try:
        return model.model_validate(loaded.data, context=context)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            problems.append(loaded.problem(_data_path(loaded.data, err["loc"]), _message(err)))
        raise ConfigError(problems) from None
