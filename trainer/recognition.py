"""Recognition by 2D-3D registration: the gallery of enrolled prototypes, the correspondence rate and the
decision rule.

Every foreground pixel of a query image (predicted part 1-14) is matched to its most similar point of a
prototype (cosine similarity of the L2-normalised embeddings). The pixel *corresponds* when that similarity
is at least the threshold T and the point lies on the same part the pixel is predicted to be. The
correspondence rate of an identity is the share of foreground pixels that correspond; the decision is the
identity with the highest rate, or "unknown" when that rate is under the calibrated open-set threshold.
See docs/recognition.md.
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

from protoreg.parts import BODY_PART_IDS, NUM_LABELS

GALLERY_FORMAT_VERSION = "1.0"
DEFAULT_SIMILARITY_THRESHOLD = 0.5  # T: used when the gallery holds no calibrated value
DEFAULT_UNKNOWN_THRESHOLD = 0.0  # U: uncalibrated galleries never answer "unknown"
DEFAULT_SHORTLIST = 32  # candidates that get full registration after the per-part descriptor shortlist
UNKNOWN = "unknown"
MIN_PART_PIXELS = 3  # a part with fewer predicted pixels counts as not visible


class RecognitionError(ValueError):
    """Bad input to enrolment or recognition; the message is one line naming the input."""


# ----------------------------------------------------------------------------------------------------------
# Correspondence on plain arrays (no model needed: the unit tests use hand-made embeddings)


@dataclass
class Correspondence:
    """Registration of one image's foreground pixels against one prototype."""

    best_point: np.ndarray  # (P,) int64 index of each pixel's most similar prototype point
    best_similarity: np.ndarray  # (P,) float32 cosine similarity of that point
    same_part: np.ndarray  # (P,) bool: the point lies on the part the pixel is predicted to be
    matched: np.ndarray  # (P,) bool: same_part and best_similarity >= threshold
    rate: float  # matched.mean(): the correspondence rate
    mean_similarity: float  # mean best similarity over matched pixels (0 when none): breaks ties in rate
    part_pixels: np.ndarray  # (16,) int64 foreground pixels per predicted part
    part_matched: np.ndarray  # (16,) int64 matched pixels per predicted part

    @property
    def part_rate(self) -> np.ndarray:
        """(16,) per-part match strength: the share of the part's pixels that correspond (nan if unseen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.part_pixels > 0, self.part_matched / np.maximum(self.part_pixels, 1), np.nan)


def _as_tensor(x: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def best_matches(pixel_emb: Any, point_emb: Any) -> tuple[np.ndarray, np.ndarray]:
    """Most similar point (index, cosine) for every pixel; embeddings must be L2-normalised."""
    import torch

    e = _as_tensor(pixel_emb)
    p = _as_tensor(point_emb)
    if e.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    with torch.no_grad():
        sim, idx = (e @ p.T).max(dim=1)
    return idx.numpy().astype(np.int64), sim.numpy().astype(np.float32)


def correspondence_from_matches(
    best_point: np.ndarray,
    best_similarity: np.ndarray,
    pixel_parts: np.ndarray,
    point_parts: np.ndarray,
    threshold: float,
) -> Correspondence:
    """The correspondence rate and per-part strength from each pixel's best match."""
    pixel_parts = np.asarray(pixel_parts, dtype=np.int64)
    same_part = np.asarray(point_parts)[best_point].astype(np.int64) == pixel_parts
    matched = same_part & (best_similarity >= threshold)
    n = len(pixel_parts)
    part_pixels = np.bincount(pixel_parts, minlength=NUM_LABELS)[:NUM_LABELS].astype(np.int64)
    part_matched = np.bincount(pixel_parts[matched], minlength=NUM_LABELS)[:NUM_LABELS].astype(np.int64)
    return Correspondence(
        best_point=best_point,
        best_similarity=best_similarity,
        same_part=same_part,
        matched=matched,
        rate=float(matched.sum() / n) if n else 0.0,
        mean_similarity=float(best_similarity[matched].mean()) if matched.any() else 0.0,
        part_pixels=part_pixels,
        part_matched=part_matched,
    )


