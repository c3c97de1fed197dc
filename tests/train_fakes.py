"""Small real datasets for trainer tests, without Blender: real webdataset shards, real prototypes.h5.

Images are point-splat projections of the synthetic test body (protoreg.body.synthetic) posed at random
rotations, so part labels and vertex ids are geometrically consistent with the prototypes; identities
differ in shape, skin tone and hair colour exactly as the generator's do.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from protoreg import dataset as ds
from protoreg.body import load_body_model
from protoreg.body.synthetic import synthetic_body_arrays
from protoreg.identities import sample_identities
from protoreg.prototypes import write_prototypes


def synthetic_body(tmp: Path):
    path = tmp / "synthetic_body.npz"
    if not path.exists():
        np.savez(path, **synthetic_body_arrays(num_betas=10, seed=3))
    return load_body_model(path), path


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def render_splat(body, ident, rng: np.random.Generator, hw: tuple[int, int]):
    """A crude but consistent 'render': rotate the rest body about y, project orthographically, splat."""
    import torch

    h, w = hw
    verts = body.rest_vertices(torch.as_tensor(ident.betas[None], dtype=torch.float32))[0].numpy()
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    v = verts @ rot.T
    scale = (h * 0.85) / 2.0
    x = (v[:, 0] * scale * 0.5 + w / 2).astype(int)
    y = (h * 0.95 - v[:, 1] * scale * 0.5).astype(int)
    order = np.argsort(v[:, 2])  # far to near: nearer vertices paint last
    parts = np.zeros((h, w), np.uint8)
    vid = np.zeros((h, w), np.uint16)
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = rng.integers(0, 255, 3)
    vparts = np.asarray(body.vertex_parts)
    skin = (np.clip(ident.skin_tone, 0, 1) ** (1 / 2.2) * 255).astype(np.uint8)
    hair = (np.clip(ident.hair_color, 0, 1) ** (1 / 2.2) * 255).astype(np.uint8)
    cloth = rng.integers(0, 255, 3).astype(np.uint8)
    for i in order:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y[i] + dy, x[i] + dx
                if 0 <= yy < h and 0 <= xx < w:
                    parts[yy, xx] = vparts[i]
                    vid[yy, xx] = i + 1
                    p = vparts[i]
                    rgb[yy, xx] = hair if p == 1 else (cloth if p in (2, 9, 10) else skin)
    return rgb, parts, vid


def write_fake_dataset(
    out: Path,
    n_identities: int = 3,
    n_samples: int = 24,
    shard_size: int = 6,
    hw: tuple[int, int] = (128, 64),
    seed: int = 0,
    extra_entries: dict[int, dict[str, bytes]] | None = None,
) -> Path:
    """DIR with shard-XXXXXX.tar, manifest.json and prototypes.h5 in the project's format."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body, body_path = synthetic_body(out)
    idents = sample_identities(n_identities, seed, body)
    write_prototypes(out / ds.PROTOTYPES_NAME, idents, body, n_points=448, seed=seed, min_per_part=16)
    rng = np.random.default_rng(seed)
    pattern = str(out / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i in range(n_samples):
            ident = idents[i % n_identities]
            rgb, parts, vid = render_splat(body, ident, rng, hw)
            sample = {
                "__key__": ds.sample_key(i),
                "rgb.jpg": _jpg(rgb),
                "parts.png": _png(parts),
                "vid.png": _png(vid),
                "json": json.dumps({"identity": {"name": ident.name, "id": ident.id}, "index": i}).encode(),
            }
            sample.update((extra_entries or {}).get(i, {}))
            sink.write(sample)
    shards = sorted(p.name for p in out.glob("shard-*.tar"))
    manifest = {
        "format_version": ds.FORMAT_VERSION,
        "identities": [{"name": d.name, "id": d.id} for d in idents],
        "resolution": {"width": hw[1], "height": hw[0]},
        "body_model": {"path": str(body_path), "num_vertices": int(body.num_vertices)},
        "prototypes": {"file": ds.PROTOTYPES_NAME},
        "shards": [{"name": s} for s in shards],
    }
    (out / ds.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return out
