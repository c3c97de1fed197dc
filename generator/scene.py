"""Scene stage: a renderer-independent description of camera, lights, background and occluders."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SceneConfig:
    """Distribution of cameras, lighting, backgrounds and occluders."""
