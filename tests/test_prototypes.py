"""prototypes.h5: shared surface samples, per-part minimums, exact round trip, atomic writes."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from protoreg.body import load_body_model
from protoreg.body.synthetic import synthetic_body_arrays
from protoreg.identities import Identity, sample_identities
from protoreg.parts import BODY_PART_IDS, PART_ID, TAXONOMY_VERSION
from protoreg.prototypes import (
    FORMAT_VERSION,
    Prototype,
    PrototypeError,
    _allocate_counts,
    build_prototype,
    hair_vertex_mask,
    prototype_points_tensor,
    read_prototypes,
    read_prototypes_attrs,
    sample_surface,
    write_prototypes,
)

NUM_BETAS = 10


@pytest.fixture(scope="module")
def body(tmp_path_factory):
    path = tmp_path_factory.mktemp("body") / "synthetic.npz"
    np.savez(path, **synthetic_body_arrays(num_betas=NUM_BETAS, seed=2))
    return load_body_model(path)


@pytest.fixture(scope="module")
def cast(body):
    return sample_identities(4, 11, body)


@pytest.fixture(scope="module")
def written(body, cast, tmp_path_factory):
    path = tmp_path_factory.mktemp("protos") / "prototypes.h5"
    write_prototypes(path, cast, body, n_points=2048, seed=5, min_per_part=100)
    return path


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rest(body, betas) -> np.ndarray:
    return body.rest_vertices(np.asarray(betas, dtype=np.float32)[None])[0].numpy().astype(np.float64)


def test_round_trip_is_exact(body, cast, written):
    protos = read_prototypes(written)
    assert list(protos) == [i.name for i in cast]
    samples = sample_surface(body, n_points=2048, seed=5, min_per_part=100)
    mask = hair_vertex_mask(body)
    for ident in cast:
        expected = build_prototype(ident, body, samples, mask)
        got = protos[ident.name]
        assert isinstance(got, Prototype)
        assert (got.name, got.identity_id) == (ident.name, ident.id)
        for field in ("points", "normals", "parts", "vertex_ids", "albedo", "betas"):
            a, b = getattr(got, field), getattr(expected, field)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), field
        assert got.points.shape == (2048, 3) and got.points.dtype == np.float32
        assert got.parts.dtype == np.uint8 and got.vertex_ids.dtype == np.int32
    attrs = read_prototypes_attrs(written)
    assert attrs["body_model_sha256"] == body.sha256 and len(body.sha256) == 64
    assert attrs["taxonomy_version"] == TAXONOMY_VERSION
    assert attrs["format_version"] == FORMAT_VERSION
    assert (attrs["n_points"], attrs["seed"], attrs["min_per_part"], attrs["num_identities"]) == (
        2048,
        5,
        100,
        4,
    )
    with h5py.File(written, "r") as f:
        g = f["identities"][cast[1].name]
        assert set(g) == {"points", "normals", "parts", "vertex_ids", "albedo", "betas"}
        assert (g.attrs["name"], int(g.attrs["identity_id"])) == (cast[1].name, 1)


def test_every_part_gets_its_minimum_and_the_total_is_exact(body):
    samples = sample_surface(body, n_points=2048, seed=0, min_per_part=100)
    counts = np.bincount(samples.parts, minlength=15)
    assert counts[0] == 0 and counts[15:].sum() == 0
    assert counts.sum() == 2048
    assert all(counts[p] >= 100 for p in BODY_PART_IDS), counts
    assert counts[PART_ID["torso"]] > 300  # big parts keep their share by area
    assert list(_allocate_counts(np.array([20.0, 1.0, 1.0, 78.0]), 1000, 100)) == [163, 100, 100, 637]


def test_point_parts_are_their_source_vertex_parts(body, written):
    protos = read_prototypes(written)
    for proto in protos.values():
        assert np.array_equal(proto.parts, body.vertex_parts[proto.vertex_ids])
    with h5py.File(written, "r") as f:
        faces = body.faces[f["sampling/face_ids"][()]]
        bary = f["sampling/barycentric"][()]
    assert np.allclose(bary.sum(axis=1), 1.0, atol=1e-6) and bary.min() >= 0
    assert np.array_equal(faces[np.arange(len(faces)), bary.argmax(axis=1)], proto.vertex_ids)
    assert np.all(bary.max(axis=1) >= 1 / 3 - 1e-6)


def test_same_surface_places_on_every_body(body, cast, written):
    protos = read_prototypes(written)
    with h5py.File(written, "r") as f:
        faces = body.faces[f["sampling/face_ids"][()]]
        bary = f["sampling/barycentric"][()].astype(np.float64)
    for ident in cast:
        expected = np.einsum("nk,nkd->nd", bary, rest(body, ident.betas)[faces])
        assert np.allclose(protos[ident.name].points, expected, atol=1e-5)
        assert np.allclose(np.linalg.norm(protos[ident.name].normals, axis=1), 1.0, atol=1e-5)
    first = [p.vertex_ids for p in protos.values()]
    assert all(np.array_equal(first[0], v) for v in first)
    assert not np.allclose(protos[cast[0].name].points, protos[cast[1].name].points)


def test_same_seed_same_bytes_other_seed_other_points(body, cast, tmp_path):
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    write_prototypes(a, cast, body, n_points=1600, seed=3)
    write_prototypes(b, cast, body, n_points=1600, seed=3)
    write_prototypes(c, cast, body, n_points=1600, seed=4)
    pa, pb, pc = read_prototypes(a), read_prototypes(b), read_prototypes(c)
    name = cast[0].name
    assert pa[name].points.tobytes() == pb[name].points.tobytes()
    assert sha(a) == sha(b)
    assert not np.array_equal(pa[name].points, pc[name].points)


def test_enrolled_mesh_replaces_the_shape_blend(body, tmp_path):
    verts = rest(body, np.zeros(NUM_BETAS)) + np.array([0.0, 0.1, 0.0])
    np.save(tmp_path / "ana.npy", verts.astype(np.float32))
    zero = np.zeros(NUM_BETAS, dtype=np.float32)
    skin, hair = np.array([0.6, 0.4, 0.3]), np.array([0.02, 0.02, 0.02])
    plain = Identity("plain", 0, zero, skin, hair)
    ana = Identity("ana", 1, zero, skin, hair, mesh=str(tmp_path / "ana.npy"))
    write_prototypes(tmp_path / "p.h5", [plain, ana], body, n_points=1600)
    protos = read_prototypes(tmp_path / "p.h5")
    shift = protos["ana"].points - protos["plain"].points
    assert np.allclose(shift, [0.0, 0.1, 0.0], atol=1e-5)


def test_albedo_is_skin_with_hair_on_the_scalp(body, cast, written):
    protos = read_prototypes(written)
    mask = hair_vertex_mask(body)
    assert mask.any() and np.all(body.vertex_parts[mask] == PART_ID["head"])
    for ident in cast:
        proto = protos[ident.name]
        on_scalp = mask[proto.vertex_ids]
        assert 0 < on_scalp.sum() < (proto.parts == PART_ID["head"]).sum()
        assert np.array_equal(proto.albedo[on_scalp], np.broadcast_to(ident.hair_color, (on_scalp.sum(), 3)))
        assert np.array_equal(
            proto.albedo[~on_scalp], np.broadcast_to(ident.skin_tone, ((~on_scalp).sum(), 3))
        )


def test_unwritable_output_is_a_one_line_error_without_partial_files(body, cast, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(PrototypeError, match=r"not-a-folder/prototypes.h5: cannot write prototypes") as err:
        write_prototypes(blocker / "prototypes.h5", cast, body, n_points=1600)
    assert "\n" not in str(err.value)
    # A failure half-way (second identity's mesh has the wrong vertex count) leaves nothing behind.
    np.save(tmp_path / "bad.npy", np.zeros((5, 3), dtype=np.float32))
    bad = Identity(
        "bad", 1, cast[1].betas, cast[1].skin_tone, cast[1].hair_color, mesh=str(tmp_path / "bad.npy")
    )
    out = tmp_path / "out" / "prototypes.h5"
    with pytest.raises(PrototypeError, match="identity bad: mesh .*bad.npy: expected 1120 vertices, got 5"):
        write_prototypes(out, [cast[0], bad], body, n_points=1600)
    assert list(out.parent.iterdir()) == []


def test_reader_refuses_other_major_versions_and_taxonomies(written, tmp_path):
    for attr, value, message in (
        ("format_version", "2.0", "prototypes format_version 2.0"),
        ("taxonomy_version", "0", "part taxonomy_version 0"),
    ):
        copy = tmp_path / f"{attr}.h5"
        copy.write_bytes(written.read_bytes())
        with h5py.File(copy, "r+") as f:
            f.attrs[attr] = value
        with pytest.raises(PrototypeError, match=message):
            read_prototypes(copy)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(PrototypeError, match="junk.h5: cannot read prototypes"):
        read_prototypes(junk)


def test_points_tensor_and_argument_checks(body, cast, written):
    protos = read_prototypes(written)
    names = [cast[2].name, cast[0].name]
    t = prototype_points_tensor(protos, names)
    assert tuple(t.shape) == (2, 2048, 3) and str(t.dtype) == "torch.float32"
    assert np.array_equal(t[0].numpy(), protos[cast[2].name].points)
    assert tuple(prototype_points_tensor(protos).shape) == (4, 2048, 3)
    with pytest.raises(PrototypeError, match="unknown identity nobody"):
        prototype_points_tensor(protos, ["nobody"])
    with pytest.raises(PrototypeError, match=r"n_points: expected at least 1400"):
        sample_surface(body, n_points=1000, min_per_part=100)


def test_default_body_prototypes_cover_every_part_with_scalp_and_outward_normals(tmp_path):
    from protoreg.body import DEFAULT_BODY_MODEL

    if not DEFAULT_BODY_MODEL.exists():
        pytest.skip("the embedded default body has not been baked yet")
    body = load_body_model()
    cast = sample_identities(3, 0, body)
    path = write_prototypes(tmp_path / "prototypes.h5", cast, body)
    protos = read_prototypes(path)
    for ident in cast:
        proto = protos[ident.name]
        assert proto.points.shape == (4096, 3)
        counts = np.bincount(proto.parts, minlength=15)
        assert counts.sum() == 4096 and all(counts[p] >= 100 for p in BODY_PART_IDS), counts
        assert np.array_equal(proto.parts, body.vertex_parts[proto.vertex_ids])
        assert 1.4 < np.ptp(proto.points[:, 1]) < 2.1  # standing height, metres
        hair = np.all(proto.albedo == ident.hair_color, axis=1)
        assert hair.sum() >= 50 and np.all(proto.parts[hair] == PART_ID["head"])
        top = np.argmax(proto.points[:, 1])
        assert proto.normals[top, 1] > 0.8  # the crown's normal points up
        # Outward: on each part, normals point away from the part's centre for the vast majority of points.
        for p in BODY_PART_IDS:
            sel = proto.parts == p
            away = np.einsum("nd,nd->n", proto.normals[sel], proto.points[sel] - proto.points[sel].mean(0))
            assert (away > 0).mean() > 0.8, (p, (away > 0).mean())
