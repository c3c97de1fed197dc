"""Appearance stage: procedural garments, patterns and palettes on the rest-pose surface.

What a person wears changes from sample to sample (`sample_outfit`); skin tone, hair colour and hair style
stay with the identity. Garment regions are per-vertex masks computed ONCE on the body's rest-pose template
(`Dresser`), from part labels and rest coordinates along each limb, so garments move with the body whatever
the pose. Patterns are evaluated on rest-pose coordinates (so stripes follow the body, not the camera).
Loose garments (loose shirts, coats, skirts, wide trousers) also get geometry: a shell, i.e. a copy of the
covered body faces pushed out along the posed normals, each shell vertex remembering the body vertex beneath
it, so a pixel covered by clothing keeps the label of the body part under it.

All colours are linear RGB in [0, 1].
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from protoreg.dataset import GARMENT_ID
from protoreg.parts import PART_ID, SMPL_JOINT_NAMES

_J = {name: i for i, name in enumerate(SMPL_JOINT_NAMES)}


def srgb_to_linear(rgb255: tuple[float, float, float]) -> tuple[float, float, float]:
    """An sRGB colour (0-255) as linear RGB in [0, 1], rounded to 4 decimals (readable in YAML)."""
    c = np.asarray(rgb255, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return tuple(round(float(x), 4) for x in lin)  # type: ignore[return-value]


def _palette(*colors: tuple[int, int, int]) -> list[tuple[float, float, float]]:
    return [srgb_to_linear(c) for c in colors]


# Named garment palettes (linear RGB), from swatches of everyday clothing. A domain-shift config swaps these.
DEFAULT_PALETTES: dict[str, list[tuple[float, float, float]]] = {
    "denim": _palette(
        (35, 55, 90), (50, 75, 115), (70, 95, 135), (95, 120, 155), (30, 40, 60), (120, 140, 170)
    ),
    "greys": _palette((60, 60, 62), (90, 90, 92), (130, 130, 132), (170, 170, 170), (200, 200, 198)),
    "blacks": _palette((18, 18, 20), (28, 28, 32), (35, 32, 30), (25, 28, 35)),
    "whites": _palette((235, 235, 230), (245, 242, 235), (220, 220, 215), (228, 224, 210)),
    "navy": _palette((25, 35, 70), (35, 45, 85), (40, 50, 70)),
    "earth": _palette(
        (110, 80, 55),
        (150, 115, 80),
        (90, 95, 60),
        (160, 140, 100),
        (120, 60, 40),
        (70, 55, 45),
        (185, 165, 130),
    ),
    "pastels": _palette(
        (240, 190, 200), (190, 215, 240), (200, 235, 205), (245, 235, 180), (215, 200, 235), (250, 215, 185)
    ),
    "brights": _palette(
        (200, 30, 40),
        (30, 90, 200),
        (240, 190, 20),
        (30, 150, 70),
        (240, 110, 20),
        (150, 40, 150),
        (20, 160, 170),
        (230, 60, 120),
    ),
    "shoes": _palette(
        (20, 20, 22), (45, 30, 22), (90, 60, 40), (235, 235, 235), (120, 120, 125), (30, 40, 70)
    ),
}

TOP_KINDS = ("sleeveless", "short", "long", "loose_shirt", "coat")
BOTTOM_KINDS = ("shorts", "knee", "long", "skirt")
PATTERNS = ("solid", "stripes", "checks", "noise")
HAIR_STYLES = ("bald", "short", "medium", "long")


@dataclass
class AppearanceConfig:
    """Distribution of what a person wears in a sample (lengths in metres, cuts as limb fractions)."""

    # Probability of each top: sleeveless, short sleeves, long sleeves, loose shirt (shell), coat (shell).
    top_probs: dict[str, float] = field(
        default_factory=lambda: {
            "sleeveless": 0.10,
            "short": 0.32,
            "long": 0.28,
            "loose_shirt": 0.15,
            "coat": 0.15,
        }
    )
    # Probability of each bottom: shorts, knee-length, long trousers, skirt (shell).
    bottom_probs: dict[str, float] = field(
        default_factory=lambda: {"shorts": 0.14, "knee": 0.10, "long": 0.60, "skirt": 0.16}
    )
    # Probability of wearing shoes (else bare feet).
    shoes_prob: float = 0.97
    # Probability of each pattern (per garment; shoes are always solid).
    pattern_probs: dict[str, float] = field(
        default_factory=lambda: {"solid": 0.55, "stripes": 0.18, "checks": 0.12, "noise": 0.15}
    )
    # Named palettes of linear-RGB colours, laid over the built-in ones (a name given here replaces the
    # built-in palette of that name); the *_palette_weights below pick among them by name.
    palettes: dict[str, list[tuple[float, float, float]]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_PALETTES.items()}
    )
    top_palette_weights: dict[str, float] = field(
        default_factory=lambda: {
            "greys": 1.0,
            "blacks": 1.0,
            "whites": 1.0,
            "navy": 0.6,
            "earth": 0.6,
            "pastels": 0.7,
            "brights": 0.8,
            "denim": 0.3,
        }
    )
    bottom_palette_weights: dict[str, float] = field(
        default_factory=lambda: {
            "denim": 2.0,
            "blacks": 1.2,
            "greys": 0.8,
            "earth": 0.8,
            "navy": 0.6,
            "whites": 0.2,
            "pastels": 0.2,
            "brights": 0.15,
        }
    )
    coat_palette_weights: dict[str, float] = field(
        default_factory=lambda: {
            "blacks": 1.0,
            "greys": 1.0,
            "earth": 1.0,
            "navy": 0.8,
            "brights": 0.2,
            "denim": 0.2,
        }
    )
    shoe_palette_weights: dict[str, float] = field(default_factory=lambda: {"shoes": 1.0})
    # Relative brightness jitter of a garment's colour (multiplier drawn from 1 +- this).
    color_jitter: float = 0.15
    # Pattern size on the rest-pose surface: stripe period, check size or noise cell (metres).
    pattern_scale_range: tuple[float, float] = (0.02, 0.12)
    # Share of each stripe period taken by the first colour.
    stripe_duty_range: tuple[float, float] = (0.3, 0.65)
    # Short sleeves end at this fraction of the shoulder-to-wrist length; long sleeves at the second range.
    short_sleeve_range: tuple[float, float] = (0.15, 0.38)
    long_sleeve_range: tuple[float, float] = (0.9, 1.0)
    # Bottom lengths as fractions of the hip-to-ankle height: shorts, knee-length, long, skirt; coat hem.
    shorts_range: tuple[float, float] = (0.18, 0.4)
    knee_range: tuple[float, float] = (0.48, 0.62)
    long_range: tuple[float, float] = (0.9, 1.0)
    skirt_range: tuple[float, float] = (0.25, 0.7)
    coat_length_range: tuple[float, float] = (0.2, 0.6)
    # Top hem and trouser waist heights relative to the pelvis joint (metres, + = up).
    top_hem_range: tuple[float, float] = (-0.12, 0.02)
    waist_range: tuple[float, float] = (0.0, 0.12)
    # Depth of the neckline at the front below the neck joint (0 = crew neck).
    neckline_range: tuple[float, float] = (0.0, 0.12)
    # Shoe top as a fraction of the hip-to-ankle height (lower = higher boots).
    shoe_top_range: tuple[float, float] = (0.9, 1.0)
    # Probability that an ordinary top (sleeveless/short/long) or long trousers are loose (get a shell).
    loose_prob: float = 0.2
    # Shell offsets along the normals (metres): loose tops, coats, skirts at the waist, wide trousers.
    shirt_offset_range: tuple[float, float] = (0.01, 0.03)
    coat_offset_range: tuple[float, float] = (0.02, 0.045)
    skirt_offset_range: tuple[float, float] = (0.012, 0.03)
    trouser_offset_range: tuple[float, float] = (0.006, 0.02)
    # Extra offset at the hem of skirts, coats and wide trousers (the garment flares out downwards).
    flare_range: tuple[float, float] = (0.03, 0.15)
    # Amplitude of the low-frequency displacement that makes shells look draped rather than inflated.
    fold_amplitude: float = 0.35
    # A garment colour closer to the wearer's skin than this (max difference of sqrt-linear RGB) is darkened
    # or lightened, so that a beige top on a beige-skinned person does not read as bare skin.
    skin_contrast: float = 0.08
    # Amplitude of per-vertex fabric shading noise (multiplies garment colours by 1 +- this).
    shade_noise: float = 0.08
    # Hair style of an identity (drawn once per identity id, so it stays with the person).
    hair_style_probs: dict[str, float] = field(
        default_factory=lambda: {"bald": 0.05, "short": 0.45, "medium": 0.3, "long": 0.2}
    )
    # Surface roughness of skin and hair (garments carry their own, drawn with the garment).
    skin_roughness: float = 0.5
    hair_roughness: float = 0.4


# ------------------------------------------------------------------------------------------------------------
# Outfits: what is worn in one sample (pure description, JSON-able)
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Garment:
    """One garment: its kind, colours, pattern and cut. Lengths in metres, cuts as limb fractions."""

    slot: str  # "top", "bottom" or "shoes"
    kind: str  # one of TOP_KINDS, BOTTOM_KINDS, or "shoes"
    palette: str
    color: tuple[float, float, float]  # linear RGB
    color2: tuple[float, float, float]  # second pattern colour
    pattern: str = "solid"
    pattern_scale: float = 0.05
    pattern_angle: float = 0.0  # degrees in the frontal plane: 0 = horizontal stripes
    pattern_duty: float = 0.5
    pattern_seed: int = 0
    cut: float = 1.0  # sleeve / leg / shoe-top fraction; for coats the hem fraction down the thigh
    hem: float = 0.0  # top hem / trouser waist height relative to the pelvis joint
    neckline: float = 0.0
    loose: bool = False
    offset: float = 0.0  # shell offset at the top of the garment
    flare: float = 0.0  # extra shell offset at its hem
    roughness: float = 0.8


@dataclass
class Outfit:
    """What a person wears in one sample: a top, a bottom and optionally shoes."""

    top: Garment
    bottom: Garment
    shoes: Garment | None = None

    @property
    def garments(self) -> list[Garment]:
        return [g for g in (self.bottom, self.top, self.shoes) if g is not None]

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (the sample's `garments` entry)."""
        out: dict[str, Any] = {}
        for g in self.garments:
            d = asdict(g)
            for key in ("color", "color2"):
                d[key] = [round(float(c), 5) for c in d[key]]
            for key in (
                "pattern_scale",
                "pattern_angle",
                "pattern_duty",
                "cut",
                "hem",
                "neckline",
                "offset",
                "flare",
                "roughness",
            ):
                d[key] = round(float(d[key]), 5)
            d["loose"] = bool(d["loose"])
            d["pattern_seed"] = int(d["pattern_seed"])
            out[g.slot] = d
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outfit:
        def garment(d: dict[str, Any] | None) -> Garment | None:
            if d is None:
                return None
            d = dict(d)
            d["color"], d["color2"] = tuple(d["color"]), tuple(d["color2"])
            return Garment(**d)

        return cls(top=garment(data["top"]), bottom=garment(data["bottom"]), shoes=garment(data.get("shoes")))


