"""Scene sampling and sample description (pure numpy, no Blender)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generator.appearance as appearance
from generator.config import GenConfig, RenderSettings
from generator.sample import GenContext, cycles_seed, describe_sample, sample_seed
from generator.scene import BackgroundsError, SceneConfig, list_backgrounds, sample_scene
from protoreg import dataset as ds
from protoreg.identities import sample_identities
from tests.scene_fixtures import FlatDressed, a_pose, flat_dressing, frontal_config, load_test_body

SETTINGS = RenderSettings(width=64, height=128)


@pytest.fixture(scope="module")
def body(tmp_path_factory):
    return load_test_body(tmp_path_factory.mktemp("scene_body"))


@pytest.fixture(scope="module")
def person(body) -> np.ndarray:
    with torch.no_grad():
        v = body(pose=torch.as_tensor(a_pose()[None], dtype=torch.float32)).vertices[0].numpy()
    return (v - [0.0, v[:, 1].min(), 0.0]).astype(np.float64)


def test_sample_seed_is_a_pure_function_of_seed_and_index():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    seeds = {sample_seed(s, i) for s in range(3) for i in range(200)}
    assert len(seeds) == 600
    assert all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(0, 0) == 6375474604893067239  # pinned: changing it changes every dataset
    assert 0 <= cycles_seed(sample_seed(1, 2)) < 2**31


def test_scene_is_deterministic_and_json_able(person):
    config = SceneConfig(occluder_probability=0.5, area_light_probability=0.5)
    a = sample_scene(np.random.default_rng(11), config, SETTINGS, person).to_json()
    b = sample_scene(np.random.default_rng(11), config, SETTINGS, person).to_json()
    c = sample_scene(np.random.default_rng(12), config, SETTINGS, person).to_json()
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)


def test_cameras_stay_in_range_and_frame_the_person(person):
    config = SceneConfig()
    for seed in range(150):
        cam = sample_scene(np.random.default_rng(seed), config, SETTINGS, person).camera
        assert config.camera_distance[0] <= cam.distance <= config.camera_distance[1]
        assert config.camera_height[0] <= cam.position[1] <= config.camera_height[1]
        assert np.allclose(cam.R @ cam.R.T, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(cam.R), 1.0)
        assert np.allclose(cam.R @ cam.position + cam.t, 0.0, atol=1e-9)
        uv, z = cam.project(person)
        assert (z > 0).all()
        assert (
            (uv >= -0.5).all()
            and (uv[:, 0] <= cam.width - 0.5).all()
            and (uv[:, 1] <= cam.height - 0.5).all()
        )
        extent = (uv.max(0) - uv.min(0)) / [cam.width, cam.height]
        assert extent.max() > 0.7  # the person fills the crop along its longer side


def test_crop_box_maps_the_full_view_onto_the_output_image(person):
    for seed in range(30):
        cam = sample_scene(np.random.default_rng(seed), SceneConfig(), SETTINGS, person).camera
        x0, y0, x1, y1 = cam.crop_box
        assert np.isclose((x1 - x0) / (y1 - y0), cam.width / cam.height)
        s = cam.width / (x1 - x0)
        full = (person @ cam.R.T + cam.t) @ cam.full_K.T
        full = full[:, :2] / full[:, 2:]
        out, _ = cam.project(person)
        assert np.allclose((full + 0.5 - [x0, y0]) * s - 0.5, out, atol=1e-6)
        if cam.focal_length_mm > SceneConfig().min_focal_length_mm + 1e-9:  # lens fitted: crop inside sensor
            assert (
                x0 >= -1e-6 and y0 >= -1e-6 and x1 <= cam.full_width + 1e-6 and y1 <= cam.full_height + 1e-6
            )


def test_blender_lens_puts_the_principal_point_where_K_says(person):
    cam = sample_scene(np.random.default_rng(0), frontal_config(), SETTINGS, person).camera
    lens = cam.blender_lens()
    assert np.isclose(lens["lens"], cam.K[0, 0] * cam.sensor_width_mm / cam.width)
    centred = replace(cam, K=np.array([[100.0, 0, 31.5], [0, 100.0, 63.5], [0, 0, 1]]))
    assert np.allclose([centred.blender_lens()["shift_x"], centred.blender_lens()["shift_y"]], 0.0)
    pushed = replace(cam, K=np.array([[100.0, 0, 21.5], [0, 100.0, 73.5], [0, 0, 1]]))
    assert np.allclose(
        [pushed.blender_lens()["shift_x"], pushed.blender_lens()["shift_y"]], [10 / 64, 10 / 64]
    )


def test_occluders_stand_between_camera_and_person(person):
    config = SceneConfig(occluder_probability=1.0, occluder_count=(1, 3))
    counts = []
    for seed in range(40):
        scene = sample_scene(np.random.default_rng(seed), config, SETTINGS, person)
        counts.append(len(scene.occluders))
        _, z_person = scene.camera.project(person)
        for occ in scene.occluders:
            uv, z = scene.camera.project(occ.center[None])
            assert 0 < z[0] < np.median(z_person)
            assert z[0] + 0.5 * np.linalg.norm(occ.size) <= z_person.min() + 1e-9  # never cuts into the body
            assert -0.5 <= uv[0, 0] <= scene.camera.width and -0.5 <= uv[0, 1] <= scene.camera.height
            assert occ.shape in config.occluder_shapes and (occ.size > 0).all()
    assert set(counts) == {1, 2, 3}
    none = sample_scene(np.random.default_rng(0), SceneConfig(occluder_probability=0.0), SETTINGS, person)
    assert none.occluders == []


def test_backgrounds_folder_errors_are_clear(tmp_path):
    with pytest.raises(BackgroundsError, match="not a readable directory"):
        list_backgrounds(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(BackgroundsError, match="holds no images"):
        list_backgrounds(str(tmp_path))


def test_background_images_come_from_the_folder(tmp_path, person):
    for name in ("b.png", "a.jpg"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    files = list_backgrounds(str(tmp_path))
    assert [Path(f).name for f in files] == ["a.jpg", "b.png"]
    config = SceneConfig(backgrounds_dir=str(tmp_path))
    chosen = {
        sample_scene(np.random.default_rng(s), config, SETTINGS, person).background.backdrop.image
        for s in range(20)
    }
    assert chosen == set(files)
    procedural = sample_scene(
        np.random.default_rng(0), SceneConfig(backdrop_probability=1.0), SETTINGS, person
    )
    assert procedural.background.backdrop.image is None
    assert procedural.background.backdrop.surface.pattern in ("solid", "noise", "checker", "brick")


# ---------------------------------------------------------------------------------------- describe_sample


@dataclass
class _FlatOutfit:
    """Stands in for generator.appearance's Outfit while that module is not there."""

    shell: bool

    def to_json(self) -> dict:
        return {"flat": True, "shell": self.shell}


