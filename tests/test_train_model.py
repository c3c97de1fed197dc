"""RegistrationNet's public API, the losses on hand-made cases, checkpoints and the config loader."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from trainer.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from trainer.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    model_fingerprint,
)
from trainer.losses import (
    PixelSample,
    contrastive_loss,
    dense_loss,
    identity_loss,
    material_loss,
    sample_pixels,
    segmentation_loss,
    similarity_logits,
    spread_loss,
    target_points,
)
from trainer.models import (
    EXPOSURE_GAIN,
    EXPOSURE_QUANTILE,
    AnchorReadout,
    ImageFeatures,
    RegistrationNet,
    count_parameters,
    exposure_normalised,
    farthest_points,
    knn_graph,
    neighbour_mean,
)
from trainer.validation import correspondence_scores, miou

TINY = ModelConfig(
    embed_dim=16, widths=(8, 16, 16, 24), decoder_width=16, point_widths=(16, 16), point_global=32
)


def test_encode_image_and_points_shapes_and_normalisation():
    torch.manual_seed(0)
    model = RegistrationNet(TINY).eval()
    feats = model.encode_image(torch.rand(2, 3, 64, 32))
    assert isinstance(feats, ImageFeatures) and feats.stride == 4
    assert feats.embeddings.shape == (2, 16, 16, 8) and feats.seg_logits.shape == (2, 16, 16, 8)
    assert torch.allclose(feats.embeddings.norm(dim=1), torch.ones(2, 16, 8), atol=1e-5)
    pts = torch.randn(3, 100, 3)
    emb = model.encode_points(pts, torch.randn(3, 100, 3), torch.rand(3, 100, 3))
    assert emb.shape == (3, 100, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3, 100), atol=1e-5)
    assert model.encode_points(pts).shape == (3, 100, 16)  # normals / albedo optional
    assert abs(float(model.temperature.detach()) - 0.07) < 1e-6 and model.temperature.requires_grad
    with pytest.raises(ValueError, match="expected \\(B,3,H,W\\)"):
        model.encode_image(torch.rand(3, 64, 32))


def test_point_embedding_of_a_set_does_not_depend_on_its_batch_mates():
    model = RegistrationNet(TINY).eval()
    pts = torch.randn(3, 80, 3)
    together = model.encode_points(pts)
    alone = model.encode_points(pts[1:2], neighbours=model.neighbours(pts))
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    model.set_point_graph(knn_graph(pts.mean(0), 6))  # what training does: one graph for the topology
    together = model.encode_points(pts)
    for i in range(3):
        assert torch.allclose(together[i : i + 1], model.encode_points(pts[i : i + 1]), atol=1e-5)
    assert model.encode_points(torch.randn(1, 50, 3)).shape == (1, 50, 16)  # other N: own graph


def test_knn_graph_is_cached_per_topology_and_mean_aggregation_is_exact():
    model = RegistrationNet(TINY)
    pts = torch.randn(2, 60, 3)
    g1 = model.neighbours(pts)
    assert model.neighbours(pts.clone()) is g1 and len(model._knn_cache) == 1
    nbrs = knn_graph(pts[0], 5)
    assert nbrs.shape == (60, 5) and not (nbrs == torch.arange(60)[:, None]).any()
    d = torch.cdist(pts[0], pts[0])
    assert torch.allclose(d.gather(1, nbrs).max(1).values, d.topk(6, largest=False).values[:, 5])
    v = torch.randn(2, 60, 4, requires_grad=True)
    from trainer.models import NeighbourGraph

    out = neighbour_mean(v, NeighbourGraph(nbrs))
    assert torch.allclose(out, v[:, nbrs].mean(2), atol=1e-6)
    out.sum().backward()
    expected = torch.bincount(nbrs.reshape(-1), minlength=60).float() / 5
    assert torch.allclose(v.grad[0, :, 0], expected, atol=1e-6)


def test_default_model_is_small():
    n = count_parameters(RegistrationNet(ModelConfig()))
    assert 150_000 < n < 1_500_000


def test_contrastive_loss_prefers_same_identity_same_part():
    # 2 identities x 4 points, parts [1, 1, 2, 2]; pixel of identity 0, part 2
    point_emb = torch.nn.functional.normalize(torch.randn(2, 4, 8), dim=-1)
    parts = torch.tensor([1, 1, 2, 2])
    good = PixelSample(torch.tensor([0]), point_emb[0, 2:3].clone(), torch.tensor([2]), torch.tensor([-1]))
    bad = PixelSample(torch.tensor([0]), point_emb[1, 0:1].clone(), torch.tensor([2]), torch.tensor([-1]))
    t = torch.tensor(0.07)
    rows = torch.tensor([0])

    def loss(pix: PixelSample, emb: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(similarity_logits(pix, emb, temp), pix, rows, parts)

    assert loss(good, point_emb, t) < loss(bad, point_emb, t)
    # exact value on a hand-computed case: orthogonal embeddings, one positive among 8
    eye = torch.eye(8).view(2, 4, 8)
    pix = PixelSample(torch.tensor([0]), eye[0, 2:3], torch.tensor([2]), torch.tensor([-1]))
    logits = torch.zeros(8)
    logits[2] = 1 / 0.5
    expected = torch.logsumexp(logits, 0) - torch.logsumexp(logits[2:4], 0)
    assert torch.allclose(loss(pix, eye, torch.tensor(0.5)), expected)


def test_identity_loss_compares_only_the_pixels_part_across_identities():
    eye = torch.eye(8).view(2, 4, 8)  # identity 0: e0..e3, identity 1: e4..e7; parts [1, 1, 2, 2]
    parts = torch.tensor([1, 1, 2, 2])
    pix = PixelSample(torch.tensor([0]), eye[0, 2:3], torch.tensor([2]), torch.tensor([-1]))
    logits = similarity_logits(pix, eye, torch.tensor(0.5))
    # softmax over the 4 part-2 points (2 per identity), positives = identity 0's two part-2 points
    same_part = torch.tensor([2.0, 0.0, 0.0, 0.0])
    expected = torch.logsumexp(same_part, 0) - torch.logsumexp(same_part[:2], 0)
    assert torch.allclose(identity_loss(logits, pix, torch.tensor([0]), parts), expected)
    one = similarity_logits(pix, eye[:1], torch.tensor(0.5))
    assert float(identity_loss(one, pix, torch.tensor([0]), parts)) == 0.0


def test_spread_loss_is_lowest_for_prototypes_far_apart_on_the_sphere():
    def sets(who: torch.Tensor) -> torch.Tensor:  # (P, 2 points, 2 where + 2 who dims)
        where = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(who.shape[0], 2, 2)
        return torch.cat([where, who[:, None, :].expand(-1, 2, -1)], dim=-1)

    apart = sets(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    close = sets(torch.tensor([[1.0, 0.0], [0.8, 0.6]]))
    # pairs of unit vectors: |w_i - w_j|^2 = 2 - 2 cos, loss = log mean exp(-2 |.|^2)
    assert torch.allclose(spread_loss(apart, 2), torch.tensor(-8.0))
    assert torch.allclose(spread_loss(close, 2), torch.tensor(-2 * 0.4))
    assert float(spread_loss(apart[:1], 2)) == 0.0 and float(spread_loss(apart, 0)) == 0.0


def test_material_loss_counts_only_pixels_with_known_garment_labels():
    garments = torch.zeros(2, 4, 4, dtype=torch.long)  # the batch's label + 1; 0 = the sample has none
    garments[0] = 1 + 1  # image 0: all skin
    garments[0, 0, :2] = 1 + 3  # two top pixels
    logits = torch.zeros(2, 6, 4, 4)
    logits[:, 1] = 3.0  # everything called skin
    feats = ImageFeatures(torch.zeros(2, 2, 4, 4), torch.zeros(2, 16, 4, 4), 1, logits)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[0, 3, 3] = False  # an erased pixel does not count either
    ce = torch.nn.functional.cross_entropy
    right = ce(logits[0, :, 1, 1][None], torch.tensor([1]))
    wrong = ce(logits[0, :, 0, 0][None], torch.tensor([3]))
    assert torch.allclose(material_loss(feats, garments, valid), (13 * right + 2 * wrong) / 15)
    assert float(material_loss(feats, torch.zeros_like(garments), valid)) == 0.0  # no labels: no loss
    plain = ImageFeatures(feats.embeddings, feats.seg_logits, 1)
    assert float(material_loss(plain, garments, valid)) == 0.0  # no material head: no loss


def test_material_head_adds_its_logits_and_feeds_the_colour_code():
    torch.manual_seed(0)
    model = RegistrationNet(ModelConfig(material_head=True)).eval()
    images = torch.rand(2, 3, 128, 64)
    feats = model.encode_image(images)
    assert feats.material_logits.shape == (2, 6, 32, 16) and feats.seg_logits.shape == (2, 16, 32, 16)
    assert model.image_encoder.part_colour[0].in_features == (16 + 6) * 7
    with torch.no_grad():  # the code reads the material masks: changing them changes the embeddings
        model.image_encoder.material.bias[1] += 5.0
    assert not torch.allclose(model.encode_image(images).embeddings, feats.embeddings)
    assert RegistrationNet().encode_image(images).material_logits is None


def test_exposure_normalisation_sets_the_level_and_makes_the_model_blind_to_a_global_gain():
    images = torch.rand(2, 3, 128, 64) * torch.tensor([0.4, 0.8])[:, None, None, None]
    out = exposure_normalised(images, 0.7)
    level = torch.quantile(out.mean(dim=1).flatten(1), EXPOSURE_QUANTILE, dim=1)
    assert torch.allclose(level, torch.tensor([0.7, 0.7]), atol=1e-5)
    assert float(out.max()) <= 1.0 and float(out.min()) >= 0.0
    black = exposure_normalised(torch.full((1, 3, 4, 4), 0.01), 0.7)  # the gain stops at its upper bound
    assert torch.allclose(black, torch.full((1, 3, 4, 4), 0.01 * EXPOSURE_GAIN[1]))
    torch.manual_seed(0)
    model = RegistrationNet(ModelConfig(material_head=True, auto_exposure=0.7)).eval()
    dim = torch.rand(2, 3, 128, 64) * 0.5  # a dim scene, and the same scene 2x brighter (nothing clips)
    a, b = model.encode_image(dim), model.encode_image(dim * 2)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-3)
    assert torch.allclose(a.seg_logits, b.seg_logits, atol=1e-3)
    plain = RegistrationNet(ModelConfig(material_head=True)).eval()
    assert not torch.allclose(
        plain.encode_image(dim).embeddings, plain.encode_image(dim * 2).embeddings, atol=1e-2
    )


def test_balanced_segmentation_loss_weighs_a_rare_part_like_a_common_one():
    parts = torch.zeros(1, 4, 4, dtype=torch.long)
    parts[0, 0, 0] = 8  # one hand pixel among 15 background pixels
    logits = torch.zeros(1, 16, 4, 4)
    logits[:, 0] = 2.0  # everything called background: right 15 times, wrong once
    feats = ImageFeatures(torch.zeros(1, 2, 4, 4), logits, 1)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy
    right = ce(logits[0, :, 1, 1][None], torch.tensor([0]))
    wrong = ce(logits[0, :, 0, 0][None], torch.tensor([8]))
    assert torch.allclose(segmentation_loss(feats, parts, valid), (15 * right + wrong) / 16)
    w_bg, w_hand = 16.0**-1, 2.0**-1  # (pixels + 1) ^ -1
    expected = (15 * w_bg * right + w_hand * wrong) / (15 * w_bg + w_hand)
    assert torch.allclose(segmentation_loss(feats, parts, valid, balance=1.0), expected)


def test_dense_loss_is_lowest_at_the_true_vertex():
    xyz = torch.tensor([[[0.0, 0, 0], [0.02, 0, 0], [0.5, 0, 0], [1.0, 0, 0]]])
    emb = torch.eye(4).view(1, 4, 4)
    vtp = torch.tensor([0, 1, 2, 3])
    t = torch.tensor(0.1)

    def loss_for(point: int) -> float:
        pix = PixelSample(torch.tensor([0]), emb[0, point : point + 1], torch.tensor([1]), torch.tensor([2]))
        target = target_points(pix, vtp, None)
        return float(dense_loss(similarity_logits(pix, emb, t), pix, torch.tensor([0]), xyz, target, 0.05))

    assert loss_for(2) < loss_for(1) and loss_for(2) < loss_for(3)
    # with only bank points 1 and 2 in use, vertex 2's point is local index 1
    pix = PixelSample(torch.tensor([0, 0]), emb[0, :2], torch.tensor([1, 1]), torch.tensor([2, 0]))
    assert target_points(pix, vtp, torch.tensor([1, 2])).tolist() == [1, -1]


def test_pixel_sampling_balances_parts_and_skips_invalid():
    emb = torch.nn.functional.normalize(torch.randn(1, 4, 16, 8), dim=1)
    feats = ImageFeatures(emb, torch.zeros(1, 16, 16, 8), 4)
    parts = torch.zeros(1, 64, 32, dtype=torch.long)
    parts[:, :60] = 2  # torso everywhere ...
    parts[:, :8, :8] = 1  # ... a little head
    valid = torch.ones(1, 64, 32, dtype=torch.bool)
    valid[:, 32:] = False
    pix = sample_pixels(feats, parts, parts.clone(), valid, 8, torch.Generator().manual_seed(0))
    assert len(pix.parts) == 8
    assert int((pix.parts == 1).sum()) >= 2  # rare parts are over-sampled
    assert len(pix.batch) == 8 and (pix.parts >= 1).all()
    all_pix = sample_pixels(feats, parts, parts.clone(), valid, 10_000, torch.Generator().manual_seed(0))
    assert len(all_pix.parts) == 8 * 8  # the valid top half of the grid only


def test_correspondence_scores_and_miou_on_known_cases():
    point_emb = torch.eye(4).view(2, 2, 4)  # identity 0: points e0 (part 1), e1 (part 2); identity 1: e2, e3
    point_parts = torch.tensor([1, 2])
    pix = torch.eye(4)[[0, 1, 2]]
    scores = correspondence_scores(pix, torch.tensor([1, 2, 1]), point_emb, point_parts, 0.5)
    assert scores.tolist() == pytest.approx([2 / 3, 1 / 3])
    conf = torch.zeros(16, 16, dtype=torch.int64).numpy()
    conf[0, 0], conf[1, 1], conf[1, 2] = 10, 3, 1
    assert miou(conf) == pytest.approx((1 + 3 / 4 + 0) / 3)


def test_farthest_points_spread_out_from_point_zero():
    line = torch.tensor([[float(x), 0.0, 0.0] for x in range(11)])
    assert farthest_points(line, 3).tolist() == [0, 10, 5]
    assert farthest_points(line, 50).shape == (11,)


def _body(girth: float = 1.0, hair: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy 'body': a vertical cylinder of radius 0.15 m * girth, with `hair` albedo on its top ring."""
    z = torch.linspace(0, 1.7, 18).repeat_interleave(24)
    angle = torch.linspace(0, 2 * torch.pi, 25)[:-1].repeat(18)
    r = 0.15 * girth
    xyz = torch.stack([r * angle.cos(), r * angle.sin(), z], dim=1)
    albedo = torch.full_like(xyz, 0.5)
    albedo[z > 1.65] = hair
    return xyz, albedo