def _choice(
    rng: np.random.Generator, probs: dict[str, float], what: str, allowed: tuple[str, ...] | None = None
) -> str:
    names = sorted(probs)
    if allowed is not None:
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ValueError(f"appearance.{what}: unknown names {unknown}; expected some of {list(allowed)}")
    p = np.array([float(probs[n]) for n in names])
    if len(p) == 0 or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(
            f"appearance.{what}: expected non-negative weights that are not all zero, got {probs}"
        )
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def effective_palettes(config: AppearanceConfig) -> dict[str, list]:
    """The built-in palettes with the config's palettes laid over them (same name: replaced), so a config
    that defines only the palettes it changes keeps the others; drop one by giving it weight 0."""
    return {**DEFAULT_PALETTES, **config.palettes}


def _pick_color(
    rng: np.random.Generator, config: AppearanceConfig, weights: dict[str, float], what: str
) -> tuple[str, np.ndarray]:
    palettes = effective_palettes(config)
    palette = _choice(rng, weights, what, tuple(palettes))
    colors = np.asarray(palettes[palette], dtype=np.float64).reshape(-1, 3)
    if len(colors) == 0:
        raise ValueError(f"appearance.palettes[{palette!r}]: expected at least one colour")
    color = colors[rng.integers(len(colors))] * (1.0 + rng.uniform(-1, 1) * config.color_jitter)
    return palette, np.clip(color, 0.0, 1.0)


