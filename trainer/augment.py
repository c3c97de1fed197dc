"""Training-time augmentation for synthetic-to-real generalisation, cheap enough for 2 CPU cores.

Split in two by cost, not by kind, so that a loader worker spends its time on a handful of SIMD passes
over uint8 pixels instead of float tensors:
- per sample (`augment_sample`), in the loader worker: all random choices of a sample come from one
  vector of NUM_DRAWS uniforms (`params_from_draws`: the loader uses its row of the batch's draws,
  `draw_params` draws it from a generator) into an `AugParams`; then, on the uint8 image through OpenCV,
  one resample does the fit to the output size and the random resized crop (and optional flip; bilinear
  RGB, labels nearest at the same pixel centres, so labels move with their pixels), garment recolouring
  (a garment region repainted in a random colour at its own luminance, when drawn), background
  replacement (label-0 pixels repainted with a procedural texture, when drawn), followed by JPEG
  re-compression at the output size (when drawn), colour jitter as one 3x4 colour matrix, blur as a
  separable Gaussian, Gaussian noise from a fixed bank of fields (rounded and saturated to uint8 in one
  pass) and random erasing (a box painted with a uint8 colour);
- nothing per batch: the batch stays uint8 until the training step converts it on its device
  (trainer.data.to_device_batch), and the packing marks erased pixels in `valid`.
Erased pixels keep their labels but are marked invalid, so no loss trusts them. Every step is a
single-threaded pass or an elementwise op, so a batch is bit-identical whichever process made it.
The torch versions of colour, blur and noise for float batches (`photometric`) use the same definitions
(the worker's noise is the same shifted field, rounded to uint8).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from protoreg.dataset import GARMENT_ID, opencv
from protoreg.parts import OCCLUDER
from trainer.config import AugmentConfig


@dataclass
class PhotoParams:
    """Per-sample photometric parameters: colour and blur (applied per sample), noise (per batch)."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # fraction of a turn
    gray: bool = False
    blur_sigma: float = 0.0  # 0 = no blur
    noise_std: float = 0.0
    noise_seed: int = 0

    @property
    def recolours(self) -> bool:
        return (self.brightness, self.contrast, self.saturation, self.hue, self.gray) != (1, 1, 1, 0, False)


@dataclass
class AugParams:
    """Everything random about one sample's augmentation, drawn in the worker from the sample's generator."""

    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # crop (x0, y0, w, h) as image fractions
    flip: bool = False
    photo: PhotoParams = field(default_factory=PhotoParams)
    mean_gray: float = 0.5  # the cropped image's mean grey in [0, 1] (contrast pivots around it)
    jpeg_quality: int = 0  # 0 = no re-compression
    erase: tuple[int, int, int, int] | None = None  # (y0, x0, h, w) in output pixels
    erase_fill: tuple[float, float, float] = (0.0, 0.0, 0.0)
    erase_occluder: bool = True  # the erased box is labelled occluder (True) or left out of the losses
    background_seed: int = -1  # seed of the texture that replaces the background; -1 = keep the render's
    # per garment region (GARMENT_REGIONS): (tint r, g, b, luminance gain), or None = keep the render's
    garment_tints: tuple[tuple[float, float, float, float] | None, ...] = ()
    shading: tuple[float, float] | None = None  # side light (direction a in radians, strength s), or none

    @property
    def geometric(self) -> bool:
        return self.flip or self.box != (0.0, 0.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Drawing the parameters


def uniform(u: float, bounds: tuple[float, float]) -> float:
    """A uniform draw in [lo, hi) from a uniform u in [0, 1)."""
    return float(bounds[0] + (bounds[1] - bounds[0]) * u)


def log_uniform(u: float, bounds: tuple[float, float]) -> float:
    return math.exp(uniform(u, (math.log(bounds[0]), math.log(bounds[1]))))


def random_crop(
    u: np.ndarray, src_hw: tuple[int, int], out_hw: tuple[int, int], cfg: AugmentConfig
) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) in source pixels of a random crop with the output's aspect ratio (jittered), from 4
    uniforms: area share, aspect jitter, x and y position."""
    sh, sw = src_hw
    oh, ow = out_hw
    area = sh * sw * uniform(u[0], cfg.crop_scale)
    ratio = ow / oh * log_uniform(u[1], cfg.crop_ratio)
    w = min(math.sqrt(area * ratio), sw)
    h = min(math.sqrt(area / ratio), sh)
    return (float(u[2] * (sw - w)), float(u[3] * (sh - h)), w, h)


def crop_box(
    rng: np.random.Generator, src_hw: tuple[int, int], out_hw: tuple[int, int], cfg: AugmentConfig | None
) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) in source pixels of a random crop with the output's aspect ratio (jittered).

    With no augmentation: the largest centred crop of the output's aspect ratio (whole image when equal).
    """
    sh, sw = src_hw
    oh, ow = out_hw
    if cfg is None or not cfg.enabled:
        w = min(sw, sh * ow / oh)
        h = w * oh / ow
        return ((sw - w) / 2, (sh - h) / 2, w, h)
    return random_crop(rng.random(4), src_hw, out_hw, cfg)


