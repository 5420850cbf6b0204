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
- Imports only the standard library, PyYAML and :mod:`detect.errors`, so every layer can use it.
- YAML is read by :func:`load_yaml` only: PyYAML's safe loader, with YAML's aliases capped. An alias is a
  reference, so ten nested levels of ten references each make a 400-byte file whose tree has 10^10 values (the
  "billion laughs"); every consumer that walks it (overrides, digests, JSON) then works for minutes. The composed
  document's tree size is counted with shared nodes counted once per reference (memoised, so counting is cheap)
  and a document over :data:`MAX_YAML_VALUES` values, or with more than :data:`MAX_YAML_ALIASES` aliases, is a
  :class:`ConfigError` before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from detect.errors import ConfigError

__all__ = ["override", "from_dict", "to_json", "load_yaml", "MAX_YAML_VALUES", "MAX_YAML_ALIASES"]

MAX_YAML_VALUES = 100_000  # values in the expanded tree of one YAML document
MAX_YAML_ALIASES = 1_000  # alias references in one YAML document

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


def load_yaml(text: str, source: str = "YAML") -> Any:
    """The YAML document in ``text`` (PyYAML's safe types), refusing alias bombs (see the module docstring);
    :class:`ConfigError` names ``source`` for a document that does not parse or is too large."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        aliases = _count_aliases(text)
        if aliases > MAX_YAML_ALIASES:
            raise ConfigError(f"{source}: {aliases} YAML aliases (at most {MAX_YAML_ALIASES})")
        size = _tree_size(node, {})
        if size > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: its YAML aliases expand to {size:,} values (at most {MAX_YAML_VALUES:,}); "
                "write the values out instead of nesting references"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def _count_aliases(text: str) -> int:
    """Alias tokens (``*name``) in ``text``, counted by PyYAML's scanner (not a regular expression)."""
    import yaml

    return sum(isinstance(token, yaml.AliasToken) for token in yaml.scan(text, Loader=yaml.SafeLoader))


def _tree_size(node: Any, seen: dict[int, int]) -> int:
    """Values in the tree ``node`` stands for, a shared node counted at every reference; memoised by identity,
    capped so the count itself stays small."""
    import yaml

    known = seen.get(id(node))
    if known is not None:
        return known
    seen[id(node)] = 1  # a node that refers to itself (recursive alias) counts once
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            size += _tree_size(child, seen)
            if size > MAX_YAML_VALUES:
                break
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _tree_size(key, seen) + _tree_size(value, seen)
            if size > MAX_YAML_VALUES:
                break
    seen[id(node)] = size
    return size
