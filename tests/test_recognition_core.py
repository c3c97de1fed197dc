"""Correspondence rate, decision rule, shortlist and gallery file on hand-made embeddings (known answers)."""

from __future__ import annotations

from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from trainer.recognition import (
    UNKNOWN,
    Gallery,
    GalleryIdentity,
    Letterbox,
    RecognitionError,
    Recognizer,
    correspondence,
    decide,
    image_pixels,
    load_gallery,
    mirrored_box,
    part_descriptors,
    pixel_features_from_maps,
    rank_identities,
    set_gallery_attrs,
    write_gallery,
)


def unit(*v: float) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


E = np.eye(4, dtype=np.float32)  # four orthogonal point embeddings


def test_correspondence_rate_counts_only_confident_same_part_matches():
    point_emb = E  # points 0, 1 on the head (1); points 2, 3 on the torso (2)
    point_parts = np.array([1, 1, 2, 2])
    pixels = np.stack(
        [
            E[0],  # head pixel -> head point 0, similarity 1: matches
            unit(0.1, 0, 1, 0),  # head pixel whose best point (2) is on the torso: wrong part
            unit(1, 0, 0.3, -1),  # torso pixel: best is point 0 (head) -> wrong part
            unit(0.3, 0.3, 0.0, 0.4),  # torso pixel, best point 3 at cos 0.4/sqrt(0.34) = 0.686
            E[3],  # torso pixel -> point 3: matches
        ]
    )
    pixel_parts = np.array([1, 1, 2, 2, 2])
    c = correspondence(pixels, pixel_parts, point_emb, point_parts, threshold=0.7)
    assert c.best_point.tolist() == [0, 2, 0, 3, 3]
    assert c.same_part.tolist() == [True, False, False, True, True]
    assert c.matched.tolist() == [True, False, False, False, True]  # pixel 3: 0.686 < 0.7
    assert c.rate == pytest.approx(2 / 5)
    assert c.part_pixels[1] == 2 and c.part_pixels[2] == 3
    assert c.part_rate[1] == pytest.approx(0.5) and c.part_rate[2] == pytest.approx(1 / 3)
    assert np.isnan(c.part_rate[3])  # left upper arm not visible
    lower = correspondence(pixels, pixel_parts, point_emb, point_parts, threshold=0.6)
    assert lower.rate == pytest.approx(3 / 5)  # pixel 3 now counts
    assert c.mean_similarity == pytest.approx(1.0)


def test_correspondence_of_no_pixels_is_zero():
    c = correspondence(np.zeros((0, 4)), np.zeros(0, dtype=int), E, np.array([1, 1, 2, 2]), 0.5)
    assert c.rate == 0.0 and c.part_pixels.sum() == 0


def test_decision_picks_highest_rate_and_says_unknown_under_threshold():
    names = ["ann", "bob", "cy"]
    d = decide(names, [0.2, 0.7, 0.5], unknown_threshold=0.3)
    assert d.identity == "bob" and d.best == "bob" and d.ranking == [1, 2, 0]
    d = decide(names, [0.2, 0.7, 0.5], unknown_threshold=0.75)
    assert d.identity == UNKNOWN and d.best == "bob" and d.rate == pytest.approx(0.7)
    with pytest.raises(RecognitionError, match="no enrolled identities"):
        decide([], [], 0.0)


def test_ties_in_rate_are_broken_by_similarity_then_row():
    assert rank_identities([0.5, 0.5, 0.5], [0.8, 0.9, 0.8]) == [1, 0, 2]
    assert rank_identities([0.5, 0.6, 0.5]) == [1, 0, 2]


def test_part_descriptors_are_normalised_part_means():
    emb = np.stack([E[0], E[1], E[2]])
    desc, counts = part_descriptors(emb, np.array([1, 1, 5]))
    assert desc.shape == (14, 4)
    np.testing.assert_allclose(desc[0], unit(1, 1, 0, 0), atol=1e-6)
    np.testing.assert_allclose(desc[4], E[2], atol=1e-6)
    assert counts.tolist() == [2, 0, 0, 0, 1] + [0] * 9
    assert np.all(desc[1] == 0)


