"""protoreg.storage against real local servers: moto's S3 server and a static HTTP server."""

from __future__ import annotations

import io

import webdataset as wds

from protoreg import storage
from tests.servers import http_server, s3_server


def _tar_bytes(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return buf.getvalue()


def test_scheme_and_join():
    assert storage.scheme("/data/x") == ""
    assert storage.scheme("s3://b/k") == "s3"
    assert storage.is_remote("https://h/x") and not storage.is_remote("pipe:cat x")
    assert storage.join("s3://b/ds/", "manifest.json") == "s3://b/ds/manifest.json"


def test_local_write_is_atomic_and_lists(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    storage.write_bytes(target, b"abc")
    assert target.read_bytes() == b"abc"
    assert storage.list_names(tmp_path / "sub") == ["a.bin"]  # no temporary left behind
    assert storage.list_names(tmp_path / "missing") == []


def test_s3_roundtrip_and_webdataset_reads_s3():
    with s3_server() as bucket:
        url = f"{bucket}/ds/shard-000000.tar"
        data = _tar_bytes([{"__key__": "000000000", "txt": "hi"}, {"__key__": "000000001", "txt": "yo"}])
        storage.write_bytes(url, data)
        assert storage.exists(url) and not storage.exists(f"{bucket}/ds/nothing")
        assert storage.read_bytes(url) == data
        assert storage.list_names(f"{bucket}/ds") == ["shard-000000.tar"]
        storage.register_webdataset_schemes()
        keys = [s["__key__"] for s in wds.WebDataset(url, shardshuffle=False)]
        assert keys == ["000000000", "000000001"]


def test_http_read(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01payload")
    with http_server(tmp_path) as base:
        assert storage.read_bytes(f"{base}/x.bin") == b"\x00\x01payload"
        with storage.open_read(f"{base}/x.bin") as f:
            assert f.read() == b"\x00\x01payload"
