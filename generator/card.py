"""DATASET.md and contact-sheet.png beside the manifest: what a receiving team reads before trusting data.

The card is made from the manifest (counts, identities, resolved configuration, body model, checksums
live there) plus a contact sheet of the first samples, so it always describes the bytes that are there.
It is written by gen-shards and by `protoreg finalize`, locally or in an object store.
"""

from __future__ import annotations

import io
import json
import platform
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from generator.location import DatasetLocation
from protoreg import dataset as ds
from protoreg import storage

CARD_NAME = "DATASET.md"
SHEET_NAME = "contact-sheet.png"
HF_FEATURES_NAME = "hf-features.json"  # column types for Hugging Face datasets
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


def _url_depth(url: str) -> int:
    """Number of path components of a URL (https://host/a/b -> 2)."""
    from urllib.parse import urlparse

    return len([p for p in urlparse(url).path.split("/") if p])


def render_card(manifest: dict[str, Any], root: str, has_sheet: bool) -> str:
    """DATASET.md text for a manifest; `root` is where readers find the files (folder or URL)."""
    t = manifest["totals"]
    res = manifest["resolution"]
    idents = manifest.get("identities", [])
    body = manifest.get("body_model", {})
    gen = manifest.get("generator", {})
    pattern = f"{root.rstrip('/')}/{shard_pattern(manifest)}"
    if storage.scheme(root) == "s3":
        pattern = f"pipe:aws s3 cp {pattern} -"  # plain webdataset streams s3 objects through a pipe
    local = root.rstrip("/") if not storage.is_remote(root) else "./" + root.rstrip("/").rsplit("/", 1)[-1]
    copy_command = (
        f"aws s3 sync {root} {local}"
        if storage.scheme(root) == "s3"
        else f"wget -r -np -nH --cut-dirs={_url_depth(root) - 1} -R 'index.html*' {root}/"
    )
    copy_note = (
        [
            f"The dataset lives at `{root}`; webdataset and train-from-shards stream it from there. wids and "
            f"Hugging Face datasets read a local copy: `{copy_command}`.",
            "",
        ]
        if storage.is_remote(root)
        else []
    )
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
        *copy_note,
        "Plain webdataset (nothing is unpickled: only the listed entries are decoded):",
        "",
        "```python",
        "import io, json, numpy as np, webdataset as wds",
        "from PIL import Image",
        "",
        "def decode(s):",
        "    img = lambda name: Image.open(io.BytesIO(s[name]))",
        "    return {'key': s['__key__'], 'rgb': np.asarray(img('rgb.jpg').convert('RGB')),",
        "            'parts': np.asarray(img('parts.png')),  # uint8 part ids 0-15",
        "            'vid': np.asarray(img('vid.png'), dtype=np.int32),  # vertex + 1, 0 = none",
        "            'meta': json.loads(s['json'])}",
        "",
        f"ds = wds.WebDataset('{pattern}', shardshuffle=False).map(decode)",
        "```",
        "",
        "Random access with `wids` through the index:",
        "",
        "```python",
        "import wids",
        f"ds = wids.ShardListDataset('{local}/{ds.WIDS_INDEX_NAME}')  # keys: '.rgb.jpg', ...",
        "```",
        "",
        f"Hugging Face datasets (`{HF_FEATURES_NAME}` gives the column types, so samples whose json fills a "
        "field that the first samples leave empty still load):",
        "",
        "```python",
        "import glob, json",
        "from datasets import Features, load_dataset",
        f"features = Features.from_dict(json.load(open('{local}/{HF_FEATURES_NAME}')))",
        f"files = {{'train': sorted(glob.glob('{local}/shard-*.tar'))}}",
        "ds = load_dataset('webdataset', data_files=files, features=features, split='train')",
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
    """The first n decoded samples of the first shard (downloaded when remote)."""
    from generator.write import iter_tar_samples

    if not manifest["shards"]:
        return []
    name = manifest["shards"][0]["name"]
    samples = []
    with tempfile.TemporaryDirectory(prefix="protoreg-card-") as tmp:
        path = Path(location.url(name)) if not location.remote else Path(tmp) / name
        if location.remote:
            location.download(name, path)
        for raw in iter_tar_samples(path):
            samples.append(ds.decode_sample(raw))
            if len(samples) >= n:
                break
    return samples


def shard_json_entries(path: Path) -> list[dict[str, Any]]:
    """Every sample's json of a local shard, without reading the image entries."""
    import tarfile

    with tarfile.open(path, "r:") as tar:
        return [
            ds.decode_json(tar.extractfile(m).read()) for m in tar if m.isfile() and m.name.endswith(".json")
        ]


def json_arrow_schema(location: DatasetLocation, manifest: dict[str, Any]) -> Any:
    """The Arrow type of the json entries, unified over every shard of a local dataset (the first shard
    of a remote one, to avoid downloading everything: `protoreg finalize` on a local copy widens it)."""
    import pyarrow as pa

    schema = None
    with tempfile.TemporaryDirectory(prefix="protoreg-card-") as tmp:
        for shard in manifest["shards"][: 1 if location.remote else None]:
            path = Path(location.url(shard["name"])) if not location.remote else Path(tmp) / shard["name"]
            if location.remote:
                location.download(shard["name"], path)
            metas = shard_json_entries(path)
            if not metas:
                continue
            one = pa.Table.from_pylist([{"json": m} for m in metas]).schema
            schema = one if schema is None else pa.unify_schemas([schema, one], promote_options="permissive")
    return schema


def hf_features(location: DatasetLocation, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Hugging Face `Features` (as a dict) for its webdataset loader, or None without `datasets`.

    The loader guesses the json column's type from the first 5 samples; a field that is empty there
    (no area light yet) and filled later then fails to cast. The type unified over the shards avoids it.
    """
    try:
        import datasets
    except ImportError:
        return None
    try:
        schema = json_arrow_schema(location, manifest)
        json_type = datasets.Features.from_arrow_schema(schema)["json"] if schema is not None else None
    except (ValueError, TypeError, NotImplementedError) as e:  # pyarrow's ArrowInvalid is a ValueError
        print(f"warning: no {HF_FEATURES_NAME} ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
        return None
    if json_type is None:
        return None
    features = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
    for entry in manifest.get("sample_entries", ds.SAMPLE_ENTRIES):
        features[entry] = json_type if entry == "json" else datasets.Image()
    return datasets.Features(features).to_dict()


def write_contact_sheet(location: DatasetLocation, manifest: dict[str, Any], samples: list) -> bool:
    """contact-sheet.png from the first samples (inspect's sheet writer); False when there are none."""
    from generator.inspect import contact_sheet, load_vertex_colors

    if not samples:
        return False
    buf = io.BytesIO()
    contact_sheet(samples, load_vertex_colors(manifest)).save(buf, format="PNG")
    storage.write_bytes(location.url(SHEET_NAME), buf.getvalue())  # atomic locally, one PUT remotely
    return True


def write_dataset_card(location: DatasetLocation, manifest: dict[str, Any] | None = None) -> str:
    """Write DATASET.md (and contact-sheet.png) beside the manifest; returns the card's location."""
    manifest = manifest if manifest is not None else ds.load_manifest(location.root)
    has_sheet = write_contact_sheet(location, manifest, _first_samples(location, manifest, SHEET_SAMPLES))
    features = hf_features(location, manifest)
    if features is not None:
        location.write_text(HF_FEATURES_NAME, ds.canonical_json(features, indent=1) + "\n")
    location.write_text(CARD_NAME, render_card(manifest, location.root, has_sheet))
    return location.url(CARD_NAME)
