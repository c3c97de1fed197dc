"""DATASET.md and contact-sheet.png beside the manifest: what a receiving team reads before trusting data.

The card is made from the manifest (counts, identities, resolved configuration, body model, checksums
live there) plus a contact sheet of the first samples, so it always describes the bytes that are there.
It is written by gen-shards and by `protoreg finalize`, locally or in an object store.
"""

from __future__ import annotations

import io
import json
import platform
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from generator.location import DatasetLocation
from protoreg import dataset as ds
from protoreg import storage

CARD_NAME = "DATASET.md"
SHEET_NAME = "contact-sheet.png"
SHEET_SAMPLES = 8
DEFAULT_BODY_FACTS = Path(__file__).resolve().parents[1] / "blender_assets" / "bodies" / "anny_smpl.json"
SOFTWARE = ("protoreg", "bpy", "numpy", "webdataset", "torch")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def body_licence(body: dict[str, Any]) -> str:
    """The body model's licence: from the embedded default body's facts when the sha256 matches."""
    try:
        facts = json.loads(DEFAULT_BODY_FACTS.read_text())
    except (OSError, ValueError):
        facts = {}
    if facts.get("sha256") and facts.get("sha256") == body.get("sha256"):
        lic = facts.get("licence", {})
        parts = [f"{k.replace('_', ' ')}: {v}" for k, v in lic.items()]
        return f"the embedded default body ({facts.get('source', 'anny')}); " + "; ".join(parts)
    return "user-supplied SMPL-format file: the licence of its provider applies (check it before sharing)"


