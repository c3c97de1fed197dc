"""Pose stage: a pose prior in SMPL axis-angle (key poses, perturbation, interpenetration rejection).

No licensed motion-capture data ships with the project, so the default prior is hand-made: a library of key
poses (standing variants, a parametric walking cycle, head variants) written as per-joint Euler angles,
perturbed, clipped to per-joint anatomical limits, mirrored, turned about the vertical axis and rejected when
limb capsules interpenetrate. Users who hold AMASS-style pose files (or VPoser) can mix those in.

Conventions (SMPL): y-up, facing +z, +x = the subject's left, zero pose = T-pose. Every joint's Euler
angles are (x, y, z) in degrees, composed about the fixed axes of the joint's rest frame in the order
`EULER_ORDER[j]` (scipy's lower-case, extrinsic notation).
Useful signs, checked numerically in tests/test_pose.py:
left shoulder z < 0 lowers the left arm; left elbow y < 0 flexes it; knee x > 0 flexes it (ankle moves to -z);
hip x < 0 swings the thigh forward; ankle x > 0 points the toes down; neck/head x > 0 nods down, y > 0 turns
the face to the subject's left; spine x > 0 bends forward.
"""

from __future__ import annotations

import glob as globlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from protoreg.parts import PART_ID, SMPL_JOINT_NAMES, SMPL_PARENTS

NUM_JOINTS = 24
J = {name: i for i, name in enumerate(SMPL_JOINT_NAMES)}
PARENTS = np.array(SMPL_PARENTS)


def _mirror_joint_permutation() -> np.ndarray:
    perm = np.arange(NUM_JOINTS)
    for name, i in J.items():
        if name.startswith("left_"):
            perm[i] = J["right_" + name[5:]]
        elif name.startswith("right_"):
            perm[i] = J["left_" + name[6:]]
    return perm


# (24,) index of the same joint on the other side of the body (centre joints map to themselves).
MIRROR_JOINT = _mirror_joint_permutation()

# Composition order per joint (extrinsic, scipy notation). Hips twist about the limb axis (y) first so that
# flexion and abduction keep their meaning; the root turns about y last so that yaw is a pure heading; elbows
# flex (y) last. The middle axis of every order stays within +-90 deg, so decomposition is unique.
EULER_ORDER: tuple[str, ...] = tuple(
    "xzy" if n in ("pelvis",) or n.endswith("_elbow") else "yxz" if n.endswith("_hip") else "xyz"
    for n in SMPL_JOINT_NAMES
)

# Anatomical limits, degrees, per axis (x, y, z) for centre and left joints; right joints are mirrored.
_LIMITS_LEFT_CENTRE: dict[str, tuple[tuple[float, float], ...]] = {
    "pelvis": ((-20, 20), (-180, 180), (-15, 15)),
    "left_hip": ((-88, 35), (-35, 35), (-25, 50)),
    "spine1": ((-15, 35), (-25, 25), (-20, 20)),
    "left_knee": ((0, 145), (-12, 12), (-4, 4)),
    "spine2": ((-12, 25), (-20, 20), (-15, 15)),
    "left_ankle": ((-30, 50), (-20, 20), (-20, 20)),
    "spine3": ((-12, 25), (-20, 20), (-15, 15)),
    "left_foot": ((-35, 25), (-6, 6), (-6, 6)),
    "neck": ((-30, 40), (-45, 45), (-25, 25)),
    "left_collar": ((-12, 12), (-20, 15), (-12, 25)),
    "head": ((-35, 35), (-45, 45), (-25, 25)),
    "left_shoulder": ((-100, 110), (-88, 50), (-95, 110)),
    "left_elbow": ((-70, 70), (-150, 0), (-12, 12)),
    "left_wrist": ((-60, 60), (-35, 35), (-75, 75)),
    "left_hand": ((-15, 15), (-15, 15), (-30, 30)),
}


def _joint_limits() -> np.ndarray:
    lim = np.zeros((NUM_JOINTS, 3, 2))
    for name, rng in _LIMITS_LEFT_CENTRE.items():
        i = J[name]
        lim[i] = np.array(rng, float)
        m = MIRROR_JOINT[i]
        if m != i:
            lim[m, 0] = lim[i, 0]
            lim[m, 1:] = -lim[i, 1:, ::-1]  # mirrored: y and z change sign, so the bounds swap
    return lim


# (24, 3, 2) min/max Euler angle, degrees.
JOINT_LIMITS_DEG = _joint_limits()


# ------------------------------------------------------------------------------------------------------------
# Euler <-> axis-angle
# ------------------------------------------------------------------------------------------------------------
_ORDER_GROUPS: dict[str, np.ndarray] = {
    o: np.array([i for i, oo in enumerate(EULER_ORDER) if oo == o]) for o in sorted(set(EULER_ORDER))
}
_AXIS = {"x": 0, "y": 1, "z": 2}


def euler_to_rotations(euler_deg: np.ndarray) -> Rotation:
    """(24, 3) per-joint (x, y, z) Euler degrees -> 24 rotations, each composed in its joint's order."""
    quats = np.zeros((NUM_JOINTS, 4))
    for order, idx in _ORDER_GROUPS.items():
        cols = [_AXIS[a] for a in order]
        quats[idx] = Rotation.from_euler(order, euler_deg[idx][:, cols], degrees=True).as_quat()
    return Rotation.from_quat(quats)


def euler_to_axis_angle(euler_deg: np.ndarray) -> np.ndarray:
    """(24, 3) Euler degrees -> (72,) SMPL axis-angle pose (float64)."""
    return euler_to_rotations(euler_deg).as_rotvec().reshape(-1).astype(np.float64)


