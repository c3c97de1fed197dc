"""Checksums of a dataset wherever it lives: every shard's size and sha256 against its manifest.

Shared by both halves (the trainer's `--verify` and the generator's verify), so it imports neither:
shards are streamed through protoreg.storage (local, s3://, http(s)://) and hashed in 1 MiB chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from protoreg import dataset as ds
from protoreg import storage


def stream_sha256(url: str) -> tuple[int, str]:
    """(bytes, hex sha256) of a local file or URL, read once in chunks."""
    h = hashlib.sha256()
    size = 0
    with storage.open_read(url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def check_shard(root: str, shard: dict[str, Any]) -> None:
    """Raise DatasetFormatError naming the shard when it is missing or its bytes differ from the record."""
    name = shard["name"]
    url = storage.join(root, name)
    try:
        size, digest = stream_sha256(url)
    except FileNotFoundError:
        raise ds.DatasetFormatError(f"{name}: missing (listed in the manifest, not found at {url})") from None
    if size != shard["bytes"]:
        raise ds.DatasetFormatError(f"{name}: size mismatch (expected {shard['bytes']} bytes, got {size})")
    if digest != shard["sha256"]:
        raise ds.DatasetFormatError(f"{name}: sha256 mismatch (expected {shard['sha256']}, got {digest})")


def verify_checksums(root: str, on_shard: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load (and version-check) ROOT's manifest, then check every shard; returns the manifest."""
    manifest = ds.load_manifest(root)
    for shard in manifest["shards"]:
        check_shard(str(root), shard)
        if on_shard is not None:
            on_shard(shard["name"])
    return manifest