def covariate_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(setting, value) for every range ([lo, hi]) and probability in the resolved configuration."""
    rows = []
    for section in ("scene", "pose", "appearance", "render"):
        for key, value in (config.get(section) or {}).items():
            is_range = (
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            )
            is_prob = "prob" in key and isinstance(value, (int, float, dict))
            if section == "render" and not isinstance(value, dict):
                rows.append((f"{section}.{key}", json.dumps(value)))
            elif is_range:
                rows.append((f"{section}.{key}", f"{value[0]} .. {value[1]}"))
            elif is_prob:
                rows.append((f"{section}.{key}", json.dumps(value, sort_keys=True)))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def shard_pattern(manifest: dict[str, Any]) -> str:
    names = [s["name"] for s in manifest["shards"]]
    if len(names) == 1:
        return names[0]
    first, last = names[0].split("-")[1].split(".")[0], names[-1].split("-")[1].split(".")[0]
    return f"shard-{{{first}..{last}}}.tar"


def render_card(manifest: dict[str, Any], root: str, has_sheet: bool) -> str:
    """DATASET.md text for a manifest; `root` is where readers find the files (folder or URL)."""
    t = manifest["totals"]
    res = manifest["resolution"]
    idents = manifest.get("identities", [])
    body = manifest.get("body_model", {})
    gen = manifest.get("generator", {})
    pattern = f"{root.rstrip('/')}/{shard_pattern(manifest)}"
    lines = [
        f"# Dataset `{Path(root.rstrip('/')).name}`",
        "",
        "Synthetic images of posed, clothed, lit persons rendered with Blender Cycles, with exact per-pixel "
        "part labels and per-pixel body-vertex correspondence, written as WebDataset shards by protoreg's "
        "`gen-shards`. Field-by-field format: protoreg's docs/dataset-format.md.",
        "",
        "## What it contains",
        "",
        *_table(
            ("", ""),
            [
                ("format version", manifest["format_version"]),
                ("samples", t["samples"]),
                ("shards", f"{t['shards']} ({manifest.get('shard_size')} samples a shard)"),
                ("bytes", f"{t['bytes']:,}"),
                ("identities", len(idents)),
                ("resolution", f"{res['width']}x{res['height']} (width x height)"),
                ("entries per sample", ", ".join(manifest.get("sample_entries", ds.SAMPLE_ENTRIES))),
                ("seed", manifest.get("seed")),
            ],
        ),
        "",
        f"Identities (sample i shows identity i mod {max(len(idents), 1)}): "
        + ", ".join(f"{i['name']} (id {i['id']})" for i in idents[:40])
        + (f", ... ({len(idents) - 40} more in manifest.json)" if len(idents) > 40 else ""),
        "",
    ]
    if has_sheet:
        lines += [
            f"![contact sheet: RGB | part labels | surface correspondence]({SHEET_NAME})",
            "",
            f"`{SHEET_NAME}`: the first samples as RGB | part labels over the image | body-vertex "
            "correspondence colours (`protoreg inspect` prints label statistics).",
            "",
        ]
    lines += ["### Covariates (resolved configuration)", ""]
    lines += _table(("setting", "value"), covariate_rows(manifest.get("config", {})))
    taxonomy = manifest.get("parts", {})
    lines += ["", f"### Part taxonomy (version {taxonomy.get('taxonomy_version', '?')})", ""]
    lines += _table(
        ("id", "part", "colour (RGB)"),
        [(i, n, tuple(c)) for i, n, c in zip(taxonomy.get("ids", []), taxonomy.get("names", []),
                                             taxonomy.get("colors", []), strict=False)],
    )  # fmt: skip
    lines += [
        "",
        "## How it was made",
        "",
        "```",
        str(manifest.get("command", "?")),
        "```",
        "",
        *_table(
            ("", ""),
            [
                ("generator", f"{gen.get('name', 'protoreg')} {gen.get('version', '?')}"),
                ("git commit", gen.get("git_commit", "unknown")),
                *[(f"{p} (finalizing environment)", package_version(p)) for p in SOFTWARE],
                ("python (finalizing environment)", platform.python_version()),
            ],
        ),
        "",
        "The full resolved configuration (every distribution) is `config` in `manifest.json`; sample i is a "
        "pure function of (seed, configuration, i), so the same command reproduces the same bytes.",
        "",
        "## Body model and licence",
        "",
        f"- file `{body.get('file', '?')}`, sha256 `{body.get('sha256', '?')}`, "
        f"{body.get('num_vertices', '?')} vertices, {body.get('num_betas', '?')} shape parameters",
        f"- licence: {body_licence(body)}",
        "- `vid.png` holds body-vertex index + 1 of this mesh; `prototypes.h5` holds each identity's 3D "
        "prototype built from it.",
        "",
        "## Checking it",
        "",
        "`manifest.json` lists every shard with its sample count, bytes and sha256. "
        f"`protoreg verify {root}` checks every checksum and sample (local folders, s3:// and http(s)://). "
        "Readers refuse a manifest of a newer major format version and read older minor versions.",
        "",
        "## How to load it",
        "",
        "Plain webdataset (nothing is unpickled: only the listed entries are decoded):",
        "",
        "```python",
        "import io, json, numpy as np, webdataset as wds",
        "from PIL import Image",
        "",
        "def decode(s):",
        "    img = lambda name: Image.open(io.BytesIO(s[name]))  # noqa: E731",
        "    return {'key': s['__key__'], 'rgb': np.asarray(img('rgb.jpg').convert('RGB')),",
        "            'parts': np.asarray(img('parts.png')),  # uint8 part ids 0-15",
        "            'vid': np.asarray(img('vid.png'), dtype=np.int32),  # vertex + 1, 0 = none",
        "            'meta': json.loads(s['json'])}",
        "",
        f"ds = wds.WebDataset('{pattern}', shardshuffle=False).map(decode)",
        "```",
        "",
        "Random access with `wids` (local copy of the folder):",
        "",
        "```python",
        "import wids",
        f"ds = wids.ShardListDataset('{ds.WIDS_INDEX_NAME}')  # keys keep the leading '.': '.rgb.jpg'",
        "```",
        "",
        "Hugging Face datasets:",
        "",
        "```python",
        "from datasets import load_dataset",
        f"files = {{'train': '{root.rstrip('/')}/shard-*.tar'}}",
        "ds = load_dataset('webdataset', data_files=files, split='train')",
        "```",
        "",
        "protoreg:",
        "",
        "```",
        f"train-from-shards --shards {root} --out runs/example",
        "```",
        "",
    ]
    return "\n".join(lines)


def _first_samples(location: DatasetLocation, manifest: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Decoded first samples of the first shard (downloaded when remote)."""
    from generator.write import iter_tar_samples

    if not manifest["shards"]:
        return []
    name = manifest["shards"][0]["name"]
    with tempfile.TemporaryDirectory(prefix="protoreg-card-") as tmp:
        path = Path(location.url(name)) if not location.remote else Path(tmp) / name
        if location.remote:
            location.download(name, path)
        out = []
        for raw in iter_tar_samples(path):
            out.append(ds.decode_sample(raw))
            if len(out) >= n:
                break
    return out


def write_contact_sheet(location: DatasetLocation, manifest: dict[str, Any]) -> bool:
    """contact-sheet.png from the first samples (inspect's sheet writer); False when there are none."""
    from generator.inspect import contact_sheet, load_vertex_colors

    samples = _first_samples(location, manifest, SHEET_SAMPLES)
    if not samples:
        return False
    buf = io.BytesIO()
    contact_sheet(samples, load_vertex_colors(manifest)).save(buf, format="PNG")
    storage.write_bytes(location.url(SHEET_NAME), buf.getvalue())  # atomic locally, one PUT remotely
    return True


def write_dataset_card(location: DatasetLocation, manifest: dict[str, Any] | None = None) -> str:
    """Write DATASET.md (and contact-sheet.png) beside the manifest; returns the card's location."""
    manifest = manifest if manifest is not None else ds.load_manifest(location.root)
    has_sheet = write_contact_sheet(location, manifest)
    location.write_text(CARD_NAME, render_card(manifest, location.root, has_sheet))
    return location.url(CARD_NAME)