def axis_angle_to_euler(pose: np.ndarray) -> np.ndarray:
    """(72,) axis-angle -> (24, 3) Euler degrees in each joint's order (for limit checks and statistics)."""
    rot = Rotation.from_rotvec(np.asarray(pose, float).reshape(NUM_JOINTS, 3))
    out = np.zeros((NUM_JOINTS, 3))
    for order, idx in _ORDER_GROUPS.items():
        cols = [_AXIS[a] for a in order]
        out[idx[:, None], cols] = rot[idx].as_euler(order, degrees=True)
    return out


def mirror_euler(euler_deg: np.ndarray) -> np.ndarray:
    """Reflect a pose through the sagittal plane: swap left/right joints, negate the y and z angles."""
    out = euler_deg[MIRROR_JOINT].copy()
    out[:, 1:] *= -1
    return out


def mirror_axis_angle(pose: np.ndarray) -> np.ndarray:
    """The same reflection for an axis-angle pose: swap joints, negate the y and z axis components."""
    p = np.asarray(pose, float).reshape(NUM_JOINTS, 3)[MIRROR_JOINT].copy()
    p[:, 1:] *= -1
    return p.reshape(-1)


def within_limits(pose: np.ndarray, tol_deg: float = 0.5) -> np.ndarray:
    """(24,) bool: does each joint's rotation lie inside its anatomical box (root yaw free)?"""
    e = axis_angle_to_euler(pose)
    lo, hi = JOINT_LIMITS_DEG[..., 0] - tol_deg, JOINT_LIMITS_DEG[..., 1] + tol_deg
    return np.all((e >= lo) & (e <= hi), axis=1)


# ------------------------------------------------------------------------------------------------------------
# The key-pose library
# ------------------------------------------------------------------------------------------------------------
# Left-arm presets: collar, shoulder, elbow, wrist Euler angles (x, y, z), degrees. Right arms are mirrored.
ARM_PRESETS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "side": ((0, 0, -5), (0, -4, -76), (0, -14, 0), (0, 0, -6)),
    "a_pose": ((0, 0, 0), (0, 0, -58), (0, -6, 0), (0, 0, 0)),
    "side_straight": ((0, 0, -4), (0, 4, -80), (0, -4, 0), (0, 0, -4)),
    "hip": ((0, 0, 0), (51, 15, -57), (0, -74, 0), (0, 0, 10)),
    "crossed": ((0, -8, 0), (57, -17, -84), (0, -94, 0), (0, 0, 0)),
    "crossed_low": ((0, -8, 0), (53, -13, -83), (0, -81, 0), (0, 0, 0)),
    "phone_ear": ((0, -5, 6), (-20, -36, -28), (0, -145, 0), (0, 0, 40)),
    "phone_front": ((0, -5, 0), (40, -30, -70), (-30, -95, 0), (0, 0, 20)),
    "reach": ((0, -10, 0), (0, -75, -22), (0, -12, 0), (0, 0, 0)),
    "raised": ((0, 0, 12), (0, -15, 78), (0, -18, 0), (0, 0, 0)),
    "wave": ((0, 0, 8), (-80, -10, 8), (0, -95, 0), (0, 0, 0)),
    "behind": ((0, 8, 0), (45, 38, -85), (0, -42, 0), (0, 0, 0)),
    "pocket": ((0, 0, 0), (6, -6, -84), (0, -10, 0), (0, 0, -15)),
    "carry": ((0, 0, -8), (-10, 0, -74), (0, -55, 0), (0, 0, -10)),
    "chin": ((0, -8, 6), (40, -40, -50), (-10, -140, 0), (0, 0, 35)),
    "point_side": ((0, 0, 5), (0, -5, -5), (0, -5, 0), (0, 0, 0)),
    "clasp_front": ((0, -8, 0), (21, -8, -92), (0, -23, 0), (0, 0, 0)),
}

_ARM_JOINTS = ("left_collar", "left_shoulder", "left_elbow", "left_wrist")
# joints whose angles belong to the left/right arm (for mixing arms from different key poses)
LEFT_ARM_JOINTS = np.array([J[n] for n in _ARM_JOINTS + ("left_hand",)])
RIGHT_ARM_JOINTS = MIRROR_JOINT[LEFT_ARM_JOINTS]


def _set_left(e: np.ndarray, name: str, angles) -> None:
    e[J[name]] = angles


def _set_right(e: np.ndarray, left_name: str, angles) -> None:
    i = MIRROR_JOINT[J[left_name]]
    e[i] = (angles[0], -angles[1], -angles[2])


def _build_pose(
    left_arm: str = "side",
    right_arm: str = "side",
    legs: dict[str, tuple[float, float, float]] | None = None,
    centre: dict[str, tuple[float, float, float]] | None = None,
) -> np.ndarray:
    """Euler angles (24, 3) from a left-arm preset, a right-arm preset (given as its left mirror image),
    explicit leg joints (left_*/right_* names) and centre joints."""
    e = np.zeros((NUM_JOINTS, 3))
    for joint, ang in zip(_ARM_JOINTS, ARM_PRESETS[left_arm], strict=True):
        _set_left(e, joint, ang)
    for joint, ang in zip(_ARM_JOINTS, ARM_PRESETS[right_arm], strict=True):
        _set_right(e, joint, ang)
    for name, ang in (legs or {}).items():
        e[J[name]] = ang
    for name, ang in (centre or {}).items():
        e[J[name]] = ang
    return e


