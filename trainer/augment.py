"""Training-time augmentation for synthetic-to-real generalisation, cheap enough for 2 CPU cores.

Split in two so that the per-sample work in a loader worker is little more than decoding:
- per sample (`draw_params`, `fit_sample`): every random number of a sample is drawn from the sample's
  own generator into an `AugParams`; the image is fitted to the output size (only when the shard's size
  differs) and, with a probability, JPEG re-compressed by Pillow (the one step that needs a codec);
- per batch (`augment_batch`), vectorised in torch after collation: random resized crop (and optional
  flip) through one `affine_grid` + `grid_sample` (bilinear for RGB, nearest for the labels, so labels
  move with their pixels), colour jitter as a per-sample 3x3 colour matrix + offset, blur as a separable
  Gaussian with per-sample kernels, noise from a fixed bank of fields, random erasing through masks.
Erased pixels keep their labels but are marked invalid, so no loss trusts them. Every batch operation is
elementwise or a fixed-order sum, so a batch is bit-identical whichever process or thread count made it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.config import AugmentConfig


@dataclass
class PhotoParams:
    """Per-sample photometric parameters (colour, blur, noise) applied to the whole batch at once."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # fraction of a turn
    gray: bool = False
    blur_sigma: float = 0.0  # 0 = no blur
    noise_std: float = 0.0
    noise_seed: int = 0


@dataclass
class AugParams:
    """Everything random about one sample's augmentation, drawn in the worker from the sample's generator."""

    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # crop (x0, y0, w, h) as image fractions
    flip: bool = False
    photo: PhotoParams = field(default_factory=PhotoParams)
    mean_gray: float = 0.5  # the fitted image's mean grey in [0, 1] (contrast pivots around it)
    jpeg_quality: int = 0  # 0 = no re-compression
    erase: tuple[int, int, int, int] | None = None  # (y0, x0, h, w) in output pixels
    erase_fill: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def geometric(self) -> bool:
        return self.flip or self.box != (0.0, 0.0, 1.0, 1.0)


def crop_box(
    rng: np.random.Generator, src_hw: tuple[int, int], out_hw: tuple[int, int], cfg: AugmentConfig | None
) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) in source pixels of a random crop with the output's aspect ratio (jittered).

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
    oh, ow = out_hw
    if (x0, y0, w, h) == (0, 0, rgb.shape[1], rgb.shape[0]) and (oh, ow) == rgb.shape[:2]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((ow, oh), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h)))


def resize_labels(
    labels: np.ndarray, box: tuple[float, float, float, float], out_hw: tuple[int, int]
) -> np.ndarray:
    """Nearest-neighbour crop+resize of a label map (labels are never blended)."""
    x0, y0, w, h = box
    oh, ow = out_hw
    if (x0, y0, w, h) == (0, 0, labels.shape[1], labels.shape[0]) and (oh, ow) == labels.shape[:2]:
        return labels
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