def correspondence(
    pixel_emb: Any, pixel_parts: np.ndarray, point_emb: Any, point_parts: np.ndarray, threshold: float
) -> Correspondence:
    """Register foreground pixels (P, D) with predicted parts (P,) against a prototype's points (N, D)."""
    idx, sim = best_matches(pixel_emb, point_emb)
    return correspondence_from_matches(idx, sim, pixel_parts, point_parts, threshold)


@dataclass
class Decision:
    """The answer for one image: who it is (or "unknown") and the ranking behind it."""

    identity: str  # a gallery name or UNKNOWN
    best: str  # the top-ranked gallery name, even when the answer is unknown
    rate: float  # the top correspondence rate
    unknown_threshold: float
    ranking: list[int]  # gallery rows, best first


def rank_identities(rates: Sequence[float], tie_break: Sequence[float] | None = None) -> list[int]:
    """Rows ordered by correspondence rate, highest first; ties by mean matched similarity, then row."""
    rates = np.asarray(rates, dtype=np.float64)
    tb = np.zeros_like(rates) if tie_break is None else np.asarray(tie_break, dtype=np.float64)
    order = np.lexsort((np.arange(len(rates)), -tb, -rates))
    return [int(i) for i in order]


def decide(
    names: Sequence[str],
    rates: Sequence[float],
    unknown_threshold: float,
    tie_break: Sequence[float] | None = None,
) -> Decision:
    """The identity with the highest correspondence rate; "unknown" when that rate is under U."""
    if len(names) == 0:
        raise RecognitionError("gallery: no enrolled identities to decide between")
    ranking = rank_identities(rates, tie_break)
    top = ranking[0]
    rate = float(rates[top])
    who = names[top] if rate >= unknown_threshold else UNKNOWN
    return Decision(
        identity=who, best=names[top], rate=rate, unknown_threshold=float(unknown_threshold), ranking=ranking
    )


# ----------------------------------------------------------------------------------------------------------
# Per-part descriptors: the cheap shortlist