class _FlatDresser:
    def __init__(self, body, config) -> None:
        self.body = body

    def dress(self, outfit, identity, rng, rest, posed, normals) -> FlatDressed:
        return flat_dressing(self.body, posed, normals, shell=outfit.shell)


@pytest.fixture
def stage_stubs(monkeypatch):
    """The real appearance stage when it exists, else flat colours (it is written in parallel)."""
    if not hasattr(appearance, "Dresser") or not hasattr(appearance, "sample_outfit"):
        monkeypatch.setattr(appearance, "Dresser", _FlatDresser, raising=False)
        monkeypatch.setattr(
            appearance, "sample_outfit", lambda rng, cfg: _FlatOutfit(bool(rng.random() < 0.5)), raising=False
        )


def _context(body, seed: int = 5) -> GenContext:
    config = GenConfig(render=RenderSettings(width=64, height=128))
    return GenContext(config=config, seed=seed, identities=sample_identities(3, seed=1, body=body), body=body)


def test_describe_sample_is_a_pure_function_of_seed_and_index(body, stage_stubs):
    a, b = _context(body), _context(body)
    first = describe_sample(4, a)
    describe_sample(0, b)  # what came before must not matter
    again = describe_sample(4, b)
    assert first.seed == again.seed == sample_seed(5, 4)
    assert np.array_equal(first.pose, again.pose)
    assert np.array_equal(first.posed_vertices, again.posed_vertices)
    assert json.dumps(first.metadata()) == json.dumps(again.metadata())
    other = describe_sample(5, a)
    assert not np.array_equal(other.pose, first.pose)
    assert [describe_sample(i, a).identity.id for i in range(6)] == [a.identities[i % 3].id for i in range(6)]


def test_metadata_reproduces_the_posed_body(body, stage_stubs):
    spec = describe_sample(2, _context(body))
    meta = json.loads(json.dumps(spec.metadata()))
    for name in ds.SAMPLE_JSON_FIELDS:
        assert name in meta
    for name in ds.CAMERA_JSON_FIELDS:
        assert name in meta["camera"]
    assert len(meta["pose"]) == 72 and len(meta["transl"]) == 3 and len(meta["camera"]["crop_box"]) == 4
    with torch.no_grad():
        out = body(
            betas=torch.tensor([meta["betas"]], dtype=torch.float32),
            pose=torch.tensor([meta["pose"]], dtype=torch.float32),
            transl=torch.tensor([meta["transl"]], dtype=torch.float32),
        )
    assert np.allclose(out.vertices[0].numpy(), spec.posed_vertices, atol=1e-5)
    assert spec.posed_vertices[:, 1].min() == pytest.approx(0.0, abs=1e-6)  # standing on the ground
    K, R, t = (np.array(meta["camera"][k]) for k in ("K", "R", "t"))
    uvw = (spec.posed_vertices @ R.T + t) @ K.T
    uv = uvw[:, :2] / uvw[:, 2:]
    assert (uv > -0.5).all() and (uv[:, 0] < 63.5).all() and (uv[:, 1] < 127.5).all()


def test_metadata_names_background_images_by_file_name(body, stage_stubs, tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "street.png")
    config = GenConfig(render=RenderSettings(width=64, height=128))
    ctx = GenContext(
        config=config,
        seed=0,
        identities=sample_identities(1, seed=1, body=body),
        body=body,
        backgrounds=str(tmp_path),
    )
    meta = describe_sample(0, ctx).metadata()
    assert meta["background"]["backdrop"]["image"] == "street.png"
