"""A stand-in sample backend for the writer's unit tests: the mock at the renderer edge.

It draws deterministic arrays from the sample index (no Blender), so tests of sharding, resume,
determinism and verification run in seconds. The real renderer is covered by test_gen_shards.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FakeRendered:
    rgb: np.ndarray
    parts: np.ndarray
    vid: np.ndarray
    depth: np.ndarray | None = None
    garments: np.ndarray | None = None


class FakeBackend:
    def __init__(self, job):
        self.job = job
        self.settings = job.config.render

    def produce(self, index: int):
        h, w = self.settings.height, self.settings.width
        rng = np.random.default_rng([self.job.seed, index])
        parts = np.zeros((h, w), np.uint8)
        parts[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(1, 16, size=(h // 2, w // 2))
        vid = np.where(parts > 0, rng.integers(1, 500, size=(h, w)), 0).astype(np.uint16)
        rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        ident = self.job.identities[index % len(self.job.identities)]
        meta = {
            "index": index,
            "seed": int(rng.integers(2**31)),
            "identity": {"name": ident["name"], "id": ident["id"]},
            "betas": ident["betas"],
            "pose": np.zeros(72, np.float32),
            "transl": np.array([0.1, 0.2, 0.3], np.float32),
            "camera": {"K": np.eye(3), "R": np.eye(3), "t": np.zeros(3), "width": w, "height": h},
            "lighting": {"sun": 1.0 / 3.0},
            "garments": [],
            "background": {},
            "occluders": [],
        }
        return FakeRendered(rgb, parts, vid, np.full((h, w), 2.5, np.float32)), meta


class FailingBackend(FakeBackend):
    """Raises while producing sample 5: a renderer crash must surface as an error, not a hang."""

    def produce(self, index: int):
        if index == 5:
            raise RuntimeError("boom at sample 5")
        return super().produce(index)
