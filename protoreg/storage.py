"""Where datasets live: local folders, object stores (s3://) and web servers (http(s)://), behind one API.

Everything remote goes through fsspec, so any S3-compatible store works; its endpoint comes from
`PROTOREG_S3_ENDPOINT_URL` (or the standard `AWS_ENDPOINT_URL`). Local writes are atomic (temporary
name, then rename); an object-store PUT is atomic by nature.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

REMOTE_SCHEMES = ("s3", "http", "https", "gs", "gcs", "az", "abfs")


def scheme(url: str | Path) -> str:
    """'' for a local path, else the URL scheme ('s3', 'https', 'pipe', ...)."""
    text = str(url)
    parsed = urlparse(text)
    # A Windows drive letter or a plain path has no scheme worth the name.
    return parsed.scheme if len(parsed.scheme) > 1 else ""


def is_remote(url: str | Path) -> bool:
    return scheme(url) in REMOTE_SCHEMES


def join(base: str | Path, *names: str) -> str:
    """Join path parts under a local folder or a URL prefix."""
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *names)
    return str(Path(base, *names))


def storage_options(url: str | Path) -> dict[str, Any]:
    """fsspec options for `url`: the S3 endpoint for S3-compatible stores, nothing otherwise."""
    if scheme(url) != "s3":
        return {}
    endpoint = os.environ.get("PROTOREG_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def filesystem(url: str | Path):
    """(fsspec filesystem, path inside it) for any supported URL or local path."""
    import fsspec.core

    return fsspec.core.url_to_fs(str(url), **storage_options(url))


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return Path(url).exists()
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str | Path) -> bytes:
    if not is_remote(url):
        return Path(url).read_bytes()
    fs, path = filesystem(url)
    return fs.cat_file(path)


def open_read(url: str | Path) -> IO[bytes]:
    """A binary stream for reading `url` (local file, s3 object, http resource)."""
    if not is_remote(url):
        return open(url, "rb")
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write `data` so that readers see either nothing or the whole file."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.pipe_file(path, data)
        return
    target = Path(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upload_file(local: str | Path, url: str | Path) -> None:
    """Copy a finished local file to `url` (a rename when `url` is local)."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.put_file(str(local), path)
    else:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, url)


def list_names(url: str | Path) -> list[str]:
    """File names directly under a folder or prefix (empty when it does not exist)."""
    if not is_remote(url):
        p = Path(url)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(x.rstrip("/")) for x in fs.ls(path, detail=False))


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    if mode[0] != "r":
        raise ValueError(f"{url}: only reading is supported through webdataset")
    return open_read(url)


def register_webdataset_schemes() -> None:
    """Teach webdataset's opener s3:// through fsspec (it already reads http(s) and pipe:)."""
    import sys

    import webdataset.gopen  # noqa: F401  (the submodule, not the function it exports)

    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    schemes.setdefault("s3", _gopen_fsspec)
