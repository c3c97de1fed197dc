"""A tiny procedural SMPL-format body (24 joints, a tube per bone) for fast tests.

It follows SMPL conventions (metres, y up, facing +z, +x = the subject's left, T-pose at zero pose)
and is exactly left-right symmetric, so tests of posing, loaders and part labels can run in
milliseconds without the embedded default body.
"""

from __future__ import annotations

import numpy as np

from protoreg.parts import SMPL_PARENTS

# Rest joint positions of a 1.7 m T-posed figure, SMPL joint order (see protoreg.parts).
SYNTHETIC_JOINTS = np.array(
    [
        (0.0, 0.95, 0.0),  # pelvis
        (0.09, 0.87, 0.0),  # left hip
        (-0.09, 0.87, 0.0),
        (0.0, 1.06, 0.0),  # spine1
        (0.10, 0.50, 0.0),  # left knee
        (-0.10, 0.50, 0.0),
        (0.0, 1.18, 0.0),  # spine2
        (0.10, 0.10, -0.02),  # left ankle
        (-0.10, 0.10, -0.02),
        (0.0, 1.26, 0.0),  # spine3
        (0.10, 0.03, 0.11),  # left foot (toes)
        (-0.10, 0.03, 0.11),
        (0.0, 1.48, 0.0),  # neck
        (0.07, 1.40, 0.0),  # left collar
        (-0.07, 1.40, 0.0),
        (0.0, 1.56, 0.02),  # head
        (0.18, 1.42, 0.0),  # left shoulder
        (-0.18, 1.42, 0.0),
        (0.45, 1.42, 0.0),  # left elbow
        (-0.45, 1.42, 0.0),
        (0.70, 1.42, 0.0),  # left wrist
        (-0.70, 1.42, 0.0),
        (0.78, 1.42, 0.0),  # left hand
        (-0.78, 1.42, 0.0),
    ]
)
# Leaf joints get a tube of their own, pointing this way from the joint.
_LEAF_EXTENSIONS = {
    10: (0.0, 0.0, 0.05),
    11: (0.0, 0.0, 0.05),
    15: (0.0, 0.16, 0.0),
    22: (0.08, 0.0, 0.0),
    23: (-0.08, 0.0, 0.0),
}
_RINGS, _AROUND, _RADIUS = 5, 8, 0.04


def _ring_basis(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors across the bone; the helper axis lies in the yz plane, so mirrored bones
    get mirrored rings (with an even number of points per ring)."""
    helper = np.array([0.0, 0.0, 1.0]) if abs(direction[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(direction, helper)
    u /= np.linalg.norm(u)
    return u, np.cross(direction, u)


def _tube(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(_RINGS * _AROUND, 3) points on a tube from start to end, rings strictly between the ends."""
    direction = (end - start) / np.linalg.norm(end - start)
    u, v = _ring_basis(direction)
    t = (np.arange(_RINGS) + 0.5) / _RINGS
    angles = 2 * np.pi * np.arange(_AROUND) / _AROUND
    circle = np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * v
    return (start + t[:, None, None] * (end - start) + _RADIUS * circle[None]).reshape(-1, 3), t


def _tube_faces(offset: int) -> np.ndarray:
    faces = []
    for r in range(_RINGS - 1):
        for a in range(_AROUND):
            p, q = r * _AROUND + a, r * _AROUND + (a + 1) % _AROUND
            faces += [(p, q, p + _AROUND), (q, q + _AROUND, p + _AROUND)]
    return np.array(faces, dtype=np.int64) + offset


def synthetic_body_arrays(num_betas: int = 10, seed: int = 0, pose_correctives: bool = True) -> dict:
    """SMPL-format arrays (v_template, f, shapedirs, posedirs, J_regressor, weights, kintree_table,
    vt, ft) of a procedural tube body with 28 tubes of 40 vertices."""
    joints = SYNTHETIC_JOINTS
    segments = [(SMPL_PARENTS[j], joints[SMPL_PARENTS[j]], joints[j], j) for j in range(1, 24)]
    segments += [(j, joints[j], joints[j] + np.array(ext), None) for j, ext in _LEAF_EXTENSIONS.items()]
    vertices, faces, weights = [], [], []
    for owner, start, end, child in segments:
        points, t = _tube(start, end)
        w = np.zeros((len(points), 24))
        to_child = 0.5 * np.clip((np.repeat(t, _AROUND) - 0.6) / 0.4, 0.0, 1.0) if child is not None else 0.0
        w[:, owner] = 1.0 - to_child
        if child is not None:
            w[:, child] = to_child
        faces.append(_tube_faces(sum(len(v) for v in vertices)))
        vertices.append(points)
        weights.append(w)
    v_template = np.concatenate(vertices)
    num_vertices = len(v_template)
    rng = np.random.default_rng(seed)
    # Shape directions: smooth random linear deformations of the body (about +-2 cm per unit beta).
    mixing = rng.normal(scale=0.02, size=(num_betas, 3, 3))
    shapedirs = np.einsum("kcd,vd->vck", mixing, v_template - v_template.mean(0))
    posedirs = (
        rng.normal(scale=1e-3, size=(num_vertices, 3, 207))
        if pose_correctives
        else np.zeros((num_vertices, 3, 207))
    )
    # Regress each joint from the ends of the tubes that touch it (rows sum to 1).
    j_regressor = np.zeros((24, num_vertices))
    for j in range(24):
        near = np.linalg.norm(v_template - joints[j], axis=1)
        nearest = np.argsort(near)[:_AROUND]
        j_regressor[j, nearest] = 1.0 / _AROUND
    uv = np.stack([v_template[:, 0] * 0.5 + 0.5, v_template[:, 1] / 1.8], axis=1)
    kintree = np.array([list(SMPL_PARENTS), list(range(24))], dtype=np.int64)
    faces = np.concatenate(faces)
    return {
        "v_template": v_template,
        "f": faces,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": j_regressor,
        "weights": np.concatenate(weights),
        "kintree_table": kintree,
        "vt": uv,
        "ft": faces.copy(),
    }
