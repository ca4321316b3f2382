"""Loading any frozen config dataclass from YAML with dotted ``key.path=value`` overrides; unknown
keys are errors that name the key, the section and what is allowed."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _coerce(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML scalars)."""
    tree = json.loads(json.dumps(tree))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        node = tree
        keys = path.split(".")
        for key in keys[:-1]:
            if node.get(key) is None:  # absent, or a section left empty in the YAML (`sft:`)
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = _coerce(raw)
    return tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                message = f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line})"
                raise yaml.constructor.ConstructorError(None, None, message, key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # PyYAML names the stream in its error marks
    try:
        tree = yaml.load(stream, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    return apply_overrides(tree, overrides or [])


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build a (possibly nested) frozen dataclass from a dict, rejecting unknown keys."""
    if data is not None and not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a mapping of keys, got {data!r} ({type(data).__name__})")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown keys {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    hints = field_types(cls)
    for name, value in data.items():
        ftype = fields[name].type
        target = _resolve_dataclass(cls, ftype)
        if target is not None and isinstance(value, Mapping):
            value = from_dict(target, value, f"{where or cls.__name__}.{name}")
        else:
            value = coerce(value, hints.get(name, Any), f"{where or cls.__name__}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def field_types(cls: type) -> dict[str, Any]:
    """The evaluated annotations of a dataclass (they are strings under ``from __future__``)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be evaluated is left unchecked
        return {}


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the field's declared scalar type, or a ValueError naming the key.

    YAML 1.1 (PyYAML) reads ``1e-5`` (no dot) as a string, so numeric strings become numbers;
    an int is accepted for a float; ints and floats in a ``str`` field become strings; lists
    become tuples. Types other than scalars, their optionals and tuples of them pass unchecked.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return coerce(value, options[0], where) if len(options) == 1 else value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if origin is tuple:
        # One value for a list field (`data.sft_train=a.jsonl` on the command line) is a list of
        # one; anything else would later be iterated character by character.
        if (
            len(args) == 2
            and args[1] is Ellipsis
            and isinstance(value, (str, int, float))
            and not isinstance(value, bool)
        ):
            return (coerce(value, args[0], f"{where}[0]"),)
        raise ValueError(f"{where}: expected a list, e.g. [a, b], got {value!r} ({type(value).__name__})")
    if isinstance(value, list):
        return tuple(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(number, float) and number.is_integer():
            return int(number)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ValueError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")


def _resolve_dataclass(owner: type, ftype: Any) -> type | None:
    if isinstance(ftype, str):
        module = sys.modules[owner.__module__]
        ftype = getattr(module, ftype.split("|")[0].strip(), None)
    return ftype if dataclasses.is_dataclass(ftype) else None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
