"""Appearance: outfit sampling, garment regions, patterns, hair and skin, loose-garment shells."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from generator.appearance import (
    AppearanceConfig,
    Dresser,
    Garment,
    Outfit,
    identity_hair_style,
    pattern_mix,
    sample_outfit,
)
from generator.pose import PoseConfig, PosePrior
from protoreg.parts import PART_ID
from tests.content_fixtures import FakeIdentity, load_test_body

SKIN = np.array([0.55, 0.35, 0.25], dtype=np.float32)
HAIR = np.array([0.04, 0.03, 0.02], dtype=np.float32)


@pytest.fixture(scope="module")
def body(tmp_path_factory):
    return load_test_body(tmp_path_factory.mktemp("body"))


@pytest.fixture(scope="module")
def surfaces(body):
    """Rest vertices, and posed vertices/normals in two different poses."""
    betas = torch.zeros(1, body.num_betas)
    prior = PosePrior(PoseConfig(), body)
    poses = [np.zeros(72), prior.sample(np.random.default_rng(4), np.zeros(body.num_betas))]
    out = []
    with torch.no_grad():
        rest = body.rest_vertices(betas)[0].numpy()
        for pose in poses:
            v = body.forward(betas=betas, pose=torch.as_tensor(pose[None], dtype=torch.float32)).vertices
            out.append((v[0].numpy(), body.vertex_normals(v)[0].numpy()))
    return rest, out


def _identity(**kw) -> FakeIdentity:
    return FakeIdentity(skin_tone=SKIN, hair_color=HAIR, **kw)


def _outfit(top_kind="short", bottom_kind="long", top_pattern="solid", loose=False, shoes=True) -> Outfit:
    top = Garment(
        slot="top",
        kind=top_kind,
        palette="brights",
        color=(0.6, 0.05, 0.05),
        color2=(0.9, 0.9, 0.9),
        pattern=top_pattern,
        pattern_scale=0.05,
        cut={"short": 0.3, "sleeveless": 0.0}.get(top_kind, 0.95),
        hem=-0.05,
        loose=loose or top_kind in ("loose_shirt", "coat"),
        offset=0.02 if loose else 0.0,
    )
    if top_kind == "coat":
        top = dataclasses.replace(top, hem=0.4, offset=0.03, flare=0.05)
    bottom = Garment(
        slot="bottom",
        kind=bottom_kind,
        palette="denim",
        color=(0.05, 0.1, 0.3),
        color2=(0.05, 0.1, 0.3),
        cut={"shorts": 0.3, "skirt": 0.5}.get(bottom_kind, 0.97),
        hem=0.05,
        loose=bottom_kind == "skirt",
        offset=0.02 if bottom_kind == "skirt" else 0.0,
        flare=0.1 if bottom_kind == "skirt" else 0.0,
    )
    shoe = (
        Garment(
            slot="shoes",
            kind="shoes",
            palette="shoes",
            color=(0.02, 0.02, 0.02),
            color2=(0.02, 0.02, 0.02),
            cut=0.97,
        )
        if shoes
        else None
    )
    return Outfit(top=top, bottom=bottom, shoes=shoe)


def _dress(body, surfaces, outfit, config=None, pose_index=0, identity=None, seed=0):
    cfg = config or AppearanceConfig(shade_noise=0.0)
    rest, posed = surfaces
    v, n = posed[pose_index]
    return Dresser(body, cfg).dress(outfit, identity or _identity(), np.random.default_rng(seed), rest, v, n)


def _parts(body, *names):
    return np.isin(np.asarray(body.vertex_parts), [PART_ID[n] for n in names])


def test_outfit_sampling_is_deterministic_and_json_round_trips():
    cfg = AppearanceConfig()
    a = [sample_outfit(np.random.default_rng(s), cfg) for s in range(20)]
    b = [sample_outfit(np.random.default_rng(s), cfg) for s in range(20)]
    assert [o.to_json() for o in a] == [o.to_json() for o in b]
    assert len({json.dumps(o.to_json(), sort_keys=True) for o in a}) == 20  # clothing varies per sample
    for o in a:
        text = json.dumps(o.to_json())
        assert Outfit.from_json(json.loads(text)).to_json() == o.to_json()
    kinds = {o.top.kind for o in a} | {o.bottom.kind for o in a}
    assert len(kinds) >= 5


def test_outfit_kinds_follow_the_config():
    cfg = AppearanceConfig(top_probs={"coat": 1.0}, bottom_probs={"skirt": 1.0}, shoes_prob=0.0)
    for s in range(10):
        o = sample_outfit(np.random.default_rng(s), cfg)
        assert o.top.kind == "coat" and o.top.loose and o.top.offset > 0
        assert o.bottom.kind == "skirt" and o.bottom.loose and o.shoes is None


def test_palettes_can_be_swapped():
    red = (0.8, 0.0, 0.0)
    cfg = AppearanceConfig(
        palettes={"only": [red]},
        top_palette_weights={"only": 1.0},
        bottom_palette_weights={"only": 1.0},
        coat_palette_weights={"only": 1.0},
        shoe_palette_weights={"only": 1.0},
        color_jitter=0.0,
    )
    o = sample_outfit(np.random.default_rng(0), cfg)
    assert o.top.color == red and o.bottom.color == red and o.top.palette == "only"


def test_a_config_palette_adds_to_the_built_in_ones():
    neon = (1.0, 0.0, 0.5)
    cfg = AppearanceConfig(
        palettes={"neon": [neon]},
        top_palette_weights={"neon": 1.0},
        top_probs={"short": 1.0},
        color_jitter=0.0,
    )
    o = sample_outfit(np.random.default_rng(1), cfg)
    assert o.top.palette == "neon" and o.top.color == neon
    assert o.bottom.palette in cfg.bottom_palette_weights  # built-in palettes remain available


def test_unknown_names_in_the_config_are_rejected():
    with pytest.raises(ValueError, match="top_probs.*hoodie"):
        sample_outfit(np.random.default_rng(0), AppearanceConfig(top_probs={"hoodie": 1.0}))
    with pytest.raises(ValueError, match="top_palette_weights.*neon"):
        sample_outfit(np.random.default_rng(0), AppearanceConfig(top_palette_weights={"neon": 1.0}))


def test_vertex_colors_shape_dtype_and_range(body, surfaces):
    cfg = AppearanceConfig()
    for s in range(5):
        rng = np.random.default_rng(s)
        dressed = _dress(body, surfaces, sample_outfit(rng, cfg), config=cfg, seed=s)
        c = dressed.vertex_colors
        assert c.shape == (body.num_vertices, 3) and c.dtype == np.float32
        assert np.all((c >= 0) & (c <= 1))
        assert dressed.roughness.shape == (body.num_vertices,) and dressed.roughness.dtype == np.float32


def test_dressing_is_deterministic(body, surfaces):
    outfit = sample_outfit(np.random.default_rng(3), AppearanceConfig())
    a = _dress(body, surfaces, outfit, config=AppearanceConfig(), seed=9)
    b = _dress(body, surfaces, outfit, config=AppearanceConfig(), seed=9)
    assert np.array_equal(a.vertex_colors, b.vertex_colors)
    assert len(a.shells) == len(b.shells)
    assert all(np.array_equal(x.vertices, y.vertices) for x, y in zip(a.shells, b.shells, strict=True))


def test_garments_move_with_the_body(body, surfaces):
    """Regions live on the rest-pose surface: the same outfit colours the same vertices in any pose."""
    outfit = _outfit(top_pattern="stripes")
    a = _dress(body, surfaces, outfit, pose_index=0)
    b = _dress(body, surfaces, outfit, pose_index=1)
    assert np.array_equal(a.vertex_colors, b.vertex_colors)


def test_hair_vertices_take_the_identity_hair_colour(body, surfaces):
    for style in ("short", "medium", "long"):
        cfg = AppearanceConfig(shade_noise=0.0, hair_style_probs={style: 1.0})
        dressed = _dress(body, surfaces, _outfit(), config=cfg)
        hair = dressed.garment_masks["hair"]
        head = _parts(body, "head")
        assert hair.sum() > 0.05 * head.sum()  # head vertices crowd in the face
        assert np.allclose(dressed.vertex_colors[hair], HAIR)
        face = head & ~hair
        assert face.sum() > 0.2 * head.sum() and np.allclose(dressed.vertex_colors[face], SKIN)
    bald = _dress(body, surfaces, _outfit(), config=AppearanceConfig(hair_style_probs={"bald": 1.0}))
    assert bald.garment_masks["hair"].sum() == 0


def test_hair_style_stays_with_the_identity():
    cfg = AppearanceConfig()
    styles = [identity_hair_style(FakeIdentity(id=i, name=f"p{i}"), cfg) for i in range(40)]
    again = [identity_hair_style(FakeIdentity(id=i, name=f"p{i}"), cfg) for i in range(40)]
    assert styles == again and len(set(styles)) >= 3


def test_skin_where_no_garment_covers(body, surfaces):
    dressed = _dress(body, surfaces, _outfit("short", "shorts"))
    covered = np.zeros(body.num_vertices, bool)
    for mask in dressed.garment_masks.values():
        covered |= mask
    assert np.allclose(dressed.vertex_colors[~covered], SKIN)
    hands = _parts(body, "left_hand", "right_hand")
    assert not covered[hands].any()  # nothing covers the hands
    assert np.allclose(dressed.vertex_colors[hands], SKIN)


def test_garment_regions_cover_the_expected_parts(body, surfaces):
    lower_arm = _parts(body, "left_lower_arm", "right_lower_arm")
    upper_arm = _parts(body, "left_upper_arm", "right_upper_arm")
    lower_leg = _parts(body, "left_lower_leg", "right_lower_leg")
    feet = _parts(body, "left_foot", "right_foot")
    torso = _parts(body, "torso")
    long = _dress(body, surfaces, _outfit("long", "long")).garment_masks
    short = _dress(body, surfaces, _outfit("short", "shorts", shoes=False)).garment_masks
    assert long["top"][lower_arm].mean() > 0.7 and long["top"][torso].mean() > 0.6
    assert short["top"][lower_arm].mean() < 0.02 and 0.1 < short["top"][upper_arm].mean() < 0.95
    assert long["bottom"][lower_leg].mean() > 0.8 and short["bottom"][lower_leg].mean() < 0.02
    assert long["shoes"][feet].all() and "shoes" not in short


def test_stripes_give_two_colours_and_solid_one(body, surfaces):
    striped = _dress(body, surfaces, _outfit(top_pattern="stripes"))
    top = striped.garment_masks["top"] & ~striped.garment_masks["hair"]
    colors = np.unique(np.round(striped.vertex_colors[top], 4), axis=0)
    assert len(colors) == 2
    share = (np.abs(striped.vertex_colors[top] - np.array([0.6, 0.05, 0.05])).sum(1) < 1e-3).mean()
    assert 0.2 < share < 0.8
    solid = _dress(body, surfaces, _outfit(top_pattern="solid"))
    assert len(np.unique(np.round(solid.vertex_colors[top], 4), axis=0)) == 1


def test_skin_coloured_garments_are_set_apart_from_the_skin(body, surfaces):
    outfit = _outfit("sleeveless", "long")
    outfit.top = dataclasses.replace(outfit.top, color=tuple(SKIN), color2=tuple(SKIN))
    dressed = _dress(body, surfaces, outfit)
    top = dressed.garment_masks["top"]
    assert np.abs(dressed.vertex_colors[top] - SKIN).max(axis=1).min() > 0.1


def test_checks_and_noise_patterns_vary(body, surfaces):
    rest = surfaces[0]
    for pattern in ("checks", "noise"):
        g = Garment(
            slot="top",
            kind="long",
            palette="x",
            color=(0, 0, 0),
            color2=(1, 1, 1),
            pattern=pattern,
            pattern_scale=0.05,
            pattern_seed=3,
        )
        mix = pattern_mix(rest, g)
        assert mix.min() >= 0 and mix.max() <= 1 and 0.15 < mix.mean() < 0.85, pattern


def test_shells_lie_outside_the_body_along_the_normals(body, surfaces):
    _, posed = surfaces
    for top, bottom in (("loose_shirt", "skirt"), ("coat", "long")):
        dressed = _dress(body, surfaces, _outfit(top, bottom, loose=True), pose_index=1)
        assert len(dressed.shells) == 2 if bottom == "skirt" else len(dressed.shells) >= 1
        v, n = posed[1]
        for shell in dressed.shells:
            src = shell.source_vertex
            assert src.dtype.kind == "i" and src.min() >= 0 and src.max() < body.num_vertices
            assert len(np.unique(src)) == len(src)
            assert shell.faces.min() >= 0 and shell.faces.max() < len(shell.vertices)
            assert shell.vertex_colors.shape == (len(shell.vertices), 3)
            along = ((shell.vertices - v[src]) * n[src]).sum(1)
            assert np.all(along > 0.002)  # pushed out along the normal
            assert np.allclose(shell.vertex_colors, dressed.vertex_colors[src])  # same cloth as beneath
    skirt = next(s for s in _dress(body, surfaces, _outfit("short", "skirt")).shells if s.name == "bottom")
    v, n = posed[0]
    depth = ((skirt.vertices - v[skirt.source_vertex]) * n[skirt.source_vertex]).sum(1)
    height = v[skirt.source_vertex, 1]
    low, high = height < np.percentile(height, 20), height > np.percentile(height, 80)
    assert depth[low].mean() > depth[high].mean() + 0.02  # the skirt flares out downwards


def test_tight_outfits_have_no_shells(body, surfaces):
    assert _dress(body, surfaces, _outfit("long", "long")).shells == []


def test_dress_rejects_wrong_shapes(body, surfaces):
    rest, posed = surfaces
    dresser = Dresser(body, AppearanceConfig())
    with pytest.raises(ValueError, match="dress: expected"):
        dresser.dress(_outfit(), _identity(), np.random.default_rng(0), rest[:10], posed[0][0], posed[0][1])
