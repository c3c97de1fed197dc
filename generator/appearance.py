"""Appearance stage: procedural garments, patterns and palettes on the rest-pose surface."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AppearanceConfig:
    """Distribution of what a person wears in a sample."""
