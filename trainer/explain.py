"""Explanations a person can check: a one-sentence justification and a picture of the registration.

The sentence names the parts that match strongly, those that match weakly and those not visible; the
picture shows the image, its pixels coloured by the prototype part they matched, and the prototype from
the front and the side with the matched points lit. See docs/recognition.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protoreg.parts import BODY_PART_IDS, PART_COLORS, part_name
from trainer.recognition import MIN_PART_PIXELS, UNKNOWN, Letterbox, Recognition

STRONG = 0.5  # a visible part matches strongly when at least this share of its pixels corresponds
WEAK = 0.2  # ... and weakly under this share (in between: partly)

_PLURAL = {
    "foot": "feet",
    "hand": "hands",
    "upper arm": "upper arms",
    "lower arm": "lower arms",
    "upper leg": "upper legs",
    "lower leg": "lower legs",
}


def _group_names(parts: Sequence[int]) -> list[str]:
    """Part names in anatomical order, a left/right pair written once ("the feet")."""
    names = [part_name(p) for p in sorted(parts)]
    out: list[str] = []
    for name in names:
        if name.startswith("left "):
            base = name[5:]
            if "right " + base in names:
                out.append("both " + _PLURAL[base])
                continue
        if name.startswith("right ") and "left " + name[6:] in names:
            continue
        out.append(name)
    return out


def _pair_word(names: Sequence[str]) -> str:
    return names[0].replace("both ", "the ") if len(names) == 1 and names[0].startswith("both ") else ""


def _join(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _verb(names: Sequence[str], singular: str, plural: str) -> str:
    many = len(names) > 1 or names[0].startswith("both ")
    return plural if many else singular


def _clause(parts: Sequence[int], singular: str, plural: str) -> str:
    names = _group_names(parts)
    subject = _pair_word(names) or _join(names)
    return f"{subject} {_verb(names, singular, plural)}"


def part_tiers(part_pixels: np.ndarray, part_matched: np.ndarray) -> dict[str, list[int]]:
    """Body parts sorted into strong / partial / weak / not visible by their share of corresponding pixels."""
    tiers: dict[str, list[int]] = {"strong": [], "partial": [], "weak": [], "hidden": []}
    for p in BODY_PART_IDS:
        n = int(part_pixels[p])
        if n < MIN_PART_PIXELS:
            tiers["hidden"].append(p)
            continue
        share = part_matched[p] / n
        tiers["strong" if share >= STRONG else "weak" if share < WEAK else "partial"].append(p)
    return tiers


def justification(rec: Recognition) -> str:
    """One sentence: who (or unknown), which parts match strongly, partly or weakly, which are unseen."""
    d = rec.decision
    if rec.best is None or rec.best.part_pixels[list(BODY_PART_IDS)].sum() == 0:
        return "No person was found in the image: no pixel was predicted to be a body part."
    if d.identity == UNKNOWN:
        lead = (
            f"Unknown person (closest {d.best} at correspondence rate {d.rate:.0%}, under the "
            f"open-set threshold {d.unknown_threshold:.0%})"
        )
    else:
        lead = f"Recognised as {d.identity} (correspondence rate {d.rate:.0%})"
    tiers = part_tiers(rec.best.part_pixels, rec.best.part_matched)
    clauses = []
    if tiers["strong"]:
        clauses.append(_clause(tiers["strong"], "matches strongly", "match strongly"))
    else:
        clauses.append("no part matches strongly")
    if tiers["partial"]:
        clauses.append(_clause(tiers["partial"], "matches partly", "match partly"))
    if tiers["weak"]:
        clauses.append(_clause(tiers["weak"], "matches weakly", "match weakly"))
    if tiers["hidden"]:
        if len(tiers["hidden"]) == len(BODY_PART_IDS) - 1 or len(tiers["hidden"]) > 7:
            visible = len(BODY_PART_IDS) - len(tiers["hidden"])
            clauses.append(f"the other {len(tiers['hidden'])} parts are not visible" if visible else "")
        else:
            clauses.append(_clause(tiers["hidden"], "is not visible", "are not visible"))
    text = "; ".join(c for c in clauses if c)
    return f"{lead}: {text}."


# ----------------------------------------------------------------------------------------------------------
# The explanation picture


def grid_to_image(labels: np.ndarray, stride: int, box: Letterbox | None, fill: int = 0) -> np.ndarray:
    """A (h, w) feature-grid map -> the original image's (H, W) pixels (nearest), undoing the letterbox."""
    from PIL import Image

    full = np.repeat(np.repeat(labels, stride, axis=0), stride, axis=1)
    if box is None:
        return full
    canvas = full[box.y0 : box.y0 + box.h, box.x0 : box.x0 + box.w]
    if canvas.shape[:2] != (box.h, box.w):  # grid smaller than the input (odd sizes): pad
        pad = np.full((box.h, box.w), fill, dtype=canvas.dtype)
        pad[: canvas.shape[0], : canvas.shape[1]] = canvas
        canvas = pad
    if (box.w, box.h) == (box.src_w, box.src_h):
        return canvas
    return np.asarray(
        Image.fromarray(canvas.astype(np.uint8)).resize((box.src_w, box.src_h), Image.Resampling.NEAREST)
    )