_STAND = {"left_hip": (0, 0, 3), "right_hip": (0, 0, -3), "left_knee": (3, 0, 0), "right_knee": (3, 0, 0)}
_SHIFT_LEFT = {  # weight on the left leg, right knee relaxed (contrapposto)
    "left_hip": (0, -4, 1),
    "right_hip": (-8, 6, -8),
    "left_knee": (2, 0, 0),
    "right_knee": (16, 0, 0),
    "right_ankle": (-4, 0, 0),
}
_SHIFT_RIGHT = {
    "left_hip": (-8, -6, 8),
    "right_hip": (0, 4, -1),
    "left_knee": (16, 0, 0),
    "right_knee": (2, 0, 0),
    "left_ankle": (-4, 0, 0),
}
_WIDE = {"left_hip": (0, -8, 9), "right_hip": (0, 8, -9), "left_knee": (3, 0, 0), "right_knee": (3, 0, 0)}
_SHIFT_PELVIS_LEFT = {"pelvis": (0, 0, 4), "spine1": (0, 0, -3), "spine3": (0, 0, -2)}
_SHIFT_PELVIS_RIGHT = {"pelvis": (0, 0, -4), "spine1": (0, 0, 3), "spine3": (0, 0, 2)}


@dataclass(frozen=True)
class KeyPose:
    """One hand-made key pose: `euler` (24, 3) degrees; kind is 'standing', 'gait' or 'head'."""

    name: str
    kind: str
    euler: np.ndarray


def _bump(phase: float, centre: float, width: float) -> float:
    """Periodic Gaussian bump on the unit gait cycle."""
    d = (phase - centre + 0.5) % 1.0 - 0.5
    return math.exp(-0.5 * (d / width) ** 2)


def _leg_gait(phase: float, stride: float) -> tuple[tuple[float, float, float], ...]:
    """Hip, knee, ankle Euler angles of the LEFT leg at a gait phase (0 = left heel strike)."""
    c = math.cos(2 * math.pi * phase)
    hip_x = -(8.0 + 20.0 * c) * stride  # 28 deg flexion at heel strike, 12 deg extension at toe-off
    knee_x = 4.0 + stride * (14.0 * _bump(phase, 0.12, 0.06) + 56.0 * _bump(phase, 0.72, 0.09))
    ankle_x = stride * (
        5.0 * _bump(phase, 0.05, 0.04)
        - 8.0 * _bump(phase, 0.38, 0.12)
        + 16.0 * _bump(phase, 0.60, 0.05)
        - 6.0 * _bump(phase, 0.82, 0.07)
    )
    return (0.0, 0.0, 2.0), (hip_x, 0.0, 0.0), (knee_x, 0.0, 0.0), (ankle_x, 0.0, 0.0)


def gait_euler(phase: float, stride: float = 1.0) -> np.ndarray:
    """Euler angles (24, 3) of a parametric walking cycle: phase in [0, 1) (0 = left heel strike), stride
    scales the amplitudes (1 = an ordinary walk). Arms swing against the legs; pelvis and chest
    counter-rotate."""
    e = np.zeros((NUM_JOINTS, 3))
    for side, ph in ((0, phase), (1, (phase + 0.5) % 1.0)):
        _, hip, knee, ankle = _leg_gait(ph, stride)
        setter = _set_left if side == 0 else _set_right
        setter(e, "left_hip", (hip[0], 0.0, 2.0))
        setter(e, "left_knee", knee)
        setter(e, "left_ankle", ankle)
        # the arm on this side swings with the OTHER leg: forward when the opposite leg is forward
        swing = -math.cos(2 * math.pi * ph)  # +1 = fully forward
        shoulder_y = -(3.0 + 17.0 * stride * swing)  # y < 0 swings the left arm forward
        elbow_y = -(14.0 + 10.0 * stride * max(swing, 0.0))
        setter(e, "left_collar", (0.0, 0.0, -4.0))
        setter(e, "left_shoulder", (0.0, shoulder_y, -77.0))
        setter(e, "left_elbow", (0.0, elbow_y, 0.0))
        setter(e, "left_wrist", (0.0, 0.0, -5.0))
    c = math.cos(2 * math.pi * phase)
    s = math.sin(2 * math.pi * phase)
    e[J["pelvis"]] = (2.0, -5.0 * stride * c, 2.0 * s)
    e[J["spine1"]] = (3.0, 2.0 * stride * c, -1.0 * s)
    e[J["spine3"]] = (1.0, 3.0 * stride * c, -1.0 * s)
    e[J["neck"]] = (-2.0, 1.0 * stride * c, 0.0)
    e[J["head"]] = (2.0, 0.0, 0.0)
    return e


GAIT_LIBRARY_PHASES = 8