# ----------------------------------------------------------------------------------------------------------
# Three identities whose embeddings are known: a gallery, a fake model, and recognition end to end


D = 8
N = 6  # points per prototype: two on each of head (1), torso (2), left upper leg (9)
PARTS = np.array([1, 1, 2, 2, 9, 9], dtype=np.uint8)


def identities() -> list[GalleryIdentity]:
    rng = np.random.default_rng(0)
    out = []
    for k, name in enumerate(["alice", "bert", "chloe"]):
        emb = rng.normal(size=(N, D)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        pts = rng.normal(size=(N, 3)).astype(np.float32)
        out.append(GalleryIdentity(name, k, emb, PARTS.copy(), pts, np.arange(N, dtype=np.int32) * 7))
    return out


class HandModel:
    """encode_image returns a fixed 2x3 feature grid: pixels copying `source`'s head, torso and leg points."""

    def __init__(self, source: GalleryIdentity, stride: int = 4):
        self.source = source
        self.stride = stride

    def encode_image(self, images: torch.Tensor) -> SimpleNamespace:
        b = images.shape[0]
        emb = np.zeros((D, 2, 3), dtype=np.float32)
        seg = np.full((16, 2, 3), -5.0, dtype=np.float32)
        layout = [(0, 0, 0), (0, 1, 2), (0, 2, 4), (1, 0, 1), (1, 1, 3), (1, 2, 5)]  # (y, x, point)
        for y, x, p in layout:
            emb[:, y, x] = self.source.embeddings[p]
            seg[PARTS[p], y, x] = 5.0
        seg[0, 1, 2] = 10.0  # the last cell is background
        return SimpleNamespace(
            embeddings=torch.from_numpy(np.repeat(emb[None], b, 0)),
            seg_logits=torch.from_numpy(np.repeat(seg[None], b, 0)),
            stride=self.stride,
        )


def test_gallery_written_twice_is_byte_identical_and_round_trips(tmp_path):
    ids = identities()
    a = write_gallery(tmp_path / "a.h5", ids, {"model_fingerprint": "f" * 64, "sources": ["x"]})
    b = write_gallery(tmp_path / "b.h5", ids, {"model_fingerprint": "f" * 64, "sources": ["x"]})
    assert a.read_bytes() == b.read_bytes()
    gal = load_gallery(a)
    assert gal.names == ["alice", "bert", "chloe"] and gal.size == 3
    assert gal.model_fingerprint == "f" * 64 and gal.attrs["sources"] == ["x"]
    bert = gal.identity(1)
    np.testing.assert_allclose(bert.embeddings, ids[1].embeddings, atol=1e-3)  # float16 storage
    assert bert.vertex_ids.tolist() == [0, 7, 14, 21, 28, 35]
    rows = gal.rows([2, 0])
    np.testing.assert_allclose(rows["embeddings"][0], ids[2].embeddings, atol=1e-3)
    with h5py.File(a) as f:
        assert f["embeddings"].dtype == np.float16


def test_gallery_attrs_update_keeps_identities(tmp_path):
    path = write_gallery(tmp_path / "g.h5", identities(), {"model_fingerprint": "f"})
    set_gallery_attrs(path, {"unknown_threshold": 0.25, "calibration": {"n": 3}})
    gal = load_gallery(path)
    assert gal.unknown_threshold == 0.25 and gal.calibrated and gal.names == ["alice", "bert", "chloe"]


def test_bad_galleries_are_refused_in_one_line(tmp_path):
    with pytest.raises(RecognitionError, match="gallery file not found"):
        load_gallery(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(RecognitionError, match="not a readable HDF5 gallery"):
        load_gallery(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(RecognitionError, match="not a protoreg gallery"):
        load_gallery(other)
    with pytest.raises(RecognitionError, match="no identities to enrol"):
        write_gallery(tmp_path / "empty.h5", [], {})
    assert not (tmp_path / "empty.h5").exists()


@pytest.mark.parametrize("shortlist", [0, 1, 2])
def test_recognizer_names_the_identity_the_pixels_came_from(tmp_path, shortlist):
    ids = identities()
    gal = load_gallery(write_gallery(tmp_path / "g.h5", ids, {"model_fingerprint": "f"}))
    for k, ident in enumerate(ids):
        rec = Recognizer(
            HandModel(ident),
            gal,
            input_size=(12, 8),
            similarity_threshold=0.99,
            unknown_threshold=0.5,
            shortlist=shortlist,
        )
        out = rec.recognize(np.zeros((8, 12, 3), dtype=np.uint8))
        assert out.decision.identity == ident.name
        assert out.decision.ranking[0] == k
        assert out.candidates[0].rate == pytest.approx(1.0)  # all 5 foreground pixels correspond
        assert len(out.pixels.parts) == 5
        assert out.best.part_pixels[[1, 2, 9]].tolist() == [2, 2, 1]


def test_recognizer_says_unknown_for_a_stranger(tmp_path):
    ids = identities()
    gal = load_gallery(write_gallery(tmp_path / "g.h5", ids[:2], {"model_fingerprint": "f"}))
    rec = Recognizer(
        HandModel(ids[2]), gal, input_size=(12, 8), similarity_threshold=0.9, unknown_threshold=0.5
    )
    out = rec.recognize(np.zeros((8, 12, 3), dtype=np.uint8))
    assert out.decision.identity == UNKNOWN
    assert out.decision.rate < 0.5


def test_letterbox_padding_is_never_foreground():
    ident = identities()[0]
    model = HandModel(ident, stride=4)
    feats = model.encode_image(torch.zeros(1, 3, 8, 12))
    from trainer.recognition import Letterbox

    box = Letterbox(src_w=4, src_h=8, x0=4, y0=0, w=4, h=8)  # only the middle grid column is content
    px = pixel_features_from_maps(feats.embeddings[0].numpy(), feats.seg_logits[0].numpy(), 4, box)
    assert sorted(px.yx[:, 1].tolist()) == [1, 1]
    assert isinstance(Gallery, type)


def test_mirror_view_pools_the_mirror_images_pixels_mapped_back_onto_the_image():
    ident = identities()[0]
    model = HandModel(ident)
    images = np.zeros((1, 3, 8, 12), dtype=np.float32)
    ((own_only, counted_plain),) = image_pixels(model, images, [None], mirror=False)
    assert counted_plain is own_only
    ((own, counted),) = image_pixels(model, images, [None], mirror=True)
    assert len(own.parts) == 5 and len(counted.parts) == 10
    np.testing.assert_array_equal(counted.parts, np.concatenate([own.parts, own.parts]))
    # the mirror view's columns come back mirrored: grid column x of the mirror image is 2 - x here
    np.testing.assert_array_equal(counted.yx[5:, 1], 2 - own.yx[:, 1])
    np.testing.assert_array_equal(counted.yx[5:, 0], own.yx[:, 0])
    assert counted.seg is own.seg and counted.grid == own.grid
    box = Letterbox(src_w=4, src_h=8, x0=0, y0=0, w=4, h=8)  # content in the left third of a 12-wide input
    assert mirrored_box(box, 12) == Letterbox(src_w=4, src_h=8, x0=8, y0=0, w=4, h=8)
    # a view the same as the image (this model ignores its input) leaves every rate as it was
    gal_ids = identities()
    plain = [correspondence(own.embeddings, own.parts, g.embeddings, g.parts, 0.5).rate for g in gal_ids]
    pooled = [
        correspondence(counted.embeddings, counted.parts, g.embeddings, g.parts, 0.5).rate for g in gal_ids
    ]
    assert plain == pooled
