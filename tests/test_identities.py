"""Identities: seeded sampling, YAML/JSONL casts, one-line errors, fingerprint, show-identities."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from protoreg.body import load_body_model
from protoreg.body.synthetic import synthetic_body_arrays
from protoreg.identities import (
    BETA_LIMIT,
    HAIR_COLORS,
    MIN_BETA_DISTANCE,
    Identity,
    IdentityError,
    identities_fingerprint,
    load_identities,
    resolve_identities,
    sample_identities,
)
from protoreg.identities_cli import sheet_size_px, show_identities

NUM_BETAS = 10


@pytest.fixture(scope="module")
def body_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("body") / "synthetic.npz"
    np.savez(path, **synthetic_body_arrays(num_betas=NUM_BETAS, seed=1))
    return path


@pytest.fixture(scope="module")
def body(body_path):
    return load_body_model(body_path)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ sampling


def test_sampling_is_deterministic_per_seed(body):
    a, b, c = sample_identities(8, 5, body), sample_identities(8, 5, body), sample_identities(8, 6, body)
    assert a == b
    assert [i.to_json() for i in a] == [i.to_json() for i in b]
    assert not np.allclose(np.stack([i.betas for i in a]), np.stack([i.betas for i in c]))


def test_sampled_identities_are_distinct_plausible_and_named(body):
    cast = sample_identities(60, 0, body)
    betas = np.stack([i.betas for i in cast])
    assert betas.shape == (60, NUM_BETAS) and betas.dtype == np.float32
    assert [i.name for i in cast] == [f"id{k:04d}" for k in range(60)]
    assert [i.id for i in cast] == list(range(60))
    assert np.abs(betas).max() <= BETA_LIMIT
    dist = np.linalg.norm(betas[:, None] - betas[None], axis=-1) + np.eye(60) * 1e9
    assert dist.min() >= MIN_BETA_DISTANCE
    for ident in cast:
        assert np.all((ident.skin_tone > 0) & (ident.skin_tone <= 1))
        assert np.all((ident.hair_color >= 0) & (ident.hair_color <= 1))


def test_small_cast_spans_the_leading_shape_components_and_skin_tones(body):
    cast = sample_identities(10, 3, body)
    betas = np.stack([i.betas for i in cast])
    # Latin hypercube: one draw per decile, so the lowest is below the 10th percentile (-1.28 sd).
    assert np.all(betas[:, :3].min(axis=0) < -1.28) and np.all(betas[:, :3].max(axis=0) > 1.28)
    luminance = np.stack([i.skin_tone for i in cast]) @ np.array([0.2126, 0.7152, 0.0722])
    assert luminance.max() > 4 * luminance.min()  # light and dark skin in a cast of ten


def test_count_below_one_is_a_one_line_error(body):
    for spec in ("0", "-3"):
        with pytest.raises(
            IdentityError, match=r"expected a positive number of identities or a file, got -?\d"
        ):
            resolve_identities(spec, 0, body)


def test_resolve_picks_sampling_or_file(body, tmp_path):
    assert resolve_identities(" 4 ", 1, body) == sample_identities(4, 1, body)
    path = write(tmp_path, "cast.yaml", "- {name: ana, betas: [1.0]}\n")
    assert [i.name for i in resolve_identities(str(path), 1, body)] == ["ana"]


def test_identity_json_round_trip(body):
    ident = sample_identities(3, 9, body)[2]
    ident.mesh = "/data/ana.npy"
    back = Identity.from_json(json.loads(json.dumps(ident.to_json())))
    assert back == ident
    assert np.array_equal(back.betas, ident.betas) and back.betas.dtype == np.float32
    assert back.mesh == "/data/ana.npy" and back.body_model is None


# ------------------------------------------------------------------ files


def test_yaml_cast_pads_betas_and_keeps_given_traits(body, tmp_path):
    path = write(
        tmp_path,
        "people.yaml",
        "identities:\n"
        "  - name: ana\n    betas: [1.5, -0.5]\n    skin_tone: [0.5, 0.3, 0.2]\n    hair_color: red\n"
        "  - name: ben\n    betas: [0, 0, 0, 0, 0, 0, 0, 0, 0, 2]\n",
    )
    cast = load_identities(path, body, seed=4)
    assert [(i.name, i.id) for i in cast] == [("ana", 0), ("ben", 1)]
    assert np.array_equal(cast[0].betas, np.array([1.5, -0.5] + [0.0] * 8, dtype=np.float32))
    assert np.array_equal(cast[0].skin_tone, np.array([0.5, 0.3, 0.2], dtype=np.float32))
    assert np.array_equal(cast[0].hair_color, HAIR_COLORS["red"].astype(np.float32))
    assert cast[1].betas[9] == 2.0
    assert load_identities(path, body, seed=4) == cast  # drawn traits (ben's colours) are seeded too


def test_jsonl_cast_with_enrolled_mesh(body, tmp_path):
    verts = body.rest_vertices(np.zeros((1, NUM_BETAS), dtype=np.float32))[0].numpy()
    np.save(tmp_path / "ana.npy", verts)
    path = write(
        tmp_path,
        "people.jsonl",
        '{"name": "ana", "mesh": "ana.npy"}\n\n'
        '{"name": "ben", "betas": [0.5], "hair_color": [0.1, 0.1, 0.1]}\n',
    )
    ana, ben = load_identities(path, body)
    assert ana.mesh == str((tmp_path / "ana.npy").resolve()) and np.all(ana.betas == 0)
    assert ben.mesh is None and ben.betas[0] == 0.5 and ben.id == 1


def _mesh_files(tmp_path, body):
    np.save(tmp_path / "wrong.npy", np.zeros((body.num_vertices - 1, 3), dtype=np.float32))


BAD_FILES = [
    ("people.yaml", "- name: a\n  betas: [1, 2\n", "people.yaml: invalid YAML at line 3"),
    (
        "people.yaml",
        "- {name: a, betas: [1]}\n- {name: b, betas: [2]}\n- {name: c, betas: tall}\n",
        "people.yaml: entry 3: field 'betas': expected a list of numbers, got 'tall'",
    ),
    (
        "people.yaml",
        "- {name: a, betas: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]}\n",
        "people.yaml: entry 1: field 'betas': expected at most 10 numbers, got 11",
    ),
    (
        "people.yaml",
        "- {name: a, betas: [1], mesh: missing.obj}\n",
        "people.yaml: entry 1: field 'mesh': file not found: missing.obj",
    ),
    (
        "people.yaml",
        "- {name: a, mesh: wrong.npy}\n",
        "people.yaml: entry 1: field 'mesh': expected 1120 vertices (the body's topology), "
        "got 1119 in wrong.npy",
    ),
    (
        "people.yaml",
        "- {name: a, betas: [1], skin_tone: [2, 0, 0]}\n",
        "people.yaml: entry 1: field 'skin_tone': expected [r, g, b] linear RGB in [0, 1], got [2, 0, 0]",
    ),
    (
        "people.yaml",
        "- {name: a, betas: [1], hair: black}\n",
        "people.yaml: entry 1: field 'hair': unknown field",
    ),
    ("people.yaml", "- {name: a}\n", "people.yaml: entry 1: field 'betas': missing"),
    (
        "people.yaml",
        "- {name: a, betas: [1]}\n- {name: a, betas: [2]}\n",
        "people.yaml: entry 2: field 'name': duplicate name 'a' (also entry 1)",
    ),
    (
        "people.jsonl",
        '{"name": "a", "betas": [1]}\n{"name": "b", "betas": [1]\n',
        "people.jsonl: line 2: invalid JSON",
    ),
    (
        "people.jsonl",
        '{"name": "a", "betas": [1]}\n\n{"name": "b", "betas": [1], "hair_color": "purple"}\n',
        "people.jsonl: line 3: field 'hair_color': expected one of black, dark_brown",
    ),
    ("people.txt", "a\n", "people.txt: expected an identities file ending in .yaml, .yml or .jsonl"),
    ("people.yaml", "name: a\n", "people.yaml: expected a list of identities"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES)
def test_malformed_files_give_one_line_errors(body, tmp_path, name, text, message):
    _mesh_files(tmp_path, body)
    path = write(tmp_path, name, text)
    with pytest.raises(IdentityError) as err:
        load_identities(path, body)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_show_identities_cli_errors(body_path, tmp_path):
    with pytest.raises(IdentityError, match="identities file not found"):
        resolve_identities(str(tmp_path / "nobody.yaml"), 0, None)
    bad = write(
        tmp_path,
        "people.yaml",
        "- {name: a, betas: [1]}\n- {name: b, betas: [1]}\n- {name: c, betas: tall}\n",
    )
    out = tmp_path / "ids.png"
    runner = CliRunner()
    result = runner.invoke(
        show_identities, ["--identities", str(bad), "--body-model", str(body_path), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "people.yaml: entry 3: field 'betas': expected a list of numbers, got 'tall'" in result.output
    result = runner.invoke(
        show_identities, ["--identities", "0", "--body-model", str(body_path), "--out", str(out)]
    )
    assert result.exit_code == 2 and "got 0" in result.output
    assert not out.exists()


def test_fingerprint_tracks_content(body, tmp_path):
    cast = sample_identities(4, 0, body)
    same = sample_identities(4, 0, body)
    assert identities_fingerprint(cast) == identities_fingerprint(same)
    assert len(identities_fingerprint(cast)) == 64
    same[2].betas[0] += 0.01
    assert identities_fingerprint(cast) != identities_fingerprint(same)
    mesh = tmp_path / "m.npy"
    np.save(mesh, np.zeros((3, 3), dtype=np.float32))
    cast[0].mesh = str(mesh)
    before = identities_fingerprint(cast)
    np.save(mesh, np.ones((3, 3), dtype=np.float32))  # same path, new content
    assert identities_fingerprint(cast) != before


# ------------------------------------------------------------------ show-identities


def test_show_identities_writes_png_of_expected_size(body_path, tmp_path):
    out = tmp_path / "sheet" / "identities.png"
    result = CliRunner().invoke(
        show_identities,
        ["--identities", "6", "--seed", "2", "--body-model", str(body_path), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert sheet_size_px(6, "a") == (3 * 373, 2 * 440 + 70 + 44)
    with Image.open(out) as im:
        assert im.size == sheet_size_px(6, "a")
        pixels = np.asarray(im.convert("RGB"))
    torso = np.array([255, 225, 25])  # the torso's part colour, shaded
    hue_match = (pixels[..., 2] < 60) & (pixels[..., 0] > 120) & (pixels[..., 1] > 100)
    assert hue_match.sum() > 500, f"expected shaded {torso} torso pixels"
    assert sorted(p.name for p in out.parent.iterdir()) == ["identities.png"]  # no temporary left behind


def test_show_identities_unwritable_output_is_a_one_line_error(body_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(
        show_identities,
        ["--identities", "1", "--body-model", str(body_path), "--out", str(blocker / "ids.png")],
    )
    assert result.exit_code == 1
    assert "ids.png: cannot write the picture" in result.output
    assert len(result.output.strip().splitlines()) == 1
