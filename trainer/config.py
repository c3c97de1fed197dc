"""Typed training configuration: dataclasses with YAML loading and saving.

One `TrainConfig` describes a run completely (model, data, augmentation, losses, optimiser, loop);
it is saved resolved in RUN/config.yaml and inside every checkpoint, so a run can be reproduced and a
checkpoint from another configuration is recognised and refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protoreg.config_io import ConfigError, from_dict, read_yaml_mapping, to_plain

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", "save_config", "to_dict"]


@dataclass
class ModelConfig:
    """Architecture of RegistrationNet. Its hash is the model fingerprint galleries check."""

    embed_dim: int = 32  # D: size of pixel and point embeddings
    # The embedding is factorised: D - identity_dim dims say WHERE on the body (part, place), identity_dim
    # dims say WHO (at most D/2); each half is L2-normalised and weighted so that the cosine similarity is
    # (1-s) cos_where + s cos_who with s = identity_share. identity_dim 0 = one unfactorised embedding.
    identity_dim: int = 16
    identity_share: float = 0.5
    widths: tuple[int, ...] = (16, 24, 48, 64)  # image encoder channels at strides 2, 4, 8, 16
    decoder_width: int = 32  # channels of the stride-4 decoder
    # A second segmentation head: what covers each pixel (none, skin, hair, top, bottom, shoes; learnt from
    # garments.png), whose masks add skin and hair colours to the part-colour code: skin tone is read from
    # the face, arms, hands and bare legs together, not from the few pixels of a predicted hand.
    material_head: bool = False
    # Exposure normalisation of every input (training and recognition alike): the image is scaled so that
    # its 95th-percentile grey level is auto_exposure (0 = off), as a camera's auto-exposure would; a dim
    # scene then no longer reads as dark skin. Clipped to [0, 1]; the gain is kept within [1/2, 3].
    auto_exposure: float = 0.0
    point_widths: tuple[int, ...] = (32, 64, 64)  # edge-conv layer widths of the point encoder
    point_global: int = 128  # width of the point set's global (identity-level) descriptor
    # Anchor readout of the who-half: K fixed places on the body (farthest-point samples of the training
    # prototypes' mean), each pooling its nearby points' offset from it (girth, length) and their albedo
    # (hair on the scalp, skin on the hands). 0 turns it off.
    shape_anchors: int = 64
    anchor_sigma: float = 0.04  # metres: the Gaussian reach of an anchor's pooling
    knn: int = 12  # neighbours per point in the static graph
    use_normals: bool = True  # feed point normals to the point encoder
    use_albedo: bool = True  # feed point albedo (skin / hair colour) to the point encoder
    temperature_init: float = 0.07  # initial softmax temperature of the similarities (learnable)
    image_size: tuple[int, int] = (128, 64)  # (H, W) the network is trained at; resize inputs to it


@dataclass
class DataConfig:
    shards: str = ""  # SPEC: dataset folder, brace-expanded shard list, or URL(s)
    val: str = ""  # SPEC of the validation set ("" = no validation)
    prototypes: str = ""  # prototypes.h5 path/URL; "" = next to the shards
    batch_size: int = 16
    workers: int = 2  # DataLoader worker processes (0 = in the main process)
    shuffle_buffer: int = 256  # raw samples held for shuffling
    max_points: int = 1024  # prototype points used per identity (a fixed, strided subset when N is larger)
    val_samples: int = 256  # at most this many validation samples per validation


@dataclass
class AugmentConfig:
    enabled: bool = True
    # random resized crop: area share of the image. Mild by default: the renders are already person-centred,
    # and a deep crop cuts off the head or the feet, which no test image lacks (0.6-1.0 gave lower
    # in-distribution Rank-1 on both demo casts tried, docs/benchmarks.md)
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # aspect ratio jitter relative to the output's; off by default: stretching an image makes a slim body
    # look heavy, and build is one of the few identity cues (a plain identity classifier on the demo data
    # went from 23.5% to 38% in distribution without it, docs/benchmarks.md)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    flip: bool = False  # a horizontal flip would swap left/right part labels; off by default
    brightness: float = 0.2  # milder colour jitter keeps skin tone and hair colour (identity cues) legible
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02  # hue shift, fraction of a full turn
    gray_p: float = 0.0  # probability of a grey-scale image (grey hides skin tone and hair colour)
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise_p: float = 0.4
    noise_std: tuple[float, float] = (0.005, 0.04)
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)
    erase_p: float = 0.3
    erase_area: tuple[float, float] = (0.02, 0.15)
    # The erased box is labelled occluder (15, no vertex), so the segmentation learns that something in
    # front of the person is not the person (the shifted test set has twice training's occluders); false:
    # its pixels keep their labels and no loss uses them.
    erase_occluder: bool = True
    # Background replacement: the probability that a sample's background pixels (label 0) are repainted
    # with a random procedural texture (a smooth colour field with a grating, or dead-leaves clutter), so
    # that neither parts nor identity can be read from the backdrop (the demo's shifted test set has
    # backdrops never seen in training). The ground's shadows go with it.
    background_p: float = 0.8
    # Garment recolouring: the probability that each garment region (top: torso and upper arms; bottom:
    # legs; shoes: feet) is repainted in a random colour of random saturation and brightness, keeping its
    # shading and pattern. Off by default: it removed the cost of the shifted set's garment colours, but
    # both demo runs with it lost 9-15 points in distribution (bare arms and legs get repainted too).
    garment_p: float = 0.0
    # Side light: the probability of an image-wide gain exp(s (x cos a + y sin a) / sqrt 2), x and y in
    # [-1, 1] across the image, a random, s uniform in [0, shading]; 0 = off (augment.shading_sample).
    shading_p: float = 0.0
    shading: float = 0.5


@dataclass
class LossConfig:
    w_contrast: float = 1.0  # (a) multi-positive InfoNCE: same identity AND same part
    w_identity: float = 1.0  # (a') the same, softmax over the pixel's part only: which person is this?
    w_dense: float = 0.25  # (b) soft vertex targets from vid.png
    w_seg: float = 1.0  # (c) part segmentation cross-entropy
    seg_balance: float = 0.5  # class weights of (c): (pixels of the class in the batch)^-seg_balance
    w_spread: float = 1.0  # (d) uniformity of the prototypes' who-halves on the sphere
    # (e) cross-entropy of the material head (model.material_head) against garments.png, class-balanced
    # like (c); images without garments.png do not count
    w_material: float = 1.0
    # Prototypes of identities absent from the batch added to every step as negatives of (a), (a') and (d):
    # all of them when the training set has at most this many others, else a random draw of this many.
    extra_identities: int = 0
    pixels_per_batch: int = 512  # foreground pixels sampled for (a) and (b), balanced over parts
    points_per_identity: int = 384  # prototype points per identity in the similarity matrix (0 = all)
    dense_sigma: float = 0.05  # metres: width of the soft vertex targets in (b)


@dataclass
class OptimConfig:
    lr: float = 4e-3
    weight_decay: float = 0.02
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 2.0
    betas: tuple[float, float] = (0.9, 0.999)
    # Exponential moving average of the weights (and normalisation statistics), the model checkpoints give
    # to enroll, recognize and evaluate; 0 = off. The decay ramps up as min(ema_decay, (1+s)/(10+s)) so the
    # random initialisation is forgotten within the first steps (at the demo's 2,300 steps it is 0.996).
    ema_decay: float = 0.998


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    seed: int = 0
    device: str = "cpu"
    compile: bool = False  # torch.compile the model
    deterministic: bool = True  # torch.use_deterministic_algorithms on CPU
    log_every: int = 10
    ckpt_every: int = 200
    val_every: int = 0  # 0 = validate only at the end (when --val is given)
    val_threshold: float = 0.5  # cosine similarity a correspondence needs to count as confident
    threads: int = 1  # torch intra-op threads of each training process (0 = torch's default; 1 avoids
    # oversubscription next to the DataLoader workers on small machines)


def config_from_dict(data: dict[str, Any], cls: type = TrainConfig, where: str = "config") -> Any:
    """Build a (nested) config dataclass from plain data; unknown keys raise a one-line ConfigError."""
    return from_dict(cls, data or {}, where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict of primitives (tuples become lists), safe for YAML, JSON and checkpoints."""
    return to_plain(cfg)


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML TrainConfig; a missing file, bad YAML or unknown key gives a one-line ConfigError."""
    return config_from_dict(read_yaml_mapping(path), TrainConfig, where=str(path))


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config atomically (temporary name, then rename)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def fingerprint(cfg: Any) -> str:
    """sha256 of a config's canonical JSON: equal configs, equal fingerprints."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# Model options added after checkpoints were first shared, with the value that turns them off: while off
# they are left out of the fingerprint, so a checkpoint written before they existed keeps it and loads.
OPTIONAL_MODEL_KEYS: dict[str, Any] = {"auto_exposure": 0.0}


def model_fingerprint(model_cfg: ModelConfig) -> str:
    """What galleries store to refuse embeddings made by a different architecture."""
    d = to_dict(model_cfg)
    for key, off in OPTIONAL_MODEL_KEYS.items():
        if key in d and d[key] == off:
            del d[key]
    return fingerprint(d)


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


def training_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of the config a resumed run must share with the checkpoint (not steps, logging, device)."""
    d = to_dict(cfg)
    return {
        "model": d["model"],
        "augment": d["augment"],
        "loss": d["loss"],
        "optim": d["optim"],
        "seed": d["seed"],
        "data": {k: d["data"][k] for k in ("batch_size", "shuffle_buffer", "max_points")},
    }