def key_pose_library() -> list[KeyPose]:
    """The hand-made key poses: standing variants, 8 walking phases, head variants."""
    poses: list[KeyPose] = []

    def stand(name: str, la: str, ra: str, legs=None, centre=None) -> None:
        poses.append(KeyPose(name, "standing", _build_pose(la, ra, legs or _STAND, centre)))

    stand("relaxed", "side", "side")
    stand("a_pose", "a_pose", "a_pose")
    stand(
        "attention",
        "side_straight",
        "side_straight",
        {**_STAND, "left_hip": (0, 0, 1), "right_hip": (0, 0, -1)},
    )
    stand("weight_shift_left", "side", "side", _SHIFT_LEFT, _SHIFT_PELVIS_LEFT)
    stand("weight_shift_right", "side_straight", "side", _SHIFT_RIGHT, _SHIFT_PELVIS_RIGHT)
    stand("hands_on_hips", "hip", "hip", _WIDE)
    stand("hand_on_hip", "hip", "side", _SHIFT_RIGHT, _SHIFT_PELVIS_RIGHT)
    stand("arms_crossed", "crossed", "crossed_low", _STAND, {"spine3": (-3, 0, 0)})
    stand("phone_ear", "side", "phone_ear", _SHIFT_LEFT, {**_SHIFT_PELVIS_LEFT, "head": (4, -8, -6)})
    stand("texting", "phone_front", "phone_front", _STAND, {"neck": (18, 0, 0), "head": (14, 0, 0)})
    stand("reaching", "reach", "side", _SHIFT_LEFT, {"spine1": (6, -8, 0), "spine3": (4, -6, 0)})
    stand("raised_arm", "side", "raised", _STAND, {"head": (-12, -6, 0)})
    stand("waving", "wave", "side", _SHIFT_RIGHT, {"head": (0, 10, 0)})
    stand("hands_behind_back", "behind", "behind", _WIDE, {"spine3": (-4, 0, 0), "head": (-3, 0, 0)})
    stand("hands_in_pockets", "pocket", "pocket", _STAND, {"spine3": (-2, 0, 0)})
    stand("one_pocket", "pocket", "side", _SHIFT_LEFT, _SHIFT_PELVIS_LEFT)
    stand("carrying_bag", "carry", "side", _STAND, {"spine1": (0, 0, 3)})
    stand("thinking", "side", "chin", _SHIFT_RIGHT, {"neck": (8, 0, 0), "head": (6, -5, 0)})
    stand("pointing", "point_side", "side", _WIDE, {"neck": (0, 20, 0), "head": (0, 20, 0)})
    stand("hands_clasped", "clasp_front", "clasp_front", _STAND, {"neck": (6, 0, 0)})
    stand(
        "stride_stand",
        "a_pose",
        "side",
        {
            "left_hip": (-18, 0, 4),
            "right_hip": (8, 0, -4),
            "left_knee": (12, 0, 0),
            "right_knee": (4, 0, 0),
            "left_ankle": (6, 0, 0),
            "right_ankle": (-10, 0, 0),
        },
    )
    for k in range(GAIT_LIBRARY_PHASES):
        poses.append(KeyPose(f"walk_phase_{k}", "gait", gait_euler(k / GAIT_LIBRARY_PHASES, 1.0)))
    head_variants = {
        "look_left": (0, 35, 0),
        "look_right": (0, -35, 0),
        "look_down": (25, 0, 0),
        "look_up": (-22, 0, 0),
        "head_tilt": (4, 8, 14),
    }
    for name, (px, py, pz) in head_variants.items():
        e = _build_pose("side", "side", _STAND)
        e[J["neck"]] = (px * 0.5, py * 0.5, pz * 0.5)
        e[J["head"]] = (px * 0.5, py * 0.5, pz * 0.5)
        poses.append(KeyPose(name, "head", e))
    return poses


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PoseConfig:
    """Distribution of body poses (angles in degrees)."""

    # Share of samples drawn from the parametric walking cycle (random phase and stride); the rest start
    # from a standing or head key pose. Facts: a gait + standing mix looked natural; uniform sampling did not.
    gait_fraction: float = 0.4
    # Walking stride scale range (1 = an ordinary walk; amplitudes of hips, knees, arms scale with it).
    gait_stride_range: tuple[float, float] = (0.5, 1.3)
    # Relative weights of the non-gait key poses by name (see key_pose_library()); unnamed poses weigh 1.
    key_pose_weights: dict[str, float] = field(default_factory=lambda: {"relaxed": 3.0, "a_pose": 1.5})
    # Probability of replacing one arm of a standing pose with the same arm of another standing pose.
    arm_mix_prob: float = 0.35
    # Probability of adding an extra head turn, and its yaw / pitch ranges (split between neck and head).
    head_turn_prob: float = 0.5
    head_yaw_range: tuple[float, float] = (-40.0, 40.0)
    head_pitch_range: tuple[float, float] = (-12.0, 22.0)
    # Standard deviation of the Gaussian perturbation of the main joints (shoulders, elbows, hips, knees,
    # spine, neck), scaled per axis by how far that axis moves in daily life.
    perturb_deg: float = 7.0
    # Every joint gets small noise whose standard deviation is drawn from this range per sample.
    jitter_deg_range: tuple[float, float] = (2.0, 6.0)
    # Probability of reflecting the pose left <-> right.
    mirror_prob: float = 0.5
    # Global rotation about the vertical (y) axis: heading range, degrees (0 faces +z).
    yaw_range: tuple[float, float] = (-180.0, 180.0)
    # Standard deviation of the pelvis' forward/side tilt.
    root_tilt_deg: float = 2.0
    # Interpenetration test: capsules overlapping by more than this many metres are a collision.
    contact_slack_m: float = 0.012
    # Capsule radius = this percentile of the part's vertex distances to its bone segment.
    capsule_radius_percentile: float = 30.0
    # Proposals tried before falling back to the relaxed pose (with the drawn heading).
    max_tries: int = 30
    # Optional AMASS-style .npz files (keys `poses` (T, >=72) or `root_orient` + `pose_body`); a glob.
    poses_glob: str | None = None
    # When pose files are given: the share of samples taken from them (the rest from the key-pose prior).
    poses_fraction: float = 0.5
    # Up axis of the pose files' world frame: "z" for AMASS, "y" for SMPL-native data.
    poses_up_axis: str = "z"
    # Keep every k-th frame of the pose files (neighbouring mocap frames are near duplicates).
    poses_frame_step: int = 5
    # Optional VPoser (human_body_prior code + weights supplied by the user): folder with the weights.
    vposer_dir: str | None = None
    # When VPoser is given: share of samples decoded from its latent space.
    vposer_fraction: float = 0.3


