"""The SMPL-formulation forward: agreement with smplx, SMPL posing conventions, inputs, normals, cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protoreg.body import BodyModel, BodyOutput, load_body_model
from protoreg.body.io import read_body_arrays
from protoreg.body.model import axis_angle_to_matrix
from protoreg.body.synthetic import synthetic_body_arrays
from protoreg.parts import SMPL_JOINT_NAMES, SMPL_PARENTS

J = {name: i for i, name in enumerate(SMPL_JOINT_NAMES)}


def write_npz(tmp_path, arrays: dict, name: str = "body.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def synthetic_arrays() -> dict:
    return synthetic_body_arrays(num_betas=10, seed=3)


@pytest.fixture(scope="module")
def synthetic_path(tmp_path_factory, synthetic_arrays):
    return write_npz(tmp_path_factory.mktemp("body"), synthetic_arrays)


@pytest.fixture(scope="module")
def body(synthetic_path) -> BodyModel:
    return load_body_model(synthetic_path)


def smplx_forward(arrays: dict, betas: torch.Tensor, pose: torch.Tensor, transl: torch.Tensor, dtype):
    """Run the smplx package's SMPL on the same arrays (test-only interop; smplx is non-commercial)."""
    smplx = pytest.importorskip("smplx")
    num_vertices, _, num_betas = arrays["shapedirs"].shape
    padded = np.zeros((num_vertices, 3, 300))  # fewer than 300 directions would cap betas at 10
    padded[..., :num_betas] = arrays["shapedirs"]
    struct = smplx.utils.Struct(**{**arrays, "shapedirs": padded})
    face_ids = {
        name: 0 for name in ("nose", "reye", "leye", "rear", "lear")
    }  # SMPL's own ids are out of range
    model = smplx.SMPL(
        model_path="unused",
        data_struct=struct,
        num_betas=num_betas,
        vertex_ids=face_ids,
        use_feet_keypoints=False,
        use_hands=False,
        batch_size=betas.shape[0],
        dtype=dtype,
    )
    with torch.no_grad():
        out = model(betas=betas, global_orient=pose[:, :3], body_pose=pose[:, 3:], transl=transl)
    return out.vertices, out.joints[:, :24]


