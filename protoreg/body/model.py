"""Our own SMPL-formulation body forward in torch (no smplx: its code is MPI non-commercial).

    v_shaped = v_template + shapedirs . betas
    J        = J_regressor . v_shaped
    v_posed  = v_shaped + posedirs . (R(theta_1..23) - I)        (skipped when posedirs are all zero)
    v        = sum_j w_j G_j(theta, J) v_posed + transl           (linear blend skinning)

SMPL conventions: metres, y up, the body faces +z, +x is the subject's left, joint order and parents
as in protoreg.parts.SMPL_JOINT_NAMES, pose = 72 axis-angle values (global orient + 23 joints).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from protoreg.body import labels
from protoreg.body.io import NUM_JOINTS, BodyArrays, BodyModelError, read_body_arrays

DEFAULT_BODY_MODEL: Path = Path(__file__).resolve().parents[2] / "blender_assets" / "bodies" / "anny_smpl.npz"
POSE_DIM = NUM_JOINTS * 3  # 72


@dataclass
class BodyOutput:
    """Posed, translated vertices (B, V, 3) and joints (B, 24, 3)."""

    vertices: torch.Tensor
    joints: torch.Tensor


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) rotation matrices (Rodrigues); exact identity and finite
    gradient at zero angle."""
    squared = (axis_angle * axis_angle).sum(-1, keepdim=True)
    angle = torch.sqrt(squared + 1e-16)
    axis = axis_angle / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*axis.shape[:-1], 3, 3)
    sin = torch.sin(angle)[..., None]
    one_minus_cos = (1.0 - torch.cos(angle))[..., None]
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin * skew + one_minus_cos * (skew @ skew)


