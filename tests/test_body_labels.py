"""14-part vertex labels from skinning weights, smoothing, and the left-right mirror index."""

from __future__ import annotations

import numpy as np
import pytest

from protoreg.body import load_body_model
from protoreg.body.labels import (
    mirror_index,
    part_weight_sums,
    random_walk_matrix,
    smoothed_part_weights,
    vertex_parts_from_weights,
)
from protoreg.body.synthetic import synthetic_body_arrays
from protoreg.parts import BODY_PART_IDS, MIRROR_PART, PART_ID, SMPL_JOINT_NAMES


@pytest.fixture(scope="module")
def arrays() -> dict:
    return synthetic_body_arrays()


@pytest.fixture(scope="module")
def body(tmp_path_factory, arrays):
    path = tmp_path_factory.mktemp("labels") / "body.npz"
    np.savez(path, **arrays)
    return load_body_model(path)


def test_part_weight_sums_follow_the_joint_part_map():
    weights = np.zeros((3, 24))
    joint = {n: i for i, n in enumerate(SMPL_JOINT_NAMES)}
    weights[0, joint["left_wrist"]], weights[0, joint["left_hand"]] = 0.5, 0.5
    weights[1, joint["neck"]], weights[1, joint["spine3"]] = 0.7, 0.3
    weights[2, joint["right_knee"]] = 1.0
    sums = part_weight_sums(weights)
    assert sums.shape == (3, 16)
    assert sums[0, PART_ID["left_hand"]] == 1.0
    assert sums[1, PART_ID["head"]] == pytest.approx(0.7) and sums[1, PART_ID["torso"]] == pytest.approx(0.3)
    assert sums[2, PART_ID["right_lower_leg"]] == 1.0
    assert np.allclose(sums.sum(1), 1.0)


def test_random_walk_matrix_is_row_stochastic_over_mesh_edges():
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    walk = random_walk_matrix(faces, 5).toarray()
    assert np.allclose(walk.sum(1), 1.0)
    assert walk[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0, 0])  # self + 2 neighbours
    assert walk[1].tolist() == pytest.approx([0.25, 0.25, 0.25, 0.25, 0])  # shared edge counted once
    assert walk[4].tolist() == [0, 0, 0, 0, 1.0]  # a vertex no face uses keeps its weights


def test_smoothing_keeps_weights_normalised_and_labels_mostly_unchanged(arrays):
    raw = vertex_parts_from_weights(part_weight_sums(arrays["weights"]))
    smoothed = smoothed_part_weights(arrays["weights"], arrays["f"])
    assert np.allclose(smoothed.sum(1), 1.0)
    changed = np.mean(vertex_parts_from_weights(smoothed) != raw)
    assert changed < 0.05


def test_synthetic_labels_match_the_tubes(body, arrays):
    """Every tube's label is the part of the joint that owns it (the bone's parent joint)."""
    parts = body.vertex_parts
    assert parts.dtype == np.uint8 and parts.shape == (body.num_vertices,)
    left_forearm = np.arange(19 * 40, 20 * 40)  # tube j-1 runs parent(j) -> j; j=20 is the left wrist
    assert set(parts[left_forearm[:24]].tolist()) == {PART_ID["left_lower_arm"]}
    assert set(np.unique(parts).tolist()) == set(BODY_PART_IDS)


def test_part_weights_columns(body):
    weights = body.part_weights
    assert weights.shape == (body.num_vertices, 15)
    assert np.all(weights[:, 0] == 0)
    assert np.array_equal(np.argmax(weights[:, 1:], axis=1) + 1, body.vertex_parts)


def test_mirror_index_is_an_involution_on_a_symmetric_body(body):
    index = body.mirror_index
    assert index.dtype == np.int64 and index.shape == (body.num_vertices,)
    assert np.array_equal(index[index], np.arange(body.num_vertices))
    template = body.v_template.double().numpy()
    assert np.allclose(template[index] * [-1, 1, 1], template, atol=1e-6)


def test_synthetic_labels_are_mirror_symmetric(body):
    parts = body.vertex_parts
    assert np.array_equal(parts[body.mirror_index], MIRROR_PART[parts])


def test_mirror_index_of_points():
    points = np.array([[1.0, 0.0, 0.0], [-1.01, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 2.0, 0.0]])
    assert mirror_index(points).tolist() == [1, 0, 2, 3]


def test_parts_doc_tables_match_the_taxonomy():
    from protoreg.body.parts_doc import PARTS_DOC, parts_tables_markdown

    text = PARTS_DOC.read_text()
    assert parts_tables_markdown() in text, "docs/parts.md is stale: run python -m protoreg.body.parts_doc"


@pytest.fixture(scope="module")
def default_body():
    from protoreg.body import DEFAULT_BODY_MODEL

    assert DEFAULT_BODY_MODEL.exists(), f"{DEFAULT_BODY_MODEL} is missing (it ships with the repository)"
    return load_body_model()


def test_default_body_has_every_part(default_body):
    counts = np.bincount(default_body.vertex_parts, minlength=15)
    assert counts[0] == 0 and np.all(counts[1:15] > 0)


def test_default_body_labels_are_mirror_symmetric(default_body):
    parts = default_body.vertex_parts
    agree = np.mean(parts[default_body.mirror_index] == MIRROR_PART[parts])
    assert agree >= 0.98


def test_default_body_blend_zones_are_narrow(default_body):
    """Most vertices belong clearly to one part; a few sit between two (shared facts: about 3 %)."""
    weights = default_body.part_weights
    assert np.allclose(weights.sum(1), 1.0, atol=1e-6)
    assert np.mean(weights.max(1) < 0.6) < 0.08
