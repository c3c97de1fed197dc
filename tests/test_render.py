"""Blender renders (64x128, 4 samples): exact labels, correspondence, projection, determinism, occluders.

Blender runs in one SPAWNED child process (bpy must never be imported by a process that later forks,
and pytest runs other areas' tests that fork), driven through a one-worker process pool.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generator.config import RenderSettings
from generator.scene import SceneConfig
from protoreg.parts import OCCLUDER, PART_ID, colorize
from tests.scene_fixtures import REAL_BODY, body_path, frontal_config, load_test_body, make_spec

pytestmark = pytest.mark.slow

SETTINGS = RenderSettings(
    width=64, height=128, samples=4, threads_per_worker=2, write_depth=True, write_garments=True
)

_RENDERER = None


def _start(settings: RenderSettings, path: str, backgrounds: str | None) -> None:
    global _RENDERER
    from generator.render import BlenderRenderer
    from protoreg.body import load_body_model

    _RENDERER = BlenderRenderer(settings, load_body_model(path), backgrounds)


def _render(spec):
    return _RENDERER.render(spec)


def _construct(settings: RenderSettings, path: str, backgrounds: str) -> str:
    """Try to build a renderer with a given backgrounds folder; return the error text ('' when it worked).

    The failure happens before Blender's scene is touched, so the process's own renderer stays usable."""
    from generator.render import BlenderRenderer
    from protoreg.body import load_body_model

    try:
        BlenderRenderer(settings, load_body_model(path), backgrounds)
    except Exception as e:  # noqa: BLE001 - the test inspects the message
        return f"{type(e).__name__}: {e}"
    return ""


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("render")


@pytest.fixture(scope="module")
def body(tmp_module):
    return load_test_body(tmp_module)


@pytest.fixture(scope="module")
def pool(tmp_module):
    """One spawned Blender process holding a renderer."""
    executor = ProcessPoolExecutor(
        max_workers=1,
        mp_context=mp.get_context("spawn"),
        initializer=_start,
        initargs=(SETTINGS, str(body_path(tmp_module)), None),
    )
    yield executor
    executor.shutdown()


@pytest.fixture(scope="module")
def renderer(pool):
    """spec -> RenderedSample, rendered in the spawned Blender process."""
    return lambda spec: pool.submit(_render, spec).result(timeout=120)


@pytest.fixture(scope="module")
def frontal(body, renderer):
    spec = make_spec(body, SETTINGS, frontal_config(backdrop_probability=0.0))
    return spec, renderer(spec)


def interior_mask(labels: np.ndarray) -> np.ndarray:
    """Pixels whose whole 3x3 neighbourhood has one label."""
    p = np.pad(labels, 1, mode="edge")
    same = np.ones(labels.shape, bool)
    h, w = labels.shape
    for dy in range(3):
        for dx in range(3):
            same &= p[dy : dy + h, dx : dx + w] == labels
    return same


def test_garment_labels_cover_the_person_and_follow_the_dressed_vertices(frontal):
    from generator.appearance import vertex_garment_labels
    from protoreg.dataset import GARMENT_ID

    spec, out = frontal
    g = out.garments
    assert g.shape == out.parts.shape and g.dtype == np.uint8
    assert np.array_equal(g > 0, (out.parts >= 1) & (out.parts <= 14))  # every person pixel, borders too
    per_vertex = vertex_garment_labels(spec.dressed, len(spec.posed_vertices))
    seen = out.vid > 0
    assert np.array_equal(g[seen], per_vertex[out.vid[seen].astype(np.int64) - 1])  # vid's vertex decides
    # the flat dressing: a shirt over torso and upper arms, trousers, shoes; skin elsewhere
    for labels, garment in (((1, 5, 6, 7, 8), "skin"), ((2, 3, 4), "top"), ((9, 10, 11, 12), "bottom")):
        assert set(np.unique(g[np.isin(out.parts, labels)])) == {GARMENT_ID[garment]}, garment
    assert set(np.unique(g[np.isin(out.parts, (13, 14))])) == {GARMENT_ID["shoes"]}


def label_border_mask(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label."""
    p = np.pad(labels, 1, mode="edge")
    return (
        (p[:-2, 1:-1] != labels)
        | (p[2:, 1:-1] != labels)
        | (p[1:-1, :-2] != labels)
        | (p[1:-1, 2:] != labels)
    )


