"""Body fixtures for the pose and appearance tests: the real default body when it is there, else a stand-in.

The stand-in is a small SMPL-format body made of tubes with adult radii around a 24-joint skeleton (rigid
skinning), loaded through protoreg.body's own BodyModel, so the content stages can be tested before, or
without, the baked default body (protoreg.body.synthetic's tubes are all 4 cm thin: too thin for capsules).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protoreg.parts import SMPL_PARENTS

# T-pose joints (metres, y-up, facing +z, +x = subject's left), roughly an adult's proportions.
_LEFT = {
    1: (0.09, 0.86, 0.0),
    4: (0.10, 0.48, 0.01),
    7: (0.10, 0.08, -0.02),
    10: (0.11, 0.02, 0.11),
    13: (0.07, 1.38, -0.01),
    16: (0.18, 1.40, -0.02),
    18: (0.44, 1.40, -0.03),
    20: (0.69, 1.40, -0.02),
    22: (0.77, 1.39, -0.02),
}
_CENTRE = {
    0: (0.0, 0.93, 0.0),
    3: (0.0, 1.03, -0.02),
    6: (0.0, 1.15, -0.01),
    9: (0.0, 1.23, 0.0),
    12: (0.0, 1.45, -0.02),
    15: (0.0, 1.54, 0.01),
}
_MIRROR_JOINT = {1: 2, 4: 5, 7: 8, 10: 11, 13: 14, 16: 17, 18: 19, 20: 21, 22: 23}


def standin_joints() -> np.ndarray:
    j = np.zeros((24, 3))
    for i, p in _CENTRE.items():
        j[i] = p
    for i, p in _LEFT.items():
        j[i] = p
        j[_MIRROR_JOINT[i]] = (-p[0], p[1], p[2])
    return j


def _tube(a, b, ra, rb, rings=8, around=12, ry=None):
    """Vertices and faces of an open tube from a to b (elliptical when ry is given)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    axis = b - a
    length = np.linalg.norm(axis)
    d = axis / length
    helper = np.array([0.0, 0.0, 1.0]) if abs(d[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(d, helper)
    u /= np.linalg.norm(u)
    w = np.cross(d, u)
    t = np.linspace(0, 1, rings)
    ang = np.linspace(0, 2 * np.pi, around, endpoint=False)
    r = ra + (rb - ra) * t
    r2 = r if ry is None else ry + 0 * t
    verts = (
        a
        + t[:, None, None] * axis
        + r[:, None, None] * np.cos(ang)[None, :, None] * u
        + r2[:, None, None] * np.sin(ang)[None, :, None] * w
    ).reshape(-1, 3)
    faces = []
    for i in range(rings - 1):
        for k in range(around):
            p0, p1 = i * around + k, i * around + (k + 1) % around
            q0, q1 = p0 + around, p1 + around
            faces += [(p0, q0, p1), (p1, q0, q1)]
    return verts, np.array(faces), t


def _sphere(c, r, n=10):
    th = np.linspace(0.15, np.pi - 0.15, n)
    ph = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
    v = (
        np.stack(
            [
                np.sin(th)[:, None] * np.sin(ph),
                np.cos(th)[:, None] + 0 * ph,
                np.sin(th)[:, None] * np.cos(ph),
            ],
            -1,
        ).reshape(-1, 3)
        * r
        + c
    )
    faces = []
    m = 2 * n
    for i in range(n - 1):
        for k in range(m):
            p0, p1 = i * m + k, i * m + (k + 1) % m
            faces += [(p0, p1, p0 + m), (p1, p1 + m, p0 + m)]
    return v, np.array(faces)


def standin_body_arrays() -> dict[str, np.ndarray]:
    """SMPL-format arrays (v_template, f, shapedirs, posedirs, J_regressor, weights, kintree_table, vt, ft) of
    a tube body with adult radii (torso 32 x 20 cm, thighs 17 cm wide), rigidly skinned. Shape direction 0
    scales the body by 5 % per unit, direction 1 thickens every tube by 10 % per unit."""
    J = standin_joints()
    pieces = []  # (verts, faces, joint)
    pieces.append((*_sphere(J[15] + (0, 0.09, 0.01), 0.1), 15))
    pieces.append((*_tube(J[12], J[15], 0.055, 0.05)[:2], 12))
    for joint, lo, hi in [(0, 0.84, 0.98), (3, 0.98, 1.10), (6, 1.10, 1.22), (9, 1.22, 1.45)]:
        pieces.append((*_tube((0, lo, -0.01), (0, hi, -0.01), 0.16, 0.16, ry=0.1)[:2], joint))
    for side in (0, 1):

        def m(i, side=side):
            return i if side == 0 else _MIRROR_JOINT[i]

        hand_end = J[m(22)] + (J[m(22)] - J[m(20)]) * 0.8
        tubes = [
            (J[m(13)], J[m(16)], 0.05, 0.05, m(13)),
            (J[m(16)], J[m(18)], 0.05, 0.042, m(16)),
            (J[m(18)], J[m(20)], 0.04, 0.03, m(18)),
            (J[m(20)], hand_end, 0.03, 0.02, m(20)),
            (J[m(1)] + (0, 0.05, 0), J[m(4)], 0.085, 0.055, m(1)),
            (J[m(4)], J[m(7)], 0.055, 0.035, m(4)),
            (J[m(7)] + (0, -0.04, -0.05), J[m(10)] + (0, 0, 0.06), 0.04, 0.03, m(7)),
        ]
        for a, b, ra, rb, joint in tubes:
            pieces.append((*_tube(a, b, ra, rb)[:2], joint))
    verts, faces, joint_of, off = [], [], [], 0
    for v, f, j in pieces:
        verts.append(v)
        faces.append(f + off)
        joint_of.append(np.full(len(v), j))
        off += len(v)
    v = np.concatenate(verts)
    joint_of = np.concatenate(joint_of)
    weights = np.zeros((len(v), 24))
    weights[np.arange(len(v)), joint_of] = 1.0
    # each joint is the mean of its 12 nearest template vertices (rows sum to 1)
    j_reg = np.zeros((24, len(v)))
    for j in range(24):
        near = np.argsort(np.linalg.norm(v - J[j], axis=1))[:12]
        j_reg[j, near] = 1.0 / 12
    shapedirs = np.zeros((len(v), 3, 16))
    shapedirs[:, :, 0] = v * 0.05
    centroid = np.zeros((24, 3))
    np.add.at(centroid, joint_of, v)
    centroid /= np.maximum(np.bincount(joint_of, minlength=24), 1)[:, None]
    shapedirs[:, :, 1] = (v - centroid[joint_of]) * 0.1
    f = np.concatenate(faces).astype(np.int64)
    return {
        "v_template": v,
        "f": f,
        "shapedirs": shapedirs,
        "posedirs": np.zeros((len(v), 3, 207)),
        "J_regressor": j_reg,
        "weights": weights,
        "kintree_table": np.array([list(SMPL_PARENTS), list(range(24))], dtype=np.int64),
        "vt": np.stack([v[:, 0] * 0.5 + 0.5, v[:, 1] / 1.9], axis=1),
        "ft": f.copy(),
    }


def load_test_body(tmp_dir: Path | None = None):
    """The real default body when it has been baked, else (or with PROTOREG_TEST_STANDIN_BODY=1) the stand-in
    written to tmp_dir and loaded through the project's own BodyModel (real forward, normals, part labels)."""
    from protoreg.body import DEFAULT_BODY_MODEL, load_body_model

    if DEFAULT_BODY_MODEL.exists() and not os.environ.get("PROTOREG_TEST_STANDIN_BODY"):
        return load_body_model(DEFAULT_BODY_MODEL)
    tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
    path = tmp_dir / "content_standin_body.npz"
    if not path.exists():
        np.savez(path, **standin_body_arrays())
    return load_body_model(path)


@dataclass
class FakeIdentity:
    """The fields of protoreg.identities.Identity that the appearance stage reads."""

    name: str = "person-0"
    id: int = 0
    betas: np.ndarray = None  # type: ignore[assignment]
    skin_tone: np.ndarray = None  # type: ignore[assignment]
    hair_color: np.ndarray = None  # type: ignore[assignment]
    body_model: object = None
    mesh: object = None

    def __post_init__(self) -> None:
        if self.betas is None:
            self.betas = np.zeros(16)
        if self.skin_tone is None:
            self.skin_tone = np.array([0.55, 0.35, 0.25])
        if self.hair_color is None:
            self.hair_color = np.array([0.05, 0.03, 0.02])
