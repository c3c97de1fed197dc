"""The writer's machinery against a fake renderer (tests/fake_backend.py): shards, records, manifest,
wids index, determinism across worker counts, resume, verify, finalize, config loading.

Real Blender renders are covered by tests/test_gen_shards.py; here the renderer edge is mocked so
the sharding logic can be tested exactly and quickly.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from generator.config import ConfigError, GenConfig, load_config
from generator.pipeline import GenerationError, GenRequest, generate_dataset
from generator.write import (
    ShardPlan,
    encode_png16,
    encode_sample,
    finalize_dataset,
    plan_shards,
    read_record,
    verify_dataset,
)
from protoreg import dataset as ds
from protoreg.body.synthetic import synthetic_body_arrays
from tests.fake_backend import FakeBackend, FakeRendered

FAKE = "tests.fake_backend:FakeBackend"
N, SHARD = 20, 8  # three shards: 8, 8, 4


def small_config() -> GenConfig:
    cfg = GenConfig()
    cfg.render.width, cfg.render.height = 32, 64
    return cfg


@pytest.fixture(scope="module")
def body_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("body") / "body.npz"
    np.savez(path, **synthetic_body_arrays(num_betas=10, seed=3))
    return path


def request(out: Path, body_file: Path, workers: int = 1, **kw) -> GenRequest:
    args = dict(
        out_dir=out,
        n=N,
        identities="3",
        seed=7,
        workers=workers,
        shard_size=SHARD,
        config=small_config(),
        body_model=str(body_file),
        backend=FAKE,
        command="gen-shards (test)",
        progress=False,
    )
    args.update(kw)
    return GenRequest(**args)


@pytest.fixture(scope="module")
def fake_datasets(tmp_path_factory, body_file) -> dict[int, Path]:
    """The same request with 1 and 2 workers."""
    root = tmp_path_factory.mktemp("fake")
    out = {}
    for w in (1, 2):
        out[w] = root / f"w{w}"
        generate_dataset(request(out[w], body_file, workers=w), echo=lambda _m: None)
    return out


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


def test_plan_covers_every_sample_once():
    plans = plan_shards(20, 8)
    assert [(p.index, p.start, p.stop) for p in plans] == [(0, 0, 8), (1, 8, 16), (2, 16, 20)]
    assert plans[2].name == "shard-000002.tar" and plans[2].count == 4
    with pytest.raises(ValueError):
        plan_shards(0, 8)


def test_worker_count_does_not_change_a_byte(fake_datasets):
    one, two = shard_bytes(fake_datasets[1]), shard_bytes(fake_datasets[2])
    assert list(one) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert one == two
    m1 = json.loads((fake_datasets[1] / "manifest.json").read_text())
    m2 = json.loads((fake_datasets[2] / "manifest.json").read_text())
    assert m1["shards"] == m2["shards"]


def test_manifest_lists_every_shard_with_checksums(fake_datasets):
    d = fake_datasets[1]
    m = ds.load_manifest(d)
    assert m["format_version"] == ds.FORMAT_VERSION
    assert m["totals"] == {"samples": N, "shards": 3, "bytes": sum(s["bytes"] for s in m["shards"])}
    for s in m["shards"]:
        path = d / s["name"]
        assert path.stat().st_size == s["bytes"]
        assert ds.file_sha256(path) == s["sha256"]
        assert read_record(d, s["index"]).sha256 == s["sha256"]
    assert [s["count"] for s in m["shards"]] == [8, 8, 4]
    assert m["resolution"] == {"width": 32, "height": 64}
    assert m["seed"] == 7 and m["command"] == "gen-shards (test)"
    assert [i["name"] for i in m["identities"]] == ["id0000", "id0001", "id0002"]
    assert m["parts"]["names"][15] == "occluder" and len(m["parts"]["colors"]) == 16
    assert m["body_model"]["file"] == "body.npz" and len(m["body_model"]["sha256"]) == 64
    assert m["config"]["render"]["width"] == 32
    assert (d / "prototypes.h5").exists()
    assert not list(d.glob("*.tmp-*"))


def test_tar_members_have_fixed_metadata(fake_datasets):
    with tarfile.open(fake_datasets[1] / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == [
        "000000000.json",
        "000000000.parts.png",
        "000000000.rgb.jpg",
        "000000000.vid.png",
    ]
    assert {(m.mtime, m.uname, m.gname, m.mode) for m in members} == {(0, "protoreg", "protoreg", 0o444)}


def test_plain_webdataset_reads_every_sample(fake_datasets):
    d = fake_datasets[1]
    urls = [str(p) for p in sorted(d.glob("shard-*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).map(ds.decode_sample)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [ds.sample_key(i) for i in range(N)]
    s = samples[11]
    backend_sample = FakeBackend(_job_like(7, small_config()))
    rendered, meta = backend_sample.produce(11)
    assert np.array_equal(s["parts.png"], rendered.parts)
    assert np.array_equal(s["vid.png"], rendered.vid.astype(np.int32))
    assert s["rgb.jpg"].shape == (64, 32, 3)
    assert s["json"]["index"] == 11 and s["json"]["identity"]["name"] == "id0002"
    assert s["json"]["lighting"]["sun"] == 1.0 / 3.0  # floats survive exactly


def _job_like(seed: int, config: GenConfig):
    class Job:
        pass

    job = Job()
    job.seed, job.config = seed, config
    job.identities = [{"name": f"id{i:04d}", "id": i, "betas": [0.0]} for i in range(3)]
    return job


def test_wids_opens_the_index_with_random_access(fake_datasets, tmp_path, monkeypatch):
    import wids

    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    d = fake_datasets[1]
    index = json.loads((d / ds.WIDS_INDEX_NAME).read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [s["url"] for s in index["shardlist"]] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    dataset = wids.ShardListDataset(str(d / ds.WIDS_INDEX_NAME), transformations=[])
    assert len(dataset) == N
    sample = dataset[13]
    assert sample["__key__"] == ds.sample_key(13)
    decoded = ds.decode_sample(sample)  # wids keeps the leading dots of extensions
    assert decoded["json"]["index"] == 13


def test_rerun_keeps_verified_shards_and_redoes_damaged_ones(fake_datasets, body_file, tmp_path):
    d = tmp_path / "resume"
    shutil.copytree(fake_datasets[2], d)
    reference = shard_bytes(fake_datasets[1])
    kept_mtime = (d / "shard-000000.tar").stat().st_mtime_ns
    damaged = bytearray((d / "shard-000001.tar").read_bytes())
    damaged[5000] ^= 0xFF
    (d / "shard-000001.tar").write_bytes(bytes(damaged))
    (d / "shard-000002.tar").unlink()
    stale = d / "shard-000002.tar.tmp-999999999"
    stale.write_bytes(b"half a shard")
    messages = []
    summary = generate_dataset(request(d, body_file, workers=2), echo=messages.append)
    assert summary.kept_shards == 1 and summary.rendered_shards == 2 and summary.rendered_samples == 12
    assert messages == ["keeping 1 verified shard(s); rendering 2"]
    assert shard_bytes(d) == reference
    assert (d / "shard-000000.tar").stat().st_mtime_ns == kept_mtime
    assert not stale.exists()
    verify_dataset(d)


def test_other_configuration_is_refused_without_touching_the_folder(fake_datasets, body_file, tmp_path):
    d = tmp_path / "other"
    shutil.copytree(fake_datasets[1], d)
    before = {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(GenerationError, match=r"another configuration \(differs in: identities, seed\)"):
        generate_dataset(request(d, body_file, seed=8), echo=lambda _m: None)
    cfg = small_config()
    cfg.render.samples = 4
    with pytest.raises(GenerationError, match=r"differs in: config"):
        generate_dataset(request(d, body_file, config=cfg), echo=lambda _m: None)
    assert {p.name: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_unknown_shards_without_a_run_description_are_refused(body_file, tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "shard-000000.tar").write_bytes(b"x")
    with pytest.raises(GenerationError, match="unknown configuration"):
        generate_dataset(request(d, body_file), echo=lambda _m: None)
    assert (d / "shard-000000.tar").read_bytes() == b"x"


def test_verify_names_a_flipped_byte_and_a_missing_shard(fake_datasets, tmp_path):
    d = tmp_path / "v"
    shutil.copytree(fake_datasets[1], d)
    assert verify_dataset(d) == {"shards": 3, "samples": N, "bytes": ds.load_manifest(d)["totals"]["bytes"]}
    data = bytearray((d / "shard-000001.tar").read_bytes())
    data[777] ^= 0x01
    (d / "shard-000001.tar").write_bytes(bytes(data))
    with pytest.raises(
        ds.DatasetFormatError, match=r"^shard-000001.tar: sha256 mismatch \(expected [0-9a-f]{64}"
    ):
        verify_dataset(d)
    (d / "shard-000000.tar").unlink()
    with pytest.raises(ds.DatasetFormatError, match=r"^shard-000000.tar: missing"):
        verify_dataset(d)


def test_verify_checks_sample_schema_behind_a_valid_checksum(fake_datasets, tmp_path):
    """A shard rewritten with a broken sample and a matching manifest entry still fails verify."""
    d = tmp_path / "schema"
    shutil.copytree(fake_datasets[1], d)
    path = d / "shard-000002.tar"
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "000000017.parts.png":
                bad = np.full((64, 32), 16, np.uint8)
                out = io.BytesIO()
                Image.fromarray(bad).save(out, format="PNG")
                data = out.getvalue()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["shards"][2].update(bytes=path.stat().st_size, sha256=ds.file_sha256(path))
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ds.DatasetFormatError, match=r"^shard-000002.tar: sample 000000017: parts.png holds label 16"
    ):
        verify_dataset(d)


def test_finalize_rebuilds_the_manifest_and_names_a_missing_shard(fake_datasets, tmp_path):
    d = tmp_path / "fin"
    shutil.copytree(fake_datasets[1], d)
    original = (d / "manifest.json").read_bytes()
    (d / "manifest.json").unlink()
    finalize_dataset(d)
    assert (d / "manifest.json").read_bytes() == original
    (d / ".records" / "shard-000001.json").unlink()
    with pytest.raises(ds.DatasetFormatError, match=r"^shard-000001.tar: missing"):
        finalize_dataset(d)


def test_encoding_is_deterministic_and_round_trips():
    cfg = small_config().render
    rendered = FakeRendered(
        rgb=np.full((64, 32, 3), 128, np.uint8),
        parts=np.arange(64 * 32).reshape(64, 32).astype(np.uint8) % 16,
        vid=(np.arange(64 * 32).reshape(64, 32) * 31 % 65536).astype(np.uint16),
        depth=np.full((64, 32), 3.2104, np.float32),
        garments=(np.arange(64 * 32).reshape(64, 32) % 6).astype(np.uint8),
    )
    cfg.write_depth = True
    assert "garments.png" not in encode_sample(5, rendered, {}, cfg)  # only when asked for
    cfg.write_garments = True
    a = encode_sample(5, rendered, {"x": np.float32(0.1), "y": (1, 2)}, cfg)
    b = encode_sample(5, rendered, {"y": [1, 2], "x": np.float32(0.1)}, cfg)
    assert a == b and a["__key__"] == "000000005"
    assert a["json"] == b'{"x":0.10000000149011612,"y":[1,2]}'
    assert np.array_equal(ds.decode_vid(a["vid.png"]), rendered.vid)
    assert np.array_equal(ds.decode_parts(a["parts.png"]), rendered.parts)
    assert ds.decode_vid(a["depth.png"]).max() == 3210  # millimetres
    assert np.array_equal(ds.decode_garments(a["garments.png"]), rendered.garments)
    with pytest.raises(ValueError, match="0..65535"):
        encode_png16(np.array([[70000]]), 6)
    with pytest.raises(ValueError, match="rgb shape"):
        encode_sample(5, FakeRendered(np.zeros((10, 10, 3), np.uint8), rendered.parts, rendered.vid), {}, cfg)


def test_config_yaml_loads_partially_and_refuses_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("render:\n  width: 64\n  samples: 4\n  denoise: true\n")
    cfg = load_config(good)
    assert (cfg.render.width, cfg.render.height, cfg.render.samples, cfg.render.denoise) == (64, 256, 4, True)
    assert GenConfig.from_dict(cfg.to_dict()) == cfg
    json.dumps(cfg.to_dict())
    bad = tmp_path / "bad.yaml"
    bad.write_text("render:\n  widht: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: render: unknown key 'widht' in RenderSettings"):
        load_config(bad)
    bad.write_text("rendr: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rendr' in GenConfig"):
        load_config(bad)
    bad.write_text("render:\n  width: wide\n")
    with pytest.raises(ConfigError, match=r"render.width: expected an integer, got 'wide'"):
        load_config(bad)


def test_config_ranges_stay_tuples(tmp_path):
    """Stage sections with (lo, hi) ranges load from YAML lists back into tuples."""
    cfg = GenConfig()
    data = cfg.to_dict()
    ranges = [(k, v) for k, v in vars(cfg.scene).items() if isinstance(v, tuple) and len(v) == 2]
    if not ranges:
        pytest.skip("scene config has no range fields yet")
    name, value = ranges[0]
    lo, hi = value
    data["scene"] = {name: [lo, hi]}
    loaded = GenConfig.from_dict(data)
    assert getattr(loaded.scene, name) == (lo, hi) and isinstance(getattr(loaded.scene, name), tuple)


def test_shard_plan_record_round_trip(fake_datasets):
    rec = read_record(fake_datasets[1], 2)
    assert rec.first_sample == 16 and rec.count == 4 and rec.name == ShardPlan(2, 16, 20).name


def test_the_stored_config_reloads_from_yaml_to_the_same_config(tmp_path):
    """manifest.json's config, written out as YAML, gives back the same GenConfig (reproducible runs)."""
    from generator.config import dump_config

    cfg = small_config()
    cfg.render.samples = 3
    path = tmp_path / "stored.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert load_config(path).to_dict() == cfg.to_dict()


def test_a_failing_worker_is_an_error_and_leaves_no_partial_shard(body_file, tmp_path):
    from generator.workers import WorkerError

    d = tmp_path / "fails"
    with pytest.raises(WorkerError, match="boom at sample 5"):
        generate_dataset(
            request(d, body_file, backend="tests.fake_backend:FailingBackend"), echo=lambda _m: None
        )
    assert not list(d.glob("shard-000000.tar*"))
    assert not (d / ds.MANIFEST_NAME).exists()
