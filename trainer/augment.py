"""Training-time augmentation for synthetic-to-real generalisation, cheap enough for 2 CPU cores.

Geometric steps (random resized crop) run per sample and move RGB and label maps together
(bilinear for RGB, nearest for labels). Colour jitter and grey are folded into one affine colour map
applied by Pillow on uint8 (C code), blur is a bilinear down/up-sample, JPEG re-compression uses
Pillow, random erasing paints a patch; noise is added to the whole batch in torch from a fixed bank
of noise fields. `photometric` applies the same colour maps to float batches. Every random number
comes from the sample's own generator, so a sample is augmented the same way whichever worker or
process handles it. Erased pixels keep their labels but are marked invalid, so no loss trusts them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.config import AugmentConfig


@dataclass
class PhotoParams:
    """Per-sample photometric parameters drawn in the worker, applied later to the whole batch."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # fraction of a turn
    gray: bool = False
    blur_sigma: float = 0.0  # 0 = no blur
    noise_std: float = 0.0
    noise_seed: int = 0


def crop_box(
    rng: np.random.Generator, src_hw: tuple[int, int], out_hw: tuple[int, int], cfg: AugmentConfig | None
) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) of a random crop of the source with the output's aspect ratio (jittered).

    With no augmentation: the largest centred crop of the output's aspect ratio (whole image when equal).
    """
    sh, sw = src_hw
    oh, ow = out_hw
    target = ow / oh
    if cfg is None or not cfg.enabled:
        w = min(sw, sh * target)
        h = w / target
        return ((sw - w) / 2, (sh - h) / 2, w, h)
    area = sh * sw * rng.uniform(*cfg.crop_scale)
    ratio = target * np.exp(rng.uniform(np.log(cfg.crop_ratio[0]), np.log(cfg.crop_ratio[1])))
    w = min(float(np.sqrt(area * ratio)), sw)
    h = min(float(np.sqrt(area / ratio)), sh)
    x0 = rng.uniform(0, sw - w) if sw > w else 0.0
    y0 = rng.uniform(0, sh - h) if sh > h else 0.0
    return (x0, y0, w, h)


def resize_rgb(
    rgb: np.ndarray, box: tuple[float, float, float, float], out_hw: tuple[int, int]
) -> np.ndarray:
    """Crop `box` and resize to out_hw with Pillow's bilinear filter (antialiased)."""
    x0, y0, w, h = box
    im = Image.fromarray(rgb)
    oh, ow = out_hw
    if (x0, y0, w, h) == (0, 0, rgb.shape[1], rgb.shape[0]) and (oh, ow) == rgb.shape[:2]:
        return rgb
    return np.asarray(im.resize((ow, oh), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h)))


def resize_labels(
    labels: np.ndarray, box: tuple[float, float, float, float], out_hw: tuple[int, int]
) -> np.ndarray:
    """Nearest-neighbour crop+resize of a label map (labels are never blended)."""
    x0, y0, w, h = box
    oh, ow = out_hw
    ys = np.minimum(np.floor(y0 + (np.arange(oh) + 0.5) * (h / oh)).astype(np.intp), labels.shape[0] - 1)
    xs = np.minimum(np.floor(x0 + (np.arange(ow) + 0.5) * (w / ow)).astype(np.intp), labels.shape[1] - 1)
    return labels.take(ys, axis=0).take(xs, axis=1)


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def erase_box(rng: np.random.Generator, hw: tuple[int, int], area: tuple[float, float]) -> tuple[int, ...]:
    h, w = hw
    a = h * w * rng.uniform(*area)
    ratio = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    eh = int(min(h, max(1, round(np.sqrt(a / ratio)))))
    ew = int(min(w, max(1, round(np.sqrt(a * ratio)))))
    y0 = int(rng.integers(0, h - eh + 1))
    x0 = int(rng.integers(0, w - ew + 1))
    return y0, x0, eh, ew


