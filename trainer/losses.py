"""The training objective: (a) part-and-identity InfoNCE, (b) dense soft vertex targets, (c) segmentation,
(d) spread of the prototypes' who-halves.

(a) The paper's objective: cosine similarities between sampled foreground pixel embeddings and ALL
    prototype points of the identities in the batch, divided by a learnable temperature; positives of a
    pixel are the points of the same identity AND the same part (multi-positive InfoNCE). Other parts of
    the same body and every part of the other bodies are negatives, so embeddings both register parts and
    separate identities.
(b) Dense refinement from vid.png (DensePose CSE spirit): a pixel whose body vertex is known gets a soft
    target over its identity's points, weight exp(-d^2 / 2 sigma^2) with d the rest-pose distance to the
    vertex's point, and is trained with soft cross-entropy over that identity's points.
(c) Cross-entropy of the 16-class part segmentation, classes weighted against their frequency.
(d) Uniformity of the batch's prototype who-halves on the sphere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from protoreg.parts import NUM_BODY_PARTS
from trainer.config import LossConfig
from trainer.models import ImageFeatures

IGNORE = -100


@dataclass
class PixelSample:
    """Sampled foreground pixels of a batch (on the stride grid)."""

    batch: Tensor  # (M,) sample index in the batch
    embeddings: Tensor  # (M, D)
    parts: Tensor  # (M,) 1..14
    vertex: Tensor  # (M,) vertex index, -1 unknown


def grid_labels(labels: Tensor, stride: int, hw: tuple[int, int]) -> Tensor:
    """Label maps (B,H,W) read at the centres of the stride-grid cells -> (B,h,w)."""
    off = stride // 2
    out = labels[:, off::stride, off::stride]
    return out[:, : hw[0], : hw[1]]


def sample_pixels(
    feats: ImageFeatures,
    parts: Tensor,
    vid: Tensor,
    valid: Tensor,
    max_pixels: int,
    generator: torch.Generator,
) -> PixelSample:
    """Up to max_pixels valid body-part pixels, balanced over parts (each part weighted 1/its count)."""
    emb = feats.embeddings
    hw = emb.shape[-2:]
    p = grid_labels(parts, feats.stride, hw)
    v = grid_labels(vid, feats.stride, hw)
    ok = grid_labels(valid, feats.stride, hw) & (p >= 1) & (p <= NUM_BODY_PARTS)
    idx = ok.reshape(-1).nonzero().squeeze(1).cpu()
    if idx.numel() == 0:
        d = emb.shape[1]
        z = torch.zeros(0, dtype=torch.long, device=emb.device)
        return PixelSample(z, emb.new_zeros(0, d), z, z)
    cand_parts = p.reshape(-1)[idx.to(p.device)].cpu()
    if idx.numel() > max_pixels:
        counts = torch.bincount(cand_parts, minlength=NUM_BODY_PARTS + 1).float()
        weights = 1.0 / counts[cand_parts]
        pick = torch.multinomial(weights, max_pixels, replacement=False, generator=generator)
        idx = idx[pick.sort().values]
    idx = idx.to(emb.device)
    b, h, w = p.shape
    bi = idx // (h * w)
    flat = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    return PixelSample(bi, flat[idx], p.reshape(-1)[idx], v.reshape(-1)[idx] - 1)


def similarity_logits(pix: PixelSample, point_emb: Tensor, temperature: Tensor) -> Tensor:
    """(M, P, N) cosine similarities / temperature between sampled pixels and every point of every set."""
    p, n, d = point_emb.shape
    return (pix.embeddings @ point_emb.reshape(p * n, d).t() / temperature).view(-1, p, n)


def positive_lse(logits: Tensor, pix: PixelSample, pix_rows: Tensor, point_parts: Tensor) -> Tensor:
    """(M,) log-sum-exp over each pixel's positives (its identity's points of its part), read from the
    pixel's own row only: P times less work than masking the whole (M, P*N) matrix."""
    own = logits[torch.arange(len(pix_rows), device=logits.device), pix_rows]  # (M, N)
    same_part = pix.parts[:, None] == point_parts[None, :]
    return torch.logsumexp(own.masked_fill(~same_part, float("-inf")), dim=1)


