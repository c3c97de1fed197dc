"""The dataset contract: shard names, sample schema, safe decoders and the manifest format.

Both halves import this module; it is the one place that says what a shard holds
(see docs/dataset-format.md). Nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = "1.0"  # major.minor: readers refuse a newer major, read older minors
SHARD_NAME = "shard-{:06d}.tar"
MANIFEST_NAME = "manifest.json"
PROTOTYPES_NAME = "prototypes.h5"
WIDS_INDEX_NAME = "wids-index.json"
WIDS_INDEX_KIND = "wids-shard-index-v1"
RECORDS_DIR = ".records"  # one JSON record per finished shard (count, bytes, sha256)
RUN_CONFIG_NAME = ".config.json"  # what the run that owns a dataset folder was asked to make
KEY_DIGITS = 9

# The entries of one sample (webdataset keys without the leading dot).
SAMPLE_ENTRIES: tuple[str, ...] = ("rgb.jpg", "parts.png", "vid.png", "json")
OPTIONAL_ENTRIES: tuple[str, ...] = ("depth.png",)

VID_NONE = 0  # vid.png: 0 = no body vertex, else vertex index + 1

# Fields every sample's `json` entry holds (see docs/dataset-format.md for their meaning).
SAMPLE_JSON_FIELDS: tuple[str, ...] = (
    "index",  # sample index (int), equals int(__key__)
    "seed",  # the sample's own seed
    "identity",  # {"name": str, "id": int}
    "betas",  # shape parameters
    "pose",  # (72,) SMPL axis-angle
    "transl",  # (3,) metres
    "camera",  # {"K", "R", "t" (OpenCV), "width", "height", "crop_box", ...}
    "lighting",
    "garments",
    "background",
    "occluders",
)
CAMERA_JSON_FIELDS: tuple[str, ...] = ("K", "R", "t", "width", "height")


class DatasetFormatError(ValueError):
    """A dataset, shard or sample does not follow the documented format."""


def sample_key(index: int) -> str:
    """Zero-padded key of sample `index`, so lexical order is sample order."""
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(shard_index: int) -> str:
    return SHARD_NAME.format(shard_index)


def record_name(shard_index: int) -> str:
    """File name (inside RECORDS_DIR) of shard `shard_index`'s record."""
    return shard_name(shard_index).replace(".tar", ".json")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_jsonable(value: Any, digits: int | None = None) -> Any:
    """Dataclasses, tuples, paths and numpy values -> plain JSON values, recursively.

    Non-finite floats become None (JSON has no NaN); `digits` rounds floats so that metadata does not
    depend on the last bits of a computation.
    """
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, digits) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return to_jsonable(value.tolist(), digits)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return round(value, digits) if digits is not None else value
    return value


def canonical_json(obj: Any, indent: int | None = None) -> str:
    """Deterministic JSON text (sorted keys, no NaN): the same object always gives the same bytes."""
    separators = (",", ":") if indent is None else (",", ": ")
    return json.dumps(obj, sort_keys=True, separators=separators, indent=indent, allow_nan=False)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file under a temporary name in the same folder, fsync, then rename: never half-written."""
    path = Path(path)
    # pid + random token: job-array tasks on different hosts of a shared filesystem may share a pid
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_parts(data: bytes) -> np.ndarray:
    """8-bit PNG bytes -> (H, W) uint8 label ids 0-15."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P"):
            raise DatasetFormatError(f"parts.png: expected an 8-bit single-channel PNG, got mode {im.mode}")
        return np.asarray(im, dtype=np.uint8)


def decode_vid(data: bytes) -> np.ndarray:
    """16-bit PNG bytes -> (H, W) int32 (0 = none, else vertex index + 1)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("I;16", "I;16B", "I"):
            raise DatasetFormatError(f"vid.png: expected a 16-bit single-channel PNG, got mode {im.mode}")
        return np.asarray(im, dtype=np.int32)


def decode_json(data: bytes) -> dict[str, Any]:
    return json.loads(data.decode("utf-8"))


# The only decoders the project uses: extension -> function. Anything else stays raw bytes.
SAFE_DECODERS = {
    "rgb.jpg": decode_rgb,
    "parts.png": decode_parts,
    "vid.png": decode_vid,
    "depth.png": decode_vid,
    "json": decode_json,
}


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a raw webdataset sample dict with SAFE_DECODERS only; unknown entries are dropped.

    Keys may come with or without the leading dot (wids keeps it).
    """
    out: dict[str, Any] = {"__key__": sample.get("__key__"), "__url__": sample.get("__url__")}
    for key, value in sample.items():
        name = key.lstrip(".")
        if name in SAFE_DECODERS:
            if hasattr(value, "getvalue"):  # wids hands out BytesIO streams
                value = value.getvalue()
            elif hasattr(value, "read"):
                value = value.read()
            out[name] = SAFE_DECODERS[name](value)
    missing = [e for e in SAMPLE_ENTRIES if e not in out]
    if missing:
        raise DatasetFormatError(f"sample {out['__key__']}: missing entries {missing}")
    return out


def parse_version(version: str) -> tuple[int, int]:
    """'MAJOR.MINOR' -> (major, minor); anything else is a DatasetFormatError naming the value."""
    try:
        major, minor = str(version).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        raise DatasetFormatError(f"format version {version!r}: expected MAJOR.MINOR, e.g. 1.0") from None


def check_format_version(version: str, source: str) -> None:
    """Refuse datasets of a newer major format version; older minors are read as they are."""
    major, _ = parse_version(version)
    ours, _ = parse_version(FORMAT_VERSION)
    if major > ours:
        raise DatasetFormatError(
            f"{source}: format version {version} is newer than this reader's {FORMAT_VERSION}; "
            "upgrade protoreg to read it"
        )


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and version-check a manifest.json (or the one inside a dataset folder), local or remote
    (s3://, http(s)://: a URL ending in .json is the manifest itself, else the dataset folder)."""
    from protoreg import storage

    if storage.is_remote(path):
        return _load_remote_manifest(str(path))
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{p}: no manifest.json (expected a dataset folder written by gen-shards)"
        ) from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{p}: not valid JSON ({e})") from None
    if "format_version" not in manifest:
        raise DatasetFormatError(f"{p}: manifest has no format_version")
    check_format_version(manifest["format_version"], str(p))
    return manifest


def _load_remote_manifest(url: str) -> dict[str, Any]:
    from protoreg import storage

    if not url.split("?")[0].endswith(".json"):
        url = storage.join(url, MANIFEST_NAME)
    try:
        manifest = json.loads(storage.read_bytes(url).decode("utf-8"))
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{url}: not found (expected the manifest.json of a gen-shards dataset)"
        ) from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{url}: not valid JSON ({e})") from None
    except OSError as e:
        raise DatasetFormatError(
            f"{url}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise DatasetFormatError(f"{url}: manifest has no format_version")
    check_format_version(manifest["format_version"], url)
    return manifest
