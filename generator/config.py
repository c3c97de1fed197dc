"""The generator's whole configuration as typed dataclasses, loaded from YAML and stored in the dataset.

Each stage owns its section (PoseConfig in generator.pose, AppearanceConfig in generator.appearance,
SceneConfig in generator.scene); this module holds the render settings and assembles the rest.
YAML files may set any subset of fields; an unknown key is an error that names the key, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from generator.appearance import AppearanceConfig
from generator.pose import PoseConfig
from generator.scene import SceneConfig
from protoreg.config_io import ConfigError, from_dict, read_yaml_mapping
from protoreg.dataset import to_jsonable

__all__ = ["ConfigError", "GenConfig", "RenderSettings", "config_fingerprint", "dump_config", "load_config"]


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
    # also store garments.png: what covers each person pixel (skin, hair, top, bottom, shoes), so a trainer
    # can recolour the clothes and nothing else
    write_garments: bool = False
    jpeg_quality: int = 92  # quality of rgb.jpg (Pillow, 4:2:0, no optimisation: deterministic bytes)
    png_compress_level: int = 6  # zlib level of the PNG entries (parts, vid, depth, garments)


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
        return from_dict(cls, data, source)


def load_config(path: str | Path | None) -> GenConfig:
    """Read a YAML file into a GenConfig (defaults for every field it leaves out); None gives defaults."""
    if path is None:
        return GenConfig()
    return GenConfig.from_dict(read_yaml_mapping(path), source=str(path))


def dump_config(config: GenConfig) -> str:
    """YAML text of a config, loadable again with load_config."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def config_fingerprint(config: GenConfig) -> str:
    """Canonical JSON text of a config: equal strings <=> equal configs."""
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
