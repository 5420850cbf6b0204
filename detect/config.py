"""The one recipe parser: frozen config dataclasses from (YAML or JSON) mappings, and back to JSON.

Every part of the project is configured by a frozen dataclass with paper defaults. Recipe files, the
``detector_config`` of a training recipe, the manifest's ``architecture.config`` and a weights file's metadata are
plain mappings that only override fields; :func:`override` applies one to a config, :func:`from_dict` to a config
type's defaults, and :func:`to_json` writes a config back.

Decisions:

- Nested dataclass fields take nested mappings and are overridden field by field, starting from the current
  value (so a partial mapping keeps a detector's own nested defaults, e.g. SPP-Net's per-image sampling); a field
  typed ``X | None`` that holds ``None`` starts from ``X``'s defaults.
- YAML and JSON have no tuples: every list becomes a tuple (recursively), so configs stay hashable and compare
  equal to the defaults they were written from.
- An unknown key raises :class:`ConfigError` naming its dotted path (``detector_config.rpn.'nms'``) and the known
  keys; so does a value the dataclass rejects (its ``TypeError``/``ValueError``); a ``ConfigError`` raised by a
  dataclass's own checks passes through unchanged.
- Imports only the standard library and :mod:`detect.errors`, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from detect.errors import ConfigError

__all__ = ["override", "from_dict", "to_json"]

C = TypeVar("C")


def override(config: C, data: Mapping[str, Any] | None, where: str = "") -> C:
    """``config`` (a frozen dataclass) with the fields in ``data`` replaced; nested dataclass fields take nested
    mappings, YAML lists become tuples. ``where`` prefixes the dotted key in error messages."""
    if data is None:
        return config
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'recipe'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    if unknown := sorted(set(data) - names):
        raise ConfigError(f"unknown key {where}{unknown[0]!r} in {type(config).__name__} (known: {sorted(names)})")
    values = {}
    for name, value in data.items():
        nested = _dataclass_in(hints[name])
        if nested is not None and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{name} must be a mapping, got {value!r}")
            current = getattr(config, name)
            value = override(current if current is not None else nested(), value, f"{where}{name}.")
        values[name] = _as_tuples(value)
    try:
        return dataclasses.replace(config, **values)
    except (TypeError, ValueError) as err:  # ConfigError is a DetectError, not a ValueError: it passes through
        raise ConfigError(f"invalid value in {where or 'recipe'}: {err}") from err


def from_dict(config_type: type[C], data: Mapping[str, Any] | None, where: str = "") -> C:
    """A ``config_type`` from its defaults with ``data`` applied (see :func:`override`): what :func:`to_json`
    wrote, or any subset of it."""
    return override(config_type(), data, where)


def to_json(config: Any) -> str:
    """A (nested) config dataclass as JSON with sorted keys (tuples become lists; :func:`from_dict` undoes it)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names, also inside ``X | None``."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), None)
    return None
