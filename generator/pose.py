"""Pose stage: a pose prior in SMPL axis-angle (key poses, perturbation, interpenetration rejection)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoseConfig:
    """Distribution of body poses."""
