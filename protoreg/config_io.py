"""Strict YAML <-> typed dataclass conversion, shared by the generator's and the trainer's configurations.

Both halves keep their whole configuration as nested dataclasses, write it resolved next to their output
(manifest.json, RUN/config.yaml, checkpoints) and read partial YAML files. One converter for both means one
set of rules: any subset of fields may be given; an unknown key or a value of the wrong type is a one-line
ConfigError naming the file and the dotted key ("cfg.yaml: optim.lr: expected a number, got 'fast'"), so a
typo never silently falls back to a default; YAML lists become tuples where the field is a tuple.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "from_dict", "read_yaml_mapping", "to_plain"]


class ConfigError(ValueError):
    """A configuration file or value does not fit its dataclass; the message is one line naming the key."""


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} for an empty file), or a one-line ConfigError."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def from_dict(cls: type, data: Any, source: str = "config") -> Any:
    """An instance of dataclass `cls` from (possibly partial) nested plain data; missing fields keep their
    defaults. `source` names where the data came from in error messages."""
    return _build(cls, data, source, "")


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively: safe for YAML, JSON and checkpoints."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def _error(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}" if key else f"{source}: {message}")


def _build(cls: type, data: Any, source: str, key: str) -> Any:
    if not isinstance(data, dict):
        raise _error(source, key, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        known = ", ".join(sorted(names))
        raise _error(source, key, f"unknown key '{unknown[0]}' in {cls.__name__} (known: {known})")
    hints = _type_hints(cls)
    default = cls()
    changes = {
        name: _convert(value, hints.get(name), getattr(default, name), source, _join(key, name))
        for name, value in data.items()
    }
    return dataclasses.replace(default, **changes)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: the defaults' types decide instead
        return {}


def _convert(value: Any, hint: Any, default: Any, source: str, key: str) -> Any:
    """One value checked against its field's type hint, or against its default's type without one."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return _build(type(default), value, source, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if default is None or (origin in (typing.Union, types.UnionType) and type(None) in args):
            return None
        raise _error(source, key, "null is not allowed here")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], default, source, key) if len(inner) == 1 else value
    if hint is bool or (hint is None and isinstance(default, bool)):
        if not isinstance(value, bool):
            raise _error(source, key, f"expected true or false, got {value!r}")
        return value
    if hint is int or (hint is None and isinstance(default, int) and not isinstance(default, bool)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(source, key, f"expected an integer, got {value!r}")
        return value
    if hint is float or (hint is None and isinstance(default, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(source, key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str or (hint is None and isinstance(default, str)):
        if not isinstance(value, str):
            raise _error(source, key, f"expected a string, got {value!r}")
        return value
    if origin is tuple or (hint is None and isinstance(default, tuple)):
        return _convert_tuple(value, args, default, source, key)
    if origin is list or (hint is None and isinstance(default, list)):
        if not isinstance(value, (list, tuple)):
            raise _error(source, key, f"expected a list, got {value!r}")
        item = args[0] if args else None
        like = default[0] if isinstance(default, list) and default else None
        return [_convert(v, item, like, source, key) for v in value]
    if origin is dict or (hint is None and isinstance(default, dict)):
        if not isinstance(value, dict):
            raise _error(source, key, f"expected a mapping, got {value!r}")
        item = args[1] if len(args) == 2 else None
        like = next(iter(default.values()), None) if isinstance(default, dict) else None
        return {k: _convert(v, item, like, source, _join(key, str(k))) for k, v in value.items()}
    return value


def _convert_tuple(value: Any, args: tuple, default: Any, source: str, key: str) -> tuple:
    """YAML gives lists; tuple fields (ranges, colours, sizes) get their length and items checked."""
    if not isinstance(value, (list, tuple)):
        raise _error(source, key, f"expected a list, got {value!r}")
    if args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(args) != len(value):
            raise _error(source, key, f"expected {len(args)} values, got {len(value)}")
        items = args
    else:
        items = (args[0] if args else None,) * len(value)
    # without hints, items are shaped like the default's (its own items, or its first for other lengths)
    if isinstance(default, tuple) and len(default) == len(value):
        likes = list(default)
    else:
        likes = [default[0] if isinstance(default, tuple) and default else None] * len(value)
    return tuple(_convert(v, h, d, source, key) for v, h, d in zip(value, items, likes, strict=True))