def contrastive_loss(
    logits: Tensor, pix: PixelSample, pix_rows: Tensor, point_parts: Tensor, positive: Tensor | None = None
) -> Tensor:
    """(a) multi-positive InfoNCE over all points of all identities in the batch.

    logits (M,P,N) from similarity_logits; pix_rows (M,) = which of the P point sets is the pixel's
    identity; point_parts (N,). Positives: same identity and same part. `positive`: positive_lse's result
    when the caller already has it (the step shares it with identity_loss).
    """
    if positive is None:
        positive = positive_lse(logits, pix, pix_rows, point_parts)
    return (torch.logsumexp(logits.flatten(1), dim=1) - positive).mean()


def identity_loss(
    logits: Tensor, pix: PixelSample, pix_rows: Tensor, point_parts: Tensor, positive: Tensor | None = None
) -> Tensor:
    """(a') the identity half of (a), isolated: the same positives, but the softmax runs over the points of
    the pixel's part only (in every identity of the batch), so parts cannot explain the loss away and
    the whole gradient asks "which person's <part> is this?" (0 when the batch holds one identity)."""
    m, p, n = logits.shape
    if p < 2:
        return logits.sum() * 0
    other_part = (pix.parts[:, None] != point_parts[None, :])[:, None, :]  # (M, 1, N), broadcast over P
    lse_part = torch.logsumexp(logits.masked_fill(other_part, float("-inf")).flatten(1), dim=1)
    if positive is None:
        positive = positive_lse(logits, pix, pix_rows, point_parts)
    return (lse_part - positive).mean()


def dense_loss(
    logits: Tensor,
    pix: PixelSample,
    pix_rows: Tensor,
    point_xyz: Tensor,
    target_point: Tensor,
    sigma: float,
) -> Tensor:
    """(b) soft cross-entropy over the pixel's own identity's points, targets by rest-pose distance.

    target_point (M,) = index of the pixel's true point among the N (-1 = unknown, excluded).
    """
    known = target_point >= 0
    if not bool(known.any()):
        return logits.sum() * 0
    idx = known.nonzero().squeeze(1)
    rows = pix_rows[idx]
    own = logits[idx, rows]  # (K, N): similarities to the pixel's own prototype only
    with torch.no_grad():
        xyz = point_xyz[rows]  # (K, N, 3)
        true_xyz = xyz[torch.arange(len(idx), device=xyz.device), target_point[idx]]
        d2 = ((xyz - true_xyz[:, None]) ** 2).sum(-1)
        weights = torch.softmax(-d2 / (2 * sigma**2), dim=1)
    return -(weights * torch.log_softmax(own, dim=1)).sum(1).mean()


def target_points(pix: PixelSample, vertex_to_point: Tensor | None, point_index: Tensor | None) -> Tensor:
    """(M,) each pixel's true point among the points used this step (-1 when unknown or not among them).

    vertex_to_point (V,) maps body vertices to the bank's points; point_index (N_used,) lists which bank
    points this step uses (None = all)."""
    out = torch.full_like(pix.vertex, -1)
    if vertex_to_point is None:
        return out
    vtp = vertex_to_point.to(pix.vertex.device)
    ok = (pix.vertex >= 0) & (pix.vertex < len(vtp))
    bank_pt = torch.full_like(pix.vertex, -1)
    bank_pt[ok] = vtp[pix.vertex[ok]]
    if point_index is None:
        return bank_pt
    n_bank = int(max(int(point_index.max()) + 1, int(bank_pt.max()) + 1, 1))
    local = torch.full((n_bank,), -1, dtype=torch.long, device=pix.vertex.device)
    local[point_index.to(pix.vertex.device)] = torch.arange(len(point_index), device=pix.vertex.device)
    has = bank_pt >= 0
    out[has] = local[bank_pt[has]]
    return out


def segmentation_loss(feats: ImageFeatures, parts: Tensor, valid: Tensor, balance: float = 0.0) -> Tensor:
    """(c) CE at full resolution (logits upsampled bilinearly); erased pixels ignored. `balance` b weights
    each class by (its pixels in the batch)^-b: with b = 0 the background and torso outweigh a hand a
    hundred to one and the arms, hands and feet are never predicted."""
    return balanced_cross_entropy(feats.seg_logits, parts, valid, balance)