def erase_box(u: np.ndarray, hw: tuple[int, int], area: tuple[float, float]) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of a random-erasing box from 4 uniforms: area share, aspect ratio, y and x."""
    h, w = hw
    a = h * w * uniform(u[0], area)
    ratio = log_uniform(u[1], (0.3, 3.3))
    eh = int(min(h, max(1, round(math.sqrt(a / ratio)))))
    ew = int(min(w, max(1, round(math.sqrt(a * ratio)))))
    return int(u[2] * (h - eh + 1)), int(u[3] * (w - ew + 1)), eh, ew


NUM_DRAWS = 27 + 4 * 3 + 3  # uniforms per sample, drawn as one vector (separate generator calls cost more)


def draw_params(rng: np.random.Generator, out_hw: tuple[int, int], cfg: AugmentConfig | None) -> AugParams:
    """All of a sample's random choices from its own generator (see `params_from_draws`)."""
    if cfg is None or not cfg.enabled:
        return AugParams()
    return params_from_draws(rng.random(NUM_DRAWS), out_hw, cfg)


def params_from_draws(u: np.ndarray, out_hw: tuple[int, int], cfg: AugmentConfig | None) -> AugParams:
    """A sample's parameters from NUM_DRAWS uniforms in [0, 1): every choice has its own fixed slot, so one
    setting never shifts the random numbers of another. Plain Python floats and `math` throughout: numpy
    scalar arithmetic costs several times more, and this runs for every sample."""
    if cfg is None or not cfg.enabled:
        return AugParams()
    u = u.tolist() if isinstance(u, np.ndarray) else list(u)
    oh, ow = out_hw
    x0, y0, w, h = random_crop(u[0:4], out_hw, out_hw, cfg)
    q_lo, q_hi = cfg.jpeg_quality
    photo = PhotoParams(
        brightness=uniform(u[5], (1 - cfg.brightness, 1 + cfg.brightness)),
        contrast=uniform(u[6], (1 - cfg.contrast, 1 + cfg.contrast)),
        saturation=uniform(u[7], (1 - cfg.saturation, 1 + cfg.saturation)),
        hue=uniform(u[8], (-cfg.hue, cfg.hue)),
        gray=bool(u[9] < cfg.gray_p),
        blur_sigma=uniform(u[11], cfg.blur_sigma) if u[10] < cfg.blur_p else 0.0,
        noise_std=uniform(u[13], cfg.noise_std) if u[12] < cfg.noise_p else 0.0,
        noise_seed=int(u[14] * (2**31 - 1)),
    )
    return AugParams(
        box=(x0 / ow, y0 / oh, w / ow, h / oh),
        flip=bool(cfg.flip and u[17] < 0.5),
        photo=photo,
        jpeg_quality=min(q_hi, q_lo + int(u[4] * (q_hi - q_lo + 1))) if u[15] < cfg.jpeg_p else 0,
        erase=erase_box(u[18:22], out_hw, cfg.erase_area) if u[16] < cfg.erase_p else None,
        erase_fill=tuple(float(int(v * 256)) / 255 for v in u[22:25]),
        erase_occluder=cfg.erase_occluder,
        background_seed=int(u[26] * (2**31 - 1)) if u[25] < cfg.background_p else -1,
        garment_tints=tuple(
            garment_tint(u[27 + 4 * g : 31 + 4 * g]) if u[27 + 4 * g] < cfg.garment_p else None
            for g in range(len(GARMENT_REGIONS))
        ),
        shading=(u[40] * 2 * math.pi, uniform(u[41], (0.0, cfg.shading))) if u[39] < cfg.shading_p else None,
    )


