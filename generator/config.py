"""The generator's whole configuration as typed dataclasses, loaded from YAML and stored in the dataset.

Each stage owns its section (PoseConfig in generator.pose, AppearanceConfig in generator.appearance,
SceneConfig in generator.scene); this module holds the render settings and assembles the rest.
YAML files may set any subset of fields; an unknown key is an error that names the key, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from generator.appearance import AppearanceConfig
from generator.pose import PoseConfig
from generator.scene import SceneConfig
from protoreg.dataset import to_jsonable


@dataclass
class RenderSettings:
    """How Cycles draws a sample and how the writer encodes it."""

    width: int = 128  # image width in pixels (person crops as in re-identification data)
    height: int = 256  # image height in pixels
    samples: int = 16  # Cycles samples per pixel
    device: str = "CPU"  # CPU or GPU (CUDA/OPTIX/HIP/METAL when present)
    threads_per_worker: int = 1  # Cycles threads in each worker process
    filter_width: float = 1.5  # Cycles pixel filter width for the RGB image
    denoise: bool = False  # OpenImageDenoise (FAST prefilter) on the RGB image
    write_depth: bool = False  # also store depth.png (uint16 millimetres)
    jpeg_quality: int = 92  # quality of rgb.jpg (Pillow, 4:2:0, no optimisation: deterministic bytes)
    png_compress_level: int = 6  # zlib level of parts.png / vid.png / depth.png


@dataclass
class GenConfig:
    """Everything that, with the seed and the sample index, determines a sample."""

    pose: PoseConfig = field(default_factory=PoseConfig)
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    render: RenderSettings = field(default_factory=RenderSettings)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists), as stored in manifest.json."""
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> GenConfig:
        """Build from a (possibly partial) nested dict; unknown keys raise ConfigError naming them."""
        return _build(cls, data, source)


class ConfigError(ValueError):
    """A configuration file or value does not match GenConfig."""


def load_config(path: str | Path | None) -> GenConfig:
    """Read a YAML file into a GenConfig (defaults for every field it leaves out); None gives defaults."""
    if path is None:
        return GenConfig()
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config sections, got {type(data).__name__}")
    return GenConfig.from_dict(data, source=str(p))


def dump_config(config: GenConfig) -> str:
    """YAML text of a config, loadable again with load_config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def config_fingerprint(config: GenConfig) -> str:
    """Canonical JSON text of a config: equal strings <=> equal configs."""
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# dict -> dataclass, strictly


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{unknown[0]}' in {cls.__name__} (known: {', '.join(sorted(fields))})"
        )
    default = cls()
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints.get(name), getattr(default, name), f"{where}: {name}")
    return dataclasses.replace(default, **kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation we cannot resolve: fall back to the defaults' types
        return {}


def _convert(value: Any, hint: Any, default: Any, where: str) -> Any:
    """Check/convert one YAML value against the field's type (or its default's type)."""
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return _build(type(default), value, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if value is None:
        if default is None or _allows_none(hint):
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if isinstance(default, bool) or hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool) or hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float) or hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str) or hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(default) == 2 and len(value) != 2 and all(not isinstance(d, (list, tuple)) for d in default):
            raise ConfigError(f"{where}: expected a (lo, hi) pair, got {value!r}")
        return _as_tuples(value, default)
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_as_tuples(v, default[0] if default else None) for v in value]
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        like = next(iter(default.values()), None)  # values shaped like the defaults' (tuples stay tuples)
        return {k: _as_tuples(v, like) for k, v in value.items()}
    return value


def _as_tuples(value: Any, like: Any) -> Any:
    """YAML gives lists; fields declared as tuples (ranges, colours) stay tuples."""
    if isinstance(value, (list, tuple)):
        inner = like[0] if isinstance(like, (list, tuple)) and like else None
        items = [_as_tuples(v, inner) for v in value]
        if isinstance(like, list):
            return items
        return tuple(items)
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _allows_none(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return type(None) in typing.get_args(hint)
    return False
