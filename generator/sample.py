"""Sample description: sample i as a pure function of (seed, config, i), without Blender.

`describe_sample` draws every random choice of one sample (pose, outfit, dressing, scene, in that
fixed order) from one numpy Generator seeded by `sample_seed(seed, i)`, so a sample never depends on
which worker renders it or on what was rendered before. The result, a SampleSpec, is all the renderer
needs, and `SampleSpec.metadata()` is the sample's json entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from generator.scene import SceneSpec, jsonable, sample_scene

CYCLES_SEED_MODULUS = 2**31
REST_CACHE_SIZE = 256  # identities whose rest vertices GenContext keeps (about 330 kB each)


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run seeded `seed`, independent of every other sample."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def cycles_seed(spec_seed: int) -> int:
    """Cycles' integer seed for a sample."""
    return int(spec_seed) % CYCLES_SEED_MODULUS


@dataclass
class RenderedSample:
    """What the renderer returns for one sample (see GENERATOR.md)."""

    rgb: np.ndarray  # (H, W, 3) uint8 sRGB
    parts: np.ndarray  # (H, W) uint8: 0 background, 1..14 body parts, 15 occluder
    vid: np.ndarray  # (H, W) uint16: 0 = none/unknown, else body vertex index + 1
    depth: np.ndarray | None = None  # (H, W) float32 camera-space z (m), 0 where nothing was hit
    garments: np.ndarray | None = None  # (H, W) uint8 protoreg.dataset.GARMENT_LABELS, 0 off the person
    timings: dict[str, float] = field(default_factory=dict)  # seconds per render step (diagnostics)


@dataclass
class SampleSpec:
    """Everything that determines one sample; renderer-independent."""

    index: int
    seed: int
    identity: Any  # protoreg.identities.Identity
    betas: np.ndarray  # (K,)
    pose: np.ndarray  # (72,) SMPL axis-angle
    transl: np.ndarray  # (3,) puts the lowest vertex on the ground y = 0
    posed_vertices: np.ndarray  # (V, 3) float32 world coordinates
    posed_normals: np.ndarray  # (V, 3) float32
    dressed: Any  # generator.appearance.DressedBody
    outfit: Any  # generator.appearance.Outfit
    scene: SceneSpec

    @property
    def cycles_seed(self) -> int:
        return cycles_seed(self.seed)

    def metadata(self) -> dict[str, Any]:
        """The sample's json entry: everything needed to reproduce its labels by projection."""
        cam = self.scene.camera
        ident = self.identity
        return {
            "index": int(self.index),
            "seed": int(self.seed),
            "identity": _identity_json(ident),
            "betas": jsonable(np.asarray(self.betas, dtype=np.float64)),
            "pose": jsonable(np.asarray(self.pose, dtype=np.float64)),
            "transl": jsonable(np.asarray(self.transl, dtype=np.float64)),
            "camera": {
                "K": jsonable(cam.K),
                "R": jsonable(cam.R),
                "t": jsonable(cam.t),
                "width": int(cam.width),
                "height": int(cam.height),
                "convention": "opencv: x right, y down, z forward; pixel = K (R X + t)",
                "crop_box": jsonable(cam.crop_box),
                "full_K": jsonable(cam.full_K),
                "full_width": int(cam.full_width),
                "full_height": int(cam.full_height),
                "focal_length_mm": jsonable(float(cam.focal_length_mm)),
                "sensor_width_mm": jsonable(float(cam.sensor_width_mm)),
                "position": jsonable(cam.position),
                "distance": jsonable(float(cam.distance)),
                "height_above_ground": jsonable(float(cam.height_above_ground)),
                "azimuth_deg": jsonable(float(cam.azimuth_deg)),
            },
            "lighting": {
                "sun": jsonable(self.scene.sun),
                "sky": jsonable(self.scene.sky),
                "area_lights": jsonable(self.scene.area_lights),
                "exposure_ev": jsonable(float(self.scene.exposure_ev)),
            },
            "garments": _outfit_json(self.outfit),
            "shells": len(getattr(self.dressed, "shells", []) or []),
            "background": _background_json(self.scene),
            "occluders": jsonable(self.scene.occluders),
        }


def _identity_json(ident: Any) -> dict[str, Any]:
    """Name and id; for people enrolled with their own mesh or body file, which one (by file name), since
    betas alone do not reproduce their surface."""
    out: dict[str, Any] = {"name": ident.name, "id": int(ident.id)}
    for key in ("mesh", "body_model"):
        value = getattr(ident, key, None)
        if value is not None:
            out[key] = Path(value).name
    return out


def _background_json(scene: SceneSpec) -> dict[str, Any]:
    """The background, with an image named by its file name only (no machine-specific folder)."""
    out = jsonable(scene.background)
    backdrop = out.get("backdrop")
    if backdrop and backdrop.get("image"):
        backdrop["image"] = Path(backdrop["image"]).name
    return out


