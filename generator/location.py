"""A dataset folder wherever it lives (local path, s3://, http(s)://), with the dataset's own vocabulary.

gen-shards, finalize and verify work on a `DatasetLocation`, so the same code writes and checks a
dataset on disk and in an object store. Local writes are atomic (temporary name, then rename); a
remote shard is uploaded before its record, so a record always means "this shard is complete".
Nothing here imports bpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from generator.write import (
    MissingShardsError,
    ShardPlan,
    ShardRecord,
    build_manifest,
    build_wids_index,
    plan_shards,
    shard_is_complete,
)
from protoreg import dataset as ds
from protoreg import storage


class DatasetLocation:
    """A dataset folder: `root` is a local path or a URL prefix (s3://bucket/ds, https://host/ds)."""

    def __init__(self, root: str | Path):
        text = str(root)
        self.remote = storage.is_remote(text)
        self.root = text.rstrip("/") if self.remote else str(Path(text))

    def __str__(self) -> str:
        return self.root

    @property
    def local_dir(self) -> Path | None:
        return None if self.remote else Path(self.root)

    @property
    def name(self) -> str:
        """The folder's last path component (names the wids index)."""
        if self.remote:
            return self.root.rsplit("/", 1)[-1]
        return Path(self.root).resolve().name

    def url(self, *names: str) -> str:
        return storage.join(self.root, *names)

    # --- reading -----------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return storage.exists(self.url(name))

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            return storage.read_bytes(self.url(name)).decode("utf-8")
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int | None:
        """Size in bytes, or None when absent."""
        if not self.remote:
            try:
                return Path(self.url(name)).stat().st_size
            except FileNotFoundError:
                return None
        fs, path = storage.filesystem(self.url(name))
        try:
            return int(fs.size(path))
        except FileNotFoundError:
            return None

    def sha256(self, name: str) -> str:
        """Hex sha256 of a file, streamed (never all in memory)."""
        h = hashlib.sha256()
        with storage.open_read(self.url(name)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def download(self, name: str, target: Path) -> tuple[int, str]:
        """Copy a file to a local path while hashing it; returns (bytes, sha256)."""
        h = hashlib.sha256()
        size = 0
        with storage.open_read(self.url(name)) as src, open(target, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        return size, h.hexdigest()

    def read_record(self, shard_index: int) -> ShardRecord | None:
        text = self.read_text(f"{ds.RECORDS_DIR}/{ds.record_name(shard_index)}")
        if text is None:
            return None
        try:
            return ShardRecord.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError):
            return None

    def read_run_config(self) -> dict[str, Any] | None:
        text = self.read_text(ds.RUN_CONFIG_NAME)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as e:
            raise ds.DatasetFormatError(
                f"{self.url(ds.RUN_CONFIG_NAME)}: unreadable run description ({e})"
            ) from None

    def shard_is_complete(self, plan: ShardPlan) -> bool:
        """Local: the shard matches its record's size and sha256. Remote: the record exists and the
        object's size matches it (records are uploaded after their shard; `verify` checks the hashes)."""
        if not self.remote:
            return shard_is_complete(Path(self.root), plan)
        record = self.read_record(plan.index)
        if record is None or record.first_sample != plan.start or record.count != plan.count:
            return False
        return self.size(plan.name) == record.bytes

    # --- writing -----------------------------------------------------------------------------------

    def write_text(self, name: str, text: str) -> None:
        if self.remote:
            storage.write_bytes(self.url(name), text.encode("utf-8"))
            return
        path = Path(self.url(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.write_text_atomic(path, text)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, ds.canonical_json(ds.to_jsonable(obj), indent=1) + "\n")

    def put(self, local: Path, name: str) -> None:
        """Publish a finished local file under `name` (no-op when it already is that file)."""
        target = self.url(name)
        if not self.remote and Path(local).resolve() == Path(target).resolve():
            return
        storage.upload_file(local, target)

    def publish_shard(self, staging: Path, record: ShardRecord) -> None:
        """Upload a shard finished in `staging`, then its record (the commit mark); free the staging copy."""
        self.put(staging / record.name, record.name)
        record_rel = f"{ds.RECORDS_DIR}/{ds.record_name(record.index)}"
        self.write_text(record_rel, ds.canonical_json(record.to_json(), indent=1) + "\n")
        if self.remote:
            (staging / record.name).unlink(missing_ok=True)
            (staging / record_rel).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Finalize: records -> manifest.json + wids-index.json


def missing_shards(location: DatasetLocation, plans: list[ShardPlan]) -> list[str]:
    """Names of planned shards that have no record, or whose file is absent or of another size."""
    missing = []
    for plan in plans:
        record = location.read_record(plan.index)
        if (
            record is None
            or record.first_sample != plan.start
            or record.count != plan.count
            or location.size(plan.name) != record.bytes
        ):
            missing.append(plan.name)
    return missing


def describe_missing(names: list[str], total: int, where: str) -> str:
    """One line that starts with the missing shards' names (the first 8, then a count)."""
    shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    return (
        f"{shown}: missing ({len(names)} of {total} shards have no finished shard with a record in {where}; "
        "re-run the tasks that own them with the same command, then finalize again)"
    )


def finalize_location(location: DatasetLocation) -> dict[str, Any]:
    """Assemble manifest.json and wids-index.json from the run description and the shard records.

    Raises MissingShardsError naming every missing shard (one line) when some are not finished yet.
    """
    run = location.read_run_config()
    if run is None:
        raise ds.DatasetFormatError(f"{location}: no {ds.RUN_CONFIG_NAME} (not a folder gen-shards wrote)")
    fp = run["fingerprint"]
    ds.check_format_version(
        str(fp.get("format_version", ds.FORMAT_VERSION)), location.url(ds.RUN_CONFIG_NAME)
    )
    plans = plan_shards(fp["n"], fp["shard_size"])
    missing = missing_shards(location, plans)
    if missing:
        raise MissingShardsError(describe_missing(missing, len(plans), str(location)))
    records = [location.read_record(p.index) for p in plans]
    proto_sha = location.sha256(ds.PROTOTYPES_NAME) if location.exists(ds.PROTOTYPES_NAME) else None
    manifest = build_manifest(run, records, proto_sha)  # type: ignore[arg-type]
    location.write_json(ds.WIDS_INDEX_NAME, build_wids_index(records, name=location.name))  # type: ignore[arg-type]
    location.write_json(ds.MANIFEST_NAME, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------
# Verify a dataset wherever it is


def verify_location(location: DatasetLocation, check_samples: bool = True) -> dict[str, int]:
    """Check every shard's size and sha256 against the manifest, then every sample's schema.

    A local folder is checked in place (generator.write.verify_dataset); a remote one is streamed shard
    by shard into a temporary file (hashed on the way), so memory stays flat. Raises DatasetFormatError
    whose message starts with the first bad shard's name.
    """
    from generator.write import _check_shard_samples, verify_dataset

    if not location.remote:
        return verify_dataset(Path(location.root), check_samples=check_samples)
    manifest = ds.load_manifest(location.root)
    width, height = manifest["resolution"]["width"], manifest["resolution"]["height"]
    num_vertices = int(manifest.get("body_model", {}).get("num_vertices", 65535))
    samples = 0
    with tempfile.TemporaryDirectory(prefix="protoreg-verify-") as tmp:
        for shard in manifest["shards"]:
            name = shard["name"]
            local = Path(tmp) / name
            try:
                size, digest = location.download(name, local)
            except FileNotFoundError:
                raise ds.DatasetFormatError(
                    f"{name}: missing (listed in the manifest, not found at {location.url(name)})"
                ) from None
            if size != shard["bytes"]:
                raise ds.DatasetFormatError(
                    f"{name}: size mismatch (expected {shard['bytes']} bytes, got {size})"
                )
            if digest != shard["sha256"]:
                raise ds.DatasetFormatError(
                    f"{name}: sha256 mismatch (expected {shard['sha256']}, got {digest})"
                )
            if check_samples:
                samples += _check_shard_samples(local, shard, width, height, num_vertices)
            os.unlink(local)
    return {"shards": len(manifest["shards"]), "samples": samples, "bytes": manifest["totals"]["bytes"]}