def vid_colors(vid: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """Correspondence picture: each pixel coloured by its vertex's rest-pose position."""
    lo, hi = rest.min(0), rest.max(0)
    col = ((rest - lo) / (hi - lo) * 255).astype(np.uint8)
    out = np.zeros(vid.shape + (3,), np.uint8)
    m = vid > 0
    out[m] = col[vid[m].astype(np.int64) - 1]
    return out


def test_labels_exact_and_every_part_visible(frontal):
    spec, out = frontal
    assert out.rgb.shape == (128, 64, 3) and out.rgb.dtype == np.uint8
    assert out.parts.shape == (128, 64) and out.parts.dtype == np.uint8
    assert out.vid.dtype == np.uint16
    assert set(np.unique(out.parts)) <= set(range(16))
    assert set(np.unique(out.parts)) == set(range(15))  # background + all 14 parts, no occluder


def test_vid_covers_interior_pixels_with_matching_parts(frontal, body):
    spec, out = frontal
    body_px = (out.parts >= 1) & (out.parts <= 14)
    interior = body_px & interior_mask(out.parts)
    assert interior.sum() > (200 if REAL_BODY else 30)
    assert (out.vid[interior] > 0).mean() >= 0.95
    has = out.vid > 0
    assert not (has & ~body_px).any()  # no correspondence off the body
    assert not (has & label_border_mask(out.parts)).any()  # border pixels are unknown
    assert has.sum() > 0.5 * body_px.sum()
    assert np.array_equal(np.asarray(body.vertex_parts)[out.vid[has].astype(np.int64) - 1], out.parts[has])


def test_projection_with_K_R_t_reproduces_labels(frontal, body):
    spec, out = frontal
    cam = spec.scene.camera
    verts = np.asarray(spec.posed_vertices, np.float64)
    uv, z = cam.project(verts)
    px = np.rint(uv).astype(np.int64)
    inside = (px[:, 0] >= 0) & (px[:, 0] < cam.width) & (px[:, 1] >= 0) & (px[:, 1] < cam.height)
    assert inside.all()  # the crop frames the whole person
    depth = out.depth[px[:, 1], px[:, 0]]
    # Visible vertices: the surface seen at their pixel is at their depth and they face the camera.
    view = verts - cam.position
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    facing = (np.asarray(spec.posed_normals) * view).sum(1) < -0.5
    visible = facing & (np.abs(depth - z) < 0.02)
    assert visible.sum() > 100
    labels = out.parts[px[visible, 1], px[visible, 0]]
    agree = (labels == np.asarray(body.vertex_parts)[visible]).mean()
    assert agree >= (0.95 if REAL_BODY else 0.8)


def test_same_spec_renders_identically(frontal, renderer, body):
    spec, out = frontal
    other = make_spec(body, SETTINGS, SceneConfig(occluder_probability=1.0), seed=99, shell=True)
    renderer(other)  # a different scene in between: nothing of it may leak into the next render
    again = renderer(spec)
    assert np.array_equal(out.rgb, again.rgb)
    assert np.array_equal(out.parts, again.parts)
    assert np.array_equal(out.vid, again.vid)


def test_occluder_is_labelled_15(body, renderer):
    config = frontal_config(
        occluder_probability=1.0, occluder_count=(1, 1), occluder_offset=(0.0, 0.1), occluder_size=(0.4, 0.5)
    )
    spec = make_spec(body, SETTINGS, config, seed=3)
    assert len(spec.scene.occluders) == 1
    out = renderer(spec)
    assert (out.parts == OCCLUDER).sum() > 50
    assert (out.vid[out.parts == OCCLUDER] == 0).all()


def test_loose_shell_keeps_the_torso_label(body, renderer, frontal, tmp_module):
    spec = make_spec(body, SETTINGS, frontal_config(backdrop_probability=0.0), shell=True)
    out = renderer(spec)
    torso = out.parts == PART_ID["torso"]
    _, plain = frontal
    assert torso.sum() >= (plain.parts == PART_ID["torso"]).sum()  # the shell is larger than the torso
    # the shell is dark red: torso pixels are redder than in the plain render
    assert out.rgb[torso][:, 0].mean() > plain.rgb[plain.parts == PART_ID["torso"]][:, 0].mean() + 20
    interior = torso & interior_mask(out.parts)
    assert (out.vid[interior] > 0).mean() >= 0.95
    has = out.vid > 0
    assert np.array_equal(np.asarray(body.vertex_parts)[out.vid[has].astype(np.int64) - 1], out.parts[has])
    # a picture for people: rgb | parts | correspondence, plain and with shell
    rest = np.asarray(body.rest_vertices(np.zeros((1, 1), np.float32)))[0]
    rows = [np.concatenate([r.rgb, colorize(r.parts), vid_colors(r.vid, rest)], 1) for r in (plain, out)]
    Image.fromarray(np.concatenate(rows, 1)).resize((6 * 64 * 3, 3 * 128), Image.NEAREST).save(
        tmp_module / "render_check.png"
    )


def test_background_image_is_rendered_behind_the_person(body, tmp_module):
    folder = tmp_module / "backgrounds"
    folder.mkdir()
    Image.fromarray(np.full((16, 32, 3), (200, 10, 10), np.uint8)).save(folder / "red.png")
    config = frontal_config(backgrounds_dir=str(folder), camera_height=(1.0, 1.0))
    spec = make_spec(body, SETTINGS, config)
    assert spec.scene.background.backdrop.image == str(folder / "red.png")
    with ProcessPoolExecutor(
        1,
        mp_context=mp.get_context("spawn"),
        initializer=_start,
        initargs=(SETTINGS, str(body_path(tmp_module)), str(folder)),
    ) as pool:
        out = pool.submit(_render, spec).result(timeout=120)
    top = out.rgb[:20][out.parts[:20] == 0].astype(int)
    assert len(top) > 100
    assert (top[:, 0] > top[:, 1] + 40).mean() > 0.9


def test_bad_backgrounds_folder_is_a_clear_error(tmp_module, pool):
    empty = tmp_module / "empty_backgrounds"
    empty.mkdir()
    path = str(body_path(tmp_module))
    missing = pool.submit(_construct, SETTINGS, path, str(tmp_module / "nope")).result(timeout=120)
    nothing = pool.submit(_construct, SETTINGS, path, str(empty)).result(timeout=120)
    assert missing.startswith("BackgroundsError") and "nope" in missing
    assert "not a readable directory" in missing
    assert nothing.startswith("BackgroundsError") and "holds no images" in nothing