def part_descriptors(emb: np.ndarray, parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(14, D) L2-normalised mean embedding of each body part and (14,) counts; zero rows for absent parts."""
    emb = np.asarray(emb, dtype=np.float32)
    parts = np.asarray(parts, dtype=np.int64)
    d = emb.shape[1]
    sums = np.zeros((NUM_LABELS, d), dtype=np.float64)
    np.add.at(sums, parts, emb)
    counts = np.bincount(parts, minlength=NUM_LABELS)[:NUM_LABELS]
    desc = sums[list(BODY_PART_IDS)]
    norm = np.linalg.norm(desc, axis=1, keepdims=True)
    desc = np.where(norm > 0, desc / np.maximum(norm, 1e-12), 0.0)
    return desc.astype(np.float32), counts[list(BODY_PART_IDS)].astype(np.int64)


def shortlist_scores(
    query_desc: np.ndarray, query_counts: np.ndarray, gallery_desc: np.ndarray
) -> np.ndarray:
    """(I,) pixel-weighted mean cosine between the query's part descriptors and each identity's.

    Cheap (I x 14 x D) and a good proxy for the correspondence rate, so only the best few identities
    need full pixel-to-point registration.
    """
    w = np.asarray(query_counts, dtype=np.float64)
    if w.sum() <= 0:
        return np.zeros(gallery_desc.shape[0])
    w = w / w.sum()
    cos = np.einsum("ipd,pd->ip", gallery_desc.astype(np.float32), query_desc.astype(np.float32))
    return cos.astype(np.float64) @ w


# ----------------------------------------------------------------------------------------------------------
# The gallery file


@dataclass
class GalleryIdentity:
    """One enrolled identity, as enrol computes it and the gallery stores it."""

    name: str
    identity_id: int
    embeddings: np.ndarray  # (N, D) float32 L2-normalised point embeddings
    parts: np.ndarray  # (N,) uint8
    points: np.ndarray  # (N, 3) float32 rest-pose points (metres, y up, facing +z)
    vertex_ids: np.ndarray  # (N,) int32


@dataclass
class Gallery:
    """Enrolled identities with cached point embeddings (so recognition never re-encodes prototypes).

    Arrays are stacked over identities (I, N, ...) and loaded lazily row by row from the HDF5 file;
    the per-part descriptors (I, 14, D) are always in memory for the shortlist.
    """

    path: Path | None
    names: list[str]
    identity_ids: np.ndarray  # (I,) int64
    part_desc: np.ndarray  # (I, 14, D) float32
    part_counts: np.ndarray  # (I, 14) int64
    attrs: dict[str, Any] = field(default_factory=dict)
    _rows: dict[str, np.ndarray] | None = None  # fully loaded arrays (in-memory galleries)
    _maps: dict[str, np.ndarray] | None = None  # memory maps of the on-disk arrays (lazy galleries)

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def model_fingerprint(self) -> str:
        return str(self.attrs.get("model_fingerprint", ""))

    @property
    def similarity_threshold(self) -> float:
        return float(self.attrs.get("similarity_threshold", DEFAULT_SIMILARITY_THRESHOLD))

    @property
    def unknown_threshold(self) -> float:
        return float(self.attrs.get("unknown_threshold", DEFAULT_UNKNOWN_THRESHOLD))

    @property
    def calibrated(self) -> bool:
        return "calibration" in self.attrs

    def rows(
        self, index: Sequence[int], names: Iterable[str] = ("embeddings", "parts")
    ) -> dict[str, np.ndarray]:
        """Arrays of the given gallery rows (in the given order), read from disk unless in memory."""
        index = [int(i) for i in index]
        names = tuple(names)
        if self._rows is not None:
            return {k: self._rows[k][index] for k in names}
        maps = self._memmaps()
        out = {k: np.asarray(maps[k][index]) for k in names}
        if "embeddings" in out:
            out["embeddings"] = out["embeddings"].astype(np.float32)
        return out

    def _memmaps(self) -> dict[str, np.ndarray]:
        """Read-only memory maps of the per-identity arrays: contiguous HDF5 datasets sit at fixed file
        offsets, so reading the few shortlisted rows costs a page-cache lookup, not an HDF5 selection."""
        if self._maps is None:
            import h5py

            maps = {}
            with h5py.File(self.path, "r") as f:
                for k in ("embeddings", "parts", "points", "vertex_ids"):
                    d = f[k]
                    offset = d.id.get_offset()
                    if offset is None or d.chunks is not None:  # not contiguous: load it whole
                        maps[k] = d[()]
                    else:
                        maps[k] = np.memmap(self.path, dtype=d.dtype, mode="r", offset=offset, shape=d.shape)
            self._maps = maps
        return self._maps

    def identity(self, row: int) -> GalleryIdentity:
        r = self.rows([row], ("embeddings", "parts", "points", "vertex_ids"))
        return GalleryIdentity(
            self.names[row],
            int(self.identity_ids[row]),
            r["embeddings"][0],
            r["parts"][0],
            r["points"][0],
            r["vertex_ids"][0],
        )

    def row_of(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise RecognitionError(f"gallery {self.path}: identity {name!r} is not enrolled") from None


def _json_attr(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def write_gallery(
    path: str | Path,
    identities: Sequence[GalleryIdentity],
    attrs: dict[str, Any],
    dtype: str = "float16",
) -> Path:
    """Write a gallery atomically and deterministically (no timestamps, fixed order): the same inputs
    give the same bytes."""
    import h5py

    path = Path(path)
    if not identities:
        raise RecognitionError(f"{path}: no identities to enrol")
    names = [g.name for g in identities]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[0]
        raise RecognitionError(f"{path}: identity {dup!r} would be enrolled twice")
    shapes = {g.embeddings.shape for g in identities}
    if len(shapes) != 1:
        raise RecognitionError(
            f"{path}: prototypes differ in point count or embedding size: {sorted(shapes)}"
        )
    n, d = identities[0].embeddings.shape
    emb = np.stack([g.embeddings for g in identities]).astype(dtype)
    desc_counts = [part_descriptors(g.embeddings, g.parts) for g in identities]
    arrays: list[tuple[str, np.ndarray, tuple[int, ...] | None]] = [
        (
            "names",
            np.array([s.encode("utf-8") for s in names], dtype=f"S{max(len(s.encode()) for s in names)}"),
            None,
        ),
        ("identity_ids", np.array([g.identity_id for g in identities], dtype=np.int64), None),
        ("embeddings", emb, None),  # contiguous (not chunked): memory-mapped by Gallery.rows
        ("parts", np.stack([g.parts for g in identities]).astype(np.uint8), None),
        ("points", np.stack([g.points for g in identities]).astype(np.float32), None),
        ("vertex_ids", np.stack([g.vertex_ids for g in identities]).astype(np.int32), None),
        ("part_descriptors", np.stack([dc[0] for dc in desc_counts]).astype(np.float32), None),
        ("part_counts", np.stack([dc[1] for dc in desc_counts]).astype(np.int64), None),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            all_attrs = {
                "format_version": GALLERY_FORMAT_VERSION,
                "embedding_dim": int(d),
                "num_points": int(n),
                "num_identities": len(identities),
                **attrs,
            }
            for key in sorted(all_attrs):
                value = all_attrs[key]
                f.attrs[key] = _json_attr(value) if isinstance(value, (dict, list)) else value
            for key, data, chunks in arrays:
                f.create_dataset(key, data=data, chunks=chunks, track_times=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        v = v.item()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


GALLERY_DATASETS = (
    "names",
    "identity_ids",
    "embeddings",
    "parts",
    "points",
    "vertex_ids",
    "part_descriptors",
    "part_counts",
)


def load_gallery(path: str | Path, in_memory: bool = False) -> Gallery:
    """Open a gallery file; per-identity arrays stay on disk unless `in_memory`."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise RecognitionError(
            f"{path}: gallery file not found (expected a file written by `protoreg enroll`)"
        )
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
            missing = [k for k in GALLERY_DATASETS if k not in f]
            if "format_version" not in attrs or missing:
                raise RecognitionError(
                    f"{path}: not a protoreg gallery (missing {missing or ['format_version']})"
                )
            if str(attrs["format_version"]).split(".")[0] != GALLERY_FORMAT_VERSION.split(".")[0]:
                raise RecognitionError(
                    f"{path}: gallery format {attrs['format_version']}, "
                    f"this reader reads {GALLERY_FORMAT_VERSION}"
                )
            names = [n.decode("utf-8") for n in f["names"][()]]
            gal = Gallery(
                path=path,
                names=names,
                identity_ids=f["identity_ids"][()].astype(np.int64),
                part_desc=f["part_descriptors"][()].astype(np.float32),
                part_counts=f["part_counts"][()].astype(np.int64),
                attrs=attrs,
            )
            if in_memory:
                gal._rows = {k: f[k][()] for k in ("embeddings", "parts", "points", "vertex_ids")}
                gal._rows["embeddings"] = gal._rows["embeddings"].astype(np.float32)
    except OSError as e:
        raise RecognitionError(f"{path}: not a readable HDF5 gallery ({str(e).splitlines()[0]})") from e
    if gal.size == 0:
        raise RecognitionError(f"{path}: the gallery is empty (enrol identities with `protoreg enroll`)")
    return gal


