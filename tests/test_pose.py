"""Pose prior: key poses, limits, sign conventions, mirroring, yaw, collisions, pose files, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from generator.pose import (
    COLLISION_PAIRS,
    GAIT_LIBRARY_PHASES,
    JOINT_LIMITS_DEG,
    MIRROR_JOINT,
    J,
    PoseConfig,
    PosePrior,
    capsule_overlaps,
    capsule_points,
    euler_to_axis_angle,
    forward_kinematics,
    key_pose_library,
    load_pose_file,
    mirror_axis_angle,
    pose_statistics,
    within_limits,
)
from tests.content_fixtures import load_test_body


@pytest.fixture(scope="module")
def body():
    return load_test_body()


@pytest.fixture(scope="module")
def prior(body):
    return PosePrior(PoseConfig(), body)


BETAS = np.zeros(16)


def _joints(prior: PosePrior, euler: np.ndarray) -> np.ndarray:
    return forward_kinematics(euler_to_axis_angle(euler), prior.geometry(BETAS).rest_joints)


def _heading_deg(pose: np.ndarray) -> float:
    facing = Rotation.from_rotvec(pose[:3]).apply([0.0, 0.0, 1.0])
    return float(np.degrees(np.arctan2(facing[0], facing[2])))


def test_library_holds_at_least_20_distinct_key_poses_with_a_walking_cycle():
    lib = key_pose_library()
    names = [p.name for p in lib]
    assert len(lib) >= 20 and len(set(names)) == len(names)
    assert sum(p.kind == "standing" for p in lib) >= 15
    assert sum(p.kind == "gait" for p in lib) == GAIT_LIBRARY_PHASES
    assert all(p.euler.shape == (24, 3) for p in lib)


def test_forward_kinematics_matches_the_body_forward(body, prior):
    pose = euler_to_axis_angle(next(p for p in prior.library if p.name == "waving").euler)
    out = body.forward(
        torch.as_tensor(BETAS[None], dtype=torch.float32),
        torch.as_tensor(pose[None], dtype=torch.float32),
        torch.zeros(1, 3),
    )
    fk = forward_kinematics(pose, prior.geometry(BETAS).rest_joints)
    assert np.abs(out.joints[0].numpy()[:24] - fk).max() < 2e-3


def test_sign_conventions_follow_smpl(prior):
    rest = _joints(prior, np.zeros((24, 3)))
    e = np.zeros((24, 3))
    e[J["left_shoulder"]] = (0, 0, -70)  # lowers the left arm
    e[J["right_shoulder"]] = (0, 0, 70)  # lowers the right arm
    e[J["left_knee"]] = (60, 0, 0)  # flexes the knee: ankle goes backwards
    e[J["right_hip"]] = (-40, 0, 0)  # thigh forwards: knee goes forwards
    posed = _joints(prior, e)
    assert posed[J["left_wrist"], 1] < rest[J["left_wrist"], 1] - 0.3
    assert posed[J["right_wrist"], 1] < rest[J["right_wrist"], 1] - 0.3
    assert posed[J["left_ankle"], 2] < rest[J["left_ankle"], 2] - 0.2
    assert posed[J["right_knee"], 2] > rest[J["right_knee"], 2] + 0.15
    e = np.zeros((24, 3))
    e[J["left_elbow"]] = (0, -90, 0)  # elbow flexion brings the forearm forwards
    assert _joints(prior, e)[J["left_wrist"], 2] > rest[J["left_wrist"], 2] + 0.15


def test_every_key_pose_is_within_limits_and_collision_free(prior):
    for kp in prior.library:
        pose = euler_to_axis_angle(kp.euler)
        assert within_limits(pose).all(), kp.name
        assert not prior.interpenetrates(pose, BETAS), kp.name


def test_relaxed_pose_has_hands_beside_hips(prior):
    relaxed = next(p for p in prior.library if p.name == "relaxed")
    j = _joints(prior, relaxed.euler)
    for wrist, hip, sign in (("left_wrist", "left_hip", 1), ("right_wrist", "right_hip", -1)):
        assert sign * j[J[wrist], 0] > sign * j[J[hip], 0]  # outside the hip
        assert abs(j[J[wrist], 1] - j[J["pelvis"], 1]) < 0.2  # about pelvis height


def test_sampling_is_deterministic_for_a_seed(prior):
    a = [prior.sample(np.random.default_rng(7), BETAS) for _ in range(3)]
    b = [prior.sample(np.random.default_rng(7), BETAS) for _ in range(3)]
    c = prior.sample(np.random.default_rng(8), BETAS)
    assert a[0].shape == (72,) and a[0].dtype == np.float64
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c)


def test_sampled_poses_respect_limits_and_look_natural(prior):
    rng = np.random.default_rng(1)
    poses = np.array([prior.sample(rng, BETAS) for _ in range(150)])
    assert all(within_limits(p).all() for p in poses)
    body_only = poses.copy()
    body_only[:, :3] = 0
    stats = pose_statistics(body_only)
    # facts: a natural mix has a mean joint angle around 18 deg and knees around 12 deg
    assert 10 < stats["mean_joint_angle_deg"] < 26
    assert 5 < stats["mean_knee_deg"] < 25
    assert not any(prior.interpenetrates(p, BETAS) for p in poses[:40])


def test_collision_test_rejects_forearm_through_torso_and_crossed_legs(prior):
    e = np.zeros((24, 3))
    e[J["left_elbow"]] = (0, -150, 0)
    e[J["left_shoulder"]] = (80, -20, -95)  # arm down, twisted so the folded forearm points into the chest
    bad_arm = euler_to_axis_angle(e)
    assert prior.interpenetrates(bad_arm, BETAS)
    e = np.zeros((24, 3))
    e[J["left_hip"]] = (0, 0, -25)
    e[J["right_hip"]] = (0, 0, 25)  # both thighs adducted through each other
    assert prior.interpenetrates(euler_to_axis_angle(e), BETAS)
    relaxed = next(p for p in prior.library if p.name == "relaxed")
    assert not prior.interpenetrates(euler_to_axis_angle(relaxed.euler), BETAS)


def test_collision_test_rejects_forearm_through_head(prior):
    e = np.zeros((24, 3))
    e[J["left_shoulder"]] = (-90, -20, 70)  # upper arm raised, forearm folded down onto the head
    e[J["left_elbow"]] = (0, -120, 0)
    pose = euler_to_axis_angle(e)
    geo = prior.geometry(BETAS)
    overlaps = dict(
        zip(
            COLLISION_PAIRS,
            capsule_overlaps(capsule_points(pose, geo.rest_points), geo.radii, 0.012),
            strict=True,
        )
    )
    assert overlaps[("l_forearm", "head")] > 0.01
    assert prior.interpenetrates(pose, BETAS)


def test_yaw_spans_the_configured_range(body):
    wide = PosePrior(PoseConfig(), body)
    rng = np.random.default_rng(3)
    headings = np.array([_heading_deg(wide.sample(rng, BETAS)) for _ in range(120)])
    assert headings.min() < -140 and headings.max() > 140
    narrow = PosePrior(PoseConfig(yaw_range=(30.0, 40.0)), body)
    headings = np.array([_heading_deg(narrow.sample(rng, BETAS)) for _ in range(40)])
    assert np.all((headings > 30 - 9) & (headings < 40 + 9))  # the gait turns the pelvis by up to 6.5 deg
    assert headings.max() - headings.min() > 5


def test_mirroring_swaps_left_and_right(prior):
    e = np.zeros((24, 3))
    e[J["left_shoulder"]] = (0, -10, 60)  # left arm raised
    e[J["right_knee"]] = (50, 0, 0)
    pose = euler_to_axis_angle(e)
    mirrored = mirror_axis_angle(pose)
    a = forward_kinematics(pose, prior.geometry(BETAS).rest_joints)
    b = forward_kinematics(mirrored, prior.geometry(BETAS).rest_joints)
    centre_x = a[J["pelvis"], 0]
    reflected = a[MIRROR_JOINT] * (-1, 1, 1) + (2 * centre_x, 0, 0)
    assert np.abs(b - reflected).max() < 0.02  # rest skeleton is near-symmetric
    assert b[J["right_wrist"], 1] > b[J["left_wrist"], 1] + 0.4
    assert np.allclose(mirror_axis_angle(mirrored), pose)


def test_limits_are_mirror_symmetric():
    left, right = JOINT_LIMITS_DEG[J["left_shoulder"]], JOINT_LIMITS_DEG[J["right_shoulder"]]
    assert np.allclose(left[0], right[0])
    assert np.allclose(left[1:], -right[1:, ::-1])


def test_amass_style_pose_files_load_and_sample(tmp_path, body):
    rng = np.random.default_rng(0)
    frames = rng.normal(0, 0.2, (6, 156))
    frames[:, :3] = Rotation.from_euler("x", 90, degrees=True).as_rotvec()  # z-up world: canonicalised
    np.savez(tmp_path / "a_poses.npz", poses=frames, trans=np.zeros((6, 3)))
    body_pose = rng.normal(0, 0.2, (4, 63))
    np.savez(tmp_path / "b_split.npz", root_orient=np.zeros((4, 3)), pose_body=body_pose)
    loaded = load_pose_file(tmp_path / "a_poses.npz")
    assert loaded.shape == (6, 72) and np.allclose(loaded[:, :66], frames[:, :66])
    assert np.all(loaded[:, 66:] == 0)  # SMPL-H finger values are not SMPL hand joints
    split = load_pose_file(tmp_path / "b_split.npz")
    assert split.shape == (4, 72) and np.allclose(split[:, 3:66], body_pose) and np.all(split[:, 66:] == 0)

    cfg = PoseConfig(
        poses_glob=str(tmp_path / "a_*.npz"),
        poses_fraction=1.0,
        poses_frame_step=1,
        mirror_prob=0.0,
        yaw_range=(0.0, 0.0),
        contact_slack_m=10.0,
    )
    prior = PosePrior(cfg, body)
    pose = prior.sample(np.random.default_rng(5), BETAS)
    match = [np.allclose(pose[3:66], f[3:66]) for f in frames]
    assert sum(match) == 1  # the body joints come from one file frame unchanged
    up = Rotation.from_rotvec(pose[:3]).apply([0.0, 1.0, 0.0])
    assert up[1] > 0.99 and abs(_heading_deg(pose)) < 1e-6  # re-expressed y-up, facing +z


def test_bad_pose_file_gives_a_clear_error(tmp_path, body):
    np.savez(tmp_path / "bad.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="bad.npz.*expected key 'poses'"):
        load_pose_file(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="no file matches"):
        PosePrior(PoseConfig(poses_glob=str(tmp_path / "none_*.npz")), body)


def test_vposer_without_weights_gives_a_clear_error(tmp_path, body):
    with pytest.raises(ValueError, match="vposer_dir .*no \\*.ckpt"):
        PosePrior(PoseConfig(vposer_dir=str(tmp_path)), body)
    with pytest.raises(ValueError, match="not a folder"):
        PosePrior(PoseConfig(vposer_dir=str(tmp_path / "missing")), body)


def test_unknown_key_pose_weight_is_rejected(body):
    with pytest.raises(ValueError, match="key_pose_weights.*no_such_pose"):
        PosePrior(PoseConfig(key_pose_weights={"no_such_pose": 1.0}), body)
