"""14-part per-vertex labels derived from skinning weights, plus the left/right mirror map.

The same code labels SMPL and the embedded default body: what a vertex belongs to is decided by the
joints that move it, so labels follow the rig rather than hand-painted regions.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
from scipy.spatial import cKDTree

from protoreg.parts import NUM_LABELS, SMPL_JOINT_PART

SMOOTHING_STEPS = 20  # random-walk steps; shortens ragged part borders (see shared facts)


def part_weight_sums(weights: np.ndarray, joint_part: np.ndarray = SMPL_JOINT_PART) -> np.ndarray:
    """(V, J) skinning weights -> (V, NUM_LABELS) summed weight per part id (col 0 and 15 stay 0)."""
    joint_to_part = np.zeros((weights.shape[1], NUM_LABELS), dtype=np.float64)
    joint_to_part[np.arange(weights.shape[1]), np.asarray(joint_part, dtype=np.int64)] = 1.0
    return np.asarray(weights, dtype=np.float64) @ joint_to_part


def random_walk_matrix(faces: np.ndarray, num_vertices: int) -> scipy.sparse.csr_matrix:
    """Row-stochastic (V, V) matrix averaging each vertex with its mesh neighbours (self loop included).

    The self loop keeps vertices that no face uses unchanged and damps oscillation between neighbours.
    """
    faces = np.asarray(faces, dtype=np.int64)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 1], faces[:, 2], faces[:, 0]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0], faces[:, 0], faces[:, 1], faces[:, 2]])
    adjacency = scipy.sparse.coo_matrix(
        (np.ones(rows.size), (rows, cols)), shape=(num_vertices, num_vertices)
    ).tocsr()
    adjacency.data[:] = 1.0  # an edge shared by two faces counts once
    adjacency = adjacency + scipy.sparse.identity(num_vertices, format="csr")
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    return scipy.sparse.diags(1.0 / degree) @ adjacency


def smoothed_part_weights(weights: np.ndarray, faces: np.ndarray, steps: int = SMOOTHING_STEPS) -> np.ndarray:
    """(V, NUM_LABELS) per-part weight sums diffused `steps` random-walk steps over the mesh graph."""
    sums = part_weight_sums(weights)
    walk = random_walk_matrix(faces, sums.shape[0])
    for _ in range(steps):
        sums = walk @ sums
    return sums


def vertex_parts_from_weights(part_weights: np.ndarray) -> np.ndarray:
    """(V, NUM_LABELS) part weights -> (V,) uint8 body part id in 1..14 (argmax over body parts)."""
    return (np.argmax(part_weights[:, 1:15], axis=1) + 1).astype(np.uint8)


def mirror_index(vertices: np.ndarray) -> np.ndarray:
    """(V,) index of the vertex nearest to each vertex's reflection x -> -x (the body's left-right mirror)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    reflected = vertices * np.array([-1.0, 1.0, 1.0])
    _, index = cKDTree(vertices).query(reflected, k=1)
    return np.asarray(index, dtype=np.int64)
