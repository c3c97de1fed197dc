"""`protoreg inspect`: a contact sheet people can look at, and the statistics of a dataset.

Each sample on the sheet is a triplet: the RGB image | its part labels blended over it | the
per-pixel surface correspondence, where each body vertex gets a fixed colour from its rest-pose
position (normalised x, y, z -> R, G, B), so the same body point has the same colour in every image.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from generator.write import iter_tar_samples
from protoreg import dataset as ds
from protoreg import parts

OVERLAY_ALPHA = 0.55  # weight of the part colour over the RGB pixel
TILE_MIN_WIDTH = 96  # small renders are scaled up (nearest) so labels stay visible
TRIPLETS_PER_ROW = 4
GAP = 4


@dataclass
class DatasetStats:
    """What `inspect` prints: counts, label statistics, framing."""

    samples: int = 0
    shards: int = 0
    identities: int = 0
    samples_per_identity: dict[str, int] = field(default_factory=dict)
    part_pixel_share: dict[str, float] = field(default_factory=dict)  # share of person (1-15) pixels
    foreground_share: float = 0.0  # share of all pixels that are not background
    occlusion_rate: float = 0.0  # share of samples where some pixel carries the occluder label
    mean_person_height_px: float = 0.0  # rows spanned by body-part pixels (1-14)
    vid_coverage: float = 0.0  # share of body-part pixels with a known vertex
    width: int = 0
    height: int = 0

    def describe(self) -> str:
        per_id = list(self.samples_per_identity.values())
        lines = [
            f"samples: {self.samples} in {self.shards} shards, {self.width}x{self.height}",
            f"identities: {self.identities} (samples per identity: min {min(per_id, default=0)}, "
            f"max {max(per_id, default=0)})",
            f"foreground pixels: {100 * self.foreground_share:.1f}% of the image",
            f"occlusion rate: {100 * self.occlusion_rate:.1f}% of samples show an occluder (label 15)",
            f"mean person height: {self.mean_person_height_px:.1f} px "
            f"({100 * self.mean_person_height_px / max(self.height, 1):.0f}% of the image height)",
            f"vid coverage: {100 * self.vid_coverage:.1f}% of body-part pixels have a vertex",
            "part pixel shares (of person pixels):",
        ]
        for name, share in self.part_pixel_share.items():
            lines.append(f"  {name:<16} {100 * share:5.1f}%")
        return "\n".join(lines)


def vertex_colors(body: Any) -> np.ndarray:
    """(V+1, 3) uint8: row 0 (no vertex) black, row v+1 = normalised rest-pose xyz of vertex v."""
    rest = np.asarray(body.rest_vertices(np.zeros((1, 1), dtype=np.float32)), dtype=np.float64)
    rest = rest.reshape(-1, 3)
    lo, hi = rest.min(axis=0), rest.max(axis=0)
    rgb = (rest - lo) / np.maximum(hi - lo, 1e-9)
    table = np.zeros((len(rest) + 1, 3), dtype=np.uint8)
    table[1:] = np.round(40 + 215 * rgb).astype(np.uint8)
    return table


def hashed_vertex_colors(num_vertices: int) -> np.ndarray:
    """Fallback when the body model file is not at hand: a fixed pseudo-random colour per vertex."""
    rng = np.random.default_rng(0)
    table = rng.integers(40, 256, size=(num_vertices + 1, 3), dtype=np.uint8)
    table[0] = 0
    return table


def load_vertex_colors(manifest: dict[str, Any]) -> np.ndarray:
    """Colour table from the dataset's body model (its recorded path, else the default body if it matches)."""
    from protoreg.body import BodyModelError, load_body_model

    info = manifest.get("body_model", {})
    for candidate in (info.get("path"), None):
        try:
            body = load_body_model(candidate)
        except (BodyModelError, OSError, ValueError):
            continue
        if body.sha256 == info.get("sha256"):
            return vertex_colors(body)
    return hashed_vertex_colors(int(info.get("num_vertices", 65535)))


