"""Evaluation of recognition on a labelled test set: identification, verification, registration quality.

Every test image is registered against every enrolled identity (no shortlist: the figures are those of
the decision rule itself). From the per-(image, identity) correspondence rates come Rank-k / CMC, mAP,
the confusion matrix, the verification ROC (EER, TAR at FAR 1%) and the genuine / impostor histograms;
from the registration against the true identity come per-part segmentation accuracy and the
correspondence error in metres against the ground-truth vertices (vid.png). Similarity histograms per
pair give the rates at any confidence threshold T, hence the Rank-1 / correspondence-rate vs T curve and
the calibration of T and the open-set threshold U. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protoreg.parts import BODY_PART_IDS, NUM_LABELS, PART_NAMES
from trainer.recognition import (
    UNKNOWN,
    Decision,
    Gallery,
    PixelFeatures,
    Recognition,
    decide,
    image_pixels,
    letterbox,
    own_registration,
    register_rows,
)

SIM_BINS = 200  # similarity histogram bins over [-1, 1]: the T sweep is exact at multiples of 0.01
T_GRID = np.round(np.arange(0.0, 1.0001, 0.025), 4)  # thresholds of the Rank-1 / rate vs T curve
FAR_TARGET = 0.01


# ----------------------------------------------------------------------------------------------------------
# Per-image results


@dataclass
class QueryResult:
    """What evaluation keeps of one test image (small: no pixels, no embeddings)."""

    key: str
    true_row: int  # gallery row of the person in the image, -1 when not enrolled
    rates: np.ndarray  # (I,) correspondence rate against every identity at threshold T
    tie_break: np.ndarray  # (I,) mean similarity of corresponding pixels
    sim_hist: np.ndarray  # (I, SIM_BINS) int32: same-part pixels per best-similarity bin
    n_foreground: int  # the foreground pixels the rates count (the image's own and its mirror view's)
    seg_confusion: np.ndarray  # (16, 16) int64 ground truth (rows) x predicted (cols) at the feature grid
    corr_error: np.ndarray  # (M,) metres, best match vs true vertex, pixels with a known vertex
    corr_error_matched: np.ndarray  # (M',) the same for corresponding pixels only
    decision: Decision | None = None


def similarity_histogram(best_similarity: np.ndarray, same_part: np.ndarray) -> np.ndarray:
    """(SIM_BINS,) counts of same-part pixels by best similarity, so rate(T) = tail sum / foreground."""
    s = best_similarity[same_part]
    idx = np.clip(np.floor((s + 1.0) * (SIM_BINS / 2) + 1e-6).astype(np.int64), 0, SIM_BINS - 1)
    return np.bincount(idx, minlength=SIM_BINS).astype(np.int32)


def rates_at(sim_hist: np.ndarray, n_foreground: np.ndarray | int, threshold: float) -> np.ndarray:
    """Correspondence rates at threshold T from similarity histograms (..., SIM_BINS)."""
    first = int(np.clip(np.round((threshold + 1.0) * SIM_BINS / 2), 0, SIM_BINS))
    tail = sim_hist[..., first:].sum(axis=-1)
    return tail / np.maximum(np.asarray(n_foreground), 1)


def seg_confusion_at_grid(
    pred: np.ndarray, gt_parts: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """(16, 16) confusion of predicted vs true labels at the grid cells' centre pixels, and the centres."""
    h, w = pred.shape
    cy = np.minimum(np.arange(h) * stride + stride // 2, gt_parts.shape[0] - 1)
    cx = np.minimum(np.arange(w) * stride + stride // 2, gt_parts.shape[1] - 1)
    gt = gt_parts[cy[:, None], cx[None, :]].astype(np.int64)
    conf = np.bincount(gt.ravel() * NUM_LABELS + pred.astype(np.int64).ravel(), minlength=NUM_LABELS**2)
    return conf.reshape(NUM_LABELS, NUM_LABELS), np.stack(np.meshgrid(cy, cx, indexing="ij"), axis=-1)


def correspondence_errors(
    pixels: PixelFeatures,
    best_point: np.ndarray,
    matched: np.ndarray,
    gt_vid: np.ndarray,
    points: np.ndarray,
    vertex_positions: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Metres between each pixel's matched prototype point and the true surface point (rest pose).

    The true point is the ground-truth vertex of the pixel's centre (vid.png) on the identity's rest
    mesh; pixels without a known vertex are left out.
    """
    if vertex_positions is None or len(pixels.parts) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    s = pixels.stride
    ys = np.minimum(pixels.yx[:, 0] * s + s // 2, gt_vid.shape[0] - 1)
    xs = np.minimum(pixels.yx[:, 1] * s + s // 2, gt_vid.shape[1] - 1)
    vid = gt_vid[ys, xs].astype(np.int64)
    known = (vid > 0) & (vid <= len(vertex_positions))
    err = np.linalg.norm(points[best_point[known]] - vertex_positions[vid[known] - 1], axis=1).astype(
        np.float32
    )
    return err, err[matched[known]]


# ----------------------------------------------------------------------------------------------------------
# Metrics (pure functions of the per-image results)


def true_ranks(rates: np.ndarray, tie: np.ndarray, true_rows: np.ndarray) -> np.ndarray:
    """1-based rank of each query's true identity in the decision rule's order (rate, then similarity)."""
    out = np.empty(len(true_rows), dtype=np.int64)
    for q, t in enumerate(true_rows):
        r, b = rates[q], tie[q]
        better = (
            (r > r[t]) | ((r == r[t]) & (b > b[t])) | ((r == r[t]) & (b == b[t]) & (np.arange(len(r)) < t))
        )
        out[q] = 1 + int(better.sum())
    return out


def expected_rank1(rates: np.ndarray, true_rows: np.ndarray) -> float:
    """Share of queries ranked first, counting a tie for first among k identities as 1/k (no arbitrary
    tie-break: at high thresholds many rates are equal)."""
    if len(true_rows) == 0:
        return 0.0
    genuine = rates[np.arange(len(true_rows)), true_rows]
    better = (rates > genuine[:, None]).sum(axis=1)
    tied = (rates == genuine[:, None]).sum(axis=1)  # includes the true identity itself
    return float(np.mean(np.where(better == 0, 1.0 / tied, 0.0)))


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for the default z): how far a Rank-1 measured on n
    test images can sit from the true one by sampling alone (200 images: about +-6 points), so two runs
    whose intervals overlap widely are not evidence that one design is better."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def cmc_curve(ranks: np.ndarray, size: int) -> np.ndarray:
    """(size,) share of queries whose true identity is within the top k, k = 1..size."""
    if len(ranks) == 0:
        return np.zeros(size)
    return np.array([(ranks <= k).mean() for k in range(1, size + 1)])


def mean_average_precision(ranks: np.ndarray) -> float:
    """With one gallery entry per identity, a query's average precision is 1 / rank of its identity."""
    return float(np.mean(1.0 / ranks)) if len(ranks) else 0.0


@dataclass
class Roc:
    far: np.ndarray
    tar: np.ndarray
    thresholds: np.ndarray
    eer: float
    eer_threshold: float
    tar_at_far: float  # at FAR_TARGET
    auc: float


def roc_curve(scores: np.ndarray, genuine: np.ndarray, far_target: float = FAR_TARGET) -> Roc:
    """Verification ROC with similarity as the score and genuine pairs as positives (accept if score >= t)."""
    scores = np.asarray(scores, dtype=np.float64)
    genuine = np.asarray(genuine, dtype=bool)
    n_pos, n_neg = int(genuine.sum()), int((~genuine).sum())
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    if n_pos == 0 or n_neg == 0:
        z = np.zeros(len(thresholds))
        return Roc(z, z, thresholds, float("nan"), float("nan"), float("nan"), float("nan"))
    pos_sorted = np.sort(scores[genuine])
    neg_sorted = np.sort(scores[~genuine])
    tar = 1.0 - np.searchsorted(pos_sorted, thresholds, side="left") / n_pos
    far = 1.0 - np.searchsorted(neg_sorted, thresholds, side="left") / n_neg
    frr = 1.0 - tar
    finite = np.isfinite(thresholds)
    i = int(np.flatnonzero(finite)[np.argmin(np.abs(far - frr)[finite])])
    eer = float((far[i] + frr[i]) / 2)
    ok = far <= far_target + 1e-12
    tar_at = float(tar[ok].max()) if ok.any() else 0.0
    auc = float(np.trapz(tar, far))
    return Roc(far, tar, thresholds, eer, float(thresholds[i]), tar_at, auc)


def confusion_matrix(true_rows: np.ndarray, pred_rows: np.ndarray, size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.int64)
    np.add.at(m, (true_rows, pred_rows), 1)
    return m


def part_metrics(conf: np.ndarray) -> dict[str, Any]:
    """Per-part IoU and accuracy (recall) of the predicted segmentation, and their means over body parts."""
    tp = np.diag(conf).astype(np.float64)
    gt = conf.sum(axis=1).astype(np.float64)
    pr = conf.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt + pr - tp)
        acc = tp / gt
    body = list(BODY_PART_IDS)
    return {
        "pixel_accuracy": float(tp.sum() / max(conf.sum(), 1)),
        "mean_iou_body": float(np.nanmean(iou[body])) if np.isfinite(iou[body]).any() else float("nan"),
        "mean_accuracy_body": float(np.nanmean(acc[body])) if np.isfinite(acc[body]).any() else float("nan"),
        "per_part": {
            PART_NAMES[p]: {"iou": _f(iou[p]), "accuracy": _f(acc[p]), "pixels": int(gt[p])}
            for p in range(NUM_LABELS)
        },
    }


def _f(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


def threshold_sweep(results: Sequence[QueryResult], grid: np.ndarray = T_GRID) -> dict[str, list[float]]:
    """Rank-1 and the mean genuine correspondence rate at each confidence threshold T (closed set)."""
    enrolled = [r for r in results if r.true_row >= 0]
    rank1, genuine, impostor = [], [], []
    for t in grid:
        if not enrolled:
            rank1.append(0.0)
            genuine.append(0.0)
            impostor.append(0.0)
            continue
        rates = np.stack([rates_at(r.sim_hist, r.n_foreground, float(t)) for r in enrolled])
        rows = np.array([r.true_row for r in enrolled])
        rank1.append(expected_rank1(rates, rows))
        genuine.append(float(rates[np.arange(len(rows)), rows].mean()))
        mask = np.ones_like(rates, dtype=bool)
        mask[np.arange(len(rows)), rows] = False
        impostor.append(float(rates[mask].mean()) if mask.any() else 0.0)
    return {
        "threshold": [float(t) for t in grid],
        "rank1": rank1,
        "genuine_rate": genuine,
        "impostor_rate": impostor,
    }


@dataclass
class Calibration:
    """The thresholds recognition uses, chosen on validation data."""

    similarity_threshold: float  # T: the one with the best Rank-1 (ties: widest genuine-impostor margin)
    unknown_threshold: float  # U: equal-error point between genuine and best-impostor rates at T
    rank1: float
    eer_open_set: float
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {k: round(float(v), 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def best_impostor_rates(rates: np.ndarray, true_rows: np.ndarray) -> np.ndarray:
    """Each query's highest rate among the OTHER identities: what an unenrolled person would score."""
    masked = rates.copy()
    masked[np.arange(len(true_rows)), true_rows] = -np.inf
    return masked.max(axis=1)


def calibrate(results: Sequence[QueryResult], grid: np.ndarray = T_GRID) -> Calibration:
    """Choose T (best Rank-1, then widest margin) and U (open-set EER point) on validation results."""
    enrolled = [r for r in results if r.true_row >= 0]
    if not enrolled:
        raise ValueError("calibration: no validation image shows an enrolled identity")
    rows = np.array([r.true_row for r in enrolled])
    n_fg = np.array([r.n_foreground for r in enrolled])
    hists = np.stack([r.sim_hist for r in enrolled])
    best: tuple[float, float, float] | None = None
    for t in grid:
        rates = rates_at(hists, n_fg[:, None], float(t))
        genuine = rates[np.arange(len(rows)), rows]
        margin = float(np.mean(genuine - best_impostor_rates(rates, rows))) if rates.shape[1] > 1 else 0.0
        key = (round(expected_rank1(rates, rows), 9), margin, float(t))
        if best is None or key[:2] > best[:2]:
            best = key
    rank1, _, t_best = best
    rates = rates_at(hists, n_fg[:, None], t_best)
    genuine = rates[np.arange(len(rows)), rows]
    if rates.shape[1] > 1:
        impostor = best_impostor_rates(rates, rows)
        roc = roc_curve(
            np.concatenate([genuine, impostor]),
            np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]),
        )
        u, eer = roc.eer_threshold, roc.eer
    else:
        u, eer = float(np.quantile(genuine, 0.05)), float("nan")
    return Calibration(float(t_best), float(u), float(rank1), float(eer), len(enrolled))


# ----------------------------------------------------------------------------------------------------------
# Running the model over a test set


@dataclass
class Evaluator:
    """Registers test images against every gallery identity and keeps the per-image results."""

    model: Any
    gallery: Gallery
    input_size: tuple[int, int]  # (W, H)
    similarity_threshold: float
    unknown_threshold: float
    vertex_positions: dict[int, np.ndarray] = field(default_factory=dict)  # gallery row -> (V, 3) rest mesh
    batch_size: int = 16
    keep_examples: int = 8
    examples: list[tuple[np.ndarray, Recognition, str]] = field(default_factory=list)
    mirror: bool = True  # rates count the mirror image's pixels too (recognition.image_pixels)

    def row_of_sample(self, meta: dict[str, Any], identity_id: int) -> int:
        ident = meta.get("identity") if isinstance(meta, dict) else None
        name = ident.get("name") if isinstance(ident, dict) else None
        if name is not None and name in self.gallery.names:
            return self.gallery.names.index(name)
        if name is None:
            hits = np.flatnonzero(self.gallery.identity_ids == identity_id)
            return int(hits[0]) if len(hits) else -1
        return -1

    def run(self, samples: Iterable[dict[str, Any]], progress: Any = None) -> list[QueryResult]:
        results: list[QueryResult] = []
        batch: list[dict[str, Any]] = []
        for s in samples:
            batch.append(s)
            if len(batch) == self.batch_size:
                results.extend(self._run_batch(batch))
                if progress is not None:
                    progress.update(len(batch))
                batch = []
        if batch:
            results.extend(self._run_batch(batch))
            if progress is not None:
                progress.update(len(batch))
        return results

    def _run_batch(self, batch: list[dict[str, Any]]) -> list[QueryResult]:
        boxed = [letterbox(s["rgb"], self.input_size) for s in batch]
        images, boxes = np.stack([b[0] for b in boxed]), [b[1] for b in boxed]
        views = image_pixels(self.model, images, boxes, self.mirror)
        return [self._query(s, *view, box) for s, view, box in zip(batch, views, boxes, strict=True)]

    def _query(self, s: dict[str, Any], px: PixelFeatures, counted: PixelFeatures, box: Any) -> QueryResult:
        """Rates, histograms and the decision from `counted`; segmentation, correspondence error and the
        example pictures from the image's own pixels `px`."""
        gal = self.gallery
        rows = list(range(gal.size))
        regs = register_rows(counted, gal, rows, self.similarity_threshold)
        rates = np.array([c.rate for c in regs])
        tie = np.array([c.mean_similarity for c in regs])
        hist = np.stack([similarity_histogram(c.best_similarity, c.same_part) for c in regs])
        true_row = self.row_of_sample(s.get("json", {}), int(s.get("identity", -1)))
        gt_parts = _labels_at_input(s["parts"], box, self.input_size)
        gt_vid = _labels_at_input(s["vid"], box, self.input_size)
        conf, _ = seg_confusion_at_grid(px.seg, gt_parts, px.stride)
        err_all = err_matched = np.zeros(0, np.float32)
        if true_row >= 0:
            c = own_registration(px, counted, regs[true_row], gal, true_row, self.similarity_threshold)
            pts = gal.rows([true_row], ("points",))["points"][0]
            err_all, err_matched = correspondence_errors(
                px, c.best_point, c.matched, gt_vid, pts, self.vertex_positions.get(true_row)
            )
        decision = decide(gal.names, rates, self.unknown_threshold, tie)
        q = QueryResult(
            str(s.get("key", "")),
            true_row,
            rates,
            tie,
            hist,
            len(counted.parts),  # what the rates count (with the mirror view, twice the image's own)
            conf,
            err_all,
            err_matched,
            decision,
        )
        self._maybe_keep_example(s, px, counted, box, regs, decision, true_row)
        return q

    def _maybe_keep_example(self, s, px, counted, box, regs, decision, true_row) -> None:  # noqa: ANN001
        """Keep the first few answers of each outcome (with the registration of the image's own pixels
        against the top identity) for the report."""
        if true_row < 0 or len(self.examples) >= self.keep_examples:
            return
        outcome = answer_outcome(decision, self.gallery.names[true_row])
        have = sum(1 for _, _, o in self.examples if o == outcome)
        if have >= -(-self.keep_examples // len(OUTCOMES)):  # an equal share, rounded up
            return
        top = decision.ranking[0]
        rec = Recognition(
            decision=decision,
            candidates=[],
            pixels=px,
            best=own_registration(px, counted, regs[top], self.gallery, top, self.similarity_threshold),
            best_identity=self.gallery.identity(top),
            box=box,
            similarity_threshold=self.similarity_threshold,
        )
        self.examples.append((s["rgb"], rec, outcome))


OUTCOMES = ("correct", "wrong", "unknown")


def answer_outcome(decision: Decision, truth: str) -> str:
    """What the system answered, as the example files are named: the right person ("correct"), someone
    else ("wrong"), or nobody ("unknown": the top rate fell under the open-set threshold, whoever ranked
    first)."""
    if decision.identity == UNKNOWN:
        return "unknown"
    return "correct" if decision.identity == truth else "wrong"


def _labels_at_input(labels: np.ndarray, box: Any, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth label map placed like the image in the model input (nearest), 0 in the padding."""
    from PIL import Image

    w, h = size
    out = np.zeros((h, w), dtype=labels.dtype)
    if (box.w, box.h) == labels.shape[::-1]:
        resized = labels
    else:
        mode_img = Image.fromarray(labels.astype(np.int32) if labels.dtype != np.uint8 else labels)
        resized = np.asarray(mode_img.resize((box.w, box.h), Image.Resampling.NEAREST)).astype(labels.dtype)
    out[box.y0 : box.y0 + box.h, box.x0 : box.x0 + box.w] = resized
    return out


# ----------------------------------------------------------------------------------------------------------
# Summaries, figures and the report


def summarize(
    results: Sequence[QueryResult], gallery: Gallery, similarity_threshold: float, unknown_threshold: float
) -> dict[str, Any]:
    """All report numbers as plain JSON."""
    enrolled = [r for r in results if r.true_row >= 0]
    size = gallery.size
    out: dict[str, Any] = {
        "images": len(results),
        "images_with_enrolled_identity": len(enrolled),
        "gallery_identities": size,
        "similarity_threshold": similarity_threshold,
        "unknown_threshold": unknown_threshold,
        "chance_rank1": 1.0 / size,
    }
    if enrolled:
        rates = np.stack([r.rates for r in enrolled])
        tie = np.stack([r.tie_break for r in enrolled])
        rows = np.array([r.true_row for r in enrolled])
        ranks = true_ranks(rates, tie, rows)
        cmc = cmc_curve(ranks, size)
        pred = np.array([r.decision.ranking[0] for r in enrolled])
        genuine = np.zeros_like(rates, dtype=bool)
        genuine[np.arange(len(rows)), rows] = True
        roc = roc_curve(rates.ravel(), genuine.ravel())
        unknown_said = np.array([r.decision.identity == "unknown" for r in enrolled])
        out.update(
            {
                "rank1": float(cmc[0]),
                "rank1_ci95": list(wilson_interval(int((ranks == 1).sum()), len(rows))),
                "rank5": float(cmc[min(4, size - 1)]),
                "rank10": float(cmc[min(9, size - 1)]),
                "cmc": [float(x) for x in cmc],
                "mAP": mean_average_precision(ranks),
                "confusion": confusion_matrix(rows, pred, size).tolist(),
                "verification": {
                    "eer": roc.eer,
                    "eer_threshold": roc.eer_threshold,
                    "tar_at_far_1pct": roc.tar_at_far,
                    "auc": roc.auc,
                },
                "genuine_rate_mean": float(rates[genuine].mean()),
                "impostor_rate_mean": float(rates[~genuine].mean()) if (~genuine).any() else None,
                "open_set": {
                    "answered_unknown": float(unknown_said.mean()),
                    "correct_and_accepted": float(((pred == rows) & ~unknown_said).mean()),
                    "impostor_accept_rate_if_unenrolled": float(
                        (best_impostor_rates(rates, rows) >= unknown_threshold).mean()
                    )
                    if size > 1
                    else None,
                },
                "per_identity_rank1": {
                    gallery.names[i]: _f(float((pred[rows == i] == i).mean()))
                    for i in range(size)
                    if (rows == i).any()
                },
            }
        )
    conf = sum((r.seg_confusion for r in results), np.zeros((NUM_LABELS, NUM_LABELS), np.int64))
    out["segmentation"] = part_metrics(conf)
    err = np.concatenate([r.corr_error for r in results]) if results else np.zeros(0)
    err_m = np.concatenate([r.corr_error_matched for r in results]) if results else np.zeros(0)
    out["correspondence_error_m"] = {
        "pixels": int(len(err)),
        "mean": _f(float(err.mean())) if len(err) else None,
        "median": _f(float(np.median(err))) if len(err) else None,
        "within_0.10m": _f(float((err <= 0.10).mean())) if len(err) else None,
        "matched_pixels": int(len(err_m)),
        "matched_mean": _f(float(err_m.mean())) if len(err_m) else None,
        "matched_median": _f(float(np.median(err_m))) if len(err_m) else None,
    }
    out["threshold_sweep"] = threshold_sweep(results)
    return out


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> str:
    plt = _plt()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path.name


def write_figures(
    out: Path, summary: dict[str, Any], results: Sequence[QueryResult], gallery: Gallery
) -> dict[str, str]:
    """The report's PNGs; returns figure name -> file name."""
    plt = _plt()
    figs: dict[str, str] = {}
    enrolled = [r for r in results if r.true_row >= 0]
    if "cmc" in summary:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        k = np.arange(1, len(summary["cmc"]) + 1)
        ax.plot(k, summary["cmc"], marker="o", ms=3)
        ax.axhline(summary["chance_rank1"], color="grey", ls=":", label="chance (rank 1)")
        ax.set(xlabel="rank k", ylabel="identification rate", ylim=(0, 1.02), title="CMC")
        ax.legend(fontsize=7)
        figs["cmc"] = _save(fig, out / "cmc.png")

        conf = np.array(summary["confusion"], dtype=np.float64)
        norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        n = len(conf)
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * n + 2), max(3.5, 0.35 * n + 1.5)))
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        if n <= 30:
            ax.set_xticks(range(n), gallery.names, rotation=90, fontsize=6)
            ax.set_yticks(range(n), gallery.names, fontsize=6)
            for i in range(n):
                for j in range(n):
                    if conf[i, j]:
                        ax.text(
                            j,
                            i,
                            int(conf[i, j]),
                            ha="center",
                            va="center",
                            fontsize=5,
                            color="white" if norm[i, j] > 0.5 else "black",
                        )
        ax.set(
            xlabel="predicted identity",
            ylabel="true identity",
            title="confusion: colour = share of the row, numbers = images",
        )
        fig.colorbar(im, ax=ax, fraction=0.046)
        figs["confusion"] = _save(fig, out / "confusion.png")

        rates = np.stack([r.rates for r in enrolled])
        rows = np.array([r.true_row for r in enrolled])
        genuine = np.zeros_like(rates, dtype=bool)
        genuine[np.arange(len(rows)), rows] = True
        roc = roc_curve(rates.ravel(), genuine.ravel())
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        ax.plot(roc.far, roc.tar)
        ax.plot([0, 1], [0, 1], color="grey", ls=":")
        ax.axvline(FAR_TARGET, color="red", ls="--", lw=0.8, label=f"FAR 1%: TAR {roc.tar_at_far:.2f}")
        ax.set(
            xlabel="false accept rate",
            ylabel="true accept rate",
            title=f"verification ROC (EER {roc.eer:.1%})",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=7, loc="lower right")
        figs["roc"] = _save(fig, out / "roc.png")

        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        bins = np.linspace(0, 1, 41)
        ax.hist(rates[~genuine], bins=bins, alpha=0.6, density=True, label="impostor pairs")
        ax.hist(rates[genuine], bins=bins, alpha=0.6, density=True, label="genuine pairs")
        ax.axvline(summary["unknown_threshold"], color="black", ls="--", lw=0.8, label="open-set threshold U")
        ax.set(xlabel="correspondence rate", ylabel="density", title="correspondence rates")
        ax.legend(fontsize=7)
        figs["rate_histograms"] = _save(fig, out / "rate_histograms.png")

    sweep = summary["threshold_sweep"]
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot(sweep["threshold"], sweep["rank1"], label="Rank-1")
    ax.plot(sweep["threshold"], sweep["genuine_rate"], label="correspondence rate (true identity)")
    ax.plot(sweep["threshold"], sweep["impostor_rate"], ls=":", label="correspondence rate (others)")
    ax.axvline(summary["similarity_threshold"], color="black", ls="--", lw=0.8, label="T used")
    ax.set(xlabel="confidence threshold T", ylim=(0, 1.02), title="Rank-1 and rate vs threshold")
    ax.legend(fontsize=7)
    figs["threshold_curve"] = _save(fig, out / "threshold_curve.png")

    seg = summary["segmentation"]["per_part"]
    names = [PART_NAMES[p] for p in BODY_PART_IDS]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [seg[n]["accuracy"] or 0 for n in names], width=0.4, label="accuracy")
    ax.bar(x + 0.2, [seg[n]["iou"] or 0 for n in names], width=0.4, label="IoU")
    ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=60, ha="right", fontsize=7)
    ax.set(ylim=(0, 1), title="part segmentation (predicted vs ground truth)")
    ax.legend(fontsize=7)
    figs["part_accuracy"] = _save(fig, out / "part_accuracy.png")

    err = np.concatenate([r.corr_error for r in results]) if results else np.zeros(0)
    if len(err):
        err_m = np.concatenate([r.corr_error_matched for r in results])
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        bins = np.linspace(0, max(0.6, float(np.quantile(err, 0.99))), 40)
        ax.hist(err, bins=bins, alpha=0.6, label="all foreground pixels")
        if len(err_m):
            ax.hist(err_m, bins=bins, alpha=0.6, label="corresponding pixels")
        ax.set(xlabel="distance to true surface point (m)", ylabel="pixels", title="correspondence error")
        ax.legend(fontsize=7)
        figs["correspondence_error"] = _save(fig, out / "correspondence_error.png")
    return figs


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{100 * float(x):.1f}%"