# The garments recoloured, each with its own tint: top, bottom, shoes. Where the dataset has garments.png
# (render.write_garments) its labels say exactly which pixels each one covers; without it, the parts a
# garment usually covers stand in: top (torso, upper arms), bottom (legs), shoes (feet), which also repaints
# bare arms and legs. Skin and hair are identity; garments are not.
GARMENT_REGIONS: tuple[tuple[int, ...], ...] = ((2, 3, 4), (9, 10, 11, 12), (13, 14))
GARMENT_SLOTS: tuple[int, ...] = (GARMENT_ID["top"], GARMENT_ID["bottom"], GARMENT_ID["shoes"])
_PART_REGION_LUT = np.zeros(256, np.uint8)  # part label -> 1 + its garment region (0: none)
_GARMENT_REGION_LUT = np.zeros(256, np.uint8)  # garments.png label -> 1 + its garment region (0: none)
for _g, _region in enumerate(GARMENT_REGIONS):
    _PART_REGION_LUT[list(_region)] = _g + 1
    _GARMENT_REGION_LUT[GARMENT_SLOTS[_g]] = _g + 1


def garment_tint(u: list[float]) -> tuple[float, float, float, float]:
    """(r, g, b, gain) from 4 uniforms (the first already spent on 'whether'): a tint of random hue and
    saturation with grey 1, and a luminance gain in [0.6, 1.8] (dark and bright garments alike)."""
    _, hue, sat, gain = u
    rgb = np.array(colorsys.hsv_to_rgb(hue, sat**0.7, 1.0))
    rgb = rgb / float(rgb @ GRAY_NP)
    return float(rgb[0]), float(rgb[1]), float(rgb[2]), log_uniform(gain, (0.6, 1.8))


# ----------------------------------------------------------------------------------------------------------
# Per sample (uint8 HWC images, OpenCV, in the loader worker)