def random_inputs(batch: int, num_betas: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    betas = torch.randn(batch, num_betas, generator=gen, dtype=dtype)
    pose = 0.4 * torch.randn(batch, 72, generator=gen, dtype=dtype)
    transl = torch.randn(batch, 3, generator=gen, dtype=dtype)
    return betas, pose, transl


@pytest.mark.parametrize("pose_correctives", [True, False])
def test_forward_matches_smplx(tmp_path, pose_correctives):
    arrays = synthetic_body_arrays(num_betas=12, seed=1, pose_correctives=pose_correctives)
    body = load_body_model(write_npz(tmp_path, arrays))
    assert body.has_pose_correctives is pose_correctives
    betas, pose, transl = random_inputs(5, 12, seed=7)
    ours = body(betas=betas, pose=pose, transl=transl)
    ref_vertices, ref_joints = smplx_forward(arrays, betas, pose, transl, torch.float32)
    assert ours.vertices.shape == (5, body.num_vertices, 3)
    assert torch.allclose(ours.vertices, ref_vertices, atol=1e-5, rtol=0)
    assert torch.allclose(ours.joints, ref_joints, atol=1e-5, rtol=0)


def test_forward_matches_smplx_float64(tmp_path, synthetic_arrays):
    body = load_body_model(write_npz(tmp_path, synthetic_arrays), dtype=torch.float64)
    betas, pose, transl = random_inputs(3, 10, seed=11, dtype=torch.float64)
    ours = body(betas=betas, pose=pose, transl=transl)
    ref_vertices, _ = smplx_forward(synthetic_arrays, betas, pose, transl, torch.float64)
    assert ours.vertices.dtype == torch.float64
    assert torch.allclose(ours.vertices, ref_vertices, atol=1e-6, rtol=0)  # smplx adds 1e-8 to angles


def test_pose_correctives_change_vertices(synthetic_arrays, tmp_path):
    """Same pose with and without correctives differs by exactly the skinned corrective offsets."""
    plain = {**synthetic_arrays, "posedirs": np.zeros_like(synthetic_arrays["posedirs"])}
    with_c = load_body_model(write_npz(tmp_path, synthetic_arrays, "a.npz"))
    without = load_body_model(write_npz(tmp_path, plain, "b.npz"))
    pose = torch.zeros(1, 72)
    pose[0, 3 * J["left_elbow"] + 1] = 1.0
    diff = (with_c(pose=pose).vertices - without(pose=pose).vertices).abs().max()
    assert diff > 1e-4
    assert torch.equal(with_c().vertices, without().vertices)  # zero pose: R - I = 0


def test_zero_inputs_give_template(body, synthetic_arrays):
    out = body()
    assert isinstance(out, BodyOutput)
    assert out.vertices.shape == (1, body.num_vertices, 3) and out.joints.shape == (1, 24, 3)
    template = torch.as_tensor(synthetic_arrays["v_template"], dtype=torch.float32)
    assert torch.allclose(out.vertices[0], template, atol=1e-6)
    expected_joints = torch.as_tensor(synthetic_arrays["J_regressor"] @ synthetic_arrays["v_template"])
    assert torch.allclose(out.joints[0], expected_joints.float(), atol=1e-6)


def test_short_betas_are_zero_padded(body):
    betas = torch.tensor([[0.5, -1.0, 2.0]])
    padded = torch.zeros(1, body.num_betas)
    padded[0, :3] = betas[0]
    assert torch.equal(body(betas=betas).vertices, body(betas=padded).vertices)
    assert torch.allclose(body.rest_vertices(betas), body(betas=padded).vertices, atol=1e-6)


def test_rest_vertices_are_shaped_template(body, synthetic_arrays):
    betas = torch.zeros(2, body.num_betas)
    betas[1, 2] = 1.5
    rest = body.rest_vertices(betas)
    expected = synthetic_arrays["v_template"] + 1.5 * synthetic_arrays["shapedirs"][:, :, 2]
    assert rest.shape == (2, body.num_vertices, 3)
    assert torch.allclose(rest[0], torch.as_tensor(synthetic_arrays["v_template"]).float(), atol=1e-6)
    assert torch.allclose(rest[1], torch.as_tensor(expected).float(), atol=1e-5)


def test_translation_shifts_everything(body):
    betas, pose, _ = random_inputs(2, 10, seed=5)
    shift = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -0.25]])
    moved, still = body(betas, pose, shift), body(betas, pose)
    assert torch.allclose(
        moved.vertices - still.vertices, shift[:, None].expand_as(still.vertices), atol=1e-5
    )
    assert torch.allclose(moved.joints - still.joints, shift[:, None].expand_as(still.joints), atol=1e-5)


def test_batch_items_are_independent(body):
    betas, pose, transl = random_inputs(4, 10, seed=9)
    batched = body(betas, pose, transl).vertices
    single = body(betas[2:3], pose[2:3], transl[2:3]).vertices
    assert torch.allclose(batched[2:3], single, atol=1e-6)


def test_one_dimensional_inputs_are_a_batch_of_one(body):
    betas, pose, transl = random_inputs(1, 10, seed=2)
    assert torch.equal(body(betas[0], pose[0], transl[0]).vertices, body(betas, pose, transl).vertices)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pose": torch.zeros(2, 69)}, "pose: expected shape"),
        ({"betas": torch.zeros(1, 11)}, "betas: expected shape"),
        ({"betas": torch.zeros(2, 3), "pose": torch.zeros(3, 72)}, "pose: expected shape"),
        ({"transl": torch.zeros(1, 2)}, "transl: expected shape"),
    ],
)
def test_bad_input_shapes_are_refused(body, kwargs, message):
    with pytest.raises(ValueError, match=message):
        body(**kwargs)


def test_rodrigues_matches_known_rotations():
    quarter_z = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64))
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(quarter_z, expected, atol=1e-12)
    assert torch.equal(axis_angle_to_matrix(torch.zeros(3)), torch.eye(3))


