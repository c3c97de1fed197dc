"""The generator's whole configuration as typed dataclasses, loaded from YAML and stored in the dataset.

Each stage owns its section (PoseConfig in generator.pose, AppearanceConfig in generator.appearance,
SceneConfig in generator.scene); this module holds the render settings and assembles the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from generator.appearance import AppearanceConfig
from generator.pose import PoseConfig
from generator.scene import SceneConfig


@dataclass
class RenderSettings:
    """How Cycles draws a sample."""

    width: int = 128
    height: int = 256
    samples: int = 16
    device: str = "CPU"  # CPU or GPU (CUDA/OPTIX/HIP/METAL when present)
    threads_per_worker: int = 1
    filter_width: float = 1.5
    denoise: bool = False
    write_depth: bool = False
    jpeg_quality: int = 92


@dataclass
class GenConfig:
    """Everything that, with the seed and the sample index, determines a sample."""

    pose: PoseConfig = field(default_factory=PoseConfig)
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    render: RenderSettings = field(default_factory=RenderSettings)
