"""The dataset contract: shard names, sample schema, safe decoders and the manifest format.

Both halves import this module; it is the one place that says what a shard holds
(see docs/dataset-format.md). Nothing here ever unpickles.
"""

from __future__ import annotations

import functools
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

from protoreg import png16

FORMAT_VERSION = "1.1"  # major.minor: readers refuse a newer major, read older minors
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
OPTIONAL_ENTRIES: tuple[str, ...] = ("depth.png", "garments.png")

# garments.png: what covers each pixel of the person (the surface's nearest body vertex decides); 0 on
# background and occluders. Top is worn over bottom, hair over everything, as the generator dresses them.
GARMENT_LABELS: tuple[str, ...] = ("none", "skin", "hair", "top", "bottom", "shoes")
GARMENT_ID: dict[str, int] = {name: i for i, name in enumerate(GARMENT_LABELS)}

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


# Decoding goes through OpenCV (libjpeg-turbo, libpng): the same pixels as Pillow at about half the
# cost, which matters because the training loader decodes three images per sample. Only JPEG and PNG
# payloads with the right signature, a sane size and (for PNG) the schema's bit depth ever reach it, so
# OpenCV's other codecs are never used on shard bytes.
PNG_SIGNATURE = png16.PNG_SIGNATURE
MAX_IMAGE_PIXELS = 1 << 26  # far above any render; a header claiming more is refused before decoding
_PNG_GREY, _PNG_PALETTE = 0, 3  # PNG colour types


def _checked_size(h: int, w: int, entry: str) -> None:
    if h <= 0 or w <= 0 or h * w > MAX_IMAGE_PIXELS:
        raise DatasetFormatError(f"{entry}: image size {w}x{h} outside 1..{MAX_IMAGE_PIXELS} pixels")


def _png_header(data: bytes, entry: str) -> tuple[int, int, int, int]:
    """(height, width, bit depth, colour type) from the IHDR chunk, which PNG requires first."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        raise DatasetFormatError(f"{entry}: expected a PNG (no PNG signature and header)")
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    _checked_size(h, w, entry)
    return h, w, data[24], data[25]


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG frame header (SOFn), walking the marker segments before it."""
    if data[:3] != b"\xff\xd8\xff":
        raise DatasetFormatError("rgb.jpg: expected a JPEG (no JPEG start marker)")
    if data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        raise DatasetFormatError("rgb.jpg: truncated JPEG (no end marker)")
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            _checked_size(h, w, "rgb.jpg")
            return h, w
        i += 2 + length
    raise DatasetFormatError("rgb.jpg: no JPEG frame header")


@functools.cache
def opencv() -> Any:
    """cv2, imported on first use (Blender-side code that never decodes does not load it), single-threaded:
    one image is too small to split, and a pool would only compete with torch's threads."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _cv2_decode(data: bytes, flags: int, entry: str) -> np.ndarray:
    cv2 = opencv()
    out = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if out is None:
        raise DatasetFormatError(f"{entry}: corrupt image data (does not decode)")
    return out


def _spng_decode(data: bytes, entry: str) -> np.ndarray:
    import pyspng

    try:
        return pyspng.load(data)
    except (RuntimeError, ValueError) as e:
        raise DatasetFormatError(f"{entry}: corrupt image data (does not decode: {e})") from None


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8 RGB, through simplejpeg (libjpeg-turbo straight into RGB: the same
    pixels as OpenCV's decoder on the 128x256 training shards, in 0.19 instead of 0.22 ms per image)."""
    import simplejpeg

    h, w = _jpeg_size(data)
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as e:
        raise DatasetFormatError(f"rgb.jpg: corrupt image data (does not decode: {e})") from None
    if rgb.shape != (h, w, 3):
        raise DatasetFormatError(f"rgb.jpg: decoded to {rgb.shape}, header says {(h, w, 3)}")
    return rgb


def decode_parts(data: bytes) -> np.ndarray:
    """8-bit PNG bytes -> (H, W) uint8 label ids 0-15."""
    return _decode_labels8(data, "parts.png", palette_ok=True)