def material_loss(
    feats: ImageFeatures, garments: Tensor | None, valid: Tensor, balance: float = 0.0
) -> Tensor:
    """(e) CE of the material head at full resolution against the garments.png labels (the batch carries
    label + 1, 0 where a sample has none: those pixels and erased ones are ignored), class-weighted as (c)."""
    if feats.material_logits is None or garments is None:
        return feats.seg_logits.sum() * 0
    known = valid & (garments > 0)
    if not bool(known.any()):
        return feats.material_logits.sum() * 0
    return balanced_cross_entropy(feats.material_logits, (garments - 1).clamp_min(0), known, balance)


def balanced_cross_entropy(logits: Tensor, labels: Tensor, keep: Tensor, balance: float) -> Tensor:
    """CE of (B, C, h, w) logits upsampled bilinearly to the (B, H, W) labels over the `keep` pixels, each
    class weighted by (its kept pixels in the batch + 1)^-balance (no weights at 0)."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    target = labels.masked_fill(~keep, IGNORE)
    weight = None
    if balance > 0:
        counts = torch.bincount(labels[keep].reshape(-1), minlength=logits.shape[1]).float()
        weight = (counts + 1).pow(-balance)
    return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)


def spread_loss(point_emb: Tensor, identity_dim: int) -> Tensor:
    """(d) Uniformity of the prototypes' who-halves (Wang & Isola 2020): log mean exp(-2 |w_i - w_j|^2) over
    pairs of the batch's prototypes. The pixel terms only ask a pixel to prefer its own prototype, which
    a who-half 0.9 cosine from its neighbour's satisfies at a margin no test image keeps; spreading the
    prototypes on the sphere widens that margin for every pixel at once (0 when fewer than two)."""
    p = point_emb.shape[0]
    if p < 2 or identity_dim <= 0:
        return point_emb.sum() * 0
    who = F.normalize(point_emb[:, 0, -identity_dim:].float(), dim=-1)
    d2 = (2 - 2 * who @ who.t()).clamp_min(0)
    off = ~torch.eye(p, dtype=torch.bool, device=who.device)
    return torch.logsumexp(-2 * d2[off], dim=0) - math.log(p * (p - 1))


def registration_losses(
    feats: ImageFeatures,
    point_emb: Tensor,
    point_xyz: Tensor,
    point_parts: Tensor,
    sample_rows: Tensor,
    parts: Tensor,
    vid: Tensor,
    valid: Tensor,
    temperature: Tensor,
    cfg: LossConfig,
    generator: torch.Generator,
    vertex_to_point: Tensor | None = None,
    point_index: Tensor | None = None,
    identity_dim: int = 0,
    garments: Tensor | None = None,
) -> dict[str, Tensor]:
    """All terms and their weighted sum ('loss').

    point_emb / point_xyz (P,N,D)/(P,N,3) and point_parts (N,) are the points used this step (bank points
    `point_index`, all when None); sample_rows (B,) = point set of each image's identity; identity_dim =
    the size of the embeddings' who-half (`models.identity_dims`), which (d) spreads (0: no spread term);
    garments = the batch's garments.png labels + 1 (0: none), for (e).
    """
    pix = sample_pixels(feats, parts, vid, valid, cfg.pixels_per_batch, generator)
    rows = sample_rows[pix.batch]
    zero = point_emb.sum() * 0
    if len(rows):
        logits = similarity_logits(pix, point_emb, temperature)
        pos = positive_lse(logits, pix, rows, point_parts)
        lc = contrastive_loss(logits, pix, rows, point_parts, pos)
        li = identity_loss(logits, pix, rows, point_parts, pos) if cfg.w_identity > 0 else zero
        tgt = target_points(pix, vertex_to_point, point_index)
        ld = dense_loss(logits, pix, rows, point_xyz, tgt, cfg.dense_sigma)
    else:
        lc = li = ld = zero
    ls = segmentation_loss(feats, parts, valid, cfg.seg_balance)
    lu = spread_loss(point_emb, identity_dim) if cfg.w_spread > 0 else zero
    lm = material_loss(feats, garments, valid, cfg.seg_balance) if cfg.w_material > 0 else zero
    total = cfg.w_contrast * lc + cfg.w_identity * li + cfg.w_dense * ld + cfg.w_seg * ls + cfg.w_spread * lu
    total = total + cfg.w_material * lm
    return {
        "loss": total,
        "contrast": lc,
        "identity": li,
        "dense": ld,
        "seg": ls,
        "spread": lu,
        "material": lm,
        "pixels": torch.tensor(float(len(rows))),
    }