def test_gradients_are_finite_at_zero_pose(body):
    pose = torch.zeros(1, 72, requires_grad=True)
    betas = torch.zeros(1, 10, requires_grad=True)
    body(betas=betas, pose=pose).vertices.square().sum().backward()
    assert torch.isfinite(pose.grad).all() and pose.grad.abs().sum() > 0
    assert torch.isfinite(betas.grad).all() and betas.grad.abs().sum() > 0


def test_vertex_normals_point_out_of_the_tubes(body, synthetic_arrays):
    """Synthetic tubes: every normal is unit length and points away from the bone axis."""
    out = body()
    normals = body.vertex_normals(out.vertices)[0].numpy()
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    vertices = out.vertices[0].numpy()
    tube = np.arange(body.num_vertices) // 40  # 40 vertices per tube, rings of 8
    axis_points = np.stack([vertices[tube == t].reshape(5, 8, 3).mean(1) for t in range(tube.max() + 1)])
    centre = axis_points[tube, (np.arange(body.num_vertices) % 40) // 8]
    outward = (vertices - centre) / np.linalg.norm(vertices - centre, axis=1, keepdims=True)
    assert (np.sum(normals * outward, axis=1) > 0.6).all()


def test_vertex_normals_of_a_single_triangle_are_its_normal(body):
    tri = torch.zeros(1, body.num_vertices, 3)
    a, b, c = (int(i) for i in body.faces[0])
    tri[0, b] = torch.tensor([1.0, 0.0, 0.0])
    tri[0, c] = torch.tensor([0.0, 1.0, 0.0])
    normals = body.vertex_normals(tri)
    assert torch.allclose(normals[0, a], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def _posed_joint(body, joint_name: str, axis_angle, rotated_joint: str, **kwargs) -> torch.Tensor:
    pose = torch.zeros(1, 72)
    pose[0, 3 * J[rotated_joint] : 3 * J[rotated_joint] + 3] = torch.tensor(axis_angle)
    return body(pose=pose, **kwargs).joints[0, J[joint_name]]


def assert_smpl_conventions(body: BodyModel) -> None:
    """Shared by the synthetic and the default body: y up, facing +z, +x = left, SMPL joint axes."""
    rest = body().joints[0]
    assert rest[J["head"], 1] > rest[J["pelvis"], 1] + 0.3  # y up
    assert rest[J["left_wrist"], 0] > 0.4 and rest[J["right_wrist"], 0] < -0.4  # +x = left, T-pose
    assert rest[J["left_foot"], 2] > rest[J["left_ankle"], 2]  # toes point +z: faces +z
    # Left shoulder about -z: the T-posed arm swings down.
    for joint in ("left_elbow", "left_wrist"):
        moved = _posed_joint(body, joint, [0.0, 0.0, -math.pi / 2], "left_shoulder")
        assert moved[1] < rest[joint_index(joint), 1] - 0.15
        assert moved[0] < rest[joint_index(joint), 0] - 0.15
    # Left knee bent (positive x): the ankle goes backwards (-z) and up.
    ankle = _posed_joint(body, "left_ankle", [math.pi / 2, 0.0, 0.0], "left_knee")
    assert ankle[2] < rest[J["left_ankle"], 2] - 0.25 and ankle[1] > rest[J["left_ankle"], 1] + 0.2
    # Global orient pi about y: the body faces -z and its left hand is at -x.
    turned = body(pose=torch.tensor([[0.0, math.pi, 0.0] + [0.0] * 69])).joints[0]
    assert turned[J["left_foot"], 2] < turned[J["left_ankle"], 2]
    assert turned[J["left_wrist"], 0] < -0.4


def joint_index(name: str) -> int:
    return J[name]


def test_synthetic_body_follows_smpl_conventions(body):
    assert_smpl_conventions(body)


def test_load_is_cached_per_file_dtype_and_device(synthetic_path):
    first = load_body_model(synthetic_path)
    assert load_body_model(str(synthetic_path)) is first
    assert load_body_model(synthetic_path, dtype=torch.float64) is not first
    assert load_body_model(synthetic_path, dtype=torch.float64).v_template.dtype == torch.float64


def test_model_attributes(body, synthetic_path, synthetic_arrays):
    import hashlib

    assert body.path == synthetic_path.resolve()
    assert body.sha256 == hashlib.sha256(synthetic_path.read_bytes()).hexdigest()
    assert (body.num_vertices, body.num_betas, body.num_joints) == (1120, 10, 24)
    assert body.faces.dtype == np.int64 and body.faces.shape == synthetic_arrays["f"].shape
    assert body.parents.dtype == np.int64 and body.parents[0] == -1 and body.parents[16] == 13
    assert body.uv.shape == (1120, 2) and body.uv_faces.shape == body.faces.shape
    assert read_body_arrays(synthetic_path).sha256 == body.sha256


def test_pose_mesh_of_the_shaped_body_equals_forward(body):
    betas, pose, transl = random_inputs(2, 10, seed=13)
    rest = body.rest_vertices(betas)
    posed = body.pose_mesh(rest, pose, transl)
    reference = body(betas, pose, transl)
    assert torch.allclose(posed.vertices, reference.vertices, atol=1e-5)
    assert torch.allclose(posed.joints, reference.joints, atol=1e-5)
    plain = body.pose_mesh(rest, pose, transl, pose_correctives=False)
    assert not torch.allclose(plain.vertices, reference.vertices, atol=1e-5)
    with pytest.raises(ValueError, match=r"rest_vertices: expected shape \(B, 1120, 3\)"):
        body.pose_mesh(rest[:, :100], pose)


# ---------------------------------------------------------------------------- the embedded default body


@pytest.fixture(scope="module")
def default_body() -> BodyModel:
    from protoreg.body import DEFAULT_BODY_MODEL

    assert DEFAULT_BODY_MODEL.exists(), f"{DEFAULT_BODY_MODEL} is missing (it ships with the repository)"
    return load_body_model()


def test_default_body_loads(default_body):
    import hashlib

    from protoreg.body import DEFAULT_BODY_MODEL

    assert default_body is load_body_model(None)
    assert default_body.path == DEFAULT_BODY_MODEL.resolve()
    assert DEFAULT_BODY_MODEL.parts[-3:] == ("blender_assets", "bodies", "anny_smpl.npz")
    assert default_body.sha256 == hashlib.sha256(DEFAULT_BODY_MODEL.read_bytes()).hexdigest()
    assert (default_body.num_vertices, default_body.num_betas, default_body.num_joints) == (13718, 16, 24)
    assert default_body.faces.shape == (27420, 3)
    assert default_body.uv is not None and default_body.uv_faces.shape == default_body.faces.shape
    assert default_body.parents.tolist() == [-1, *SMPL_PARENTS[1:]]


def test_default_body_is_a_standing_adult(default_body):
    vertices = default_body().vertices[0]
    height = float(vertices[:, 1].max() - vertices[:, 1].min())
    assert 1.45 < height < 2.0
    span = float(vertices[:, 0].max() - vertices[:, 0].min())
    assert 0.9 * height < span < 1.2 * height  # T-pose: arm span about the height


def test_default_body_follows_smpl_conventions(default_body):
    assert_smpl_conventions(default_body)


def test_default_body_matches_smplx(default_body):
    from protoreg.body import DEFAULT_BODY_MODEL

    with np.load(DEFAULT_BODY_MODEL) as npz:
        arrays = {k: npz[k] for k in ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights")}
        arrays["kintree_table"] = npz["kintree_table"]
    betas, pose, transl = random_inputs(2, default_body.num_betas, seed=17)
    ours = default_body(betas=betas, pose=pose, transl=transl)
    ref_vertices, ref_joints = smplx_forward(arrays, betas, pose, transl, torch.float32)
    assert torch.allclose(ours.vertices, ref_vertices, atol=1e-5, rtol=0)
    assert torch.allclose(ours.joints, ref_joints, atol=1e-5, rtol=0)


def test_outputs_are_contiguous(body):
    out = body(*random_inputs(3, 10, seed=1))
    assert out.vertices.is_contiguous() and out.joints.is_contiguous()


def test_numpy_and_list_inputs_are_accepted(body):
    betas, pose, transl = random_inputs(2, 10, seed=4)
    reference = body(betas, pose, transl).vertices
    assert torch.allclose(body(betas.numpy(), pose.numpy(), transl.tolist()).vertices, reference)