# ------------------------------------------------------------------------------------------------------------
# Geometry: forward kinematics and capsule collisions
# ------------------------------------------------------------------------------------------------------------
# Capsules: (name, start joint, end joint, part whose vertices give the radius)
CAPSULES: tuple[tuple[str, str, str, str], ...] = (
    ("torso", "pelvis", "neck", "torso"),
    ("l_upper_arm", "left_shoulder", "left_elbow", "left_upper_arm"),
    ("r_upper_arm", "right_shoulder", "right_elbow", "right_upper_arm"),
    ("l_forearm", "left_elbow", "left_wrist", "left_lower_arm"),
    ("r_forearm", "right_elbow", "right_wrist", "right_lower_arm"),
    ("l_thigh", "left_hip", "left_knee", "left_upper_leg"),
    ("r_thigh", "right_hip", "right_knee", "right_upper_leg"),
    ("l_shin", "left_knee", "left_ankle", "left_lower_leg"),
    ("r_shin", "right_knee", "right_ankle", "right_lower_leg"),
    ("l_foot", "left_ankle", "left_foot", "left_foot"),
    ("r_foot", "right_ankle", "right_foot", "right_foot"),
    ("head", "head", "crown", "head"),
)
_CAP = {c[0]: k for k, c in enumerate(CAPSULES)}
# Pairs of non-adjacent capsules that must not overlap.
COLLISION_PAIRS: tuple[tuple[str, str], ...] = (
    ("l_forearm", "torso"),
    ("r_forearm", "torso"),
    ("l_forearm", "l_thigh"),
    ("l_forearm", "r_thigh"),
    ("r_forearm", "l_thigh"),
    ("r_forearm", "r_thigh"),
    ("l_forearm", "r_forearm"),
    ("l_thigh", "r_thigh"),
    ("l_shin", "r_shin"),
    ("l_thigh", "r_shin"),
    ("r_thigh", "l_shin"),
    ("l_foot", "r_foot"),
    ("l_foot", "r_shin"),
    ("r_foot", "l_shin"),
    ("l_upper_arm", "r_forearm"),
    ("r_upper_arm", "l_forearm"),
    ("l_forearm", "head"),
    ("r_forearm", "head"),
)
_PAIR_IDX = np.array([(_CAP[a], _CAP[b]) for a, b in COLLISION_PAIRS])
# Capsule end points index the 24 joints plus one virtual point carried by the head joint: the crown (the
# centre of the upper skull), so the head gets a capsule of its own.
CROWN = NUM_JOINTS
_POINT = {**J, "crown": CROWN}
_CAP_JOINTS = np.array([(_POINT[a], _POINT[b]) for _, a, b, _ in CAPSULES])


def forward_kinematics(pose: np.ndarray, rest_joints: np.ndarray) -> np.ndarray:
    """Posed joints (24, 3) of an axis-angle pose (72,) about the rest joints (root kept in place)."""
    return _kinematics(pose, rest_joints)[0]