def decode_garments(data: bytes) -> np.ndarray:
    """8-bit PNG bytes -> (H, W) uint8 garment labels (GARMENT_LABELS)."""
    return _decode_labels8(data, "garments.png", palette_ok=False)


def _decode_labels8(data: bytes, name: str, palette_ok: bool) -> np.ndarray:
    """An 8-bit single-channel label PNG -> (H, W) uint8, the header checked against what decodes."""
    h, w, depth, colour = _png_header(data, name)
    if depth != 8 or colour not in ((_PNG_GREY, _PNG_PALETTE) if palette_ok else (_PNG_GREY,)):
        kind = "single-channel" if palette_ok else "greyscale"
        raise DatasetFormatError(
            f"{name}: expected an 8-bit {kind} PNG, got bit depth {depth}, colour type {colour}"
        )
    if colour == _PNG_PALETTE:  # palette indices are the labels; OpenCV would expand them to colours
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im, dtype=np.uint8)
    labels = _spng_decode(data, name)  # libspng: OpenCV's pixels in two thirds of its time
    if labels.shape != (h, w) or labels.dtype != np.uint8:
        raise DatasetFormatError(f"{name}: decoded to {labels.shape} {labels.dtype}, expected {(h, w)}")
    return labels


def decode_vid(data: bytes) -> np.ndarray:
    """16-bit PNG bytes -> (H, W) int32 (0 = none, else vertex index + 1)."""
    return decode_vid_values(data).astype(np.int32)


def decode_vid_values(data: bytes) -> np.ndarray:
    """16-bit PNG bytes -> (H, W) uint16 exactly as stored: the training loader resamples and packs these
    as they are (an int32 copy per sample would cost a pass over twice the bytes)."""
    h, w, depth, colour = _png_header(data, "vid.png")
    if depth != 16 or colour != _PNG_GREY:
        raise DatasetFormatError(
            f"vid.png: expected a 16-bit single-channel PNG, got bit depth {depth}, colour type {colour}"
        )
    try:
        values = png16.decode_unfiltered(data)  # how gen-shards writes it: zlib and a byte swap
    except png16.PngError as e:
        raise DatasetFormatError(f"vid.png: corrupt image data (does not decode: {e})") from None
    if values is None:  # written by another PNG encoder (filtered rows): libpng
        values = _cv2_decode(data, opencv().IMREAD_UNCHANGED, "vid.png")
    if values.shape != (h, w) or values.dtype != np.uint16:
        raise DatasetFormatError(f"vid.png: decoded to {values.shape} {values.dtype}, expected {(h, w)}")
    return values


def decode_json(data: bytes) -> dict[str, Any]:
    """UTF-8 JSON bytes -> object, through orjson (5x faster than json on the float-heavy sample
    metadata); anything orjson refuses that json accepts (NaN literals, huge integers) goes to json."""
    import orjson

    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data.decode("utf-8"))


# The only decoders the project uses: extension -> function. Anything else stays raw bytes.
SAFE_DECODERS = {
    "rgb.jpg": decode_rgb,
    "parts.png": decode_parts,
    "vid.png": decode_vid,
    "depth.png": decode_vid,
    "garments.png": decode_garments,
    "json": decode_json,
}


def decode_entry(name: str, value: Any) -> Any:
    """One schema entry (bytes, or the BytesIO/stream wids hands out) through its SAFE_DECODERS decoder."""
    if hasattr(value, "getvalue"):
        value = value.getvalue()
    elif hasattr(value, "read"):
        value = value.read()
    return SAFE_DECODERS[name](value)


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a raw webdataset sample dict with SAFE_DECODERS only; unknown entries are dropped.

    Keys may come with or without the leading dot (wids keeps it).
    """
    out: dict[str, Any] = {"__key__": sample.get("__key__"), "__url__": sample.get("__url__")}
    for key, value in sample.items():
        name = key.lstrip(".")
        if name in SAFE_DECODERS:
            out[name] = decode_entry(name, value)
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