class BodyModel(torch.nn.Module):
    """A SMPL-format body: shape blend shapes, pose correctives and linear blend skinning.

    Built by `load_body_model`; treat cached instances as read-only (they are shared).
    """

    def __init__(self, arrays: BodyArrays, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.path: Path = arrays.path
        self.sha256: str = arrays.sha256
        self.num_vertices: int = arrays.v_template.shape[0]
        self.num_betas: int = arrays.shapedirs.shape[2]
        self.num_joints: int = NUM_JOINTS
        self.faces: np.ndarray = arrays.faces
        self.parents: np.ndarray = arrays.parents
        self.uv: np.ndarray | None = arrays.uv
        self.uv_faces: np.ndarray | None = arrays.uv_faces
        self.has_pose_correctives: bool = bool(np.any(arrays.posedirs != 0))
        self._template_np = arrays.v_template
        self._weights_np = arrays.weights

        def buffer(name: str, array: np.ndarray) -> None:
            self.register_buffer(
                name, torch.as_tensor(np.ascontiguousarray(array)).to(dtype), persistent=False
            )

        num_v, num_b = self.num_vertices, self.num_betas
        buffer("v_template", arrays.v_template)  # (V, 3)
        buffer("shapedirs", arrays.shapedirs)  # (V, 3, K)
        buffer("J_regressor", arrays.J_regressor)  # (24, V)
        buffer("lbs_weights", arrays.weights)  # (V, 24)
        # Joints depend linearly on betas: regress the template and each shape direction once.
        buffer("_joint_template", arrays.J_regressor @ arrays.v_template)  # (24, 3)
        joint_shapedirs = np.einsum("jv,vck->jck", arrays.J_regressor, arrays.shapedirs)
        buffer("_joint_shape_basis", joint_shapedirs.reshape(NUM_JOINTS * 3, num_b).T)  # (K, 72)
        buffer("_shape_basis", arrays.shapedirs.reshape(num_v * 3, num_b).T)  # (K, 3V)
        pose_basis = arrays.posedirs.reshape(num_v * 3, -1).T if self.has_pose_correctives else np.zeros((0,))
        buffer("_pose_basis", pose_basis)  # (207, 3V), or empty when there are no correctives
        self.register_buffer(
            "faces_tensor", torch.as_tensor(arrays.faces, dtype=torch.long), persistent=False
        )

    def extra_repr(self) -> str:
        return (
            f"path={self.path.name}, vertices={self.num_vertices}, faces={len(self.faces)}, "
            f"betas={self.num_betas}, pose_correctives={self.has_pose_correctives}"
        )

    # ------------------------------------------------------------------ inputs

    def _as_batch(
        self, value, width: int, name: str, batch: int, max_width: int | None = None
    ) -> torch.Tensor:
        """Validate an optional (B, width) input; None -> zeros; a 1-D vector is a batch of one."""
        if value is None:
            return self.v_template.new_zeros((batch, width))
        tensor = torch.as_tensor(value, dtype=self.v_template.dtype, device=self.v_template.device)
        if tensor.ndim == 1:
            tensor = tensor[None]
        limit = max_width if max_width is not None else width
        if (
            tensor.ndim != 2
            or tensor.shape[0] != batch
            or tensor.shape[1] > limit
            or (max_width is None and tensor.shape[1] != width)
        ):
            want = f"(B={batch}, <= {limit})" if max_width is not None else f"(B={batch}, {width})"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(tensor.shape)}")
        return tensor

    @staticmethod
    def _batch_size(*values) -> int:
        for value in values:
            if value is not None:
                shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
                return 1 if len(shape) <= 1 else int(shape[0])
        return 1

    def _padded_betas(self, betas, batch: int) -> torch.Tensor:
        betas = self._as_batch(betas, self.num_betas, "betas", batch, max_width=self.num_betas)
        if betas.shape[1] < self.num_betas:
            betas = torch.nn.functional.pad(betas, (0, self.num_betas - betas.shape[1]))
        return betas

    # ------------------------------------------------------------------ forward

    def rest_vertices(self, betas) -> torch.Tensor:
        """(B, V, 3) shaped vertices at zero pose, without translation."""
        betas = self._padded_betas(betas, self._batch_size(betas))
        return self._shaped(betas)

    def _shaped(self, betas: torch.Tensor) -> torch.Tensor:
        offsets = (betas @ self._shape_basis).view(betas.shape[0], self.num_vertices, 3)
        return self.v_template + offsets

    def _rest_joints(self, betas: torch.Tensor) -> torch.Tensor:
        return self._joint_template + (betas @ self._joint_shape_basis).view(betas.shape[0], NUM_JOINTS, 3)

    def _world_transforms(self, rotations: torch.Tensor, rest_joints: torch.Tensor):
        """Walk the kinematic chain: world rotation (B,24,3,3) and posed joint position (B,24,3)."""
        world_rot, world_pos = [rotations[:, 0]], [rest_joints[:, 0]]
        for j in range(1, NUM_JOINTS):
            parent = int(self.parents[j])
            bone = (rest_joints[:, j] - rest_joints[:, parent]).unsqueeze(-1)
            world_pos.append(world_pos[parent] + (world_rot[parent] @ bone).squeeze(-1))
            world_rot.append(world_rot[parent] @ rotations[:, j])
        return torch.stack(world_rot, dim=1), torch.stack(world_pos, dim=1)

    def forward(self, betas=None, pose=None, transl=None) -> BodyOutput:
        """Pose the body. betas (B, K'<=K), pose (B, 72) axis-angle, transl (B, 3); each optional."""
        batch = self._batch_size(betas, pose, transl)
        betas = self._padded_betas(betas, batch)
        pose = self._as_batch(pose, POSE_DIM, "pose", batch)
        transl = self._as_batch(transl, 3, "transl", batch)

        vertices = self._shaped(betas)
        rest_joints = self._rest_joints(betas)
        rotations = axis_angle_to_matrix(pose.view(batch, NUM_JOINTS, 3))
        vertices = vertices + self._pose_offsets(rotations)  # skipped when posedirs are all zero

        return self._skin(vertices, rest_joints, rotations, transl)

    def _skin(
        self, vertices: torch.Tensor, rest_joints: torch.Tensor, rotations: torch.Tensor, transl: torch.Tensor
    ) -> BodyOutput:
        """Linear blend skinning of (B, V, 3) rest-pose vertices about (B, 24, 3) rest joints."""
        batch = vertices.shape[0]
        world_rot, world_pos = self._world_transforms(rotations, rest_joints)
        # Skinning transform of joint j maps rest point x to R_j (x - J_j) + P_j. Blend the 12 numbers
        # (columns of R_j, then the offset) over joints with one (V, 24) x (24, B*12) matrix product, then
        # apply each vertex's blended transform elementwise (much faster than B*V tiny 3x3 products).
        offsets = world_pos - (world_rot @ rest_joints.unsqueeze(-1)).squeeze(-1)
        columns = world_rot.transpose(-1, -2).reshape(batch, NUM_JOINTS, 9)
        per_joint = torch.cat([columns, offsets], dim=-1).permute(1, 0, 2).reshape(NUM_JOINTS, batch * 12)
        blended = (self.lbs_weights @ per_joint).view(self.num_vertices, batch, 12)
        rest = vertices.transpose(0, 1)  # (V, B, 3)
        posed = (
            blended[..., 0:3] * rest[..., 0:1]
            + blended[..., 3:6] * rest[..., 1:2]
            + blended[..., 6:9] * rest[..., 2:3]
            + blended[..., 9:12]
        ).transpose(0, 1)
        shift = transl[:, None, :]
        return BodyOutput(vertices=(posed + shift).contiguous(), joints=world_pos + shift)

    def pose_mesh(self, rest_vertices, pose=None, transl=None, pose_correctives: bool = True) -> BodyOutput:
        """Pose any rest-pose mesh in this body's topology (B, V, 3), e.g. an enrolled scan fitted to it.

        Joints are regressed from the given mesh; pose correctives are added unless switched off.
        """
        verts = torch.as_tensor(rest_vertices, dtype=self.v_template.dtype, device=self.v_template.device)
        if verts.ndim == 2:
            verts = verts[None]
        if verts.ndim != 3 or tuple(verts.shape[1:]) != (self.num_vertices, 3):
            raise ValueError(
                f"rest_vertices: expected shape (B, {self.num_vertices}, 3), got {tuple(verts.shape)}"
            )
        batch = verts.shape[0]
        pose = self._as_batch(pose, POSE_DIM, "pose", batch)
        transl = self._as_batch(transl, 3, "transl", batch)
        rest_joints = torch.einsum("jv,bvc->bjc", self.J_regressor, verts)
        rotations = axis_angle_to_matrix(pose.view(batch, NUM_JOINTS, 3))
        if pose_correctives:
            verts = verts + self._pose_offsets(rotations)
        return self._skin(verts, rest_joints, rotations, transl)

    def _pose_offsets(self, rotations: torch.Tensor) -> torch.Tensor | float:
        """(B, V, 3) pose corrective offsets from (B, 24, 3, 3) joint rotations (0 when there are none)."""
        if not self.has_pose_correctives:
            return 0.0
        batch = rotations.shape[0]
        eye = torch.eye(3, dtype=rotations.dtype, device=rotations.device)
        pose_feature = (rotations[:, 1:] - eye).reshape(batch, -1)
        return (pose_feature @ self._pose_basis).view(batch, self.num_vertices, 3)

    # ------------------------------------------------------------------ geometry helpers

    def vertex_normals(self, vertices: torch.Tensor) -> torch.Tensor:
        """(B, V, 3) unit vertex normals, each the area-weighted mean of its faces' normals."""
        faces = self.faces_tensor.to(vertices.device)
        v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))
        face_normals = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 * area
        normals = torch.zeros_like(vertices)
        for k in range(3):
            normals.index_add_(1, faces[:, k], face_normals)
        return torch.nn.functional.normalize(normals, dim=-1, eps=1e-12)

    # ------------------------------------------------------------------ labels

    @cached_property
    def part_weights(self) -> np.ndarray:
        """(V, 15) per-part skinning weight sums smoothed over the mesh (column 0 unused)."""
        return labels.smoothed_part_weights(self._weights_np, self.faces)[:, :15]

    @cached_property
    def vertex_parts(self) -> np.ndarray:
        """(V,) uint8 body part id 1..14 (protoreg.parts) of each vertex."""
        return labels.vertex_parts_from_weights(self.part_weights)

    @cached_property
    def mirror_index(self) -> np.ndarray:
        """(V,) int64 index of each vertex's mirror image (x -> -x) on the template."""
        return labels.mirror_index(self._template_np)


_CACHE: dict[tuple, BodyModel] = {}
_CACHE_LOCK = threading.Lock()


def load_body_model(
    path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BodyModel:
    """Load a SMPL-format .npz/.pkl (None = the embedded default body), cached per file, dtype and device.

    The cache key includes the file's size and modification time, so a re-baked file is re-read.
    """
    resolved = Path(DEFAULT_BODY_MODEL if path is None else path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except FileNotFoundError:
        hint = " (the embedded default body has not been baked)" if path is None else ""
        raise BodyModelError(f"{resolved}: body model file not found{hint}") from None
    key = (str(resolved), stat.st_size, stat.st_mtime_ns, dtype, str(torch.device(device)))
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = BodyModel(read_body_arrays(resolved), dtype=dtype).to(device)
            model.requires_grad_(False)
            _CACHE[key] = model
    return model