def part_overlay(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Part colours blended over the image where there is a label; background pixels stay as they are."""
    colored = parts.colorize(labels).astype(np.float32)
    out = rgb.astype(np.float32)
    mask = labels > 0
    out[mask] = (1 - OVERLAY_ALPHA) * out[mask] + OVERLAY_ALPHA * colored[mask]
    return np.round(out).astype(np.uint8)


def correspondence_image(vid: np.ndarray, table: np.ndarray) -> np.ndarray:
    return table[np.clip(vid, 0, len(table) - 1)]


def _tile(array: np.ndarray, scale: int) -> Image.Image:
    im = Image.fromarray(array)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def contact_sheet(samples: list[dict[str, Any]], table: np.ndarray) -> Image.Image:
    """Grid of (RGB | part overlay | correspondence) triplets, TRIPLETS_PER_ROW per row, with keys."""
    h, w = samples[0]["parts.png"].shape
    scale = max(1, -(-TILE_MIN_WIDTH // w))
    tw, th = w * scale, h * scale
    cols = min(TRIPLETS_PER_ROW, len(samples))
    rows = -(-len(samples) // cols)
    label_h = 14
    sheet = Image.new(
        "RGB",
        (cols * (3 * tw + 2 * GAP) + (cols + 1) * 3 * GAP, rows * (th + label_h + GAP) + GAP),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for k, s in enumerate(samples):
        r, c = divmod(k, cols)
        x0 = 3 * GAP + c * (3 * tw + 2 * GAP + 3 * GAP)
        y0 = GAP + r * (th + label_h + GAP)
        tiles = (
            s["rgb.jpg"],
            part_overlay(s["rgb.jpg"], s["parts.png"]),
            correspondence_image(s["vid.png"], table),
        )
        for j, t in enumerate(tiles):
            sheet.paste(_tile(t, scale), (x0 + j * (tw + GAP), y0 + label_h))
        ident = s["json"].get("identity", {})
        draw.text((x0, y0), f"{s['__key__'].lstrip('0') or '0'} {ident.get('name', '')}", fill=(0, 0, 0))
    return sheet


def iter_dataset(dataset_dir: Path, manifest: dict[str, Any]):
    for shard in manifest["shards"]:
        for raw in iter_tar_samples(dataset_dir / shard["name"]):
            yield ds.decode_sample(raw)


def compute_stats(dataset_dir: Path, manifest: dict[str, Any], limit: int | None = None) -> DatasetStats:
    """Statistics over the dataset's samples (the first `limit` when given)."""
    stats = DatasetStats(shards=len(manifest["shards"]))
    stats.width, stats.height = manifest["resolution"]["width"], manifest["resolution"]["height"]
    per_id: collections.Counter[str] = collections.Counter()
    label_counts = np.zeros(parts.NUM_LABELS, dtype=np.int64)
    occluded = heights = body_px = body_with_vid = 0
    with_person = 0
    for s in iter_dataset(dataset_dir, manifest):
        labels, vid = s["parts.png"], s["vid.png"]
        stats.samples += 1
        per_id[s["json"].get("identity", {}).get("name", "?")] += 1
        label_counts += np.bincount(labels.ravel(), minlength=parts.NUM_LABELS)[: parts.NUM_LABELS]
        occluded += bool((labels == parts.OCCLUDER).any())
        body = (labels >= 1) & (labels <= 14)
        rows = np.flatnonzero(body.any(axis=1))
        if len(rows):
            heights += rows[-1] - rows[0] + 1
            with_person += 1
        body_px += int(body.sum())
        body_with_vid += int((body & (vid > 0)).sum())
        if limit is not None and stats.samples >= limit:
            break
    stats.samples_per_identity = dict(sorted(per_id.items()))
    stats.identities = len(manifest.get("identities", [])) or len(per_id)
    person = label_counts[1:].sum()
    stats.part_pixel_share = {
        parts.PART_NAMES[i]: float(label_counts[i] / person) if person else 0.0
        for i in range(1, parts.NUM_LABELS)
    }
    total = label_counts.sum()
    stats.foreground_share = float(person / total) if total else 0.0
    stats.occlusion_rate = occluded / max(stats.samples, 1)
    stats.mean_person_height_px = heights / max(with_person, 1)
    stats.vid_coverage = body_with_vid / max(body_px, 1)
    return stats


def first_samples(dataset_dir: Path, manifest: dict[str, Any], n: int) -> list[dict[str, Any]]:
    out = []
    for s in iter_dataset(dataset_dir, manifest):
        out.append(s)
        if len(out) >= n:
            break
    return out


def inspect_dataset(
    dataset_dir: Path, out: Path | None = None, n: int = 16, limit: int | None = 5000
) -> tuple[DatasetStats, Path]:
    """Write the contact sheet PNG (atomically) and return the dataset statistics and the sheet's path."""
    dataset_dir = Path(dataset_dir)
    manifest = ds.load_manifest(dataset_dir)
    samples = first_samples(dataset_dir, manifest, n)
    if not samples:
        raise ds.DatasetFormatError(f"{dataset_dir}: holds no samples")
    sheet = contact_sheet(samples, load_vertex_colors(manifest))
    out = Path(out) if out is not None else dataset_dir / "contact-sheet.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(out)
    return compute_stats(dataset_dir, manifest, limit), out
