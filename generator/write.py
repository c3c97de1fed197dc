"""Write stage: encode rendered samples and write them as WebDataset shards, records, manifest and index.

Shards must be byte-identical whatever the worker count, so every byte is deterministic: fixed tar
metadata (mtime, owner, mode), JPEG/PNG encoders with fixed settings, canonical JSON. A shard is
written under a temporary name and fsynced, its record (DIR/.records/shard-XXXXXX.json: count, bytes,
sha256) is written atomically, then the shard is renamed to its final name. The manifest is assembled
from the records, so shards written by independent processes (or machines) can be finalised later.
No bpy here.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from protoreg import dataset as ds
from protoreg import parts, png16

TAR_MTIME = 0  # fixed tar metadata: shards do not depend on when or by whom they were written
TAR_USER = "protoreg"
TAR_GROUP = "protoreg"
TAR_MODE = 0o444
JPEG_SUBSAMPLING = 2  # 4:2:0, fixed explicitly so Pillow defaults can't change the bytes
DEPTH_SCALE = 1000.0  # depth.png stores millimetres
TMP_MARK = ".tmp-"


# ---------------------------------------------------------------------------------------------------
# Encoding one sample


def encode_rgb(rgb: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 -> baseline JPEG bytes (no optimize/progressive: deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(
        buf, format="JPEG", quality=int(quality), subsampling=JPEG_SUBSAMPLING, optimize=False
    )
    return buf.getvalue()


def encode_png8(labels: np.ndarray, compress_level: int) -> bytes:
    """(H, W) uint8 -> 8-bit greyscale PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8)).save(
        buf, format="PNG", compress_level=int(compress_level)
    )
    return buf.getvalue()


def encode_png16(values: np.ndarray, compress_level: int) -> bytes:
    """(H, W) integers 0..65535 -> 16-bit greyscale PNG bytes, written unfiltered (protoreg.png16): any
    PNG reader opens them, and the training loader reads them with zlib alone."""
    return png16.encode_unfiltered(values, compress_level)


def encode_depth(depth: np.ndarray, compress_level: int) -> bytes:
    """(H, W) float metres (inf/nan/<=0 = none) -> 16-bit PNG of millimetres (0 = none)."""
    d = np.asarray(depth, dtype=np.float64)
    mm = np.where(np.isfinite(d) & (d > 0), np.round(d * DEPTH_SCALE), 0.0)
    return encode_png16(np.clip(mm, 0, 65535).astype(np.uint16), compress_level)