def _outfit_json(outfit: Any) -> Any:
    to_json = getattr(outfit, "to_json", None)
    if callable(to_json):
        return to_json()
    return jsonable(outfit)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class GenContext:
    """Per-run, per-process state describe_sample needs: config, seed, identities, body and the
    expensive stage objects (pose prior, dresser) and per-identity rest shapes, built once."""

    def __init__(
        self,
        config: Any,
        seed: int,
        identities: list[Any],
        body: Any,
        poses: Any = None,
        backgrounds: str | None = None,
    ) -> None:
        """`poses` (a glob of pose files) and `backgrounds` (an image folder) override the config's own."""
        if not identities:
            raise ValueError("GenContext: expected at least one identity")
        if backgrounds is not None:
            config = dataclasses.replace(
                config, scene=dataclasses.replace(config.scene, backgrounds_dir=str(backgrounds))
            )
        self.config = config
        self.seed = int(seed)
        self.identities = list(identities)
        self.body = body
        self.poses = poses
        self._pose_prior: Any = None
        self._dresser: Any = None
        self._rest: dict[int, tuple[np.ndarray, Any]] = {}
        self._bodies: dict[str, Any] = {}

    @property
    def pose_prior(self) -> Any:
        if self._pose_prior is None:
            from generator.pose import PosePrior

            pose_config = self.config.pose
            if self.poses is not None and hasattr(pose_config, "poses_glob"):
                pose_config = dataclasses.replace(pose_config, poses_glob=self.poses)
            self._pose_prior = PosePrior(pose_config, self.body)
        return self._pose_prior

    @property
    def dresser(self) -> Any:
        if self._dresser is None:
            from generator.appearance import Dresser

            self._dresser = Dresser(self.body, self.config.appearance)
        return self._dresser

    def identity_for(self, index: int) -> Any:
        """Identities are balanced: sample i shows identities[i % n]."""
        return self.identities[index % len(self.identities)]

    def rest_shape(self, identity: Any) -> tuple[np.ndarray, Any]:
        """(V, 3) float64 rest vertices of an identity and the body model that poses it (cached)."""
        key = int(identity.id)
        if key not in self._rest:
            from protoreg.prototypes import identity_rest_vertices

            if len(self._rest) >= REST_CACHE_SIZE:  # bounded: runs may hold many thousands of identities
                self._rest.pop(next(iter(self._rest)))
            self._rest[key] = identity_rest_vertices(identity, self.body, self._bodies)
        return self._rest[key]


def pose_vertices(body: Any, identity: Any, rest: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """(V, 3) float64 posed vertices (no translation) of an identity: the body forward for betas
    identities; the enrolled rest mesh posed by the same skinning for mesh identities."""
    import torch

    pose_t = torch.as_tensor(np.asarray(pose, dtype=np.float32)[None])
    if getattr(identity, "mesh", None) is None:
        betas = torch.as_tensor(np.asarray(identity.betas, dtype=np.float32)[None])
        with torch.no_grad():
            return _np(body(betas=betas, pose=pose_t).vertices)[0].astype(np.float64)
    with torch.no_grad():
        return _np(body.pose_mesh(np.asarray(rest, dtype=np.float32)[None], pose_t).vertices)[0].astype(
            np.float64
        )


def vertex_normals(body: Any, vertices: np.ndarray) -> np.ndarray:
    """(V, 3) float32 unit normals, each the area-weighted mean of its faces' normals (as the body's own
    `vertex_normals`), in numpy: bincount sums are several times faster than a scatter-add per sample."""
    faces = np.asarray(body.faces)
    v = np.asarray(vertices, dtype=np.float64)
    v0, v1, v2 = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    face_n = np.cross(v1 - v0, v2 - v0)
    n = len(v)
    out = np.empty((n, 3))
    for c in range(3):
        out[:, c] = sum(np.bincount(faces[:, k], weights=face_n[:, c], minlength=n) for k in range(3))
    length = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(length, 1e-12)).astype(np.float32)


def framing_vertices(posed_vertices: np.ndarray, dressed: Any) -> np.ndarray:
    """All visible person geometry (body + loose garment shells), used to frame the crop."""
    shells = [np.asarray(s.vertices) for s in (getattr(dressed, "shells", None) or []) if len(s.vertices)]
    return np.concatenate([posed_vertices, *shells]) if shells else posed_vertices


def describe_sample(index: int, ctx: GenContext) -> SampleSpec:
    """Sample `index` of the run: pose, outfit, dressing and scene, drawn in that order from one rng."""
    from generator.appearance import sample_outfit

    seed = sample_seed(ctx.seed, index)
    rng = np.random.default_rng(seed)
    identity = ctx.identity_for(index)
    rest, body = ctx.rest_shape(identity)

    pose = np.asarray(ctx.pose_prior.sample(rng, identity.betas), dtype=np.float64).reshape(-1)
    posed = pose_vertices(body, identity, rest, pose)
    transl = np.array([0.0, -posed[:, 1].min(), 0.0])  # stand on the ground plane y = 0
    posed = (posed + transl).astype(np.float32)
    normals = vertex_normals(body, posed)

    outfit = sample_outfit(rng, ctx.config.appearance)
    dressed = ctx.dresser.dress(outfit, identity, rng, rest.astype(np.float32), posed, normals)
    scene = sample_scene(rng, ctx.config.scene, ctx.config.render, framing_vertices(posed, dressed))
    return SampleSpec(
        index=int(index),
        seed=seed,
        identity=identity,
        betas=np.asarray(identity.betas, dtype=np.float32),
        pose=pose,
        transl=transl,
        posed_vertices=posed,
        posed_normals=normals,
        dressed=dressed,
        outfit=outfit,
        scene=scene,
    )