def test_anchor_readout_sees_girth_and_hair_colour_and_any_point_count():
    torch.manual_seed(0)
    readout = AnchorReadout(16, 0.04, 8).eval()
    base, base_albedo = _body()
    readout.set_anchors(base)
    assert readout.anchors.abs().sum() > 0 and readout.anchors[0].tolist() == base[0].tolist()
    with torch.no_grad():
        ref = readout(base[None], base_albedo[None])
        wider = readout(_body(girth=1.1)[0][None], base_albedo[None])
        blond = readout(base[None], _body(hair=0.8)[1][None])
        assert not torch.allclose(wider, ref, atol=1e-3) and not torch.allclose(blond, ref, atol=1e-3)
        assert torch.allclose(readout(base[None], base_albedo[None]), ref)  # a function of the points
        assert readout(base[None, ::2], base_albedo[None, ::2]).shape == (1, 8)  # any N


def test_checkpoint_roundtrip_with_weights_only_and_refusals(tmp_path):
    cfg = TrainConfig(model=TINY)
    model = RegistrationNet(TINY)
    path = save_checkpoint(tmp_path / "c.pt", model, cfg, step=7)
    raw = torch.load(path, weights_only=True)
    assert raw["model_fingerprint"] == model_fingerprint(TINY) and raw["step"] == 7
    loaded, saved = load_model(path)
    assert saved["model"]["embed_dim"] == 16 and not loaded.training and loaded.point_graph is None
    model.set_point_graph(knn_graph(torch.randn(40, 3), 5))
    loaded2, _ = load_model(save_checkpoint(tmp_path / "g.pt", model, cfg, step=8))
    assert torch.equal(loaded2.point_graph, model.point_graph)
    model.set_anchors(torch.randn(40, 3))
    loaded3, _ = load_model(save_checkpoint(tmp_path / "a.pt", model, cfg, step=9))
    anchors = model.point_encoder.anchors.anchors
    assert anchors.abs().sum() > 0 and torch.equal(loaded3.point_encoder.anchors.anchors, anchors)
    x = torch.rand(1, 3, 32, 16)
    assert torch.allclose(loaded.encode_image(x).embeddings, model.eval().encode_image(x).embeddings)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable protoreg checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a protoreg training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_checkpoint_from_before_an_optional_model_key_still_loads(tmp_path):
    # a checkpoint written before model.auto_exposure existed: its config and fingerprint lack the key
    model = RegistrationNet(TINY)
    state = torch.load(
        save_checkpoint(tmp_path / "c.pt", model, TrainConfig(model=TINY), step=1), weights_only=True
    )
    old = {k: v for k, v in state["model_config"].items() if k != "auto_exposure"}
    state["model_config"] = old
    state["model_fingerprint"] = hashlib.sha256(
        json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert state["model_fingerprint"] == model_fingerprint(TINY)  # off: left out of the fingerprint
    torch.save(state, tmp_path / "old.pt")
    loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded.config.auto_exposure == 0.0
    assert model_fingerprint(ModelConfig(auto_exposure=0.7)) != model_fingerprint(ModelConfig())


def test_config_yaml_roundtrip_and_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  embed_dim: 24\n  widths: [8, 8, 16, 16]\nsteps: 5\n")
    cfg = load_config(p)
    assert cfg.model.embed_dim == 24 and cfg.model.widths == (8, 8, 16, 16) and cfg.steps == 5
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        config_from_dict({"stepz": 3})
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        config_from_dict({"optim": {"lr": "fast"}})
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
