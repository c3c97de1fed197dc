"""Identities: the people the system learns to recognise.

An identity is what stays with a person from picture to picture: body shape (betas in the body
model's shape space, or an enrolled mesh), skin tone and hair colour. Clothing, pose, camera and
light are NOT part of an identity; the generator varies them per sample.

Identities come either from seeded sampling of the shape space (`sample_identities`) or from a
YAML/JSONL file listing named people (`load_identities`); `resolve_identities` picks by spec.
See docs/identities.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protoreg.dataset import canonical_json, file_sha256, write_text_atomic

BETA_LIMIT = 2.5  # sampled betas stay within +-BETA_LIMIT standard deviations (plausible bodies)
STRATIFIED_COMPONENTS = 3  # leading shape components drawn by Latin hypercube (height, build, ...)
MIN_BETA_DISTANCE = 0.5  # sampled identities are at least this far apart in beta space
NAME_FORMAT = "id{:04d}"
MESH_SUFFIXES = (".npy", ".npz", ".obj")


class IdentityError(ValueError):
    """An identity spec or identities file is malformed; the message is one line naming file, entry, field."""


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


# Skin tones from very light to very dark (Fitzpatrick I-VI-like), sRGB 0-255; sampled by interpolation.
SKIN_PALETTE_SRGB = np.array(
    [
        (246, 222, 204),
        (234, 196, 170),
        (214, 168, 132),
        (188, 138, 100),
        (150, 100, 68),
        (110, 70, 46),
        (74, 47, 32),
    ],
    dtype=np.float64,
)
SKIN_PALETTE = _srgb_to_linear(SKIN_PALETTE_SRGB / 255.0)

# Named hair colours, sRGB 0-255, and how often each is drawn.
HAIR_COLORS_SRGB: dict[str, tuple[int, int, int]] = {
    "black": (28, 24, 22),
    "dark_brown": (59, 40, 30),
    "brown": (106, 74, 50),
    "blond": (196, 160, 100),
    "red": (145, 62, 32),
    "grey": (160, 158, 155),
}
HAIR_PROBABILITIES: dict[str, float] = {
    "black": 0.30,
    "dark_brown": 0.25,
    "brown": 0.18,
    "blond": 0.12,
    "red": 0.05,
    "grey": 0.10,
}
HAIR_COLORS: dict[str, np.ndarray] = {
    k: _srgb_to_linear(np.array(v, dtype=np.float64) / 255.0) for k, v in HAIR_COLORS_SRGB.items()
}


@dataclass
class Identity:
    """One person: shape (betas or an enrolled mesh), skin tone and hair colour (linear RGB in [0, 1])."""

    name: str
    id: int
    betas: np.ndarray  # (K,) float32
    skin_tone: np.ndarray  # (3,) float32 linear RGB
    hair_color: np.ndarray  # (3,) float32 linear RGB
    body_model: str | None = None  # body model file for this person; None = the run's body model
    mesh: str | None = None  # rest-pose vertices in the body's topology (replaces the shape blend)

    def __post_init__(self) -> None:
        self.betas = np.asarray(self.betas, dtype=np.float32).reshape(-1)
        self.skin_tone = np.asarray(self.skin_tone, dtype=np.float32).reshape(3)
        self.hair_color = np.asarray(self.hair_color, dtype=np.float32).reshape(3)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form; float32 values survive the round trip exactly."""
        out: dict[str, Any] = {
            "name": self.name,
            "id": int(self.id),
            "betas": [float(b) for b in self.betas],
            "skin_tone": [float(c) for c in self.skin_tone],
            "hair_color": [float(c) for c in self.hair_color],
        }
        if self.body_model is not None:
            out["body_model"] = self.body_model
        if self.mesh is not None:
            out["mesh"] = self.mesh
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Identity:
        return cls(
            name=str(data["name"]),
            id=int(data["id"]),
            betas=np.asarray(data["betas"], dtype=np.float32),
            skin_tone=np.asarray(data["skin_tone"], dtype=np.float32),
            hair_color=np.asarray(data["hair_color"], dtype=np.float32),
            body_model=data.get("body_model"),
            mesh=data.get("mesh"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # mutable arrays inside


# ----------------------------------------------------------------------------------------------------------
# Sampling


def _stratified_normals(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    """Latin-hypercube N(0,1) draws: each of the `dims` components covers its whole range even for small n."""
    strata = (np.arange(n)[:, None] + rng.random((n, dims))) / n  # one draw per stratum
    for d in range(dims):
        strata[:, d] = strata[rng.permutation(n), d]
    from scipy.special import ndtri

    return ndtri(np.clip(strata, 1e-6, 1 - 1e-6))


def _sample_betas(rng: np.random.Generator, n: int, num_betas: int) -> np.ndarray:
    """(n, K) betas: stratified leading components, Gaussian tail, clipped and pairwise distinct."""
    lead = min(STRATIFIED_COMPONENTS, num_betas)
    betas = np.empty((n, num_betas), dtype=np.float64)
    betas[:, :lead] = _stratified_normals(rng, n, lead)
    betas[:, lead:] = rng.standard_normal((n, num_betas - lead))
    betas = np.clip(betas, -BETA_LIMIT, BETA_LIMIT)
    for i in range(1, n):  # redraw the tail of anyone too close to an earlier identity
        for _ in range(100):
            if np.min(np.linalg.norm(betas[:i] - betas[i], axis=1)) >= MIN_BETA_DISTANCE:
                break
            betas[i, lead:] = np.clip(rng.standard_normal(num_betas - lead), -BETA_LIMIT, BETA_LIMIT)
            if num_betas == lead:
                betas[i] = np.clip(rng.standard_normal(num_betas), -BETA_LIMIT, BETA_LIMIT)
    return betas.astype(np.float32)


def _sample_skin_tones(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) linear RGB along the palette, stratified so a small cast still spans light to dark."""
    t = (rng.permutation(n) + rng.random(n)) / n * (len(SKIN_PALETTE) - 1)
    lo = np.floor(t).astype(int).clip(0, len(SKIN_PALETTE) - 2)
    w = (t - lo)[:, None]
    tones = SKIN_PALETTE[lo] * (1 - w) + SKIN_PALETTE[lo + 1] * w
    tones *= rng.uniform(0.95, 1.05, size=(n, 1))  # slight brightness variation within a tone
    return np.clip(tones, 0.0, 1.0).astype(np.float32)


def _sample_hair_colors(rng: np.random.Generator, n: int) -> np.ndarray:
    names = list(HAIR_PROBABILITIES)
    p = np.array([HAIR_PROBABILITIES[k] for k in names])
    picks = rng.choice(len(names), size=n, p=p / p.sum())
    base = np.stack([HAIR_COLORS[names[i]] for i in picks]) if n else np.zeros((0, 3))
    base = base * rng.uniform(0.85, 1.15, size=(n, 1))
    return np.clip(base, 0.0, 1.0).astype(np.float32)


def sample_identities(n: int, seed: int, body: Any) -> list[Identity]:
    """N distinct, plausible people from the body's shape space, the same for the same seed."""
    if int(n) < 1:
        raise IdentityError(f"identities: expected a number of identities >= 1, got {n}")
    n = int(n)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1D3]))
    betas = _sample_betas(rng, n, int(body.num_betas))
    skins = _sample_skin_tones(rng, n)
    hairs = _sample_hair_colors(rng, n)
    return [
        Identity(name=NAME_FORMAT.format(i), id=i, betas=betas[i], skin_tone=skins[i], hair_color=hairs[i])
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------------------------------
# Files


def load_mesh_vertices(path: str | Path) -> np.ndarray:
    """(V, 3) float32 vertices from .npy, .npz ('vertices', 'v' or its only array) or .obj ('v' lines)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        verts = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = [k for k in ("vertices", "v") if k in z.files] or (z.files if len(z.files) == 1 else [])
            if not keys:
                raise ValueError(f"expected an array named 'vertices' or 'v', found {sorted(z.files)}")
            verts = z[keys[0]]
    elif suffix == ".obj":
        rows = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("v "):
                    rows.append([float(x) for x in line.split()[1:4]])
        verts = np.array(rows, dtype=np.float64).reshape(-1, 3)
    else:
        raise ValueError(f"expected one of {', '.join(MESH_SUFFIXES)}, got '{path.suffix}'")
    verts = np.asarray(verts)
    if verts.ndim == 3 and verts.shape[0] == 1:
        verts = verts[0]
    if verts.ndim != 2 or verts.shape[1] != 3 or not np.issubdtype(verts.dtype, np.number):
        raise ValueError(f"expected a (V, 3) array of numbers, got shape {tuple(verts.shape)}")
    if not np.all(np.isfinite(verts)):
        raise ValueError("vertices contain NaN or infinity")
    return verts.astype(np.float32)


def _where(file: Path, index: int, kind: str) -> str:
    return f"{file.name}: {kind} {index}"


def _describe(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _number_list(value: Any, where: str, name: str) -> list[float]:
    ok = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise IdentityError(f"{where}: field '{name}': expected a list of numbers, got {_describe(value)}")
    return [float(v) for v in value]


def _color(value: Any, where: str, name: str, named: dict[str, np.ndarray] | None) -> np.ndarray:
    if isinstance(value, str) and named is not None:
        if value not in named:
            raise IdentityError(
                f"{where}: field '{name}': expected one of {', '.join(named)} or [r, g, b], "
                f"got {_describe(value)}"
            )
        return named[value]
    rgb = _number_list(value, where, name) if not isinstance(value, str) else None
    if rgb is None or len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise IdentityError(
            f"{where}: field '{name}': expected [r, g, b] linear RGB in [0, 1], got {_describe(value)}"
        )
    return np.array(rgb, dtype=np.float32)


class _BodyCache:
    """Loads each per-identity body model once (they can be large)."""

    def __init__(self, default: Any):
        self.default = default
        self.loaded: dict[str, Any] = {}

    def get(self, path: str | None) -> Any:
        if path is None:
            return self.default
        if path not in self.loaded:
            from protoreg.body import load_body_model

            self.loaded[path] = load_body_model(path)
        return self.loaded[path]


def _resolve_path(value: Any, file: Path, where: str, name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise IdentityError(f"{where}: field '{name}': expected a file path, got {_describe(value)}")
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = file.parent / p
    if not p.is_file():
        raise IdentityError(f"{where}: field '{name}': file not found: {value}")
    return p.resolve()


KNOWN_FIELDS = ("name", "betas", "skin_tone", "hair_color", "body_model", "mesh")


def _parse_entry(
    entry: Any, index: int, kind: str, file: Path, bodies: _BodyCache, rng: np.random.Generator
) -> Identity:
    where = _where(file, index, kind)
    if not isinstance(entry, dict):
        raise IdentityError(f"{where}: expected a mapping with 'name' and 'betas', got {_describe(entry)}")
    unknown = sorted(set(entry) - set(KNOWN_FIELDS))
    if unknown:
        raise IdentityError(
            f"{where}: field '{unknown[0]}': unknown field (expected {', '.join(KNOWN_FIELDS)})"
        )
    name = entry.get("name", NAME_FORMAT.format(index - 1))
    if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
        raise IdentityError(
            f"{where}: field 'name': expected a non-empty name without '/', got {_describe(name)}"
        )

    body_path = None
    if entry.get("body_model") is not None:
        body_path = str(_resolve_path(entry["body_model"], file, where, "body_model"))
    try:
        body = bodies.get(body_path)
    except Exception as e:  # BodyModelError and friends: keep it one line
        raise IdentityError(f"{where}: field 'body_model': {str(e).splitlines()[0]}") from e
    k = int(body.num_betas)

    mesh_path = None
    if entry.get("mesh") is not None:
        mesh_p = _resolve_path(entry["mesh"], file, where, "mesh")
        try:
            verts = load_mesh_vertices(mesh_p)
        except (ValueError, OSError) as e:
            raise IdentityError(f"{where}: field 'mesh': {mesh_p.name}: {str(e).splitlines()[0]}") from e
        if verts.shape[0] != int(body.num_vertices):
            raise IdentityError(
                f"{where}: field 'mesh': expected {body.num_vertices} vertices (the body's topology), "
                f"got {verts.shape[0]} in {mesh_p.name}"
            )
        mesh_path = str(mesh_p)

    if "betas" not in entry and mesh_path is None:
        raise IdentityError(f"{where}: field 'betas': missing (give betas, a mesh, or both)")
    betas = _number_list(entry.get("betas", []), where, "betas")
    if len(betas) > k:
        raise IdentityError(f"{where}: field 'betas': expected at most {k} numbers, got {len(betas)}")
    betas = betas + [0.0] * (k - len(betas))

    skin = (
        _color(entry["skin_tone"], where, "skin_tone", None)
        if entry.get("skin_tone") is not None
        else _sample_skin_tones(rng, 1)[0]
    )
    hair = (
        _color(entry["hair_color"], where, "hair_color", HAIR_COLORS)
        if entry.get("hair_color") is not None
        else _sample_hair_colors(rng, 1)[0]
    )
    return Identity(
        name=name, id=index - 1, betas=np.array(betas), skin_tone=skin, hair_color=hair,
        body_model=body_path, mesh=mesh_path,
    )


def _read_entries(path: Path) -> tuple[list[tuple[int, Any]], str]:
    """[(1-based entry or line number, raw entry)] and the word for it ('entry' or 'line')."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IdentityError(f"{path.name}: cannot read identities file: {e}") from e
    if suffix == ".jsonl":
        entries = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise IdentityError(f"{path.name}: line {lineno}: invalid JSON: {e.msg}") from e
        return entries, "line"
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise IdentityError(f"{path.name}: invalid YAML{at}: {problem}") from e
        if isinstance(data, dict) and "identities" in data:
            data = data["identities"]
        if not isinstance(data, list):
            raise IdentityError(
                f"{path.name}: expected a list of identities (or a mapping with key 'identities'), "
                f"got {type(data).__name__}"
            )
        return list(enumerate(data, start=1)), "entry"
    raise IdentityError(f"{path.name}: expected an identities file ending in .yaml, .yml or .jsonl")


def load_identities(path: str | Path, body: Any, seed: int = 0) -> list[Identity]:
    """Named people from a YAML or JSONL file; traits not given are drawn with `seed`."""
    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"{path}: identities file not found")
    entries, kind = _read_entries(path)
    if not entries:
        raise IdentityError(f"{path.name}: no identities listed")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF11E]))
    bodies = _BodyCache(body)
    out: list[Identity] = []
    seen: dict[str, int] = {}
    for position, (index, entry) in enumerate(entries):
        ident = _parse_entry(entry, index, kind, path, bodies, rng)
        ident.id = position
        if "name" not in entry:
            ident.name = NAME_FORMAT.format(position)
        if ident.name in seen:
            raise IdentityError(
                f"{_where(path, index, kind)}: field 'name': duplicate name '{ident.name}' "
                f"(also {kind} {seen[ident.name]})"
            )
        seen[ident.name] = index
        out.append(ident)
    return out


