"""Validation during training: part segmentation, correspondence quality, identification.

- part-segmentation mIoU (16 classes, full resolution, classes absent from both truth and prediction skipped);
- the share of confident correspondences (best point of the TRUE identity's prototype with cosine >=
  threshold) that land on the pixel's true part;
- the mean rest-pose distance (metres) between the matched point and the point of the pixel's true vertex;
- identification rank-1 over the validation identities with the correspondence-rate rule
  (`correspondence_scores`); trainer/recognition.py implements the full recogniser.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from protoreg.parts import NUM_BODY_PARTS, NUM_LABELS
from trainer.config import TrainConfig
from trainer.data import (
    DataSource,
    attach_body_vertices,
    iterate_batches,
    load_prototype_bank,
    to_device_batch,
)
from trainer.losses import grid_labels
from trainer.models import RegistrationNet


def correspondence_scores(
    pixel_emb: Tensor, pixel_parts: Tensor, point_emb: Tensor, point_parts: Tensor, threshold: float
) -> Tensor:
    """Correspondence rate per identity: the share of pixels whose best point in that prototype has
    cosine >= threshold AND lies on the pixel's part.

    pixel_emb (M,D), pixel_parts (M,) predicted parts 1..14, point_emb (P,N,D), point_parts (N,) -> (P,).
    """
    if pixel_emb.shape[0] == 0:
        return torch.zeros(point_emb.shape[0])
    sims = torch.einsum("md,pnd->pmn", pixel_emb, point_emb)  # (P, M, N)
    best, idx = sims.max(dim=2)
    ok = (best >= threshold) & (point_parts[idx] == pixel_parts[None])
    return ok.float().mean(dim=1)


def identity_scores(
    pixel_emb: Tensor, pixel_parts: Tensor, point_emb: Tensor, point_parts: Tensor, threshold: float
) -> Tensor:
    """Correspondence rate per identity, ties broken by the mean best similarity (an image with no
    confident pixel would otherwise always rank the first identity first)."""
    if pixel_emb.shape[0] == 0:
        return torch.zeros(point_emb.shape[0])
    best, idx = torch.einsum("md,pnd->pmn", pixel_emb, point_emb).max(dim=2)
    rate = ((best >= threshold) & (point_parts[idx] == pixel_parts[None])).float().mean(dim=1)
    return rate + 1e-4 * best.mean(dim=1)


def encode_bank(model: RegistrationNet, bank, device: torch.device, chunk: int = 16) -> Tensor:  # noqa: ANN001
    outs = []
    with torch.no_grad():
        for s in range(0, len(bank.names), chunk):
            sl = slice(s, s + chunk)
            outs.append(
                model.encode_points(
                    bank.points[sl].to(device), bank.normals[sl].to(device), bank.albedo[sl].to(device)
                )
            )
    return torch.cat(outs)


def miou(confusion: np.ndarray) -> float:
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0


def validate(
    model: RegistrationNet, source: DataSource, cfg: TrainConfig, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """The four validation figures (keys val_miou, val_part_accuracy, val_vertex_error_m, val_rank1, ...)."""
    device = torch.device(device)
    bank = load_prototype_bank(source.prototypes, cfg.data.max_points)
    attach_body_vertices(bank, source.manifest)
    point_emb = encode_bank(model, bank, device)  # (P, N, D)
    point_parts = bank.parts.to(device)
    xyz = bank.points.to(device)
    vtp = bank.vertex_to_point.to(device) if bank.vertex_to_point is not None else None
    confusion = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
    n_conf = n_conf_right = n_pix = 0
    err_sum, err_n = 0.0, 0
    rank1_hits, images = 0, 0
    thr = cfg.val_threshold
    with torch.no_grad():
        for batch in iterate_batches(
            source.urls, cfg.data.batch_size, tuple(cfg.model.image_size), cfg.data.val_samples
        ):
            batch = to_device_batch(batch, device)
            imgs = batch["images"]
            feats = model.encode_image(imgs)
            parts = batch["parts"]
            logits = F.interpolate(
                feats.seg_logits, size=parts.shape[-2:], mode="bilinear", align_corners=False
            )
            pred = logits.argmax(1)
            confusion += np.bincount(
                (parts * NUM_LABELS + pred).reshape(-1).cpu().numpy(), minlength=NUM_LABELS**2
            ).reshape(NUM_LABELS, NUM_LABELS)
            hw = feats.embeddings.shape[-2:]
            gt_grid = grid_labels(parts, feats.stride, hw)
            vid_grid = grid_labels(batch["vid"], feats.stride, hw)
            pred_grid = feats.seg_logits.argmax(1)
            rows = bank.rows(batch["identity"]).to(device)
            for i in range(imgs.shape[0]):
                emb = feats.embeddings[i].permute(1, 2, 0).reshape(-1, feats.embeddings.shape[1])
                gt = gt_grid[i].reshape(-1)
                body = (gt >= 1) & (gt <= NUM_BODY_PARTS)
                own = point_emb[rows[i]]  # (N, D)
                if bool(body.any()):
                    sims = emb[body] @ own.t()
                    best, idx = sims.max(dim=1)
                    conf = best >= thr
                    n_pix += int(body.sum())
                    n_conf += int(conf.sum())
                    n_conf_right += int((conf & (point_parts[idx] == gt[body])).sum())
                    if vtp is not None:
                        v = vid_grid[i].reshape(-1)[body] - 1
                        known = (v >= 0) & (v < len(vtp))
                        tgt = torch.full_like(v, -1)
                        tgt[known] = vtp[v[known]]
                        known &= tgt >= 0
                        if bool(known.any()):
                            p = xyz[rows[i]]
                            err_sum += float((p[idx[known]] - p[tgt[known]]).norm(dim=1).sum())
                            err_n += int(known.sum())
                fg = pred_grid[i].reshape(-1)
                fgm = (fg >= 1) & (fg <= NUM_BODY_PARTS)
                scores = identity_scores(emb[fgm], fg[fgm], point_emb, point_parts, thr)
                rank1_hits += int(int(scores.argmax()) == int(rows[i]))
                images += 1
    return {
        "val_miou": round(miou(confusion), 4),
        "val_part_accuracy": round(n_conf_right / max(n_conf, 1), 4),
        "val_confident_share": round(n_conf / max(n_pix, 1), 4),
        "val_vertex_error_m": round(err_sum / max(err_n, 1), 4),
        "val_rank1": round(rank1_hits / max(images, 1), 4),
        "val_images": float(images),
    }


def summarize(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k[4:]} {v}" for k, v in metrics.items() if k.startswith("val_"))