def draw_params(rng: np.random.Generator, out_hw: tuple[int, int], cfg: AugmentConfig | None) -> AugParams:
    """All of a sample's random choices. The number and order of draws from `rng` are fixed, whatever the
    probabilities decide, so one setting never shifts the random numbers of another."""
    if cfg is None or not cfg.enabled:
        return AugParams()
    oh, ow = out_hw
    x0, y0, w, h = crop_box(rng, out_hw, out_hw, cfg)
    box = (x0 / ow, y0 / oh, w / ow, h / oh)
    u = rng.random(8)
    jpeg_q = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    photo = PhotoParams(
        brightness=float(1 + rng.uniform(-cfg.brightness, cfg.brightness)),
        contrast=float(1 + rng.uniform(-cfg.contrast, cfg.contrast)),
        saturation=float(1 + rng.uniform(-cfg.saturation, cfg.saturation)),
        hue=float(rng.uniform(-cfg.hue, cfg.hue)),
        gray=bool(u[0] < cfg.gray_p),
        blur_sigma=float(rng.uniform(*cfg.blur_sigma)) if u[1] < cfg.blur_p else 0.0,
        noise_std=float(rng.uniform(*cfg.noise_std)) if u[2] < cfg.noise_p else 0.0,
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
    box_e = erase_box(rng, out_hw, cfg.erase_area)
    fill = rng.integers(0, 256, size=3)
    return AugParams(
        box=box,
        flip=bool(cfg.flip and u[5] < 0.5),
        photo=photo,
        jpeg_quality=jpeg_q if u[3] < cfg.jpeg_p else 0,
        erase=tuple(box_e) if u[4] < cfg.erase_p else None,
        erase_fill=tuple(float(v) / 255 for v in fill),
    )


def mean_gray(rgb: np.ndarray) -> float:
    """Mean grey of a uint8 image from an exact integer sum over every 4th pixel (float64 means over the
    whole image cost more than the decode)."""
    sub = rgb[::4, ::4].reshape(-1, 3)
    sums = sub.sum(axis=0, dtype=np.int64)
    return float(sums @ np.array([0.299, 0.587, 0.114])) / (255 * max(1, len(sub)))


def fit_sample(
    rng: np.random.Generator,
    rgb: np.ndarray,
    parts: np.ndarray,
    vid: np.ndarray,
    out_hw: tuple[int, int],
    cfg: AugmentConfig | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, AugParams]:
    """The per-sample part: the sample's random parameters, the image fitted to out_hw (largest centred
    crop of its aspect ratio; a no-op when the shard already has that size), JPEG re-compression when
    drawn. Everything else is deferred to `augment_batch`."""
    params = draw_params(rng, out_hw, cfg)
    box = crop_box(rng, parts.shape, out_hw, None)
    rgb = resize_rgb(rgb, box, out_hw)
    parts = resize_labels(parts, box, out_hw)
    vid = resize_labels(vid, box, out_hw)
    if params.jpeg_quality:
        rgb = jpeg_roundtrip(rgb, params.jpeg_quality)
    params.mean_gray = mean_gray(rgb)
    return rgb, parts, vid, params


# ----------------------------------------------------------------------------------------------------------
# Batch level (torch, after collation)


def crop_coords(params: list[AugParams], hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling positions of every sample's crop box (and flip) in grid_sample's normalised coordinates
    (align_corners=False): gx (B,W) per output column, gy (B,H) per output row. Crops are axis-aligned,
    so rows and columns suffice (affine_grid's batched matmul costs more than the resampling)."""
    h, w = hw
    boxes = torch.tensor([p.box for p in params], dtype=torch.float32)  # (B, 4) x0, y0, w, h fractions
    flip = torch.tensor([-1.0 if p.flip else 1.0 for p in params])
    u = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1  # output pixel centres in [-1, 1]
    v = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    gx = (flip * boxes[:, 2])[:, None] * u[None] + (2 * boxes[:, 0] + boxes[:, 2] - 1)[:, None]
    gy = boxes[:, 3:4] * v[None] + (2 * boxes[:, 1] + boxes[:, 3] - 1)[:, None]
    return gx, gy


def crop_grid(params: list[AugParams], hw: tuple[int, int]) -> torch.Tensor:
    """(B,H,W,2) sampling grid of the crops, for grid_sample(align_corners=False)."""
    h, w = hw
    gx, gy = crop_coords(params, hw)
    b = len(params)
    return torch.stack([gx[:, None, :].expand(b, h, w), gy[:, :, None].expand(b, h, w)], dim=-1)


def nearest_labels(labels: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling of (B,H,W) labels at the crop positions, as one gather (the source
    pixel whose cell contains the sampling point, the same point the RGB is interpolated at)."""
    b, h, w = labels.shape
    xs = ((gx + 1) * (w / 2)).floor().clamp_(0, w - 1).long()
    ys = ((gy + 1) * (h / 2)).floor().clamp_(0, h - 1).long()
    return labels[torch.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]]


def crop_batch(
    images: torch.Tensor, parts: torch.Tensor, vid: torch.Tensor, params: list[AugParams]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random resized crop of the samples that have one: bilinear RGB, nearest labels at the same
    positions, so labels move with their pixels. A flipped sample gets mirrored part ids and no vertex ids."""
    idx = [i for i, p in enumerate(params) if p.geometric]
    if not idx:
        return images, parts, vid
    hw = tuple(images.shape[-2:])
    sub = [params[i] for i in idx]
    gx, gy = crop_coords(sub, hw)
    grid = crop_grid(sub, hw)
    if len(idx) == len(params):
        images = F.grid_sample(images, grid, "bilinear", padding_mode="border", align_corners=False)
        parts, vid = nearest_labels(parts, gx, gy), nearest_labels(vid, gx, gy)
    else:
        sel = torch.tensor(idx)
        images[sel] = F.grid_sample(images[sel], grid, "bilinear", padding_mode="border", align_corners=False)
        parts[sel], vid[sel] = nearest_labels(parts[sel], gx, gy), nearest_labels(vid[sel], gx, gy)
    flipped = [i for i in idx if params[i].flip]
    if flipped:
        from protoreg.parts import MIRROR_PART

        rows = torch.tensor(flipped)
        parts[rows] = torch.from_numpy(MIRROR_PART.astype(np.int64))[parts[rows].long()].to(parts.dtype)
        vid[rows] = 0
    return images, parts, vid


def colour_batch(images: torch.Tensor, params: list[AugParams]) -> torch.Tensor:
    """Colour jitter of a batch as x' = A x + c per sample, written as explicit per-channel sums (fixed
    order: identical results for any thread count)."""
    photos = [p.photo for p in params]
    if all(p == PhotoParams() for p in photos):
        return images
    b = len(params)
    lin, offset = colour_transform(photos, torch.tensor([p.mean_gray for p in params], dtype=torch.float32))
    return apply_affine_colour(images, lin.view(b, 3, 3, 1, 1), offset.view(b, 3, 1, 1))


def apply_affine_colour(images: torch.Tensor, lin: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """images (B,3,H,W), lin (B,3,3,1,1), offset (B,3,1,1) -> A x + c as one batched matrix product
    (the inner dimension is 3, so every output is the same 3-term sum whatever the thread count)."""
    b, _, h, w = images.shape
    x = images.reshape(b, 3, h * w)
    return torch.baddbmm(offset.view(b, 3, 1), lin.view(b, 3, 3), x).view(b, 3, h, w)


BLUR_RADIUS = 3


def gaussian_kernels(sigmas: torch.Tensor) -> torch.Tensor:
    """(K, 2r+1) normalised 1-D Gaussians, one per sigma."""
    x = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x[None] / sigmas[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def blur_batch(images: torch.Tensor, params: list[AugParams]) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (depthwise convolutions), only for the samples that
    drew one."""
    idx = [i for i, p in enumerate(params) if p.photo.blur_sigma > 0]
    if not idx:
        return images
    sel = torch.tensor(idx)
    k = gaussian_kernels(torch.tensor([params[i].photo.blur_sigma for i in idx], dtype=torch.float32))
    k = k.repeat_interleave(3, dim=0)  # (K*3, taps): one kernel per channel of each sample
    x = images[sel]
    n, _, h, w = x.shape
    r = BLUR_RADIUS
    x = F.pad(x.reshape(1, n * 3, h, w), (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(n * 3, 1, 1, -1), groups=n * 3)
    x = F.conv2d(x, k.view(n * 3, 1, -1, 1), groups=n * 3)
    images[sel] = x.view(n, 3, h, w)
    return images


def noise_batch(images: torch.Tensor, params: list[AugParams]) -> torch.Tensor:
    """Gaussian noise from the fixed field bank (shifted per sample) for the samples that drew it."""
    _, _, h, w = images.shape
    for i, p in enumerate(params):
        if p.photo.noise_std > 0:
            images[i].add_(shifted_noise(p.photo.noise_seed, (h, w)), alpha=p.photo.noise_std)
    return images


def erase_batch(images: torch.Tensor, params: list[AugParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint every drawn erase box with its fill colour; -> images, valid (B,H,W) False inside the boxes."""
    b, _, h, w = images.shape
    valid = torch.ones(b, h, w, dtype=torch.bool)
    for i, p in enumerate(params):
        if p.erase is not None:
            y0, x0, eh, ew = p.erase
            images[i, :, y0 : y0 + eh, x0 : x0 + ew] = torch.tensor(p.erase_fill).view(3, 1, 1)
            valid[i, y0 : y0 + eh, x0 : x0 + ew] = False
    return images, valid


def augment_batch(
    images: torch.Tensor, parts: torch.Tensor, vid: torch.Tensor, params: list[AugParams]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (B,3,H,W) float in [0,1], parts/vid (B,H,W) integer -> augmented images, parts and vid
    (long), valid (B,H,W) bool."""
    images, parts, vid = crop_batch(images, parts, vid, params)
    images = colour_batch(images, params)
    images = blur_batch(images, params)
    images = noise_batch(images, params)
    images, valid = erase_batch(images, params)
    return images.clamp_(0, 1), parts.long(), vid.long(), valid


GRAY = torch.tensor([0.299, 0.587, 0.114])
TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
FROM_YIQ = torch.linalg.inv(TO_YIQ)
NOISE_FIELDS = 8  # a fixed bank of unit-variance noise fields per image size, shared by all samples
_noise_bank: dict[tuple[int, int], torch.Tensor] = {}


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """(B,3,3) RGB->RGB rotations about the grey axis (YIQ hue rotation)."""
    a = turns * 2 * torch.pi
    c, s = torch.cos(a), torch.sin(a)
    rot = torch.zeros(len(turns), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return FROM_YIQ @ rot @ TO_YIQ


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


def shifted_noise(seed: int, hw: tuple[int, int]) -> torch.Tensor:
    """A bank field rolled by a seed-dependent shift, so samples sharing a field still differ."""
    h, w = hw
    shift = (seed // NOISE_FIELDS) % (h * w)
    return noise_field(seed, hw).reshape(3, -1).roll(shift, dims=1).view(3, h, w)


def photometric(images: torch.Tensor, params: list[PhotoParams]) -> torch.Tensor:
    """Colour jitter, grey, blur and noise for a float batch (B,3,H,W) in [0,1] (the mean grey is measured
    on the batch itself): the photometric half of `augment_batch`."""
    if not params or all(p == PhotoParams() for p in params):
        return images
    b, _, h, w = images.shape
    means = torch.einsum("c,bchw->b", GRAY.double(), images.double()).float() / (h * w)
    aug = [AugParams(photo=p, mean_gray=float(m)) for p, m in zip(params, means, strict=True)]
    images = colour_batch(images, aug)
    images = blur_batch(images, aug)
    images = noise_batch(images, aug)
    return images.clamp_(0, 1)
