"""Helpers for the scene and render tests: a body, flat-colour dressing and hand-built sample specs.

The body is the embedded default body when it has been baked, else the project's synthetic tube body
(protoreg.body.synthetic). The dressing stands in for generator.appearance where a test needs fixed
colours (skin, shirt, trousers, shoes) and an optional loose shell over the torso.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from generator.config import RenderSettings
from generator.sample import SampleSpec, vertex_normals
from generator.scene import SceneConfig, sample_scene
from protoreg.body import DEFAULT_BODY_MODEL, load_body_model
from protoreg.identities import Identity
from protoreg.parts import PART_ID

REAL_BODY = DEFAULT_BODY_MODEL.exists()


def body_path(tmp_dir: Path) -> Path:
    """The default body file, or a synthetic one written into tmp_dir."""
    if REAL_BODY:
        return DEFAULT_BODY_MODEL
    from protoreg.body.synthetic import synthetic_body_arrays

    path = Path(tmp_dir) / "synthetic_body.npz"
    if not path.exists():
        np.savez(path, **synthetic_body_arrays())
    return path


def load_test_body(tmp_dir: Path) -> Any:
    return load_body_model(body_path(tmp_dir))


@dataclass
class FlatShell:
    vertices: np.ndarray
    faces: np.ndarray
    source_vertex: np.ndarray
    vertex_colors: np.ndarray
    roughness: np.ndarray | None = None


@dataclass
class FlatDressed:
    vertex_colors: np.ndarray
    roughness: np.ndarray | None = None
    shells: list[FlatShell] = field(default_factory=list)
    garment_masks: dict[str, np.ndarray] = field(default_factory=dict)


SKIN = (0.55, 0.36, 0.25)
SHIRT = (0.05, 0.15, 0.45)
TROUSERS = (0.12, 0.12, 0.12)
SHOES = (0.35, 0.2, 0.08)


def flat_dressing(body: Any, posed: np.ndarray, normals: np.ndarray, shell: bool = False) -> FlatDressed:
    """Skin on head, lower arms and hands; a shirt, trousers and shoes; optionally a loose torso shell."""
    parts = np.asarray(body.vertex_parts)
    colors = np.tile(np.array(SKIN, np.float32), (len(parts), 1))
    masks = {
        "top": np.isin(parts, [PART_ID[n] for n in ("torso", "left_upper_arm", "right_upper_arm")]),
        "bottom": np.isin(parts, [PART_ID[n] for n in ("left_upper_leg", "right_upper_leg")])
        | np.isin(parts, [PART_ID[n] for n in ("left_lower_leg", "right_lower_leg")]),
        "shoes": np.isin(parts, [PART_ID["left_foot"], PART_ID["right_foot"]]),
    }
    colors[masks["top"]], colors[masks["bottom"]], colors[masks["shoes"]] = SHIRT, TROUSERS, SHOES
    shells = []
    if shell:
        torso = np.flatnonzero(parts == PART_ID["torso"])
        faces = np.asarray(body.faces)
        keep = np.all(parts[faces] == PART_ID["torso"], axis=1)
        remap = -np.ones(len(parts), np.int64)
        remap[torso] = np.arange(len(torso))
        shells.append(
            FlatShell(
                vertices=(posed[torso] + 0.03 * normals[torso]).astype(np.float32),
                faces=remap[faces[keep]],
                source_vertex=torso,
                vertex_colors=np.tile(np.array((0.5, 0.05, 0.05), np.float32), (len(torso), 1)),
            )
        )
    return FlatDressed(vertex_colors=colors, shells=shells, garment_masks=masks)


def a_pose() -> np.ndarray:
    """Arms 45 degrees down from the T-pose, so a frontal view shows every part."""
    pose = np.zeros(72)
    pose[16 * 3 + 2] = -0.75  # left shoulder about z: +x arm towards -y
    pose[17 * 3 + 2] = 0.75
    return pose


def frontal_config(**overrides: Any) -> SceneConfig:
    """A camera 4 m in front of the person at chest height, no extra lights, no occluders."""
    base = dict(
        camera_distance=(4.0, 4.0),
        camera_height=(1.2, 1.2),
        camera_azimuth_deg=(0.0, 0.0),
        camera_roll_deg=(0.0, 0.0),
        aim_jitter=0.0,
        focal_length_mm=(50.0, 50.0),
        crop_shift=0.0,
        area_light_probability=0.0,
        occluder_probability=0.0,
        sun_elevation_deg=(50.0, 50.0),
        sun_azimuth_deg=(20.0, 20.0),
    )
    base.update(overrides)
    return SceneConfig(**base)


def person_identity(body: Any) -> Identity:
    return Identity(
        name="person_0",
        id=0,
        betas=np.zeros(body.num_betas, np.float32),
        skin_tone=np.array(SKIN),
        hair_color=np.array((0.05, 0.03, 0.02)),
    )


def make_spec(
    body: Any,
    settings: RenderSettings,
    config: SceneConfig,
    seed: int = 7,
    pose: np.ndarray | None = None,
    shell: bool = False,
) -> SampleSpec:
    """A sample with a fixed pose (A-pose by default) standing on the ground, flat dressing, sampled scene."""
    import torch

    pose = a_pose() if pose is None else pose
    ident = person_identity(body)
    with torch.no_grad():
        verts = body(
            betas=torch.as_tensor(ident.betas[None]), pose=torch.as_tensor(pose[None], dtype=torch.float32)
        )
    posed = verts.vertices[0].numpy().astype(np.float64)
    transl = np.array([0.0, -posed[:, 1].min(), 0.0])
    posed = (posed + transl).astype(np.float32)
    normals = vertex_normals(body, posed)
    dressed = flat_dressing(body, posed, normals, shell=shell)
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, config, settings, posed)
    return SampleSpec(
        index=0,
        seed=seed,
        identity=ident,
        betas=ident.betas,
        pose=pose,
        transl=transl,
        posed_vertices=posed,
        posed_normals=normals,
        dressed=dressed,
        outfit={"test": "flat"},
        scene=scene,
    )