def resolve_identities(spec: str | int, seed: int, body: Any) -> list[Identity]:
    """`spec` is a count N (sampled people) or the path of a YAML/JSONL identities file."""
    text = str(spec).strip()
    try:
        n = int(text)
    except ValueError:
        return load_identities(text, body, seed=seed)
    if n < 1:
        raise IdentityError(f"identities: expected a positive number of identities or a file, got {n}")
    return sample_identities(n, seed, body)


def identities_fingerprint(identities: list[Identity]) -> str:
    """sha256 of the canonical JSON of the cast (mesh files by content), for manifests and caches."""
    records = []
    for ident in identities:
        rec = ident.to_json()
        if ident.mesh is not None:
            rec["mesh"] = file_sha256(ident.mesh)
        if ident.body_model is not None:
            rec["body_model"] = file_sha256(ident.body_model)
        records.append(rec)
    return hashlib.sha256(canonical_json(records).encode("utf-8")).hexdigest()


def write_identities_jsonl(path: str | Path, identities: list[Identity]) -> None:
    """One identity per line (the JSONL format load_identities reads), written atomically."""
    lines = []
    for ident in identities:
        rec = ident.to_json()
        rec.pop("id")  # ids are positions in the file
        lines.append(json.dumps(rec) + "\n")
    write_text_atomic(path, "".join(lines))