def report_markdown(
    summary: dict[str, Any], figs: dict[str, str], examples: Sequence[str], title: str
) -> str:
    s = summary
    lines = [f"# {title}", ""]
    lines += [
        f"{s['images']} test images, {s['gallery_identities']} enrolled identities (chance Rank-1 "
        f"{_pct(s['chance_rank1'])}); confidence threshold T = {s['similarity_threshold']:.3f}, "
        f"open-set threshold U = {s['unknown_threshold']:.3f}.",
        "",
    ]
    if "rank1" in s:
        v = s["verification"]
        lines += [
            "| metric | value |",
            "|---|---|",
            f"| Rank-1 (95% interval) | {_pct(s['rank1'])} ({_pct(s['rank1_ci95'][0])} to "
            f"{_pct(s['rank1_ci95'][1])}) |",
            f"| Rank-5 | {_pct(s['rank5'])} |",
            f"| Rank-10 | {_pct(s['rank10'])} |",
            f"| mAP | {_pct(s['mAP'])} |",
            f"| verification EER | {_pct(v['eer'])} |",
            f"| TAR at FAR 1% | {_pct(v['tar_at_far_1pct'])} |",
            f"| mean correspondence rate, genuine | {_pct(s['genuine_rate_mean'])} |",
            f"| mean correspondence rate, impostor | {_pct(s['impostor_rate_mean'])} |",
            f"| answered unknown (all enrolled) | {_pct(s['open_set']['answered_unknown'])} |",
        ]
    seg, ce = s["segmentation"], s["correspondence_error_m"]
    lines += [
        f"| part segmentation pixel accuracy | {_pct(seg['pixel_accuracy'])} |",
        f"| part segmentation mean IoU (body parts) | {_pct(seg['mean_iou_body'])} |",
        f"| correspondence error, median (all / corresponding) | "
        f"{ce['median'] if ce['median'] is not None else 'n/a'} m / "
        f"{ce['matched_median'] if ce['matched_median'] is not None else 'n/a'} m |",
        f"| correspondences within 10 cm | {_pct(ce['within_0.10m'])} |",
        "",
    ]
    captions = {
        "cmc": "Cumulative match characteristic.",
        "confusion": "Confusion matrix (true identity rows, predicted columns), as the paper's Fig. 5.",
        "roc": "Verification ROC: every (image, identity) pair, correspondence rate as the score.",
        "rate_histograms": "Correspondence rates of genuine and impostor pairs.",
        "threshold_curve": "Rank-1 and correspondence rate against the confidence threshold T.",
        "part_accuracy": "Per-part segmentation accuracy and IoU against the ground-truth labels.",
        "correspondence_error": "Distance between each pixel's matched prototype point and its true vertex "
        "(rest pose).",
    }
    for key, name in figs.items():
        lines += [f"## {key.replace('_', ' ')}", "", captions.get(key, ""), "", f"![{key}]({name})", ""]
    if examples:
        lines += [
            "## examples",
            "",
            "Image | pixels coloured by the matched prototype part | prototype front "
            "and side with the matched points lit.",
            "",
        ]
        for e in examples:
            lines += [f"![example]({e})", ""]
    return "\n".join(lines)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(
    out: str | Path,
    summary: dict[str, Any],
    results: Sequence[QueryResult],
    gallery: Gallery,
    examples: Sequence[tuple[np.ndarray, Recognition, str]] = (),
    title: str = "Evaluation report",
) -> tuple[Path, Path]:
    """report.json, report.md and the figures (and example explanations) into `out`."""
    from trainer.explain import justification, save_explanation

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = write_figures(out, summary, results, gallery)
    ex_names = []
    for i, (rgb, rec, outcome) in enumerate(examples):
        name = f"example-{i:02d}-{outcome}.png"
        save_explanation(out / name, rgb, rec, justification(rec))
        ex_names.append(name)
    summary = {**summary, "figures": figs, "examples": ex_names}
    write_text_atomic(out / "report.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "report.md", report_markdown(summary, figs, ex_names, title))
    return out / "report.json", out / "report.md"