def _pattern(rng: np.random.Generator, config: AppearanceConfig, weights: dict[str, float], g: dict) -> None:
    g["pattern"] = _choice(rng, config.pattern_probs, "pattern_probs", PATTERNS)
    g["pattern_scale"] = float(rng.uniform(*config.pattern_scale_range))
    g["pattern_angle"] = float(rng.choice([0.0, 0.0, 90.0, 45.0, -45.0]) + rng.normal(0, 3))
    g["pattern_duty"] = float(rng.uniform(*config.stripe_duty_range))
    g["pattern_seed"] = int(rng.integers(2**31))
    if rng.random() < 0.5:  # contrast with a neutral (white/grey/black), else a second palette colour
        base = np.asarray(g["color"])
        neutral = 0.85 if base.mean() < 0.25 else 0.015
        color2 = np.full(3, neutral) * (1.0 + rng.uniform(-0.1, 0.1))
    else:
        _, color2 = _pick_color(rng, config, weights, "palette weights")
    g["color2"] = tuple(float(c) for c in np.clip(color2, 0, 1))


def _garment(
    rng: np.random.Generator,
    config: AppearanceConfig,
    slot: str,
    kind: str,
    weights: dict[str, float],
    what: str,
) -> dict:
    palette, color = _pick_color(rng, config, weights, what)
    g: dict[str, Any] = {
        "slot": slot,
        "kind": kind,
        "palette": palette,
        "color": tuple(float(c) for c in color),
        "color2": tuple(float(c) for c in color),
    }
    return g


