"""The part taxonomy: the single source of truth for label ids, names and colours.

Every label image, prototype and report in the project uses these ids. Ids are stable
across versions; bump TAXONOMY_VERSION if they ever change.
"""

from __future__ import annotations

import numpy as np

TAXONOMY_VERSION = "1"

BACKGROUND = 0
OCCLUDER = 15

PART_NAMES: tuple[str, ...] = (
    "background",
    "head",
    "torso",
    "left_upper_arm",
    "right_upper_arm",
    "left_lower_arm",
    "right_lower_arm",
    "left_hand",
    "right_hand",
    "left_upper_leg",
    "right_upper_leg",
    "left_lower_leg",
    "right_lower_leg",
    "left_foot",
    "right_foot",
    "occluder",
)
NUM_LABELS = len(PART_NAMES)  # 16: background, 14 body parts, occluder
BODY_PART_IDS: tuple[int, ...] = tuple(range(1, 15))
NUM_BODY_PARTS = len(BODY_PART_IDS)
PART_ID: dict[str, int] = {name: i for i, name in enumerate(PART_NAMES)}

# Display colours (RGB, 0-255), chosen so that left and right sides are told apart at a glance.
PART_COLORS = np.array(
    [
        (0, 0, 0),  # background
        (230, 25, 75),  # head
        (255, 225, 25),  # torso
        (60, 180, 75),  # left upper arm
        (0, 130, 200),  # right upper arm
        (170, 255, 195),  # left lower arm
        (70, 240, 240),  # right lower arm
        (0, 128, 128),  # left hand
        (0, 0, 128),  # right hand
        (245, 130, 48),  # left upper leg
        (145, 30, 180), # right upper leg
        (255, 215, 180),  # left lower leg
        (240, 50, 230),  # right lower leg
        (128, 128, 0),  # left foot
        (128, 0, 0),  # right foot
        (128, 128, 128),  # occluder
    ],
    dtype=np.uint8,
)


def _mirror_id(name: str) -> int:
    if name.startswith("left_"):
        return PART_ID["right_" + name[5:]]
    if name.startswith("right_"):
        return PART_ID["left_" + name[6:]]
    return PART_ID[name]


# Label id of the same part on the other side of the body (centre parts map to themselves).
MIRROR_PART = np.array([_mirror_id(n) for n in PART_NAMES], dtype=np.uint8)

# SMPL's 24 joints, in kinematic-tree order, and the part each joint's skinning weight belongs to.
SMPL_JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hand", "right_hand",
)
SMPL_PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21,
)
JOINT_TO_PART: dict[str, str] = {
    "pelvis": "torso",
    "left_hip": "left_upper_leg",
    "right_hip": "right_upper_leg",
    "spine1": "torso",
    "left_knee": "left_lower_leg",
    "right_knee": "right_lower_leg",
    "spine2": "torso",
    "left_ankle": "left_foot",
    "right_ankle": "right_foot",
    "spine3": "torso",
    "left_foot": "left_foot",
    "right_foot": "right_foot",
    "neck": "head",
    "left_collar": "torso",
    "right_collar": "torso",
    "head": "head",
    "left_shoulder": "left_upper_arm",
    "right_shoulder": "right_upper_arm",
    "left_elbow": "left_lower_arm",
    "right_elbow": "right_lower_arm",
    "left_wrist": "left_hand",
    "right_wrist": "right_hand",
    "left_hand": "left_hand",
    "right_hand": "right_hand",
}
# (24,) part id of each SMPL joint.
SMPL_JOINT_PART = np.array([PART_ID[JOINT_TO_PART[j]] for j in SMPL_JOINT_NAMES], dtype=np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    """Label image (H, W) of ids 0-15 -> RGB uint8 (H, W, 3) for people to look at."""
    return PART_COLORS[np.clip(labels, 0, NUM_LABELS - 1)]


def part_name(label: int) -> str:
    """Human-readable name ("left upper arm") for reports and explanations."""
    return PART_NAMES[int(label)].replace("_", " ")