def read_gallery_identities(gallery: Gallery) -> list[GalleryIdentity]:
    return [gallery.identity(i) for i in range(gallery.size)]


def set_gallery_attrs(path: str | Path, updates: dict[str, Any]) -> None:
    """Rewrite a gallery with changed attributes (e.g. calibration), atomically and deterministically."""
    gal = load_gallery(path, in_memory=True)
    attrs = {
        k: v
        for k, v in gal.attrs.items()
        if k not in ("format_version", "embedding_dim", "num_points", "num_identities")
    }
    attrs.update(updates)
    write_gallery(path, read_gallery_identities(gal), attrs, dtype=_stored_dtype(path))


def _stored_dtype(path: str | Path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return str(f["embeddings"].dtype)


def check_gallery_matches(gallery: Gallery, fingerprint: str, checkpoint: str | Path) -> None:
    """Refuse a gallery enrolled with another model: its embeddings live in a different space."""
    if gallery.model_fingerprint != fingerprint:
        raise RecognitionError(
            f"{gallery.path}: gallery was enrolled with another model (fingerprint "
            f"{gallery.model_fingerprint[:12] or 'missing'}, "
            f"checkpoint {checkpoint} has {fingerprint[:12]}); "
            "re-run `protoreg enroll` with this checkpoint"
        )


# ----------------------------------------------------------------------------------------------------------
# Model side: encoding prototypes and images


DEFAULT_INPUT_SIZE = (128, 256)  # (width, height): the generator's default person crop


def model_input_size(config: dict[str, Any] | None) -> tuple[int, int]:
    """(width, height) the model was trained at, from the checkpoint's configuration."""
    config = config or {}
    for section in (config, config.get("data", {}) or {}, config.get("model", {}) or {}):
        if not isinstance(section, dict):
            continue
        res = section.get("resolution") or section.get("image_size")
        if isinstance(res, str) and "x" in res:
            w, h = res.lower().split("x")
            return int(w), int(h)
        if isinstance(res, (list, tuple)) and len(res) == 2:
            return int(res[0]), int(res[1])
        if "width" in section and "height" in section:
            return int(section["width"]), int(section["height"])
    return DEFAULT_INPUT_SIZE


@dataclass
class Letterbox:
    """Where the original image sits inside the model's input after an aspect-keeping resize."""

    src_w: int
    src_h: int
    x0: int
    y0: int
    w: int
    h: int


def letterbox(image: np.ndarray, size: tuple[int, int], fill: float = 0.5) -> tuple[np.ndarray, Letterbox]:
    """(H, W, 3) uint8 -> (3, h, w) float32 in [0, 1] at `size` = (w, h), aspect kept, grey padding."""
    from PIL import Image

    out_w, out_h = size
    src_h, src_w = image.shape[:2]
    scale = min(out_w / src_w, out_h / src_h)
    w = max(1, min(out_w, int(round(src_w * scale))))
    h = max(1, min(out_h, int(round(src_h * scale))))
    x0, y0 = (out_w - w) // 2, (out_h - h) // 2
    canvas = np.full((out_h, out_w, 3), fill, dtype=np.float32)
    if (w, h) == (src_w, src_h):
        resized = image
    else:
        resized = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    canvas[y0 : y0 + h, x0 : x0 + w] = resized.astype(np.float32) / 255.0
    return canvas.transpose(2, 0, 1).copy(), Letterbox(src_w, src_h, x0, y0, w, h)


def mirrored_box(box: Letterbox | None, width: int) -> Letterbox | None:
    """Where the content sits in the mirror image of a `width`-wide letterboxed input."""
    if box is None:
        return None
    return Letterbox(box.src_w, box.src_h, width - box.x0 - box.w, box.y0, box.w, box.h)


def load_image(path: str | Path) -> np.ndarray:
    """An RGB photograph as (H, W, 3) uint8; anything else is refused with a one-line reason."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                raise RecognitionError(f"{path}: expected an RGB colour image, got mode {mode}")
            if mode == "P" and "transparency" not in im.info and len(im.getpalette() or []) == 0:
                raise RecognitionError(
                    f"{path}: expected an RGB colour image, got a palette image without colours"
                )
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise RecognitionError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, RecognitionError):
            raise
        raise RecognitionError(f"{path}: not a readable image ({str(e).splitlines()[0][:100]})") from None


def _tensor(x: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def encode_prototypes(model: Any, prototypes: Sequence[Any], batch_size: int = 1) -> list[GalleryIdentity]:
    """Point embeddings of each prototype (protoreg.prototypes.Prototype), in the given order.

    With batch_size 1 (the default) each prototype is encoded with its own neighbour graph, so an
    identity's embeddings never depend on which other identities share its batch or gallery.
    """
    import torch

    out: list[GalleryIdentity] = []
    with torch.no_grad():
        for start in range(0, len(prototypes), batch_size):
            chunk = list(prototypes[start : start + batch_size])
            same_n = len({p.points.shape for p in chunk}) == 1
            groups = [chunk] if same_n else [[p] for p in chunk]
            for group in groups:
                pts = _tensor(np.stack([p.points for p in group]))
                nrm = _tensor(np.stack([p.normals for p in group]))
                alb = _tensor(np.stack([p.albedo for p in group]))
                emb = model.encode_points(pts, nrm, alb).float().cpu().numpy()
                for p, e in zip(group, emb, strict=True):
                    out.append(
                        GalleryIdentity(
                            p.name,
                            int(p.identity_id),
                            e.astype(np.float32),
                            np.asarray(p.parts, dtype=np.uint8),
                            p.points.astype(np.float32),
                            np.asarray(p.vertex_ids, dtype=np.int32),
                        )
                    )
    return out


@dataclass
class PixelFeatures:
    """One image's feature grid, and its foreground pixels as the recogniser sees them."""

    embeddings: np.ndarray  # (P, D) float32 embeddings of foreground pixels
    parts: np.ndarray  # (P,) int64 predicted part 1-14 of each foreground pixel
    yx: np.ndarray  # (P, 2) int64 feature-grid row and column of each foreground pixel
    seg: np.ndarray  # (h, w) uint8 predicted label of every grid cell (0 outside the letterbox content)
    stride: int
    grid: tuple[int, int]  # (h, w)


def _content_mask(grid: tuple[int, int], stride: int, box: Letterbox | None) -> np.ndarray:
    h, w = grid
    if box is None:
        return np.ones((h, w), dtype=bool)
    cy = (np.arange(h) + 0.5) * stride
    cx = (np.arange(w) + 0.5) * stride
    ok_y = (cy >= box.y0) & (cy < box.y0 + box.h)
    ok_x = (cx >= box.x0) & (cx < box.x0 + box.w)
    return ok_y[:, None] & ok_x[None, :]


def pixel_features_from_maps(
    emb: np.ndarray, seg_logits: np.ndarray, stride: int, box: Letterbox | None = None
) -> PixelFeatures:
    """Foreground pixels (predicted part 1-14 inside the letterbox content) from (D,h,w) and (16,h,w) maps."""
    d, h, w = emb.shape
    seg = seg_logits.argmax(axis=0).astype(np.uint8)
    seg[~_content_mask((h, w), stride, box)] = 0
    fg = (seg >= 1) & (seg <= 14)
    ys, xs = np.nonzero(fg)
    return PixelFeatures(
        embeddings=np.ascontiguousarray(emb[:, ys, xs].T, dtype=np.float32),
        parts=seg[ys, xs].astype(np.int64),
        yx=np.stack([ys, xs], axis=1).astype(np.int64),
        seg=seg,
        stride=int(stride),
        grid=(h, w),
    )


def with_mirror_view(px: PixelFeatures, mirror: PixelFeatures) -> PixelFeatures:
    """The foreground pixels of an image and of its mirror image as one set, the mirror's columns mapped
    back onto the image's: the pixels a correspondence rate with the mirror view counts (a second look
    at the same person, as re-identification averages a flipped query; a body is nearly left-right
    symmetric, and its mirror image shows the same shape and colours). Grid, labels and stride stay the
    image's own."""
    yx = mirror.yx.copy()
    yx[:, 1] = px.grid[1] - 1 - yx[:, 1]
    return PixelFeatures(
        embeddings=np.concatenate([px.embeddings, mirror.embeddings]),
        parts=np.concatenate([px.parts, mirror.parts]),
        yx=np.concatenate([px.yx, yx]),
        seg=px.seg,
        stride=px.stride,
        grid=px.grid,
    )


def image_pixels(
    model: Any, images: np.ndarray, boxes: Sequence[Letterbox | None], mirror: bool
) -> list[tuple[PixelFeatures, PixelFeatures]]:
    """Per letterboxed (B, 3, H, W) image: (its own foreground pixels, the pixels its correspondence rates
    count: the same, or pooled with its mirror image's when `mirror`)."""
    emb, seg, stride = encode_images(model, images)
    own = [pixel_features_from_maps(emb[i], seg[i], stride, boxes[i]) for i in range(len(images))]
    if not mirror:
        return [(px, px) for px in own]
    emb, seg, stride = encode_images(model, np.ascontiguousarray(images[..., ::-1]))
    width = images.shape[-1]
    flipped = [
        pixel_features_from_maps(emb[i], seg[i], stride, mirrored_box(boxes[i], width))
        for i in range(len(images))
    ]
    return [(px, with_mirror_view(px, m)) for px, m in zip(own, flipped, strict=True)]


def encode_images(model: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(B, 3, H, W) float32 in [0, 1] -> embeddings (B, D, h, w), seg logits (B, 16, h, w), stride."""
    import torch

    with torch.no_grad():
        feats = model.encode_image(_tensor(images))
    return feats.embeddings.float().cpu().numpy(), feats.seg_logits.float().cpu().numpy(), int(feats.stride)


# ----------------------------------------------------------------------------------------------------------
# Recognising one image


@dataclass
class Candidate:
    """One gallery identity's result for one image."""

    row: int
    name: str
    rate: float | None  # None when the identity did not make the shortlist (not registered)
    mean_similarity: float
    shortlist_score: float
    part_rate: np.ndarray | None  # (16,)


@dataclass
class Recognition:
    """Everything one image's answer rests on: decision, ranking and the registration of the best identity."""

    decision: Decision
    candidates: list[
        Candidate
    ]  # ranked best first: registered ones by rate, then the rest by shortlist score
    pixels: PixelFeatures
    best: Correspondence | None  # registration against the top identity
    best_identity: GalleryIdentity | None
    box: Letterbox | None
    similarity_threshold: float


def register_rows(
    pixels: PixelFeatures, gallery: Gallery, rows: Sequence[int], threshold: float, chunk: int = 8
) -> list[Correspondence]:
    """Full registration of the foreground pixels against the given gallery rows."""
    import torch

    out: list[Correspondence] = []
    e = _tensor(pixels.embeddings)
    for start in range(0, len(rows), chunk):
        part_rows = list(rows[start : start + chunk])
        data = gallery.rows(part_rows, ("embeddings", "parts"))
        emb = data["embeddings"]
        k, n, d = emb.shape
        if len(pixels.parts) == 0:
            for j in range(k):
                out.append(
                    correspondence_from_matches(
                        np.zeros(0, np.int64),
                        np.zeros(0, np.float32),
                        pixels.parts,
                        data["parts"][j],
                        threshold,
                    )
                )
            continue
        with torch.no_grad():
            sim = (e @ _tensor(emb.reshape(k * n, d)).T).view(-1, k, n)
            best_sim, best_idx = sim.max(dim=2)
        best_sim_np, best_idx_np = best_sim.numpy(), best_idx.numpy()
        for j in range(k):
            out.append(
                correspondence_from_matches(
                    best_idx_np[:, j].astype(np.int64),
                    best_sim_np[:, j],
                    pixels.parts,
                    data["parts"][j],
                    threshold,
                )
            )
    return out


def own_registration(
    own: PixelFeatures,
    counted: PixelFeatures,
    counted_reg: Correspondence,
    gallery: Gallery,
    row: int,
    threshold: float,
) -> Correspondence:
    """The image's own pixels registered against gallery `row` (what explanations show): `counted_reg` when
    the rates counted exactly those pixels, else (the mirror view pooled in) registered here."""
    if own is counted:
        return counted_reg
    return register_rows(own, gallery, [row], threshold)[0]


class Recognizer:
    """Registers images against a gallery: per-part shortlist, then full registration of the best few."""

    def __init__(
        self,
        model: Any,
        gallery: Gallery,
        input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
        similarity_threshold: float | None = None,
        unknown_threshold: float | None = None,
        shortlist: int = DEFAULT_SHORTLIST,
        mirror: bool = True,
    ):
        self.model = model
        self.mirror = bool(mirror)
        self.gallery = gallery
        self.input_size = input_size
        self.similarity_threshold = (
            gallery.similarity_threshold if similarity_threshold is None else float(similarity_threshold)
        )
        self.unknown_threshold = (
            gallery.unknown_threshold if unknown_threshold is None else float(unknown_threshold)
        )
        self.shortlist = int(shortlist)

    def pixels(self, image: np.ndarray) -> tuple[PixelFeatures, PixelFeatures, Letterbox]:
        """The image's own foreground pixels, the pixels its rates count (`image_pixels`), its letterbox."""
        x, box = letterbox(image, self.input_size)
        own, counted = image_pixels(self.model, x[None], [box], self.mirror)[0]
        return own, counted, box

    def recognize(self, image: np.ndarray, top: int = 5) -> Recognition:
        """Who is in this (H, W, 3) uint8 image, and the registration that says why."""
        own, counted, box = self.pixels(image)
        return self.recognize_pixels(counted, box, top=top, own=own)

    def recognize_pixels(
        self,
        pixels: PixelFeatures,
        box: Letterbox | None = None,
        top: int = 5,
        own: PixelFeatures | None = None,
    ) -> Recognition:
        """Rank and decide on `pixels`; the explanation registers `own` (the image's own pixels, when
        `pixels` also holds its mirror view's) against the best identity."""
        gal = self.gallery
        qdesc, qcount = (
            part_descriptors(pixels.embeddings.reshape(-1, gal.part_desc.shape[2]), pixels.parts)
            if len(pixels.parts)
            else (np.zeros(gal.part_desc.shape[1:], np.float32), np.zeros(14, np.int64))
        )
        scores = shortlist_scores(qdesc, qcount, gal.part_desc)
        n_full = gal.size if self.shortlist <= 0 else min(gal.size, max(self.shortlist, top))
        by_score = [int(i) for i in np.lexsort((np.arange(gal.size), -scores))]
        rows = by_score[:n_full]
        regs = register_rows(pixels, gal, rows, self.similarity_threshold)
        rates = [c.rate for c in regs]
        sims = [c.mean_similarity for c in regs]
        decision = decide([gal.names[r] for r in rows], rates, self.unknown_threshold, sims)
        decision.ranking = [rows[i] for i in decision.ranking] + by_score[n_full:]
        reg_of = dict(zip(rows, regs, strict=True))
        candidates = []
        for r in decision.ranking:
            c = reg_of.get(r)
            candidates.append(
                Candidate(
                    r,
                    gal.names[r],
                    None if c is None else c.rate,
                    0.0 if c is None else c.mean_similarity,
                    float(scores[r]),
                    None if c is None else c.part_rate,
                )
            )
        top_row = decision.ranking[0]
        own = pixels if own is None else own
        return Recognition(
            decision=decision,
            candidates=candidates,
            pixels=own,
            best=own_registration(own, pixels, reg_of[top_row], gal, top_row, self.similarity_threshold),
            best_identity=gal.identity(top_row),
            box=box,
            similarity_threshold=self.similarity_threshold,
        )