def sample_outfit(rng: np.random.Generator, config: AppearanceConfig) -> Outfit:
    """Draw what is worn in one sample (a pure function of the rng state and the config)."""
    # --- top
    top_kind = _choice(rng, config.top_probs, "top_probs", TOP_KINDS)
    weights = config.coat_palette_weights if top_kind == "coat" else config.top_palette_weights
    top = _garment(rng, config, "top", top_kind, weights, "top_palette_weights")
    _pattern(rng, config, weights, top)
    if top_kind == "coat" and top["pattern"] == "stripes":
        top["pattern"] = "solid"  # striped coats look like costumes
    sleeve = {"sleeveless": (0.0, 0.0), "short": config.short_sleeve_range}.get(
        top_kind, config.long_sleeve_range
    )
    if top_kind == "loose_shirt" and rng.random() < 0.5:
        sleeve = config.short_sleeve_range
    top["cut"] = float(rng.uniform(*sleeve))
    top["hem"] = float(rng.uniform(*config.top_hem_range))
    top["neckline"] = float(rng.uniform(*config.neckline_range))
    top["loose"] = bool(top_kind in ("loose_shirt", "coat") or rng.random() < config.loose_prob)
    offsets = config.coat_offset_range if top_kind == "coat" else config.shirt_offset_range
    top["offset"] = float(rng.uniform(*offsets)) if top["loose"] else 0.0
    top["flare"] = float(rng.uniform(*config.flare_range)) * 0.5 if top_kind == "coat" else 0.0
    if top_kind == "coat":
        top["cut"] = float(rng.uniform(*config.long_sleeve_range))
        top["hem"] = float(rng.uniform(*config.coat_length_range))  # coat hem: fraction down the thigh
        top["neckline"] = float(rng.uniform(0.05, 0.18))
    top["roughness"] = float(rng.uniform(0.55, 0.7) if top_kind == "coat" else rng.uniform(0.7, 0.95))
    # --- bottom
    bottom_kind = _choice(rng, config.bottom_probs, "bottom_probs", BOTTOM_KINDS)
    bottom = _garment(
        rng, config, "bottom", bottom_kind, config.bottom_palette_weights, "bottom_palette_weights"
    )
    _pattern(rng, config, config.bottom_palette_weights, bottom)
    if bottom["pattern"] == "stripes" and bottom_kind != "skirt":
        bottom["pattern_angle"] = 90.0 + rng.normal(0, 2)  # trousers: pinstripes run down the leg
    cuts = {
        "shorts": config.shorts_range,
        "knee": config.knee_range,
        "long": config.long_range,
        "skirt": config.skirt_range,
    }
    bottom["cut"] = float(rng.uniform(*cuts[bottom_kind]))
    bottom["hem"] = float(rng.uniform(*config.waist_range))
    bottom["loose"] = bool(
        bottom_kind == "skirt" or (bottom_kind == "long" and rng.random() < config.loose_prob)
    )
    offsets = config.skirt_offset_range if bottom_kind == "skirt" else config.trouser_offset_range
    bottom["offset"] = float(rng.uniform(*offsets)) if bottom["loose"] else 0.0
    bottom["flare"] = (
        float(rng.uniform(*config.flare_range)) * (1.0 if bottom_kind == "skirt" else 0.3)
        if bottom["loose"]
        else 0.0
    )
    bottom["roughness"] = float(rng.uniform(0.75, 0.95))
    # --- shoes
    shoes = None
    if rng.random() < config.shoes_prob:
        s = _garment(rng, config, "shoes", "shoes", config.shoe_palette_weights, "shoe_palette_weights")
        s["cut"] = float(rng.uniform(*config.shoe_top_range))
        s["roughness"] = float(rng.uniform(0.3, 0.7))
        shoes = Garment(**s)
    return Outfit(top=Garment(**top), bottom=Garment(**bottom), shoes=shoes)


