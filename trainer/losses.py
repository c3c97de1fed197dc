"""The training objective: (a) part-and-identity InfoNCE, (b) dense soft vertex targets, (c) segmentation.

(a) The paper's objective: cosine similarities between sampled foreground pixel embeddings and ALL
    prototype points of the identities in the batch, divided by a learnable temperature; positives of a
    pixel are the points of the same identity AND the same part (multi-positive InfoNCE). Other parts of
    the same body and every part of the other bodies are negatives, so embeddings both register parts and
    separate identities.
(b) Dense refinement from vid.png (DensePose CSE spirit): a pixel whose body vertex is known gets a soft
    target over its identity's points, weight exp(-d^2 / 2 sigma^2) with d the rest-pose distance to the
    vertex's point, and is trained with soft cross-entropy over that identity's points.
(c) Cross-entropy of the 16-class part segmentation (erased pixels ignored).
"""

from __future__ import annotations

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


def contrastive_loss(
    pix: PixelSample,
    pix_rows: Tensor,
    point_emb: Tensor,
    point_parts: Tensor,
    temperature: Tensor,
) -> Tensor:
    """(a) multi-positive InfoNCE over all points of all identities in the batch.

    pix_rows (M,) = which of the P point sets is the pixel's identity; point_emb (P,N,D); point_parts (N,).
    """
    p, n, d = point_emb.shape
    logits = pix.embeddings @ point_emb.reshape(p * n, d).t() / temperature  # (M, P*N)
    same_id = pix_rows[:, None] == torch.arange(p, device=logits.device).repeat_interleave(n)[None]
    same_part = pix.parts[:, None] == point_parts.repeat(p)[None]
    pos = same_id & same_part
    lse_all = torch.logsumexp(logits, dim=1)
    lse_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
    return (lse_all - lse_pos).mean()


def dense_loss(
    pix: PixelSample,
    pix_rows: Tensor,
    point_emb: Tensor,
    point_xyz: Tensor,
    vertex_to_point: Tensor | None,
    temperature: Tensor,
    sigma: float,
) -> Tensor:
    """(b) soft cross-entropy over the pixel's own identity's points, targets by rest-pose distance."""
    if vertex_to_point is None:
        return point_emb.sum() * 0
    known = pix.vertex >= 0
    vtp = vertex_to_point.to(pix.vertex.device)
    known &= pix.vertex < len(vtp)
    target = torch.full_like(pix.vertex, -1)
    target[known] = vtp[pix.vertex[known]]
    known &= target >= 0
    if not bool(known.any()):
        return point_emb.sum() * 0
    rows = pix_rows[known]
    emb = pix.embeddings[known]  # (K, D)
    logits = torch.einsum("kd,knd->kn", emb, point_emb[rows]) / temperature  # (K, N)
    xyz = point_xyz[rows]  # (K, N, 3)
    true_xyz = xyz[torch.arange(len(rows), device=xyz.device), target[known]]  # (K, 3)
    d2 = ((xyz - true_xyz[:, None]) ** 2).sum(-1)
    weights = torch.softmax(-d2 / (2 * sigma**2), dim=1)
    return -(weights * torch.log_softmax(logits, dim=1)).sum(1).mean()


def segmentation_loss(feats: ImageFeatures, parts: Tensor, valid: Tensor) -> Tensor:
    """(c) CE at full resolution (logits upsampled bilinearly); erased pixels ignored."""
    logits = F.interpolate(feats.seg_logits, size=parts.shape[-2:], mode="bilinear", align_corners=False)
    target = parts.masked_fill(~valid, IGNORE)
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


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
) -> dict[str, Tensor]:
    """All terms and their weighted sum ('loss'). sample_rows (B,) = point set of each image's identity."""
    pix = sample_pixels(feats, parts, vid, valid, cfg.pixels_per_batch, generator)
    rows = sample_rows[pix.batch]
    zero = point_emb.sum() * 0
    lc = contrastive_loss(pix, rows, point_emb, point_parts, temperature) if len(rows) else zero
    ld = (
        dense_loss(pix, rows, point_emb, point_xyz, vertex_to_point, temperature, cfg.dense_sigma)
        if len(rows)
        else zero
    )
    ls = segmentation_loss(feats, parts, valid)
    total = cfg.w_contrast * lc + cfg.w_dense * ld + cfg.w_seg * ls
    return {"loss": total, "contrast": lc, "dense": ld, "seg": ls, "pixels": torch.tensor(float(len(rows)))}