def _kinematics(pose: np.ndarray, rest_joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posed joint positions (24, 3) and world rotations (24, 3, 3)."""
    rot = Rotation.from_rotvec(np.asarray(pose, float).reshape(NUM_JOINTS, 3)).as_matrix()
    glob_r = np.zeros_like(rot)
    posed = np.zeros((NUM_JOINTS, 3))
    glob_r[0] = rot[0]
    posed[0] = rest_joints[0]
    for k in range(1, NUM_JOINTS):
        p = PARENTS[k]
        glob_r[k] = glob_r[p] @ rot[k]
        posed[k] = posed[p] + glob_r[p] @ (rest_joints[k] - rest_joints[p])
    return posed, glob_r


def capsule_points(pose: np.ndarray, rest_points: np.ndarray) -> np.ndarray:
    """(25, 3) posed capsule end points: the 24 joints and the crown, which moves rigidly with the head."""
    posed, glob_r = _kinematics(pose, rest_points[:NUM_JOINTS])
    head = J["head"]
    crown = posed[head] + glob_r[head] @ (rest_points[CROWN] - rest_points[head])
    return np.concatenate([posed, crown[None]])


def segment_distances(p0, p1, q0, q1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest distance between segments p0-p1 and q0-q1 (arrays (N, 3)), and the parameters s, t in [0, 1]
    of the closest points on each."""
    d1, d2, r = p1 - p0, q1 - q0, p0 - q0
    a = (d1 * d1).sum(1)
    e = (d2 * d2).sum(1)
    f = (d2 * r).sum(1)
    c = (d1 * r).sum(1)
    b = (d1 * d2).sum(1)
    denom = a * e - b * b
    eps = 1e-12
    s = np.where(denom > eps, np.clip((b * f - c * e) / np.maximum(denom, eps), 0, 1), 0.0)
    t = (b * s + f) / np.maximum(e, eps)
    s_low = np.clip(-c / np.maximum(a, eps), 0, 1)
    s_high = np.clip((b - c) / np.maximum(a, eps), 0, 1)
    s = np.where(t < 0, s_low, np.where(t > 1, s_high, s))
    t = np.clip(t, 0, 1)
    dist = np.linalg.norm((p0 + d1 * s[:, None]) - (q0 + d2 * t[:, None]), axis=1)
    return dist, s, t


@dataclass
class BodyGeometry:
    """What the collision test needs of one body shape: rest joints and tapered capsule radii."""

    rest_joints: np.ndarray  # (24, 3)
    radii: np.ndarray  # (n_capsules, 2) radius at the start and end joint, metres
    rest_points: np.ndarray  # (25, 3) the rest joints and the crown


def crown_point(rest_vertices: np.ndarray, vertex_parts: np.ndarray, rest_joints: np.ndarray) -> np.ndarray:
    """Rest position of the crown: the centroid of the head vertices in the upper half of the skull."""
    head = rest_vertices[vertex_parts == PART_ID["head"]]
    base = rest_joints[J["head"], 1]
    if len(head) == 0:
        return rest_joints[J["head"]] + (0.0, 0.1, 0.0)
    upper = head[head[:, 1] > base + 0.5 * (head[:, 1].max() - base)]
    return upper.mean(axis=0) if len(upper) else head.mean(axis=0)


def capsule_radii(
    rest_vertices: np.ndarray, vertex_parts: np.ndarray, rest_points: np.ndarray, percentile: float
) -> np.ndarray:
    """(n_capsules, 2) radii at both ends of each capsule from the distances of the part's rest vertices to
    its bone segment (a low percentile, so that a flattened torso or a muscle bulge does not inflate it)."""
    radii = np.zeros((len(CAPSULES), 2))
    for k, (_, ja, jb, part) in enumerate(CAPSULES):
        a, b = rest_points[_POINT[ja]], rest_points[_POINT[jb]]
        v = rest_vertices[vertex_parts == PART_ID[part]]
        d = b - a
        t = np.clip(((v - a) @ d) / max(float(d @ d), 1e-12), 0, 1)
        dist = np.linalg.norm(v - (a + t[:, None] * d), axis=1)
        for end, sel in ((0, t < 0.35), (1, t > 0.65)):
            pick = dist[sel] if sel.sum() >= 5 else dist
            radii[k, end] = np.percentile(pick, percentile) if len(pick) else 0.03
    return radii


def capsule_overlaps(posed_points: np.ndarray, radii: np.ndarray, slack_m: float) -> np.ndarray:
    """(n_pairs,) overlap depth in metres (> 0 = interpenetrating) of each collision pair, from the posed
    capsule end points (25, 3) of `capsule_points`."""
    ends = posed_points[_CAP_JOINTS]  # (n_caps, 2, 3)
    a, b = _PAIR_IDX[:, 0], _PAIR_IDX[:, 1]
    dist, s, t = segment_distances(ends[a, 0], ends[a, 1], ends[b, 0], ends[b, 1])
    ra = radii[a, 0] + (radii[a, 1] - radii[a, 0]) * s
    rb = radii[b, 0] + (radii[b, 1] - radii[b, 0]) * t
    return ra + rb - slack_m - dist


# ------------------------------------------------------------------------------------------------------------
# Pose files (AMASS-style) and VPoser
# ------------------------------------------------------------------------------------------------------------
def load_pose_file(path: str | Path) -> np.ndarray:
    """(T, 72) SMPL axis-angle poses from an AMASS-style .npz (`poses` or `root_orient` + `pose_body`)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # unreadable or not an npz
        raise ValueError(f"pose file {path}: cannot read it as .npz ({exc})") from exc
    with data:
        keys = set(data.files)
        if "poses" in keys:
            poses = np.asarray(data["poses"], dtype=np.float64)
            if poses.ndim != 2 or poses.shape[1] < 72:
                raise ValueError(f"pose file {path}: 'poses' must be (T, >=72), got {poses.shape}")
            out = poses[:, :72].copy()
            if poses.shape[1] > 72:  # SMPL-H / SMPL-X: values 66..71 are finger joints, not SMPL's hands
                out[:, 66:72] = 0.0
            return out
        if "pose_body" in keys and "root_orient" in keys:
            root = np.asarray(data["root_orient"], dtype=np.float64).reshape(-1, 3)
            body = np.asarray(data["pose_body"], dtype=np.float64)
            body = body.reshape(len(body), -1)
            if body.shape[1] < 63 or len(body) != len(root):
                raise ValueError(
                    f"pose file {path}: 'pose_body' must be (T, 63) beside 'root_orient' "
                    f"(T, 3), got {body.shape} and {root.shape}"
                )
            out = np.zeros((len(body), 72))
            out[:, :3] = root
            out[:, 3:66] = body[:, :63]
            return out
    raise ValueError(
        f"pose file {path}: expected key 'poses' (T, >=72) or 'root_orient' + 'pose_body'; "
        f"found {sorted(keys)}"
    )


def load_pose_files(pattern: str, frame_step: int = 1) -> np.ndarray:
    """All frames (every `frame_step`-th) of the files matching a glob, in sorted file order."""
    files = sorted(globlib.glob(str(Path(pattern).expanduser()), recursive=True))
    if not files:
        raise ValueError(f"poses_glob {pattern!r}: no file matches (expected AMASS-style .npz files)")
    chunks = [load_pose_file(f)[:: max(1, int(frame_step))] for f in files]
    poses = np.concatenate(chunks)
    if len(poses) == 0:
        raise ValueError(f"poses_glob {pattern!r}: the files hold no frames")
    return poses


def canonical_root(pose: np.ndarray, up_axis: str) -> np.ndarray:
    """Re-express a pose's root rotation in the y-up frame and remove its heading (facing +z), so the prior's
    own yaw decides where the body looks."""
    pose = np.asarray(pose, float).copy()
    root = Rotation.from_rotvec(pose[:3])
    if up_axis == "z":
        root = Rotation.from_euler("x", -90, degrees=True) * root
    elif up_axis != "y":
        raise ValueError(f"poses_up_axis: expected 'y' or 'z', got {up_axis!r}")
    facing = root.apply([0.0, 0.0, 1.0])
    heading = math.atan2(facing[0], facing[2])
    root = Rotation.from_euler("y", -heading) * root
    pose[:3] = root.as_rotvec()
    return pose


class VPoserDecoder:
    """Hook for VPoser (v2, human_body_prior): the user supplies the package and the weights folder.

    decode(rng) draws z ~ N(0, I) and returns the 21 body joints' axis-angle (63,). Raises a clear error at
    construction when the package or the weights are missing."""

    def __init__(self, weights_dir: str | Path) -> None:
        weights_dir = Path(weights_dir)
        if not weights_dir.is_dir():
            raise ValueError(
                f"vposer_dir {weights_dir}: not a folder (expected VPoser v2 weights, "
                f"e.g. V02_05/ with a snapshots/*.ckpt)"
            )
        ckpts = sorted(weights_dir.rglob("*.ckpt")) + sorted(weights_dir.rglob("*.pt"))
        if not ckpts:
            raise ValueError(
                f"vposer_dir {weights_dir}: no *.ckpt or *.pt weights inside (VPoser weights "
                f"are licensed: download them yourself from the SMPL-X site)"
            )
        try:
            from human_body_prior.models.vposer_model import VPoser  # type: ignore[import-not-found]
            from human_body_prior.tools.model_loader import load_model  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ValueError(
                f"vposer_dir {weights_dir}: the 'human_body_prior' package is not installed "
                f"(pip install it yourself to use VPoser)"
            ) from exc
        self.model, _ = load_model(
            str(weights_dir), model_code=VPoser, remove_words_in_model_weights="vp_model.", disable_grad=True
        )
        self.model.eval()
        self.latent_dim = int(getattr(self.model, "latentD", 32))

    def decode(self, rng: np.random.Generator) -> np.ndarray:
        import torch

        z = torch.as_tensor(rng.standard_normal((1, self.latent_dim)), dtype=torch.float32)
        with torch.no_grad():
            body = self.model.decode(z)["pose_body"]
        return body.reshape(-1).double().numpy()[:63]


# ------------------------------------------------------------------------------------------------------------
# The prior
# ------------------------------------------------------------------------------------------------------------
# How strongly each joint/axis is perturbed (multiples of perturb_deg); 0 = not perturbed beyond jitter.
def _perturb_scale() -> np.ndarray:
    s = np.zeros((NUM_JOINTS, 3))
    table = {
        "left_shoulder": (1.2, 1.5, 1.5),
        "left_elbow": (0.6, 1.5, 0.2),
        "left_wrist": (1.0, 0.6, 1.2),
        "left_collar": (0.3, 0.5, 0.5),
        "left_hip": (0.5, 0.7, 0.6),
        "left_knee": (1.0, 0.2, 0.1),
        "left_ankle": (0.8, 0.5, 0.4),
        "spine1": (0.6, 0.6, 0.4),
        "spine2": (0.3, 0.4, 0.3),
        "spine3": (0.3, 0.4, 0.3),
        "neck": (0.7, 0.8, 0.5),
        "head": (0.7, 0.8, 0.5),
    }
    for name, v in table.items():
        s[J[name]] = v
        s[MIRROR_JOINT[J[name]]] = v
    return s


PERTURB_SCALE = _perturb_scale()
_LIB = key_pose_library()
_RELAXED = next(p for p in _LIB if p.name == "relaxed")


class PosePrior:
    """Draws natural SMPL poses: key pose -> perturb -> clip to limits -> mirror -> yaw -> reject
    collisions."""

    def __init__(self, config: PoseConfig, body) -> None:
        self.config = config
        self.body = body
        self.library = _LIB
        self._proposals = [p for p in self.library if p.kind != "gait"]
        weights = np.array([float(config.key_pose_weights.get(p.name, 1.0)) for p in self._proposals])
        unknown = set(config.key_pose_weights) - {p.name for p in self.library}
        if unknown:
            raise ValueError(
                f"pose.key_pose_weights: unknown key poses {sorted(unknown)}; "
                f"expected names from {[p.name for p in self._proposals]}"
            )
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError("pose.key_pose_weights: weights must be >= 0 and not all zero")
        self._weights = weights / weights.sum()
        self._standing = [k for k, p in enumerate(self._proposals) if p.kind == "standing"]
        self._file_poses = (
            load_pose_files(config.poses_glob, config.poses_frame_step) if config.poses_glob else None
        )
        if config.poses_glob:
            canonical_root(np.zeros(72), config.poses_up_axis)  # validates poses_up_axis early
        self._vposer = VPoserDecoder(config.vposer_dir) if config.vposer_dir else None
        self._geometry_cache: dict[bytes, BodyGeometry] = {}
        self.last_tries = 0  # proposals drawn by the latest sample() (for statistics and tests)

    # -- body geometry ------------------------------------------------------------------------------------
    def geometry(self, betas: np.ndarray) -> BodyGeometry:
        """Rest joints and capsule radii of a body shape (cached: identities repeat)."""
        betas = np.asarray(betas, dtype=np.float64).ravel()
        key = betas.tobytes()
        geo = self._geometry_cache.get(key)
        if geo is None:
            rest_v = _to_numpy(self.body.rest_vertices(betas[None]))
            rest_j = _rest_joints(self.body, betas, rest_v)
            parts = np.asarray(self.body.vertex_parts)
            points = np.concatenate([rest_j, crown_point(rest_v, parts, rest_j)[None]])
            radii = capsule_radii(rest_v, parts, points, self.config.capsule_radius_percentile)
            geo = BodyGeometry(rest_j, radii, points)
            if len(self._geometry_cache) > 512:
                self._geometry_cache.clear()
            self._geometry_cache[key] = geo
        return geo

    def interpenetrates(self, pose: np.ndarray, betas: np.ndarray) -> bool:
        """Do any two non-adjacent limb capsules of this body in this pose overlap?"""
        geo = self.geometry(betas)
        posed = capsule_points(pose, geo.rest_points)
        return bool(np.any(capsule_overlaps(posed, geo.radii, self.config.contact_slack_m) > 0))

    # -- sampling -------------------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, betas: np.ndarray) -> np.ndarray:
        """One pose (72,) float64 axis-angle; a pure function of the rng state, the config and betas."""
        cfg = self.config
        for tries in range(1, max(1, cfg.max_tries) + 1):
            pose = self._propose(rng)
            if not self.interpenetrates(pose, betas):
                self.last_tries = tries
                return pose
        self.last_tries = cfg.max_tries
        e = _RELAXED.euler.copy()
        e[0, 1] = rng.uniform(*cfg.yaw_range)
        return euler_to_axis_angle(e)

    def _propose(self, rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        u = rng.random()
        if self._file_poses is not None and u < cfg.poses_fraction:
            return self._from_files(rng)
        if self._vposer is not None and rng.random() < cfg.vposer_fraction:
            return self._from_vposer(rng)
        return euler_to_axis_angle(self.sample_euler(rng))

    def sample_euler(self, rng: np.random.Generator) -> np.ndarray:
        """A key-pose-prior proposal as Euler angles (24, 3), before the collision test."""
        cfg = self.config
        if rng.random() < cfg.gait_fraction:
            e = gait_euler(rng.random(), rng.uniform(*cfg.gait_stride_range))
        else:
            e = self._proposals[rng.choice(len(self._proposals), p=self._weights)].euler.copy()
            if rng.random() < cfg.arm_mix_prob:
                donor = self._proposals[self._standing[rng.integers(len(self._standing))]].euler
                arm = LEFT_ARM_JOINTS if rng.random() < 0.5 else RIGHT_ARM_JOINTS
                e[arm] = donor[arm]
        if rng.random() < cfg.head_turn_prob:
            yaw = rng.uniform(*cfg.head_yaw_range)
            pitch = rng.uniform(*cfg.head_pitch_range)
            for joint in ("neck", "head"):
                e[J[joint], 0] += 0.5 * pitch
                e[J[joint], 1] += 0.5 * yaw
        e += rng.normal(0.0, 1.0, e.shape) * PERTURB_SCALE * cfg.perturb_deg
        jitter = rng.normal(0.0, 1.0, e.shape) * rng.uniform(*cfg.jitter_deg_range)
        jitter[0] = 0.0  # the root gets its own tilt below; heading is the yaw range's alone
        e += jitter
        if rng.random() < cfg.mirror_prob:
            e = mirror_euler(e)
        e[0, 0] = rng.normal(0.0, cfg.root_tilt_deg) + e[0, 0]
        e[0, 2] = rng.normal(0.0, cfg.root_tilt_deg) + e[0, 2]
        e[0, 1] = e[0, 1] + rng.uniform(*cfg.yaw_range)
        e[0, 1] = (e[0, 1] + 180.0) % 360.0 - 180.0
        return np.clip(e, JOINT_LIMITS_DEG[..., 0], JOINT_LIMITS_DEG[..., 1])

    def _with_yaw(self, pose: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pose = canonical_root(pose, self.config.poses_up_axis)
        yaw = Rotation.from_euler("y", rng.uniform(*self.config.yaw_range), degrees=True)
        pose[:3] = (yaw * Rotation.from_rotvec(pose[:3])).as_rotvec()
        return pose

    def _from_files(self, rng: np.random.Generator) -> np.ndarray:
        pose = self._file_poses[rng.integers(len(self._file_poses))].copy()
        if rng.random() < self.config.mirror_prob:
            pose = mirror_axis_angle(pose)
        return self._with_yaw(pose, rng)

    def _from_vposer(self, rng: np.random.Generator) -> np.ndarray:
        pose = np.zeros(72)
        pose[3:66] = self._vposer.decode(rng)
        yaw = Rotation.from_euler("y", rng.uniform(*self.config.yaw_range), degrees=True)
        pose[:3] = yaw.as_rotvec()
        return pose


def _to_numpy(x) -> np.ndarray:
    """A torch tensor or array -> float64 numpy, without a leading batch axis of one."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x[0] if x.ndim == 3 and x.shape[0] == 1 else x


def _rest_joints(body, betas: np.ndarray, rest_vertices: np.ndarray) -> np.ndarray:
    """Rest-pose (T-pose) joints of a shape: the body's joint regressor applied to its rest vertices (cheap),
    or, for a body without one, the forward at zero pose."""
    regressor = getattr(body, "J_regressor", None)
    if regressor is not None:
        return _to_numpy(regressor) @ rest_vertices
    import torch

    with torch.no_grad():
        betas_t = torch.as_tensor(np.asarray(betas, np.float32)[None])
        out = body.forward(betas=betas_t, pose=torch.zeros(1, 72))
    return _to_numpy(out.joints)[:NUM_JOINTS]


def pose_statistics(poses: np.ndarray) -> dict[str, float]:
    """Mean rotation angle (degrees) over body joints 1..21 and of the knees (the facts' naturalness
    figures)."""
    p = np.asarray(poses, float).reshape(len(poses), NUM_JOINTS, 3)
    ang = np.degrees(np.linalg.norm(p, axis=2))
    knees = ang[:, [J["left_knee"], J["right_knee"]]]
    return {"mean_joint_angle_deg": float(ang[:, 1:22].mean()), "mean_knee_deg": float(knees.mean())}


def draw_key_poses(body, path: str, betas: np.ndarray | None = None, columns: int = 6) -> None:
    """Contact sheet PNG of every key pose (front and side point views coloured by part), for people to
    check that the library looks natural on a body."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from protoreg.parts import PART_COLORS

    betas = np.zeros(int(getattr(body, "num_betas", 10))) if betas is None else np.asarray(betas, float)
    library = key_pose_library()
    parts = np.asarray(body.vertex_parts)
    every = np.arange(0, len(parts), max(1, len(parts) // 7000))
    rows = -(-len(library) // columns)
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.3, rows * 2.3))
    for ax in axes.flat:
        ax.set_axis_off()
    for k, kp in enumerate(library):
        pose = torch.as_tensor(euler_to_axis_angle(kp.euler)[None], dtype=torch.float32)
        with torch.no_grad():
            out = body.forward(betas=torch.as_tensor(betas[None], dtype=torch.float32), pose=pose)
        v = _to_numpy(out.vertices)[every]
        r, c = divmod(k, columns)
        for view in (0, 1):  # front: x right; side: +z (the body's front) to the right
            ax = axes[r, 2 * c + view]
            x = v[:, 0] if view == 0 else v[:, 2]
            order = np.argsort(v[:, 2] if view == 0 else -v[:, 0])
            ax.scatter(x[order], v[order, 1], s=1.5, c=PART_COLORS[parts[every][order]] / 255.0, linewidths=0)
            centre = float(np.median(x))
            ax.set_xlim(centre - 0.8, centre + 0.8)
            ax.set_ylim(v[:, 1].min() - 0.05, v[:, 1].min() + 1.95)
            ax.set_aspect("equal")
            ax.set_title(kp.name if view == 0 else "side", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