# ------------------------------------------------------------------------------------------------------------
# Patterns on rest-pose coordinates
# ------------------------------------------------------------------------------------------------------------
def _hash01(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer lattice point."""
    h = (
        (ix.astype(np.uint64) * np.uint64(73856093))
        ^ (iy.astype(np.uint64) * np.uint64(19349663))
        ^ (iz.astype(np.uint64) * np.uint64(83492791))
        ^ np.uint64(seed * 2654435761 % 2**32)
    )
    h = (h ^ (h >> np.uint64(13))) * np.uint64(0x5BD1E995)
    h = h ^ (h >> np.uint64(15))
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(0x1000000)


def value_noise(points: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Smooth 3D value noise in [0, 1] with the given cell size (metres), trilinear with smoothstep."""
    q = np.asarray(points, dtype=np.float64) / max(cell, 1e-6) + 1000.0
    i = np.floor(q)
    f = q - i
    f = f * f * (3.0 - 2.0 * f)
    i = i.astype(np.int64)
    out = np.zeros(len(q))
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1.0 - f[:, 0]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1.0 - f[:, 1]
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1.0 - f[:, 2]
                out += wx * wy * wz * _hash01(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz, seed)
    return out


def pattern_mix(points: np.ndarray, garment: Garment, noise: np.ndarray | None = None) -> np.ndarray:
    """(N,) weight of the second colour at rest-pose points: 0/1 for stripes and checks, soft for noise.
    `noise` (N,) in [0, 1] may be given precomputed for the noise pattern (else it is evaluated here)."""
    if garment.pattern == "solid" or len(points) == 0:
        return np.zeros(len(points))
    a = np.radians(garment.pattern_angle)
    period = max(garment.pattern_scale, 1e-4)
    phase = (garment.pattern_seed % 1000) / 1000.0
    along = np.array([np.sin(a), np.cos(a), 0.0])  # 0 deg: varies with height -> horizontal stripes
    if garment.pattern == "stripes":
        return ((points @ along / period + phase) % 1.0 >= garment.pattern_duty).astype(np.float64)
    if garment.pattern == "checks":
        across = np.array([np.cos(a), -np.sin(a), 0.7])  # the z part lets checks wrap round the sides
        u = np.floor(points @ along / period + phase)
        v = np.floor(points @ across / period + phase)
        return ((u + v) % 2.0).astype(np.float64)
    if garment.pattern == "noise":
        if noise is None:
            noise = 0.65 * value_noise(points, period, garment.pattern_seed) + 0.35 * value_noise(
                points, period * 0.4, garment.pattern_seed + 1
            )
        return np.clip((noise - 0.38) / 0.24, 0.0, 1.0)
    raise ValueError(f"garment pattern: expected one of {PATTERNS}, got {garment.pattern!r}")


class NoiseBank:
    """Value-noise fields precomputed once on the template's rest vertices (NOISE_CELLS x NOISE_SEEDS), so a
    sample only looks fields up: evaluating fresh 3D noise per sample would cost ~10 ms."""

    CELLS = (0.008, 0.016, 0.03, 0.06, 0.12, 0.24)  # metres, about x2 apart
    SEEDS = 4

    def __init__(self, rest: np.ndarray) -> None:
        self.fields = np.stack(
            [
                np.stack([value_noise(rest, cell, 7919 * s + k) for s in range(self.SEEDS)])
                for k, cell in enumerate(self.CELLS)
            ]
        ).astype(np.float32)  # (cells, seeds, V)

    def field(self, cell: float, seed: int) -> np.ndarray:
        """(V,) the field whose cell size is nearest `cell` (in log scale), chosen by seed."""
        k = int(np.argmin(np.abs(np.log(np.asarray(self.CELLS) / max(cell, 1e-4)))))
        return self.fields[k, seed % self.SEEDS]

    def pattern(self, idx: np.ndarray, cell: float, seed: int) -> np.ndarray:
        """Two-octave noise in [0, 1] at vertices idx."""
        return 0.65 * self.field(cell, seed)[idx] + 0.35 * self.field(cell * 0.4, seed + 1)[idx]


# ------------------------------------------------------------------------------------------------------------
# Dressing a body
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Shell:
    """Geometry of a loose garment: a displaced copy of the body faces it covers."""

    vertices: np.ndarray  # (M, 3) float32 posed world coordinates
    faces: np.ndarray  # (G, 3) int64 indices into vertices
    source_vertex: np.ndarray  # (M,) int64 body vertex beneath each shell vertex
    vertex_colors: np.ndarray  # (M, 3) float32 linear RGB
    roughness: np.ndarray | None = None  # (M,) float32
    name: str = ""  # the garment slot ("top" or "bottom")


@dataclass
class DressedBody:
    """Per-vertex colours of the body mesh plus shells for loose garments (see GENERATOR.md)."""

    vertex_colors: np.ndarray  # (V, 3) float32 linear RGB
    roughness: np.ndarray | None = None  # (V,) float32
    shells: list[Shell] = field(default_factory=list)
    garment_masks: dict[str, np.ndarray] = field(default_factory=dict)  # slot or 'hair' -> (V,) bool


def _numpy(x, dtype=np.float64) -> np.ndarray:
    """A torch tensor or array as numpy, without a leading batch axis of one."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=dtype)
    return x[0] if x.ndim == 3 and x.shape[0] == 1 else x


class Dresser:
    """Garment regions of a body, precomputed once on its rest-pose template; dresses posed bodies."""

    def __init__(self, body, config: AppearanceConfig) -> None:
        self.config = config
        self.faces = np.asarray(body.faces, dtype=np.int64)
        self._face_columns = [np.ascontiguousarray(self.faces[:, k]) for k in range(3)]
        parts = np.asarray(body.vertex_parts).astype(np.int64)
        num_betas = int(getattr(body, "num_betas", 10))
        rest = _numpy(body.rest_vertices(np.zeros((1, num_betas), np.float32)))
        joints = _template_joints(body, num_betas)
        self.num_vertices = len(rest)
        self.parts = parts

        def is_part(*names: str) -> np.ndarray:
            return np.isin(parts, [PART_ID[n] for n in names])

        self.is_torso = is_part("torso")
        self.is_head = is_part("head")
        self.is_arm = is_part("left_upper_arm", "right_upper_arm", "left_lower_arm", "right_lower_arm")
        self.is_leg = is_part("left_upper_leg", "right_upper_leg", "left_lower_leg", "right_lower_leg")
        self.is_foot = is_part("left_foot", "right_foot")
        # Fraction along shoulder -> wrist for arm vertices (0 at the shoulder joint, 1 at the wrist).
        self.arm_s = np.full(self.num_vertices, np.inf)
        for side in ("left", "right"):
            sel = is_part(f"{side}_upper_arm", f"{side}_lower_arm")
            a, b = joints[_J[f"{side}_shoulder"]], joints[_J[f"{side}_wrist"]]
            d = b - a
            self.arm_s[sel] = (rest[sel] - a) @ d / float(d @ d)
        # Height fraction from the hips (0) down to the ankles (1) for every vertex (negative above the hips).
        hip_y = 0.5 * (joints[_J["left_hip"], 1] + joints[_J["right_hip"], 1])
        ankle_y = 0.5 * (joints[_J["left_ankle"], 1] + joints[_J["right_ankle"], 1])
        self.leg_s = (hip_y - rest[:, 1]) / (hip_y - ankle_y)
        self.pelvis_y = joints[_J["pelvis"], 1]
        self.rel_y = rest[:, 1] - self.pelvis_y  # height above the pelvis joint
        neck = joints[_J["neck"]]
        self.below_neck = neck[1] - rest[:, 1]
        chest_z = joints[_J["spine3"], 2]
        self.front = rest[:, 2] > chest_z
        self.abs_x = np.abs(rest[:, 0] - joints[_J["pelvis"], 0])
        # Head frame for the hairline: u = 0 at the head joint, 1 at the crown; w = -1 back ... +1 face.
        head = joints[_J["head"]]
        hv = rest[self.is_head]
        top = hv[:, 1].max() if len(hv) else head[1] + 0.15
        self.head_u = (rest[:, 1] - head[1]) / max(top - head[1], 1e-3)
        zc = float(np.median(hv[hv[:, 1] > head[1], 2])) if len(hv) else head[2]
        depth = float(np.ptp(hv[:, 2])) if len(hv) else 0.2
        self.head_w = (rest[:, 2] - zc) / max(0.5 * depth, 1e-3)
        self.back_of_neck = self.is_torso & (rest[:, 2] < chest_z - 0.02)
        self._hair_cache: dict[tuple, np.ndarray] = {}
        self.noise = NoiseBank(rest)

    # -- regions ------------------------------------------------------------------------------------------
    def top_mask(self, g: Garment) -> np.ndarray:
        """Vertices a top covers: torso between hem and neckline, arms up to the sleeve cut (coat: thighs)."""
        neckline = np.where(self.front, g.neckline * np.clip(1.0 - self.abs_x / 0.12, 0.0, 1.0), 0.0) + 0.015
        torso = self.is_torso & (self.below_neck > neckline)
        if g.kind == "coat":  # open at the neck, down over the thighs to the coat's hem
            return torso | (self.is_leg & (self.leg_s < g.hem)) | (self.is_arm & (self.arm_s < g.cut))
        torso = torso & (self.rel_y > g.hem)
        return torso | (self.is_arm & (self.arm_s < g.cut))

    def bottom_mask(self, g: Garment) -> np.ndarray:
        """Vertices a bottom covers: torso below the waist, legs down to the cut."""
        torso = self.is_torso & (self.rel_y < g.hem)
        return torso | (self.is_leg & (self.leg_s < g.cut))

    def shoe_mask(self, g: Garment) -> np.ndarray:
        return self.is_foot | (self.is_leg & (self.leg_s > g.cut))

    def hair_mask(self, style: str) -> np.ndarray:
        """Scalp above a hairline that is high at the forehead and lower at the back (longer hair: lower)."""
        key = (style,)
        if key not in self._hair_cache:
            if style == "bald":
                mask = np.zeros(self.num_vertices, bool)
            else:
                # hairline height (u) at the nape, above the ears and at the forehead
                back, side, front = {
                    "short": (0.1, 0.55, 0.72),
                    "medium": (-0.3, 0.45, 0.7),
                    "long": (-0.7, 0.1, 0.66),
                }[style]
                hairline = np.interp(self.head_w, [-0.85, -0.5, 0.35, 0.6], [back, side, side, front])
                mask = self.is_head & (self.head_u > hairline)
                if style == "long":  # hair falls over the upper back
                    mask |= self.back_of_neck & (self.below_neck < 0.18)
            self._hair_cache[key] = mask
        return self._hair_cache[key]

    # -- dressing -------------------------------------------------------------------------------------------
    def dress(
        self,
        outfit: Outfit,
        identity,
        rng: np.random.Generator,
        rest_vertices: np.ndarray,
        posed_vertices: np.ndarray,
        posed_normals: np.ndarray,
    ) -> DressedBody:
        """Colour the body (skin, hair, garments with patterns) and build shells for loose garments."""
        cfg = self.config
        rest, posed, normals = (_numpy(x, np.float32) for x in (rest_vertices, posed_vertices, posed_normals))
        if rest.shape != (self.num_vertices, 3) or posed.shape != rest.shape or normals.shape != rest.shape:
            raise ValueError(
                f"dress: expected rest/posed vertices and normals of shape ({self.num_vertices}, 3), "
                f"got {rest.shape}, {posed.shape}, {normals.shape}"
            )
        colors = np.empty((self.num_vertices, 3))
        skin = np.asarray(identity.skin_tone, dtype=np.float64)
        colors[:] = skin
        rough = np.full(self.num_vertices, cfg.skin_roughness)
        shade_seed = int(rng.integers(2**31))
        shade_amp = cfg.shade_noise * float(rng.uniform(0.5, 1.0))

        masks: dict[str, np.ndarray] = {}
        for g in outfit.garments:  # bottom, then top (worn over it), then shoes
            mask = {"top": self.top_mask, "bottom": self.bottom_mask, "shoes": self.shoe_mask}[g.slot](g)
            idx = np.flatnonzero(mask)
            masks[g.slot] = mask
            noise = self.noise.pattern(idx, g.pattern_scale, g.pattern_seed) if g.pattern == "noise" else None
            mix = pattern_mix(rest[idx], g, noise)[:, None]
            c1, c2 = (
                apart_from_skin(np.asarray(x, float), skin, cfg.skin_contrast) for x in (g.color, g.color2)
            )
            c = (1.0 - mix) * c1 + mix * c2
            if shade_amp > 0 and g.slot != "shoes":
                c *= 1.0 + shade_amp * (2.0 * self.noise.field(0.06, shade_seed)[idx] - 1.0)[:, None]
            colors[idx] = c
            rough[idx] = g.roughness
        hair = self.hair_mask(identity_hair_style(identity, cfg))
        colors[hair] = np.asarray(identity.hair_color, dtype=np.float64)
        rough[hair] = cfg.hair_roughness
        masks["hair"] = hair

        shells = []
        for g in (outfit.top, outfit.bottom):
            if g.loose and g.offset > 0:
                shell = self._shell(g, masks[g.slot] & ~hair, posed, normals, colors, rough, shade_seed)
                if shell is not None:
                    shells.append(shell)
        return DressedBody(
            vertex_colors=np.clip(colors, 0.0, 1.0).astype(np.float32),
            roughness=rough.astype(np.float32),
            shells=shells,
            garment_masks=masks,
        )

    def _shell(
        self,
        g: Garment,
        mask: np.ndarray,
        posed: np.ndarray,
        normals: np.ndarray,
        colors: np.ndarray,
        rough: np.ndarray,
        seed: int,
    ) -> Shell | None:
        """Copy the covered faces, pushed out along the posed normals: offset + flare growing downwards,
        modulated by low-frequency noise so it drapes instead of looking inflated."""
        f0, f1, f2 = self._face_columns
        face_in = np.flatnonzero(mask[f0] & mask[f1] & mask[f2])
        if len(face_in) == 0:
            return None
        faces = self.faces[face_in]
        used = np.zeros(self.num_vertices, bool)
        used[faces.ravel()] = True
        src = np.flatnonzero(used)
        remap = np.full(self.num_vertices, -1, np.int64)
        remap[src] = np.arange(len(src))
        if g.slot == "bottom":
            depth = np.clip(self.leg_s[src] / max(g.cut, 1e-3), 0.0, 1.0)  # 0 at the hips, 1 at the hem
        elif g.kind == "coat":
            depth = np.clip(self.leg_s[src] / max(g.hem, 1e-3), 0.0, 1.0)
        else:
            depth = np.zeros(len(src))
        folds = 1.0 + self.config.fold_amplitude * (2.0 * self.noise.field(0.12, seed + 1)[src] - 1.0)
        offset = (g.offset + g.flare * depth**1.5) * folds
        verts = posed[src] + normals[src] * offset[:, None]
        return Shell(
            vertices=verts.astype(np.float32),
            faces=remap[faces],
            source_vertex=src.astype(np.int64),
            vertex_colors=np.clip(colors[src], 0, 1).astype(np.float32),
            roughness=rough[src].astype(np.float32),
            name=g.slot,
        )


def vertex_garment_labels(dressed: DressedBody, num_vertices: int) -> np.ndarray:
    """(V,) uint8 label (protoreg.dataset.GARMENT_LABELS) of what covers each body vertex, layered as `dress`
    paints them: skin, then bottom, top and shoes, hair last."""
    labels = np.full(num_vertices, GARMENT_ID["skin"], np.uint8)
    for slot in ("bottom", "top", "shoes", "hair"):
        mask = dressed.garment_masks.get(slot)
        if mask is not None:
            labels[np.asarray(mask, bool)] = GARMENT_ID[slot]
    return labels


def apart_from_skin(color: np.ndarray, skin: np.ndarray, min_difference: float) -> np.ndarray:
    """The colour, darkened (on light skin) or lightened (on dark skin) when it is too close to the skin."""
    gap = float(np.max(np.abs(np.sqrt(np.clip(color, 0, 1)) - np.sqrt(np.clip(skin, 0, 1)))))
    if gap >= min_difference:
        return color
    luminance = float(skin @ np.array([0.2126, 0.7152, 0.0722]))
    return np.clip(color * (0.4 if luminance > 0.12 else 2.5), 0.0, 1.0)


def identity_hair_style(identity, config: AppearanceConfig) -> str:
    """The identity's hair style: drawn once from its id (and name), so it stays with the person."""
    style = getattr(identity, "hair_style", None)
    if style in HAIR_STYLES:
        return style
    key = f"{getattr(identity, 'id', 0)}:{getattr(identity, 'name', '')}".encode()
    rng = np.random.default_rng(zlib.crc32(key))
    return _choice(rng, config.hair_style_probs, "hair_style_probs", HAIR_STYLES)


def _template_joints(body, num_betas: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = body.forward(betas=torch.zeros(1, num_betas), pose=torch.zeros(1, 72))
    return _numpy(out.joints)[:24]


def draw_outfits(body, path: str, n: int = 8, seed: int = 0, config: AppearanceConfig | None = None) -> None:
    """Preview PNG of n dressed people (sampled identities, poses and outfits) in front, side and back point
    views coloured by vertex colour, shells included, for people to judge the garments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from generator.pose import PoseConfig, PosePrior
    from protoreg.identities import resolve_identities

    config = config or AppearanceConfig()
    identities = resolve_identities(str(n), seed, body)
    prior = PosePrior(PoseConfig(yaw_range=(0.0, 0.0)), body)
    dresser = Dresser(body, config)
    fig, axes = plt.subplots(3, n, figsize=(n * 1.9, 3 * 3.0))
    axes = np.asarray(axes).reshape(3, n)
    for k, identity in enumerate(identities):
        rng = np.random.default_rng([seed, k])
        betas = torch.as_tensor(np.asarray(identity.betas, np.float32)[None])
        pose = prior.sample(rng, np.asarray(identity.betas))
        with torch.no_grad():
            verts = body.forward(betas=betas, pose=torch.as_tensor(pose[None], dtype=torch.float32)).vertices
            normals = body.vertex_normals(verts)
            rest = body.rest_vertices(betas)
        outfit = sample_outfit(rng, config)
        dressed = dresser.dress(outfit, identity, rng, rest, verts, normals)
        points = np.concatenate([_numpy(verts)] + [s.vertices for s in dressed.shells])
        colors = np.concatenate([dressed.vertex_colors] + [s.vertex_colors for s in dressed.shells])
        lin = np.clip(colors, 0.0, 1.0)
        srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
        every = np.arange(0, len(points), 2)
        p, c = points[every], srgb[every]
        for view, (x, depth, name) in enumerate(
            [(p[:, 0], p[:, 2], "front"), (p[:, 2], -p[:, 0], "side"), (-p[:, 0], -p[:, 2], "back")]
        ):
            ax = axes[view, k]
            order = np.argsort(depth)
            ax.scatter(x[order], p[order, 1], s=2.2, c=c[order], linewidths=0)
            ax.set_xlim(np.median(x) - 0.7, np.median(x) + 0.7)
            ax.set_ylim(p[:, 1].min() - 0.05, p[:, 1].min() + 1.95)
            ax.set_aspect("equal")
            ax.set_axis_off()
            title = f"{outfit.top.kind}/{outfit.top.pattern}\n{outfit.bottom.kind}/{outfit.bottom.pattern}"
            ax.set_title(title if view == 0 else f"{name}, {len(dressed.shells)} shell(s)", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
