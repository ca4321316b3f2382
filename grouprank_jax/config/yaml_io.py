"""Loading any frozen config dataclass from YAML with dotted ``key.path=value`` overrides; unknown
keys are errors that name the key, the section and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import sys
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
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        node[keys[-1]] = _coerce(raw)
    return tree


def load_yaml(path: str | Path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as fh:
        try:
            tree = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    return apply_overrides(tree, overrides or [])


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build a (possibly nested) frozen dataclass from a dict, rejecting unknown keys."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown keys {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        target = _resolve_dataclass(cls, ftype)
        if target is not None and isinstance(value, Mapping):
            value = from_dict(target, value, f"{where or cls.__name__}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _resolve_dataclass(owner: type, ftype: Any) -> type | None:
    if isinstance(ftype, str):
        module = sys.modules[owner.__module__]
        ftype = getattr(module, ftype.split("|")[0].strip(), None)
    return ftype if dataclasses.is_dataclass(ftype) else None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
