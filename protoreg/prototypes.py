"""3D prototypes: one rest-pose point cloud per identity, labelled by part, stored in `prototypes.h5`.

The recogniser matches image pixels to these points. Every identity is sampled at the SAME surface
places (same face and barycentric coordinates on the shared topology), so point i is the same
anatomical spot on every body and the trainer can share neighbour graphs and part slices.
See docs/prototypes.md for the file format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protoreg.identities import Identity, load_mesh_vertices
from protoreg.parts import BODY_PART_IDS, PART_NAMES, TAXONOMY_VERSION

FORMAT_VERSION = "1.0"  # major.minor: readers refuse a newer major
OVERSAMPLE = 4  # candidates per kept point before farthest-point thinning (evenly spread points)
HEAD_JOINT = 15  # SMPL joint index of the head (hair region reference)
# Hairline in head coordinates (see hair_vertex_mask): u = height, v = how far forward the hair reaches.
HAIRLINE_U = (-0.10, 0.30, 0.50, 0.70, 0.80)
HAIRLINE_V = (-0.22, -0.16, 0.20, 0.55, 2.0)


class PrototypeError(ValueError):
    """Prototypes cannot be built, written or read; the message is one line naming the file."""


@dataclass
class Prototype:
    """One identity's rest-pose point cloud (metres, body frame: y up, facing +z)."""

    name: str
    identity_id: int
    points: np.ndarray  # (N, 3) float32
    normals: np.ndarray  # (N, 3) float32, unit length, outward
    parts: np.ndarray  # (N,) uint8 part ids 1-14 (protoreg.parts)
    vertex_ids: np.ndarray  # (N,) int32 source vertex of each point (largest barycentric weight)
    albedo: np.ndarray  # (N, 3) float32 linear RGB: skin tone, hair colour on the scalp
    betas: np.ndarray  # (K,) float32


@dataclass
class SurfaceSamples:
    """Where the N points sit on the shared topology: identical for every identity."""

    face_ids: np.ndarray  # (N,) int32
    barycentric: np.ndarray  # (N, 3) float32, rows sum to 1
    vertex_ids: np.ndarray  # (N,) int32 = faces[face_ids, argmax(barycentric)]
    parts: np.ndarray  # (N,) uint8 = vertex_parts[vertex_ids]


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _rest_vertices(body: Any, betas: np.ndarray) -> np.ndarray:
    """(V, 3) float64 rest-pose (T-pose) vertices of one body shape."""
    import torch

    b = torch.as_tensor(np.asarray(betas, dtype=np.float32)[None])
    return _np(body.rest_vertices(b))[0].astype(np.float64)


def _face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = vertices[faces]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def _allocate_counts(areas: np.ndarray, n_points: int, min_per_part: int) -> np.ndarray:
    """Points per part proportional to area, but at least `min_per_part`; sums to n_points exactly."""
    fixed = np.zeros(len(areas), dtype=bool)
    share = np.zeros(len(areas))
    for _ in range(len(areas) + 1):
        budget = n_points - min_per_part * fixed.sum()
        share = np.full(len(areas), float(min_per_part))
        share[~fixed] = budget * areas[~fixed] / areas[~fixed].sum()
        small = (~fixed) & (share < min_per_part)
        if not small.any():
            break
        fixed |= small
    counts = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - counts), kind="stable")  # largest remainders get the leftovers
    counts[order[: n_points - counts.sum()]] += 1
    return counts


def _uniform_barycentric_in_corner(rng: np.random.Generator, corners: np.ndarray) -> np.ndarray:
    """Uniform points of a triangle restricted to the third nearest each given corner (where its weight is
    largest): a uniform point with its largest coordinate swapped into the corner's slot."""
    r1 = np.sqrt(rng.random(len(corners)))
    r2 = rng.random(len(corners))
    bary = np.stack([1.0 - r1, r1 * (1.0 - r2), r1 * r2], axis=1)
    rows = np.arange(len(corners))
    top = bary.argmax(axis=1)
    top_val = bary[rows, top].copy()
    bary[rows, top] = bary[rows, corners]
    bary[rows, corners] = top_val
    return bary