def pixel_box(box: tuple[float, float, float, float], src_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box in source pixels rounded to whole pixels (at least one) inside the image: the crop is random
    anyway, and whole-pixel boxes let one fast resize do the resampling."""
    x0, y0, w, h = box
    sh, sw = src_hw
    wi, hi = min(sw, max(1, round(w))), min(sh, max(1, round(h)))
    return min(max(0, round(x0)), sw - wi), min(max(0, round(y0)), sh - hi), wi, hi


def resize_rgb(rgb: np.ndarray, box: tuple[int, int, int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Crop a whole-pixel `box` (x0, y0, w, h) and resize to out_hw: bilinear at pixel centres when
    enlarging (the random crop), area-averaging when shrinking (no aliasing when shards are larger)."""
    x0, y0, w, h = box
    oh, ow = out_hw
    roi = rgb[y0 : y0 + h, x0 : x0 + w]
    if (h, w) == (oh, ow):
        return roi if roi.shape[:2] == rgb.shape[:2] else np.ascontiguousarray(roi)
    cv2 = opencv()
    shrink = ow <= w and oh <= h
    return cv2.resize(roi, (ow, oh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_labels(labels: np.ndarray, box: tuple[int, int, int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour crop of a whole-pixel `box` and resize of a label map (labels are never blended):
    each output pixel takes the source pixel containing its centre, the point the RGB is interpolated at
    (OpenCV's INTER_NEAREST_EXACT is exactly that rule)."""
    x0, y0, w, h = (int(v) for v in box)
    oh, ow = out_hw
    roi = labels[y0 : y0 + h, x0 : x0 + w]
    if (h, w) == (oh, ow):
        return roi if roi.shape == labels.shape else np.ascontiguousarray(roi)
    cv2 = opencv()
    return cv2.resize(roi, (ow, oh), interpolation=cv2.INTER_NEAREST_EXACT)


def sample_box(
    params: AugParams, src_hw: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The source pixels a sample's output shows: the fit to out_hw's aspect ratio, then its random crop."""
    fx, fy, fw, fh = crop_box(None, src_hw, out_hw, None)
    bx, by, bw, bh = params.box
    return pixel_box((fx + bx * fw, fy + by * fh, bw * fw, bh * fh), src_hw)


def crop_sample(
    rgb: np.ndarray, parts: np.ndarray, vid: np.ndarray, params: AugParams, out_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit to out_hw (largest centred crop of its aspect ratio) and the random resized crop in one
    resample. A flipped sample gets mirrored part ids and no vertex ids."""
    box = sample_box(params, parts.shape, out_hw)
    rgb = resize_rgb(rgb, box, out_hw)
    parts = resize_labels(parts, box, out_hw)
    vid = resize_labels(vid, box, out_hw)
    if params.flip:
        from protoreg.parts import MIRROR_PART

        rgb = np.ascontiguousarray(rgb[:, ::-1])
        parts = MIRROR_PART.astype(np.uint8)[parts[:, ::-1]]
        vid = np.zeros_like(vid)
    return rgb, parts, vid


def random_background(seed: int, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 procedural backdrop, half of the time a smooth random colour field (1-8 x 1-4 cells,
    mostly muted) with, most of the time, a sine or square grating of random frequency, angle and contrast;
    the other half a dead-leaves image (overlapping flat rectangles of random size and colour: edges,
    corners and flat areas at every scale, the generic statistics of clutter). Drawn at a quarter of the
    size and enlarged once (a backdrop has no finer detail than that; 4x cheaper)."""
    rng = np.random.default_rng(seed)
    cv2 = opencv()
    h, w = hw
    lh, lw = max(1, h // 4), max(1, w // 4)
    if rng.random() < 0.5:
        field = dead_leaves(rng, (lh, lw))
    else:
        field = colour_field(rng, (lh, lw))
    small = (np.clip(field, 0, 1) * 255 + 0.5).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, 3)


def muted_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) random colours, desaturated by a random amount (most backdrops are muted)."""
    cells = rng.random((n, 3)) ** rng.uniform(0.6, 2.2)
    grey = cells.mean(axis=-1, keepdims=True)
    return (grey + rng.uniform(0.0, 0.8) * (cells - grey)).astype(np.float32)


def colour_field(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) float smooth colour field, most of the time with a grating on it."""
    lh, lw = hw
    gh, gw = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    cells = muted_colours(rng, gh * gw).reshape(gh, gw, 3)
    cv2 = opencv()
    field = cv2.resize(cells, (lw, lh), interpolation=cv2.INTER_LINEAR).reshape(lh, lw, 3)
    if rng.random() < 0.7:
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.0, 12.0), rng.uniform(0, 2 * np.pi)
        k = np.float32(2 * np.pi * freq / max(lh, lw))
        wave = np.sin(
            (np.arange(lw, dtype=np.float32)[None] * np.float32(np.cos(theta)) * k + np.float32(phase))
            + np.arange(lh, dtype=np.float32)[:, None] * np.float32(np.sin(theta)) * k
        )
        if rng.random() < 0.5:
            wave = np.sign(wave)
        amp = (rng.uniform(0.05, 0.3) * rng.uniform(0.3, 1.0, size=3)).astype(np.float32)
        field = field + wave[..., None] * amp
    return field


def dead_leaves(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) float dead-leaves image: 20-80 flat rectangles, sizes from a power law, painted in turn."""
    lh, lw = hw
    n = int(rng.integers(20, 81))
    colours = muted_colours(rng, n)
    field = np.empty((lh, lw, 3), np.float32)
    field[:] = colours[0]
    sizes = np.maximum(1, (max(lh, lw) * rng.random((n, 2)) ** 2.5)).astype(int)
    for i in range(1, n):
        y, x = int(rng.integers(-sizes[i, 0] + 1, lh)), int(rng.integers(-sizes[i, 1] + 1, lw))
        field[max(y, 0) : y + sizes[i, 0], max(x, 0) : x + sizes[i, 1]] = colours[i]
    return field


BACKGROUND_BANK = 256  # textures per image size, made once per process from fixed seeds
_background_bank: dict[tuple[int, int], np.ndarray] = {}


def background_texture(seed: int, hw: tuple[int, int]) -> np.ndarray:
    """A fresh (H, W, 3) uint8 copy of one of BACKGROUND_BANK fixed textures, in one of four mirrorings
    (256 backdrops; the same in every process): a copy instead of a texture synthesis per sample."""
    bank = _background_bank.get(hw)
    if bank is None:
        bank = np.stack([random_background(0xBAC6 + i, hw) for i in range(BACKGROUND_BANK)])
        _background_bank[hw] = bank
    texture = bank[seed % BACKGROUND_BANK]
    mirror = (seed // BACKGROUND_BANK) % 4  # 0 as is, 1 left-right, 2 up-down, 3 both
    return texture.copy() if mirror == 0 else opencv().flip(texture, {1: 1, 2: 0, 3: -1}[mirror])


BACKGROUND_EDGE_SIGMA = 0.7  # pixels: the soft matte's reach across the person's outline


def background_sample(rgb: np.ndarray, parts: np.ndarray, params: AugParams) -> np.ndarray:
    """Repaint the background pixels (label 0) with the sample's random texture, when it drew one, through a
    soft matte: along the outline the render's pixels already mix person and old backdrop, and a hard cut
    would leave that old backdrop as a halo and a crisp edge no camera makes (a cue for finding the person
    that a new backdrop does not have)."""
    if params.background_seed < 0:
        return rgb
    cv2 = opencv()
    out = background_texture(params.background_seed, rgb.shape[:2])
    keep = (parts != 0).astype(np.float32)  # person and occluders
    alpha = cv2.GaussianBlur(keep, (0, 0), BACKGROUND_EDGE_SIGMA)[..., None]
    blended = rgb.astype(np.float32) * alpha + out.astype(np.float32) * (1.0 - alpha)
    return (blended + 0.5).astype(np.uint8)


def garment_sample(
    rgb: np.ndarray, parts: np.ndarray, params: AugParams, garments: np.ndarray | None = None
) -> np.ndarray:
    """Repaint the garments that drew a tint: each pixel keeps its luminance (times the gain: folds,
    stripes and shading stay) in the tint's colour, so the muted training garments also appear bright,
    pastel or saturated and garment colour stops being a cue the identity can lean on. Regions from the
    garments.png labels when given, else from the parts (GARMENT_REGIONS). One rank-1 colour matrix
    (tint x grey) per region through OpenCV, copied in under the region's mask."""
    if not any(params.garment_tints):
        return rgb
    cv2 = opencv()
    regions = _PART_REGION_LUT[parts] if garments is None else _GARMENT_REGION_LUT[garments]
    out = rgb.copy()
    for g, tint in enumerate(params.garment_tints):
        if tint is None:
            continue
        mask = (regions == g + 1).view(np.uint8)
        if not mask.any():
            continue
        matrix = np.outer(np.asarray(tint[:3]) * tint[3], GRAY_NP)
        cv2.copyTo(cv2.transform(rgb, matrix), mask, out)
    return out


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-compress and decode again (4:2:0, like the generator's and most cameras' files)."""
    cv2 = opencv()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # OpenCV's encoder expects BGR (luma/chroma split)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG re-compression failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)


def mean_gray(rgb: np.ndarray) -> float:
    """Mean grey of a uint8 image in [0, 1], measured on every 4th row (a SIMD pass over a quarter of the
    image: the contrast pivot needs no more)."""
    means = opencv().mean(rgb[::4])[:3]
    return float(np.dot(means, GRAY_NP)) / 255


def colour_sample(rgb: np.ndarray, params: AugParams) -> np.ndarray:
    """Colour jitter of one uint8 image through its 3x4 colour matrix (rounded, saturated)."""
    if not params.photo.recolours:
        return rgb
    lin, offset = colour_matrix(params.photo, params.mean_gray)
    return opencv().transform(rgb, np.concatenate([lin, 255 * offset[:, None]], axis=1))


def shading_sample(rgb: np.ndarray, params: AugParams) -> np.ndarray:
    """Light from one side: the image times exp(s (x cos a + y sin a) / sqrt 2) with x, y in [-1, 1] across
    the image (a low sun lights one side of a person and leaves the other in shade; the render's own light
    comes mostly from above)."""
    if params.shading is None or params.shading[1] <= 0:
        return rgb
    angle, strength = params.shading
    h, w = rgb.shape[:2]
    ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * np.float32(math.sin(angle))
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :] * np.float32(math.cos(angle))
    gain = np.exp(np.float32(strength) * (xs + ys) / np.float32(math.sqrt(2)))
    cv2 = opencv()
    return cv2.multiply(rgb, np.repeat(gain[..., None], 3, axis=2), dtype=cv2.CV_8U)


def blur_sample(rgb: np.ndarray, params: AugParams) -> np.ndarray:
    """Separable Gaussian blur of one uint8 image (edges replicated)."""
    if params.photo.blur_sigma <= 0:
        return rgb
    cv2 = opencv()
    k = gaussian_kernel(params.photo.blur_sigma)
    return cv2.sepFilter2D(rgb, -1, k, k, borderType=cv2.BORDER_REPLICATE)


def fit_sample(
    rng: np.random.Generator,
    rgb: np.ndarray,
    parts: np.ndarray,
    vid: np.ndarray,
    out_hw: tuple[int, int],
    cfg: AugmentConfig | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, AugParams]:
    """Draw a sample's parameters from `rng` and run its per-sample part (`augment_sample`)."""
    params = draw_params(rng, out_hw, cfg)
    return (*augment_sample(params, rgb, parts, vid, out_hw), params)


def augment_sample(
    params: AugParams,
    rgb: np.ndarray,
    parts: np.ndarray,
    vid: np.ndarray,
    out_hw: tuple[int, int],
    garments: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole augmentation of one sample: garment recolouring when drawn (at the source's size, where
    `garments`, the sample's garments.png labels if it has them, lies), fit + random resized crop to out_hw,
    background replacement and JPEG re-compression when drawn, colour jitter and blur (sets
    params.mean_gray), noise and erasing (the box labelled occluder, or its pixels' `valid` from
    params.erase, see `erase_mask`). Never changes its inputs."""
    source = rgb
    rgb = garment_sample(rgb, parts, params, garments)
    rgb, parts, vid = crop_sample(rgb, parts, vid, params, out_hw)
    rgb = background_sample(rgb, parts, params)
    if params.jpeg_quality:
        rgb = jpeg_roundtrip(rgb, params.jpeg_quality)
    if params.photo.recolours:
        params.mean_gray = mean_gray(rgb)
    rgb = colour_sample(rgb, params)
    rgb = shading_sample(rgb, params)
    rgb = blur_sample(rgb, params)
    rgb = noise_sample(rgb, params)
    if params.erase is not None and np.may_share_memory(rgb, source):
        rgb = rgb.copy()  # erasing paints in place; the caller's image stays as it was
    parts, vid = erase_labels(parts, vid, params)
    return erase_sample(rgb, params), parts, vid


def augment_garments(garments: np.ndarray, params: AugParams, out_hw: tuple[int, int]) -> np.ndarray:
    """A sample's garments.png labels through the crop, flip and erasing its part labels get (an erased box
    labelled occluder is off the person: "none")."""
    out = resize_labels(garments, sample_box(params, garments.shape, out_hw), out_hw)
    if params.flip:
        out = np.ascontiguousarray(out[:, ::-1])
    if params.erase is not None and params.erase_occluder:
        y0, x0, eh, ew = params.erase
        out = out.copy() if np.may_share_memory(out, garments) else out
        out[y0 : y0 + eh, x0 : x0 + ew] = GARMENT_ID["none"]
    return out


def erase_labels(parts: np.ndarray, vid: np.ndarray, params: AugParams) -> tuple[np.ndarray, np.ndarray]:
    """With `erase_occluder`, an erased box is something in front of the person: label OCCLUDER, no vertex
    (copies of the label maps; unchanged otherwise)."""
    if params.erase is None or not params.erase_occluder:
        return parts, vid
    y0, x0, eh, ew = params.erase
    parts, vid = parts.copy(), vid.copy()
    parts[y0 : y0 + eh, x0 : x0 + ew] = OCCLUDER
    vid[y0 : y0 + eh, x0 : x0 + ew] = 0
    return parts, vid


def noise_sample(rgb: np.ndarray, params: AugParams) -> np.ndarray:
    """uint8 (H,W,3) image + 255 * noise_std * the seed's shifted bank field (`shifted_noise`, so noise_std
    keeps its [0, 1]-image meaning), rounded and saturated to 0..255 by OpenCV's addWeighted in one pass
    per piece of the roll (no int16 or float copy of the image). Returns a new array when it noises."""
    std = params.photo.noise_std
    if std <= 0:
        return rgb
    h, w, c = rgb.shape
    size = h * w * c
    field = noise_field_hwc(params.photo.noise_seed, (h, w)).reshape(1, size)
    src = np.ascontiguousarray(rgb).reshape(1, size)
    out = np.empty_like(rgb)
    dst = out.reshape(1, size)
    k = c * ((params.photo.noise_seed // NOISE_FIELDS) % (h * w))  # the roll, in whole pixels
    _add_scaled_u8(src[:, k:], field[:, : size - k], 255.0 * std, dst[:, k:])
    if k:
        _add_scaled_u8(src[:, :k], field[:, size - k :], 255.0 * std, dst[:, :k])
    return out


def _add_scaled_u8(src: np.ndarray, field: np.ndarray, alpha: float, dst: np.ndarray) -> None:
    """dst = saturate(round(src + alpha * field)) for uint8 src/dst and a float32 field, into the view."""
    cv2 = opencv()
    out = cv2.addWeighted(src, 1.0, field, alpha, 0.0, dst=dst, dtype=cv2.CV_8U)
    if out.ctypes.data != dst.ctypes.data:  # OpenCV declined the view: copy its result over
        dst[...] = out


def erase_sample(rgb: np.ndarray, params: AugParams) -> np.ndarray:
    """Paint the drawn erase box of a uint8 (H,W,3) image with its fill colour, in place (OpenCV's filled
    rectangle: a tenth of the cost of numpy's broadcast into a 3-channel box)."""
    if params.erase is None:
        return rgb
    y0, x0, eh, ew = params.erase
    fill = tuple(int(v) for v in erase_colour(params))
    return opencv().rectangle(np.ascontiguousarray(rgb), (x0, y0), (x0 + ew - 1, y0 + eh - 1), fill, -1)


def erase_colour(params: AugParams) -> np.ndarray:
    """The erase fill as uint8 (erase_fill holds k / 255 for whole k)."""
    return np.array([round(v * 255) for v in params.erase_fill], dtype=np.uint8)


def erase_mask(valid: np.ndarray, params: AugParams) -> None:
    """Without `erase_occluder`, mark a sample's erased box invalid in its (H,W) bool `valid` (erased pixels
    keep their labels, but no loss may trust them); the rest is set valid."""
    valid.fill(True)
    if params.erase is not None and not params.erase_occluder:
        y0, x0, eh, ew = params.erase
        valid[y0 : y0 + eh, x0 : x0 + ew] = False


# ----------------------------------------------------------------------------------------------------------
# Noise for float batches (`photometric`)


def noise_batch(images: torch.Tensor, params: list[AugParams]) -> torch.Tensor:
    """Gaussian noise from the fixed field bank (shifted per sample) for the samples that drew it, clipped
    to [0, 1] (the other samples are in range already). In place, through numpy (one thread)."""
    _, _, h, w = images.shape
    images = images.contiguous()  # the in-place numpy views below need one block per image
    x = images.numpy()
    for i, p in enumerate(params):
        if p.photo.noise_std > 0:
            add_shifted_noise(x[i], p.photo.noise_seed, np.float32(p.photo.noise_std))
            np.clip(x[i], 0, 1, out=x[i])
    return images


def add_shifted_noise(image: np.ndarray, seed: int, std: np.float32) -> None:
    """image (3,H,W) float32 += std * shifted_noise(seed), in place, without materialising the roll."""
    _, h, w = image.shape
    n = h * w
    if not image.flags.c_contiguous:
        raise ValueError("add_shifted_noise: image must be C-contiguous (it is changed in place)")
    flat = image.reshape(3, n)
    field = noise_field(seed, (h, w)).numpy().reshape(3, n)
    shift = (seed // NOISE_FIELDS) % n
    _scale_add(field[:, : n - shift], std, flat[:, shift:])
    if shift:
        _scale_add(field[:, n - shift :], std, flat[:, :shift])


def _scale_add(src: np.ndarray, alpha: np.float32, dst: np.ndarray) -> None:
    """dst += alpha * src in one pass (OpenCV's scaleAdd writing into the view; numpy if it would not)."""
    out = opencv().scaleAdd(src, float(alpha), dst, dst=dst)
    if out.ctypes.data != dst.ctypes.data:
        dst += alpha * src


# ----------------------------------------------------------------------------------------------------------
# The colour and blur definitions, and their torch versions for float batches (`photometric`)

GRAY_NP = np.array([0.299, 0.587, 0.114])
TO_YIQ_NP = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
FROM_YIQ_NP = np.linalg.inv(TO_YIQ_NP)
GRAY = torch.tensor(GRAY_NP, dtype=torch.float32)
TO_YIQ = torch.tensor(TO_YIQ_NP, dtype=torch.float32)
FROM_YIQ = torch.tensor(FROM_YIQ_NP, dtype=torch.float32)
_TO_GREY = np.outer(np.ones(3), GRAY_NP)  # x -> grey(x) on every channel
# The YIQ hue rotation FROM @ R(a) @ TO, split as fixed + cos(a) * _HUE_COS + sin(a) * _HUE_SIN.
_HUE_FIXED = np.outer(FROM_YIQ_NP[:, 0], TO_YIQ_NP[0])
_HUE_COS = FROM_YIQ_NP[:, 1:] @ TO_YIQ_NP[1:]
_HUE_SIN = FROM_YIQ_NP[:, 1:] @ np.array([[0.0, -1.0], [1.0, 0.0]]) @ TO_YIQ_NP[1:]
BLUR_RADIUS = 3
NOISE_FIELDS = 8  # a fixed bank of unit-variance noise fields per image size, shared by all samples
_noise_bank: dict[tuple[int, int], torch.Tensor] = {}


def colour_matrix(p: PhotoParams, mean_gray: float) -> tuple[np.ndarray, np.ndarray]:
    """Brightness, contrast, saturation/grey and hue folded into one affine map: x' = A x + c (x in [0,1]).

    brightness: x*b; contrast: (x - m)*k + m with m the image's mean grey after brightness;
    saturation: (x - g(x))*s + g(x); hue: rotation about the grey axis (YIQ), which keeps grey, so
    A = b*k*(s*H + (1 - s)*G) with H the hue rotation and G the map to grey. -> A (3,3), c (3,).
    """
    sat = 0.0 if p.gray else p.saturation
    a = p.hue * 2 * np.pi
    hue = _HUE_FIXED + np.cos(a) * _HUE_COS + np.sin(a) * _HUE_SIN
    lin = (sat * hue + (1 - sat) * _TO_GREY) * (p.brightness * p.contrast)
    offset = np.full(3, mean_gray * p.brightness * (1 - p.contrast))  # grey: unchanged by sat and hue
    return lin, offset


def colour_batch(images: torch.Tensor, params: list[AugParams]) -> torch.Tensor:
    """Colour jitter of a float batch as x' = A x + c per sample (the 3-term sums have a fixed order:
    identical results for any thread count)."""
    if not any(p.photo.recolours for p in params):
        return images
    b, _, h, w = images.shape
    maps = [colour_matrix(p.photo, p.mean_gray) for p in params]
    lin = torch.tensor(np.stack([m[0] for m in maps]), dtype=torch.float32)
    offset = torch.tensor(np.stack([m[1] for m in maps]), dtype=torch.float32)
    x = images.reshape(b, 3, h * w)
    return torch.baddbmm(offset.view(b, 3, 1), lin, x).view(b, 3, h, w)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """(2r+1,) normalised 1-D Gaussian."""
    x = np.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
    return k / k.sum()


def blur_batch(images: torch.Tensor, params: list[AugParams]) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (depthwise convolutions), only for the samples that
    drew one."""
    idx = [i for i, p in enumerate(params) if p.photo.blur_sigma > 0]
    if not idx:
        return images
    sel = torch.tensor(idx)
    k = torch.from_numpy(np.stack([gaussian_kernel(params[i].photo.blur_sigma) for i in idx]))
    k = k.repeat_interleave(3, dim=0)  # (K*3, taps): one kernel per channel of each sample
    x = images[sel]
    n, _, h, w = x.shape
    r = BLUR_RADIUS
    x = F.pad(x.reshape(1, n * 3, h, w), (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(n * 3, 1, 1, -1), groups=n * 3)
    x = F.conv2d(x, k.view(n * 3, 1, -1, 1), groups=n * 3)
    images[sel] = x.view(n, 3, h, w)
    return images


def noise_field(index: int, hw: tuple[int, int]) -> torch.Tensor:
    """One of NOISE_FIELDS fixed unit Gaussian fields (3,H,W): cheap, and the same in every process."""
    bank = _noise_bank.get(hw)
    if bank is None:
        g = torch.Generator().manual_seed(0x5EED)
        bank = torch.randn(NOISE_FIELDS, 3, *hw, generator=g)
        _noise_bank[hw] = bank
    return bank[index % NOISE_FIELDS]


_noise_bank_hwc: dict[tuple[int, int], np.ndarray] = {}


def noise_field_hwc(index: int, hw: tuple[int, int]) -> np.ndarray:
    """`noise_field` as a (H,W,3) float32 array: the layout of the worker's uint8 images."""
    bank = _noise_bank_hwc.get(hw)
    if bank is None:
        fields = torch.stack([noise_field(i, hw) for i in range(NOISE_FIELDS)])  # (N,3,H,W)
        bank = np.ascontiguousarray(fields.permute(0, 2, 3, 1).numpy())
        _noise_bank_hwc[hw] = bank
    return bank[index % NOISE_FIELDS]


def shifted_noise(seed: int, hw: tuple[int, int]) -> torch.Tensor:
    """A bank field rolled by a seed-dependent shift, so samples sharing a field still differ."""
    h, w = hw
    shift = (seed // NOISE_FIELDS) % (h * w)
    field = noise_field(seed, hw).numpy().reshape(3, -1)
    return torch.from_numpy(np.roll(field, shift, axis=1).reshape(3, h, w))


def photometric(images: torch.Tensor, params: list[PhotoParams]) -> torch.Tensor:
    """Colour jitter, grey, blur and noise for a float batch (B,3,H,W) in [0,1] (the mean grey is measured
    on the batch itself), with the same definitions as the loader's per-sample path."""
    if not params or all(p == PhotoParams() for p in params):
        return images
    b, _, h, w = images.shape
    means = torch.einsum("c,bchw->b", GRAY.double(), images.double()).float() / (h * w)
    aug = [AugParams(photo=p, mean_gray=float(m)) for p, m in zip(params, means, strict=True)]
    images = colour_batch(images, aug)
    images = blur_batch(images, aug)
    images = noise_batch(images, aug)
    return images.clamp_(0, 1)