def match_maps(rec: Recognition) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) part id of the point each foreground pixel matched (0 elsewhere) and (h, w) matched flags."""
    h, w = rec.pixels.grid
    part_map = np.zeros((h, w), dtype=np.uint8)
    ok = np.zeros((h, w), dtype=np.uint8)
    if rec.best is None or rec.best_identity is None or len(rec.pixels.parts) == 0:
        return part_map, ok
    ys, xs = rec.pixels.yx[:, 0], rec.pixels.yx[:, 1]
    part_map[ys, xs] = rec.best_identity.parts[rec.best.best_point]
    ok[ys, xs] = rec.best.matched
    return part_map, ok


def match_overlay(image: np.ndarray, rec: Recognition) -> np.ndarray:
    """The image dimmed, foreground pixels coloured by the matched part (faint where not corresponding)."""
    part_map, ok = match_maps(rec)
    parts_img = grid_to_image(part_map, rec.pixels.stride, rec.box)
    ok_img = grid_to_image(ok, rec.pixels.stride, rec.box).astype(bool)
    base = image.astype(np.float32) * 0.35
    colours = PART_COLORS[parts_img].astype(np.float32)
    fg = parts_img > 0
    out = base.copy()
    out[fg & ok_img] = colours[fg & ok_img]
    faint = fg & ~ok_img
    out[faint] = 0.35 * colours[faint] + 0.65 * np.array([60, 60, 60], dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


def lit_points(rec: Recognition) -> np.ndarray:
    """(N,) how many corresponding pixels chose each prototype point."""
    n = len(rec.best_identity.parts) if rec.best_identity is not None else 0
    if rec.best is None or n == 0:
        return np.zeros(n, dtype=np.int64)
    return np.bincount(rec.best.best_point[rec.best.matched], minlength=n)


def _draw_prototype(ax: Any, points: np.ndarray, parts: np.ndarray, hits: np.ndarray, view: str) -> None:
    """Orthographic view of rest-pose points (y up, facing +z): 'front' from +z, 'side' from the left (+x)."""
    u = points[:, 0] if view == "front" else -points[:, 2]
    v = points[:, 1]
    depth = points[:, 2] if view == "front" else points[:, 0]
    order = np.argsort(depth)  # far points first so the near side is drawn on top
    lit = hits[order] > 0
    colours = np.full((len(order), 3), 0.82)
    colours[lit] = PART_COLORS[parts[order][lit]] / 255.0
    sizes = np.where(lit, 6.0 + 4.0 * np.log1p(hits[order]), 2.0)
    ax.scatter(u[order], v[order], c=colours, s=sizes, linewidths=0)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(f"prototype, {view}", fontsize=8)


def save_explanation(
    path: str | Path, image: np.ndarray, rec: Recognition, sentence: str | None = None
) -> Path:
    """PNG: image | pixels coloured by matched part | prototype front and side with the matched points lit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    overlay = match_overlay(image, rec)
    fig, axes = plt.subplots(1, 4, figsize=(10, 4.6), gridspec_kw={"width_ratios": [1, 1, 1, 1]})
    aspect = image.shape[1] / image.shape[0]
    fig.set_size_inches(max(8.0, 4 * 2.6 * max(aspect, 0.5)), 4.8)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(overlay)
    axes[1].set_title(f"matched parts (T = {rec.similarity_threshold:.2f})", fontsize=8)
    for ax in axes[:2]:
        ax.set_axis_off()
    if rec.best_identity is not None:
        hits = lit_points(rec)
        pts = rec.best_identity.points
        for ax, view in zip(axes[2:], ("front", "side"), strict=True):
            _draw_prototype(ax, pts, rec.best_identity.parts, hits, view)
            pad = 0.05 * float(np.ptp(pts[:, 1]) or 1.0)
            ax.set_ylim(float(pts[:, 1].min()) - pad, float(pts[:, 1].max()) + pad)
            ax.set_aspect("equal", adjustable="datalim")
    d = rec.decision
    title = f"{d.identity}" + (f" (closest {d.best})" if d.identity == UNKNOWN else "")
    fig.suptitle(f"{title}: correspondence rate {d.rate:.0%}", fontsize=10)
    if sentence:
        import textwrap

        fig.text(0.5, 0.02, "\n".join(textwrap.wrap(sentence, 150)), ha="center", va="bottom", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.12, wspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