def _farthest_point_order(points: np.ndarray, k: int) -> np.ndarray:
    """Indices of k points picked greedily farthest from those already picked (even spacing)."""
    start = int(np.argmin(np.linalg.norm(points - points.mean(axis=0), axis=1)))
    picked = np.empty(k, dtype=np.int64)
    picked[0] = start
    dist = np.linalg.norm(points - points[start], axis=1)
    for i in range(1, k):
        nxt = int(np.argmax(dist))
        picked[i] = nxt
        np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1), out=dist)
    return picked


def sample_surface(body: Any, n_points: int = 4096, seed: int = 0, min_per_part: int = 100) -> SurfaceSamples:
    """N evenly spread surface places on the mean body, at least `min_per_part` on every part.

    Each triangle is split into three equal-area corner regions (where one vertex has the largest
    barycentric weight); a corner region belongs to its vertex's part, so the per-part budget is exact.
    Within a part, candidates are drawn uniformly by area, then thinned by farthest-point sampling.
    """
    faces = np.asarray(body.faces, dtype=np.int64)
    vertex_parts = np.asarray(body.vertex_parts, dtype=np.int64)
    template = _rest_vertices(body, np.zeros(int(body.num_betas), dtype=np.float32))
    corner_area = np.repeat(_face_areas(template, faces) / 3.0, 3)  # (F*3,) flat corner index f*3+c
    corner_part = vertex_parts[faces.reshape(-1)]
    part_area = np.array([corner_area[corner_part == p].sum() for p in BODY_PART_IDS])
    missing = [PART_NAMES[p] for p, a in zip(BODY_PART_IDS, part_area, strict=True) if a <= 0]
    if missing:
        raise PrototypeError(
            f"body model {getattr(body, 'path', '?')}: no surface on part(s) {', '.join(missing)}"
        )
    if n_points < min_per_part * len(BODY_PART_IDS):
        raise PrototypeError(
            f"n_points: expected at least {min_per_part * len(BODY_PART_IDS)} "
            f"({min_per_part} per part x {len(BODY_PART_IDS)} parts), got {n_points}"
        )
    counts = _allocate_counts(part_area, n_points, min_per_part)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9A7]))
    face_ids, barys = [], []
    for p, count in zip(BODY_PART_IDS, counts, strict=True):
        idx = np.flatnonzero(corner_part == p)
        prob = corner_area[idx] / corner_area[idx].sum()
        chosen = idx[rng.choice(len(idx), size=int(count) * OVERSAMPLE, p=prob)]
        f, c = chosen // 3, chosen % 3
        bary = _uniform_barycentric_in_corner(rng, c)
        pos = np.einsum("nk,nkd->nd", bary, template[faces[f]])
        keep = _farthest_point_order(pos, int(count))
        face_ids.append(f[keep])
        barys.append(bary[keep])
    face_ids_a = np.concatenate(face_ids).astype(np.int32)
    bary_a = np.concatenate(barys).astype(np.float32)
    vertex_ids = faces[face_ids_a, bary_a.argmax(axis=1)].astype(np.int32)
    return SurfaceSamples(face_ids_a, bary_a, vertex_ids, vertex_parts[vertex_ids].astype(np.uint8))


def hair_vertex_mask(body: Any) -> np.ndarray:
    """(V,) bool: the scalp (top, back and sides of the head above the ears), where hair colour goes.

    Defined once on the mean body relative to the head joint, so it is the same vertices for everyone.
    Coordinates: y up, the body faces +z.
    """
    import torch

    template = _rest_vertices(body, np.zeros(int(body.num_betas), dtype=np.float32))
    joints = _np(body.forward(betas=torch.zeros(1, int(body.num_betas))).joints)[0]
    head = np.asarray(body.vertex_parts) == BODY_PART_IDS[0]
    jy, jz = joints[HEAD_JOINT, 1], joints[HEAD_JOINT, 2]
    top = template[head, 1].max()
    front = template[head & (template[:, 1] > jy), 2].max()
    u = (template[:, 1] - jy) / max(top - jy, 1e-6)  # 0 at the head joint, 1 at the crown
    v = (template[:, 2] - jz) / max(front - jz, 1e-6)  # 0 at the head joint, 1 at the nose tip
    # The hairline, seen from the side: how far forward (v) hair reaches at each height (u), from the nape
    # behind the ear, up the temple, to the forehead.
    hairline = np.interp(u, HAIRLINE_U, HAIRLINE_V, left=-np.inf, right=np.inf)
    return head & (v < hairline)


