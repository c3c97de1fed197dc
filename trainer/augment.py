"""Training-time augmentation for synthetic-to-real generalisation, cheap enough for 2 CPU cores.

Geometric steps (random resized crop) run per sample and move RGB and label maps together
(bilinear for RGB, nearest for labels). Photometric steps (colour jitter, grey, blur, noise) run
vectorised over a whole batch in torch; JPEG re-compression (Pillow) and random erasing run per
sample. Every random number comes from the sample's own generator, so a sample is augmented the
same way whichever worker or process handles it. Erased pixels keep their labels but are marked
invalid, so no loss trusts them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.config import AugmentConfig

BLUR_TAPS = 7  # separable Gaussian kernel length (sigma up to ~1.5 px)


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
    ys = np.clip(np.floor(y0 + (np.arange(oh) + 0.5) * (h / oh)).astype(np.int64), 0, labels.shape[0] - 1)
    xs = np.clip(np.floor(x0 + (np.arange(ow) + 0.5) * (w / ow)).astype(np.int64), 0, labels.shape[1] - 1)
    return labels[ys[:, None], xs[None, :]]


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


def _rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """(B,3,3) RGB->RGB rotations about the grey axis (YIQ hue rotation)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    a = turns * 2 * torch.pi
    c, s = torch.cos(a), torch.sin(a)
    rot = torch.zeros(len(turns), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return from_yiq @ rot @ to_yiq


def _gaussian_kernels(sigmas: torch.Tensor) -> torch.Tensor:
    """(B, BLUR_TAPS) normalised 1-D Gaussians; sigma 0 gives the identity kernel."""
    r = torch.arange(BLUR_TAPS, dtype=torch.float32) - BLUR_TAPS // 2
    s = sigmas.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (r[None] / s) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def photometric(images: torch.Tensor, params: list[PhotoParams]) -> torch.Tensor:
    """Colour jitter, grey, blur and noise for a batch (B,3,H,W) in [0,1], vectorised over the batch."""
    if not params or all(p == PhotoParams() for p in params):
        return images
    b = len(params)
    x = images

    def col(name: str) -> torch.Tensor:
        return torch.tensor([float(getattr(p, name)) for p in params], dtype=torch.float32)

    x = x * col("brightness").view(b, 1, 1, 1)
    mean = _rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * col("contrast").view(b, 1, 1, 1) + mean
    gray = _rgb_to_gray(x)
    sat = col("saturation") * (1 - col("gray"))
    x = (x - gray) * sat.view(b, 1, 1, 1) + gray
    hue = _hue_matrices(col("hue"))
    x = torch.einsum("bij,bjhw->bihw", hue, x)
    sig = col("blur_sigma")
    if bool((sig > 0).any()):
        k = _gaussian_kernels(sig)
        k = torch.where(
            (sig > 0)[:, None], k, F.one_hot(torch.tensor(BLUR_TAPS // 2), BLUR_TAPS).float()[None]
        )
        kk = k.repeat_interleave(3, dim=0)  # (B*3, taps)
        h, w = x.shape[-2:]
        y = x.reshape(1, b * 3, h, w)
        pad = BLUR_TAPS // 2
        y = F.conv2d(
            F.pad(y, (pad, pad, 0, 0), mode="replicate"), kk.view(b * 3, 1, 1, BLUR_TAPS), groups=b * 3
        )
        y = F.conv2d(
            F.pad(y, (0, 0, pad, pad), mode="replicate"), kk.view(b * 3, 1, BLUR_TAPS, 1), groups=b * 3
        )
        x = y.view(b, 3, h, w)
    std = col("noise_std")
    if bool((std > 0).any()):
        noise = torch.empty_like(x)
        for i, p in enumerate(params):
            if p.noise_std > 0:
                g = torch.Generator().manual_seed(p.noise_seed)
                noise[i] = torch.randn(x.shape[1:], generator=g) * p.noise_std
            else:
                noise[i] = 0
        x = x + noise
    return x.clamp_(0, 1)