def encode_json(metadata: dict[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, shortest round-trip float repr, so equal inputs give equal bytes."""
    return ds.canonical_json(ds.to_jsonable(metadata)).encode("utf-8")


def encode_sample(index: int, rendered: Any, metadata: dict[str, Any], settings: Any) -> dict[str, Any]:
    """A RenderedSample + its json metadata -> a webdataset sample dict of bytes."""
    rgb, labels, vid = np.asarray(rendered.rgb), np.asarray(rendered.parts), np.asarray(rendered.vid)
    if rgb.shape != (settings.height, settings.width, 3):
        want = (settings.height, settings.width, 3)
        raise ValueError(f"sample {index}: rgb shape {rgb.shape}, expected {want}")
    if labels.shape != rgb.shape[:2] or vid.shape != rgb.shape[:2]:
        raise ValueError(f"sample {index}: parts {labels.shape} / vid {vid.shape} unlike rgb {rgb.shape}")
    if labels.size and labels.max() >= parts.NUM_LABELS:
        raise ValueError(f"sample {index}: part label {labels.max()} outside 0..{parts.NUM_LABELS - 1}")
    sample: dict[str, Any] = {
        "__key__": ds.sample_key(index),
        "rgb.jpg": encode_rgb(rgb, settings.jpeg_quality),
        "parts.png": encode_png8(labels, settings.png_compress_level),
        "vid.png": encode_png16(vid, settings.png_compress_level),
        "json": encode_json(metadata),
    }
    depth = getattr(rendered, "depth", None)
    if settings.write_depth and depth is not None:
        sample["depth.png"] = encode_depth(depth, settings.png_compress_level)
    garments = getattr(rendered, "garments", None)
    if getattr(settings, "write_garments", False) and garments is not None:
        sample["garments.png"] = encode_png8(np.asarray(garments), settings.png_compress_level)
    return sample


# ---------------------------------------------------------------------------------------------------
# Shard plan and records


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds samples [start, stop)."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return ds.shard_name(self.index)

    @property
    def count(self) -> int:
        return self.stop - self.start


def plan_shards(n: int, shard_size: int) -> list[ShardPlan]:
    """Shard k holds samples [k*K, min(n, (k+1)*K)): the plan depends on n and K only."""
    if n < 1 or shard_size < 1:
        raise ValueError(f"need n >= 1 and shard size >= 1, got n={n}, shard size={shard_size}")
    return [ShardPlan(k, s, min(n, s + shard_size)) for k, s in enumerate(range(0, n, shard_size))]


@dataclass(frozen=True)
class ShardRecord:
    """What a finished shard is: written next to it so manifests can be assembled from shards alone."""

    name: str
    index: int
    first_sample: int
    count: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardRecord:
        return cls(**{k: data[k] for k in ("name", "index", "first_sample", "count", "bytes", "sha256")})


def record_path(out_dir: Path, shard_index: int) -> Path:
    return Path(out_dir) / ds.RECORDS_DIR / ds.record_name(shard_index)


def write_record(out_dir: Path, record: ShardRecord) -> None:
    path = record_path(out_dir, record.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.write_text_atomic(path, ds.canonical_json(record.to_json(), indent=1) + "\n")


def read_record(out_dir: Path, shard_index: int) -> ShardRecord | None:
    """The shard's record, or None when absent or unreadable (the shard is then redone)."""
    try:
        return ShardRecord.from_json(json.loads(record_path(out_dir, shard_index).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shard_is_complete(out_dir: Path, plan: ShardPlan) -> bool:
    """True when the shard file exists and matches its record (size and sha256) and the plan."""
    record = read_record(out_dir, plan.index)
    path = Path(out_dir) / plan.name
    if record is None or record.first_sample != plan.start or record.count != plan.count:
        return False
    try:
        if path.stat().st_size != record.bytes:
            return False
    except FileNotFoundError:
        return False
    return ds.file_sha256(path) == record.sha256


def remove_stale_temporaries(out_dir: Path, plans: Iterable[ShardPlan]) -> list[Path]:
    """Delete leftovers of interrupted writers for the given shards (only ones whose process is gone)."""
    removed = []
    for plan in plans:
        for tmp in Path(out_dir).glob(plan.name + TMP_MARK + "*"):
            pid = tmp.name.rsplit(TMP_MARK, 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
                continue
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a writer process still runs (a killed, not yet reaped zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


# ---------------------------------------------------------------------------------------------------
# Writing one shard


class _HashingFile:
    """A write-only file that hashes and counts what passes through it (no second read of the shard)."""

    def __init__(self, path: Path):
        import hashlib

        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 (closed in finish)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:  # tarfile may call close; the real close happens in finish()
        self.file.flush()

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def write_shard(
    out_dir: Path,
    plan: ShardPlan,
    samples: Iterable[dict[str, Any]],
    on_sample: Callable[[int], None] | None = None,
) -> ShardRecord:
    """Write one shard with webdataset.ShardWriter under a temporary name, fsync, rename, record it.

    `samples` yields the plan's samples in index order (encoded dicts from encode_sample).
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    final = out_dir / plan.name
    tmp = out_dir / f"{plan.name}{TMP_MARK}{os.getpid()}"
    opened: list[_HashingFile] = []

    def opener(fname: str) -> _HashingFile:
        if opened:
            raise RuntimeError(f"{plan.name}: more samples than planned ({plan.count})")
        opened.append(_HashingFile(Path(fname)))
        return opened[-1]

    # ShardWriter names its file from a %-pattern and the shard number: point it at our temporary name.
    suffix = tmp.name[len(plan.name) :]
    pattern = str(out_dir).replace("%", "%%") + "/" + ds.SHARD_NAME.replace("{:06d}", "%06d") + suffix
    written = 0
    try:
        writer = wds.ShardWriter(
            pattern,
            maxcount=plan.count,
            maxsize=float("inf"),
            start_shard=plan.index,
            verbose=0,
            opener=opener,
            encoder=False,
            user=TAR_USER,
            group=TAR_GROUP,
            mode=TAR_MODE,
            mtime=TAR_MTIME,
            format="USTAR_FORMAT",
        )
        for expected, sample in zip(range(plan.start, plan.stop), samples, strict=True):
            if sample["__key__"] != ds.sample_key(expected):
                raise RuntimeError(f"{plan.name}: got sample {sample['__key__']}, expected {expected}")
            writer.write(sample)
            written += 1
            if on_sample is not None:
                on_sample(expected)
        writer.finish()
        handle = opened[0]
        handle.finish()
        if handle.path != tmp:
            raise RuntimeError(f"ShardWriter wrote {handle.path}, expected {tmp}")
        # Record first, then rename: a shard file under its final name always has its record.
        record = ShardRecord(plan.name, plan.index, plan.start, written, handle.size, handle.sha.hexdigest())
        write_record(out_dir, record)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
    except BaseException:
        for h in opened:
            if not h.file.closed:
                h.file.close()
        tmp.unlink(missing_ok=True)
        raise
    return record


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Run description, manifest and wids index


def run_config_path(out_dir: Path) -> Path:
    return Path(out_dir) / ds.RUN_CONFIG_NAME


def read_run_config(out_dir: Path) -> dict[str, Any] | None:
    """The run description stored in DIR/.config.json (None when absent)."""
    path = run_config_path(out_dir)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ds.DatasetFormatError(f"{path}: unreadable run description ({e})") from None


def fingerprint_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the top-level fingerprint fields that differ (after a JSON round trip)."""
    wanted = json.loads(ds.canonical_json(wanted))
    keys = sorted(set(stored) | set(wanted))
    return [k for k in keys if stored.get(k) != wanted.get(k)]


def existing_fingerprint(out_dir: Path) -> dict[str, Any] | None:
    """The fingerprint of what DIR already holds: from .config.json, else from manifest.json."""
    run = read_run_config(out_dir)
    if run is not None:
        return run.get("fingerprint", {})
    manifest_path = Path(out_dir) / ds.MANIFEST_NAME
    if manifest_path.exists():
        try:
            return json.loads(manifest_path.read_text()).get("fingerprint", {})
        except ValueError:
            return {}
    return None


def holds_dataset_files(out_dir: Path) -> bool:
    """Whether DIR has anything a run writes (shards, records, manifest)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return False
    return (
        any(out_dir.glob("shard-*.tar*"))
        or (out_dir / ds.MANIFEST_NAME).exists()
        or (out_dir / ds.RECORDS_DIR).exists()
    )


def write_run_config(out_dir: Path, run: dict[str, Any]) -> None:
    ds.write_text_atomic(run_config_path(out_dir), ds.canonical_json(ds.to_jsonable(run), indent=1) + "\n")


def part_taxonomy() -> dict[str, Any]:
    return {
        "taxonomy_version": parts.TAXONOMY_VERSION,
        "names": list(parts.PART_NAMES),
        "ids": list(range(parts.NUM_LABELS)),
        "colors": parts.PART_COLORS.tolist(),
        "background": parts.BACKGROUND,
        "occluder": parts.OCCLUDER,
    }


class MissingShardsError(ds.DatasetFormatError):
    """finalize found shards without a (valid) record."""


def collect_records(out_dir: Path, plans: list[ShardPlan], check_files: bool = True) -> list[ShardRecord]:
    """Records of all planned shards; raises naming the first missing or inconsistent shard."""
    records = []
    for plan in plans:
        record = read_record(out_dir, plan.index)
        path = Path(out_dir) / plan.name
        if record is None or not path.exists():
            raise MissingShardsError(f"{plan.name}: missing (no finished shard with a record in {out_dir})")
        if record.count != plan.count or record.first_sample != plan.start:
            raise MissingShardsError(
                f"{plan.name}: record holds samples {record.first_sample}+{record.count}, "
                f"expected {plan.start}+{plan.count}"
            )
        if check_files and path.stat().st_size != record.bytes:
            raise MissingShardsError(
                f"{plan.name}: size {path.stat().st_size} bytes, record says {record.bytes}"
            )
        records.append(record)
    return records


def build_manifest(run: dict[str, Any], records: list[ShardRecord], prototypes_sha256: str | None) -> dict:
    """manifest.json content: the run description + per-shard facts + totals. No timestamps (reproducible)."""
    fp = run["fingerprint"]
    render = fp["config"]["render"]
    manifest = {
        "format_version": ds.FORMAT_VERSION,
        "generator": run["generator"],
        "command": run["command"],
        "config": fp["config"],
        "seed": fp["seed"],
        "num_samples": fp["n"],
        "shard_size": fp["shard_size"],
        "resolution": {"width": render["width"], "height": render["height"]},
        "body_model": run["body_model"],
        "parts": part_taxonomy(),
        "identities": run["identities"],
        "prototypes": {"file": ds.PROTOTYPES_NAME, "sha256": prototypes_sha256},
        "wids_index": ds.WIDS_INDEX_NAME,
        "sample_entries": list(ds.SAMPLE_ENTRIES)
        + (["depth.png"] if render.get("write_depth") else [])
        + (["garments.png"] if render.get("write_garments") else []),
        "shards": [r.to_json() for r in records],
        "totals": {
            "samples": sum(r.count for r in records),
            "shards": len(records),
            "bytes": sum(r.bytes for r in records),
        },
        "fingerprint": fp,
    }
    return manifest


def build_wids_index(records: list[ShardRecord], name: str) -> dict[str, Any]:
    """A wids-shard-index-v1 document with shard urls relative to the index file."""
    return {
        "__kind__": ds.WIDS_INDEX_KIND,
        "wids_version": 1,
        "name": name,
        "shardlist": [{"url": r.name, "nsamples": r.count, "filesize": r.bytes} for r in records],
    }


def finalize_dataset(out_dir: Path) -> dict[str, Any]:
    """Assemble manifest.json and wids-index.json from .config.json and the shard records.

    Raises MissingShardsError naming the first shard that is missing or unrecorded.
    """
    out_dir = Path(out_dir)
    run = read_run_config(out_dir)
    if run is None:
        raise ds.DatasetFormatError(f"{out_dir}: no {ds.RUN_CONFIG_NAME} (not a folder gen-shards wrote)")
    fp = run["fingerprint"]
    records = collect_records(out_dir, plan_shards(fp["n"], fp["shard_size"]))
    protos = out_dir / ds.PROTOTYPES_NAME
    proto_sha = ds.file_sha256(protos) if protos.exists() else None
    manifest = build_manifest(run, records, proto_sha)
    index = build_wids_index(records, name=out_dir.resolve().name)
    ds.write_text_atomic(out_dir / ds.WIDS_INDEX_NAME, ds.canonical_json(index, indent=1) + "\n")
    ds.write_text_atomic(out_dir / ds.MANIFEST_NAME, ds.canonical_json(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------
# Verification


def verify_dataset(
    out_dir: Path, check_samples: bool = True, on_shard: Callable[[str], None] | None = None
) -> dict[str, int]:
    """Check every shard's size and sha256 against the manifest, then every sample's schema.

    Raises DatasetFormatError whose message starts with the first bad shard's name. Returns totals.
    """
    out_dir = Path(out_dir)
    manifest = ds.load_manifest(out_dir)
    width, height = manifest["resolution"]["width"], manifest["resolution"]["height"]
    num_vertices = int(manifest.get("body_model", {}).get("num_vertices", 65535))
    samples = 0
    for shard in manifest["shards"]:
        path = out_dir / shard["name"]
        _check_shard_file(path, shard)
        if check_samples:
            samples += _check_shard_samples(path, shard, width, height, num_vertices)
        if on_shard is not None:
            on_shard(shard["name"])
    return {"shards": len(manifest["shards"]), "samples": samples, "bytes": manifest["totals"]["bytes"]}


def _check_shard_file(path: Path, shard: dict[str, Any]) -> None:
    name = shard["name"]
    if not path.exists():
        raise ds.DatasetFormatError(f"{name}: missing (listed in the manifest, not found in {path.parent})")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise ds.DatasetFormatError(f"{name}: size mismatch (expected {shard['bytes']} bytes, got {size})")
    digest = ds.file_sha256(path)
    if digest != shard["sha256"]:
        raise ds.DatasetFormatError(f"{name}: sha256 mismatch (expected {shard['sha256']}, got {digest})")


def iter_tar_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Group a shard's members into raw sample dicts (webdataset's rule: key = name up to the first dot)."""
    with tarfile.open(path, "r:") as tar:
        current: dict[str, Any] | None = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            if ext in current:
                raise ds.DatasetFormatError(f"sample {key}: entry {ext} appears twice")
            current[ext] = data
        if current is not None:
            yield current


def check_sample(sample: dict[str, Any], width: int, height: int, num_vertices: int) -> None:
    """Schema of one raw sample: entries, decodability, shapes, value ranges, json fields."""
    key = sample["__key__"]
    allowed = set(ds.SAMPLE_ENTRIES) | set(ds.OPTIONAL_ENTRIES)
    extra = sorted(set(sample) - allowed - {"__key__"})
    if extra:
        raise ds.DatasetFormatError(f"sample {key}: unexpected entries {extra}")
    try:
        decoded = ds.decode_sample(sample)
    except ds.DatasetFormatError:
        raise
    except Exception as e:  # a truncated JPEG, broken PNG, bad JSON ...
        raise ds.DatasetFormatError(f"sample {key}: does not decode ({type(e).__name__}: {e})") from None
    if decoded["rgb.jpg"].shape != (height, width, 3):
        got = decoded["rgb.jpg"].shape
        raise ds.DatasetFormatError(f"sample {key}: rgb.jpg is {got}, expected {(height, width, 3)}")
    for entry in ("parts.png", "vid.png") + tuple(e for e in ds.OPTIONAL_ENTRIES if e in decoded):
        if decoded[entry].shape != (height, width):
            got = decoded[entry].shape
            raise ds.DatasetFormatError(f"sample {key}: {entry} is {got}, expected {(height, width)}")
    labels = decoded["parts.png"]
    if labels.max() > parts.NUM_LABELS - 1:
        raise ds.DatasetFormatError(f"sample {key}: parts.png holds label {labels.max()} (expected 0-15)")
    if decoded["vid.png"].max() > num_vertices:
        raise ds.DatasetFormatError(
            f"sample {key}: vid.png holds {decoded['vid.png'].max()} (body has {num_vertices} vertices)"
        )
    if "garments.png" in decoded and decoded["garments.png"].max() >= len(ds.GARMENT_LABELS):
        got, top = decoded["garments.png"].max(), len(ds.GARMENT_LABELS) - 1
        raise ds.DatasetFormatError(f"sample {key}: garments.png holds {got} (expected 0-{top})")
    meta = decoded["json"]
    if not isinstance(meta, dict):
        raise ds.DatasetFormatError(f"sample {key}: json is not an object")
    missing = [f for f in ds.SAMPLE_JSON_FIELDS if f not in meta]
    if missing:
        raise ds.DatasetFormatError(f"sample {key}: json lacks fields {missing}")
    _check_sample_json(key, meta, width, height)


def _check_sample_json(key: str, meta: dict[str, Any], width: int, height: int) -> None:
    if meta["index"] != int(key):
        raise ds.DatasetFormatError(f"sample {key}: json index is {meta['index']}")
    ident = meta["identity"]
    if not isinstance(ident, dict) or "name" not in ident or "id" not in ident:
        raise ds.DatasetFormatError(f"sample {key}: json identity lacks name/id")
    cam = meta["camera"]
    missing = [f for f in ds.CAMERA_JSON_FIELDS if not isinstance(cam, dict) or f not in cam]
    if missing:
        raise ds.DatasetFormatError(f"sample {key}: json camera lacks fields {missing}")
    if np.asarray(cam["K"]).shape != (3, 3) or np.asarray(cam["R"]).shape != (3, 3) or len(cam["t"]) != 3:
        raise ds.DatasetFormatError(f"sample {key}: json camera K/R/t are not 3x3/3x3/3")
    if (cam["width"], cam["height"]) != (width, height):
        raise ds.DatasetFormatError(
            f"sample {key}: json camera is {cam['width']}x{cam['height']}, dataset is {width}x{height}"
        )
    if len(meta["pose"]) != 72 or len(meta["transl"]) != 3:
        raise ds.DatasetFormatError(f"sample {key}: json pose/transl are not 72/3 numbers")


def _check_shard_samples(path: Path, shard: dict[str, Any], width: int, height: int, nverts: int) -> int:
    name, first = shard["name"], shard["first_sample"]
    expected = [ds.sample_key(i) for i in range(first, first + shard["count"])]
    seen = 0
    try:
        for sample in iter_tar_samples(path):
            if seen >= len(expected) or sample["__key__"] != expected[seen]:
                want = expected[seen] if seen < len(expected) else "no more samples"
                raise ds.DatasetFormatError(f"sample {sample['__key__']}: expected {want}")
            check_sample(sample, width, height, nverts)
            seen += 1
    except ds.DatasetFormatError as e:
        raise ds.DatasetFormatError(f"{name}: {e}") from None
    except (tarfile.TarError, OSError) as e:
        raise ds.DatasetFormatError(f"{name}: not a readable tar ({e})") from None
    if seen != len(expected):
        raise ds.DatasetFormatError(f"{name}: holds {seen} samples, manifest says {len(expected)}")
    return seen