def vertex_normals_np(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) unit area-weighted vertex normals, as body.vertex_normals computes them, in numpy: it stays fast
    when torch's thread pool competes with other jobs for the cores."""
    tri = vertices[faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    normals = np.zeros_like(vertices, dtype=np.float64)
    for k in range(3):
        for d in range(3):
            normals[:, d] += np.bincount(faces[:, k], weights=face_normals[:, d], minlength=len(vertices))
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def identity_rest_vertices(
    ident: Identity, body: Any, bodies: dict[str, Any] | None = None
) -> tuple[np.ndarray, Any]:
    """Rest vertices of one identity (its mesh if enrolled, else the shape blend) and the body used."""
    own = body
    bodies = {} if bodies is None else bodies
    if ident.body_model is not None:
        if ident.body_model not in bodies:
            from protoreg.body import load_body_model

            bodies[ident.body_model] = load_body_model(ident.body_model)
        own = bodies[ident.body_model]
        same_faces = np.array_equal(np.asarray(own.faces), np.asarray(body.faces))
        if own.num_vertices != body.num_vertices or not same_faces:
            raise PrototypeError(
                f"identity {ident.name}: body model {ident.body_model} has a different topology "
                f"from {getattr(body, 'path', 'the run body model')}"
            )
    if ident.mesh is not None:
        verts = load_mesh_vertices(ident.mesh).astype(np.float64)
        if verts.shape[0] != body.num_vertices:
            raise PrototypeError(
                f"identity {ident.name}: mesh {ident.mesh}: expected {body.num_vertices} vertices, "
                f"got {verts.shape[0]}"
            )
        return verts, own
    if len(ident.betas) != int(own.num_betas):
        raise PrototypeError(f"identity {ident.name}: expected {own.num_betas} betas, got {len(ident.betas)}")
    return _rest_vertices(own, ident.betas), own


def build_prototype(
    ident: Identity,
    body: Any,
    samples: SurfaceSamples,
    hair_mask: np.ndarray,
    bodies: dict[str, Any] | None = None,
) -> Prototype:
    """One identity's prototype at the shared surface places."""
    verts, _ = identity_rest_vertices(ident, body, bodies)  # same topology as `body`, checked there
    all_faces = np.asarray(body.faces, dtype=np.int64)
    faces = all_faces[samples.face_ids]
    bary = samples.barycentric.astype(np.float64)
    points = np.einsum("nk,nkd->nd", bary, verts[faces])
    normals = np.einsum("nk,nkd->nd", bary, vertex_normals_np(verts, all_faces)[faces])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    albedo = np.where(hair_mask[samples.vertex_ids][:, None], ident.hair_color[None], ident.skin_tone[None])
    return Prototype(
        name=ident.name,
        identity_id=int(ident.id),
        points=points.astype(np.float32),
        normals=normals.astype(np.float32),
        parts=samples.parts.copy(),
        vertex_ids=samples.vertex_ids.copy(),
        albedo=albedo.astype(np.float32),
        betas=np.asarray(ident.betas, dtype=np.float32).copy(),
    )


# ----------------------------------------------------------------------------------------------------------
# File


def _create(group: Any, name: str, data: np.ndarray) -> None:
    group.create_dataset(name, data=data, track_times=False)


def _remove_quietly(path: Path) -> None:
    """Drop a temporary file after a failure; a folder that cannot hold it cannot hold it either."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_prototypes(
    path: str | Path,
    identities: list[Identity],
    body: Any,
    n_points: int = 4096,
    seed: int = 0,
    min_per_part: int = 100,
) -> Path:
    """Build every identity's prototype and write `prototypes.h5` atomically (no partial file on error)."""
    import h5py
    from tqdm import tqdm

    path = Path(path)
    if not identities:
        raise PrototypeError(f"{path}: no identities to write")
    names = [i.name for i in identities]
    if len(set(names)) != len(names):
        raise PrototypeError(f"{path}: identity names must be unique")
    samples = sample_surface(body, n_points=n_points, seed=seed, min_per_part=min_per_part)
    hair_mask = hair_vertex_mask(body)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # same folder, so os.replace is atomic
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["taxonomy_version"] = TAXONOMY_VERSION
            f.attrs["body_model_sha256"] = str(getattr(body, "sha256", ""))
            f.attrs["n_points"] = int(n_points)
            f.attrs["seed"] = int(seed)
            f.attrs["min_per_part"] = int(min_per_part)
            f.attrs["num_identities"] = len(identities)
            s = f.create_group("sampling")
            _create(s, "face_ids", samples.face_ids)
            _create(s, "barycentric", samples.barycentric)
            _create(s, "vertex_ids", samples.vertex_ids)
            _create(s, "parts", samples.parts)
            _create(s, "hair_vertex_mask", hair_mask.astype(np.uint8))
            groups = f.create_group("identities", track_order=True)
            bodies: dict[str, Any] = {}
            for ident in tqdm(identities, desc="prototypes", unit="id", leave=False):
                proto = build_prototype(ident, body, samples, hair_mask, bodies)
                g = groups.create_group(proto.name)
                g.attrs["name"] = proto.name
                g.attrs["identity_id"] = proto.identity_id
                g.attrs["skin_tone"] = ident.skin_tone
                g.attrs["hair_color"] = ident.hair_color
                if ident.mesh is not None:
                    g.attrs["mesh"] = ident.mesh
                if ident.body_model is not None:
                    g.attrs["body_model"] = ident.body_model
                _create(g, "points", proto.points)
                _create(g, "normals", proto.normals)
                g["parts"] = s["parts"]  # hard links: identical for every identity, stored once
                g["vertex_ids"] = s["vertex_ids"]
                _create(g, "albedo", proto.albedo)
                _create(g, "betas", proto.betas)
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise PrototypeError(f"{path}: cannot write prototypes: {e.strerror or e}") from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def _check_header(path: Path, f: Any) -> None:
    version = str(f.attrs.get("format_version", ""))
    if not version or version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise PrototypeError(
            f"{path}: prototypes format_version {version or 'missing'}, this reader reads {FORMAT_VERSION}"
        )
    taxonomy = str(f.attrs.get("taxonomy_version", ""))
    if taxonomy != TAXONOMY_VERSION:
        raise PrototypeError(
            f"{path}: part taxonomy_version {taxonomy or 'missing'}, expected {TAXONOMY_VERSION}"
        )
    if "identities" not in f:
        raise PrototypeError(f"{path}: no 'identities' group")


def read_prototypes_attrs(path: str | Path) -> dict[str, Any]:
    """The file attributes (body_model_sha256, n_points, seed, ...) as plain Python values."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            _check_header(path, f)
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except OSError as e:
        raise PrototypeError(f"{path}: cannot read prototypes: {str(e).splitlines()[0]}") from e


def read_prototypes(path: str | Path) -> dict[str, Prototype]:
    """All prototypes by identity name, in identity-id order."""
    import h5py

    path = Path(path)
    out: list[Prototype] = []
    try:
        with h5py.File(path, "r") as f:
            _check_header(path, f)
            for name, g in f["identities"].items():
                try:
                    out.append(
                        Prototype(
                            name=str(g.attrs["name"]),
                            identity_id=int(g.attrs["identity_id"]),
                            points=g["points"][()],
                            normals=g["normals"][()],
                            parts=g["parts"][()],
                            vertex_ids=g["vertex_ids"][()],
                            albedo=g["albedo"][()],
                            betas=g["betas"][()],
                        )
                    )
                except KeyError as e:
                    raise PrototypeError(f"{path}: identity {name}: missing {e.args[0]}") from e
    except OSError as e:
        raise PrototypeError(f"{path}: cannot read prototypes: {str(e).splitlines()[0]}") from e
    out.sort(key=lambda p: p.identity_id)
    return {p.name: p for p in out}


def prototype_points_tensor(protos: dict[str, Prototype], names: list[str] | None = None) -> Any:
    """(P, N, 3) float32 torch tensor of the named prototypes' points (all, in file order, by default)."""
    import torch

    names = list(protos) if names is None else names
    missing = [n for n in names if n not in protos]
    if missing:
        raise PrototypeError(f"prototypes: unknown identity {missing[0]}")
    return torch.from_numpy(np.stack([protos[n].points for n in names]).astype(np.float32, copy=False))