def augment_sample(
    rng: np.random.Generator,
    rgb: np.ndarray,
    parts: np.ndarray,
    vid: np.ndarray,
    out_hw: tuple[int, int],
    cfg: AugmentConfig | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, PhotoParams]:
    """Per-sample geometric and Pillow steps: -> rgb (H,W,3) uint8, parts, vid, valid (H,W) bool, params.

    The number and order of draws from `rng` are fixed, whatever the probabilities decide, so one
    setting never shifts the random numbers of another.
    """
    active = cfg is not None and cfg.enabled
    box = crop_box(rng, parts.shape, out_hw, cfg)
    rgb = resize_rgb(rgb, box, out_hw)
    parts = resize_labels(parts, box, out_hw)
    vid = resize_labels(vid, box, out_hw)
    valid = np.ones(out_hw, dtype=bool)
    if not active:
        return rgb, parts, vid, valid, PhotoParams()
    u = rng.random(8)
    jpeg_q = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    params = PhotoParams(
        brightness=float(1 + rng.uniform(-cfg.brightness, cfg.brightness)),
        contrast=float(1 + rng.uniform(-cfg.contrast, cfg.contrast)),
        saturation=float(1 + rng.uniform(-cfg.saturation, cfg.saturation)),
        hue=float(rng.uniform(-cfg.hue, cfg.hue)),
        gray=bool(u[0] < cfg.gray_p),
        blur_sigma=float(rng.uniform(*cfg.blur_sigma)) if u[1] < cfg.blur_p else 0.0,
        noise_std=float(rng.uniform(*cfg.noise_std)) if u[2] < cfg.noise_p else 0.0,
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
    rgb = apply_colour(rgb, params)
    if params.blur_sigma > 0:
        rgb = cheap_blur(rgb, params.blur_sigma)
    if u[3] < cfg.jpeg_p:
        rgb = jpeg_roundtrip(rgb, jpeg_q)
    box_e = erase_box(rng, out_hw, cfg.erase_area)
    fill = rng.integers(0, 256, size=3, dtype=np.uint8)
    if u[4] < cfg.erase_p:
        y0, x0, eh, ew = box_e
        rgb = rgb.copy()
        rgb[y0 : y0 + eh, x0 : x0 + ew] = fill
        valid[y0 : y0 + eh, x0 : x0 + ew] = False
    if cfg.flip and u[5] < 0.5:
        from protoreg.parts import MIRROR_PART

        rgb, parts, vid, valid = rgb[:, ::-1], MIRROR_PART[parts[:, ::-1]], vid[:, ::-1] * 0, valid[:, ::-1]
    return rgb, parts, vid, valid, params


def apply_colour(rgb: np.ndarray, p: PhotoParams) -> np.ndarray:
    """Colour jitter of one uint8 image as Pillow's affine colour matrix (C, ~10x cheaper than float)."""
    lin, offset = colour_transform(
        [p], torch.tensor([float(rgb.reshape(-1, 3).mean(0) @ GRAY.numpy()) / 255])
    )
    m = lin[0].numpy()
    if np.allclose(m, np.eye(3), atol=1e-6) and abs(float(offset[0, 0])) < 1e-6:
        return rgb
    off = offset[0].numpy() * 255
    matrix = tuple(float(v) for row in range(3) for v in (*m[row], off[row]))
    return np.asarray(Image.fromarray(rgb).convert("RGB", matrix=matrix))


def cheap_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian-like blur by bilinear down- and up-sampling (factor 1 + sigma): a fraction of the cost of
    ImageFilter.GaussianBlur at these sizes, and blur is only a nuisance to learn through."""
    h, w = rgb.shape[:2]
    f = 1.0 + float(sigma)
    im = Image.fromarray(rgb)
    small = im.resize((max(1, round(w / f)), max(1, round(h / f))), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def batch_noise(images: torch.Tensor, params: list[PhotoParams]) -> torch.Tensor:
    """Gaussian noise for a batch (B,3,H,W) in [0,1] from the fixed field bank (colour and blur were applied
    per sample in the worker)."""
    if not any(p.noise_std > 0 for p in params):
        return images
    b, _, h, w = images.shape
    for i, p in enumerate(params):
        if p.noise_std > 0:
            field = noise_field(p.noise_seed, (h, w))
            shift = (p.noise_seed // NOISE_FIELDS) % (h * w)
            images[i].add_(field.reshape(3, -1).roll(shift, dims=1).view(3, h, w), alpha=p.noise_std)
    return images.clamp_(0, 1)


GRAY = torch.tensor([0.299, 0.587, 0.114])
TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
FROM_YIQ = torch.linalg.inv(TO_YIQ)
NOISE_FIELDS = 8  # a fixed bank of unit-variance noise fields per image size, shared by all samples
_noise_bank: dict[tuple[int, int], torch.Tensor] = {}


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """(B,3,3) RGB->RGB rotations about the grey axis (YIQ hue rotation)."""
    to_yiq, from_yiq = TO_YIQ, FROM_YIQ
    a = turns * 2 * torch.pi
    c, s = torch.cos(a), torch.sin(a)
    rot = torch.zeros(len(turns), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return from_yiq @ rot @ to_yiq


def colour_transform(params: list[PhotoParams], mean_gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast, saturation/grey and hue folded into one affine map per image: x' = A x + c.

    brightness: x*b; contrast: (x - m)*k + m with m the image's mean grey after brightness;
    saturation: (x - g(x))*s + g(x); hue: rotation about the grey axis.
    """
    b = len(params)

    def col(name: str) -> torch.Tensor:
        return torch.tensor([float(getattr(p, name)) for p in params], dtype=torch.float32)

    bright, contrast = col("brightness"), col("contrast")
    sat = col("saturation") * (1 - col("gray"))
    eye = torch.eye(3).expand(b, 3, 3)
    g = torch.ones(3, 1) * GRAY[None]  # x -> grey(x) broadcast to RGB
    sat_m = sat.view(b, 1, 1) * eye + (1 - sat).view(b, 1, 1) * g
    lin = _hue_matrices(col("hue")) @ sat_m * (bright * contrast).view(b, 1, 1)
    m = mean_gray * bright
    offset_vec = (m * (1 - contrast)).view(b, 1) * torch.ones(b, 3)  # grey offset: unchanged by sat and hue
    return lin, offset_vec


def noise_field(index: int, hw: tuple[int, int]) -> torch.Tensor:
    """One of NOISE_FIELDS fixed unit Gaussian fields (3,H,W): cheap, and the same in every process."""
    bank = _noise_bank.get(hw)
    if bank is None:
        g = torch.Generator().manual_seed(0x5EED)
        bank = torch.randn(NOISE_FIELDS, 3, *hw, generator=g)
        _noise_bank[hw] = bank
    return bank[index % NOISE_FIELDS]


def photometric(images: torch.Tensor, params: list[PhotoParams]) -> torch.Tensor:
    """Colour jitter, grey and noise for a batch (B,3,H,W) in [0,1]: one batched affine colour map plus
    noise from a fixed field bank (shifted and flipped per sample). Blur runs per sample in the worker."""
    if not params or all(p == PhotoParams() for p in params):
        return images
    b, _, h, w = images.shape
    mean_gray = torch.einsum("c,bchw->b", GRAY, images) / (h * w)
    lin, offset = colour_transform(params, mean_gray)
    x = torch.baddbmm(offset.view(b, 3, 1), lin, images.reshape(b, 3, h * w)).view(b, 3, h, w)
    for i, p in enumerate(params):
        if p.noise_std > 0:
            field = noise_field(p.noise_seed, (h, w))
            shift = (p.noise_seed // NOISE_FIELDS) % (h * w)
            field = field.reshape(3, -1).roll(shift, dims=1).view(3, h, w)
            x[i].add_(field, alpha=p.noise_std)
    return x.clamp_(0, 1)
