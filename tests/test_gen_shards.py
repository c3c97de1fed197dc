"""gen-shards end to end with real Blender renders (64x128, 4 samples): reading back, labels,
determinism across worker counts, resume after kill -9, verify, inspect, finalize, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image
from scipy.ndimage import binary_erosion

from generator.cli import finalize_cmd, gen_shards, inspect_cmd, verify_cmd
from protoreg import dataset as ds
from tests.conftest import TINY, gen_shards_args, run_gen_shards, tiny_body_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


def read_all(d: Path) -> list[dict]:
    urls = [str(p) for p in sorted(d.glob("shard-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False).map(ds.decode_sample))


def folder_state(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_tiny_dataset_reads_back_with_plain_webdataset(tiny_dataset):
    samples = read_all(tiny_dataset)
    assert [s["__key__"] for s in samples] == [ds.sample_key(i) for i in range(TINY["n"])]
    manifest = ds.load_manifest(tiny_dataset)
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 8]
    assert manifest["totals"]["samples"] == 24 and len(manifest["identities"]) == 3
    names = [m["name"] for m in manifest["identities"]]
    for i, s in enumerate(samples):
        assert s["rgb.jpg"].shape == (128, 64, 3)
        assert s["parts.png"].shape == (128, 64) and s["parts.png"].dtype == np.uint8
        assert s["parts.png"].max() <= 15
        assert s["json"]["index"] == i and s["json"]["identity"]["name"] == names[i % 3]
        assert (s["json"]["camera"]["width"], s["json"]["camera"]["height"]) == (64, 128)
        assert ((s["parts.png"] >= 1) & (s["parts.png"] <= 14)).sum() > 100  # a person is in every crop
    seen = set().union(*(np.unique(s["parts.png"]).tolist() for s in samples))
    assert len(seen & set(range(1, 15))) >= 12


def test_vid_covers_interior_pixels_with_the_same_part(tiny_dataset):
    from protoreg.body import load_body_model

    manifest = ds.load_manifest(tiny_dataset)
    body = load_body_model(manifest["body_model"]["path"])
    assert body.sha256 == manifest["body_model"]["sha256"]
    vertex_parts = np.asarray(body.vertex_parts)
    interior_total = interior_known = agree = 0
    for s in read_all(tiny_dataset):
        labels, vid = s["parts.png"], s["vid.png"]
        for part in range(1, 15):
            interior = binary_erosion(labels == part, iterations=1)
            interior_total += int(interior.sum())
            known = interior & (vid > 0)
            interior_known += int(known.sum())
            agree += int((vertex_parts[vid[known] - 1] == part).sum())
    assert interior_total > 1000
    assert interior_known / interior_total >= 0.95
    assert agree / interior_known >= 0.95


def test_wids_reads_the_index(tiny_dataset, tmp_path, monkeypatch):
    import wids

    monkeypatch.setenv("WIDS_CACHE", str(tmp_path))
    dataset = wids.ShardListDataset(str(tiny_dataset / ds.WIDS_INDEX_NAME), transformations=[])
    assert len(dataset) == 24
    assert ds.decode_sample(dataset[17])["json"]["index"] == 17


def test_one_worker_writes_the_same_bytes_as_two(tiny_dataset, tmp_path):
    """Sample i depends on (seed, config, i) only: 1 worker, and a smaller n, give the same first shards."""
    out = tmp_path / "w1"
    run_gen_shards(gen_shards_args(out, tiny_body_model(tiny_dataset.parent), workers=1, n=12))
    ours, reference = shard_bytes(out), shard_bytes(tiny_dataset)
    assert list(ours) == ["shard-000000.tar", "shard-000001.tar"]
    assert ours["shard-000000.tar"] == reference["shard-000000.tar"]
    last = ds.load_manifest(out)["shards"][1]
    assert last["count"] == 4  # samples 8-11: the same samples, in a shorter shard
    first_four = [s for s in read_all(tiny_dataset) if 8 <= s["json"]["index"] < 12]
    assert [s["json"] for s in read_all(out)[8:]] == [s["json"] for s in first_four]
    for a, b in zip(read_all(out)[8:], first_four, strict=True):
        assert np.array_equal(a["parts.png"], b["parts.png"]) and np.array_equal(a["vid.png"], b["vid.png"])
        assert np.array_equal(a["rgb.jpg"], b["rgb.jpg"])


def test_rerun_after_kill_9_gives_the_uninterrupted_dataset(tiny_dataset, tmp_path):
    out = tmp_path / "killed"
    args = gen_shards_args(out, tiny_body_model(tiny_dataset.parent))
    code = "from generator.cli import gen_shards; gen_shards()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while not list(out.glob("shard-*.tar")):
            assert proc.poll() is None, "gen-shards ended before its first shard"
            assert time.monotonic() < deadline, "no shard after 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = set(shard_bytes(out))
    assert 1 <= len(done_before) < 3, done_before
    assert not (out / ds.MANIFEST_NAME).exists()
    result = CliRunner().invoke(gen_shards, args, prog_name="gen-shards")
    assert result.exit_code == 0, result.output
    assert f"keeping {len(done_before)} verified shard(s)" in result.output
    assert "images/s" in result.output
    assert shard_bytes(out) == shard_bytes(tiny_dataset)
    assert not list(out.glob("*.tmp-*"))
    ours, reference = ds.load_manifest(out), ds.load_manifest(tiny_dataset)
    assert ours["shards"] == reference["shards"] and ours["config"] == reference["config"]


def test_verify_passes_then_names_a_flipped_byte_and_a_missing_shard(tiny_dataset, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(tiny_dataset, d)
    runner = CliRunner()
    ok = runner.invoke(verify_cmd, [str(d)])
    assert ok.exit_code == 0 and "OK (3 shards, checksums and 24 samples" in ok.output
    data = bytearray((d / "shard-000001.tar").read_bytes())
    data[len(data) // 3] ^= 0x10
    (d / "shard-000001.tar").write_bytes(bytes(data))
    bad = runner.invoke(verify_cmd, [str(d)])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [bad.output.strip()]  # one line
    assert bad.output.startswith("Error: shard-000001.tar: sha256 mismatch (expected ")
    (d / "shard-000000.tar").unlink()
    missing = runner.invoke(verify_cmd, [str(d)])
    assert missing.exit_code == 1 and missing.output.startswith("Error: shard-000000.tar: missing")


def test_inspect_writes_a_contact_sheet_and_statistics(tiny_dataset, tmp_path):
    sheet = tmp_path / "sheet.png"
    result = CliRunner().invoke(inspect_cmd, [str(tiny_dataset), "--out", str(sheet), "--n", "8"])
    assert result.exit_code == 0, result.output
    assert "samples: 24 in 3 shards, 64x128" in result.output
    assert "identities: 3 (samples per identity: min 8, max 8)" in result.output
    assert "occlusion rate:" in result.output and "mean person height:" in result.output
    with Image.open(sheet) as im:
        assert im.mode == "RGB" and im.width > 3 * 64 * 4 and im.height > 2 * 128


def test_finalize_reassembles_the_same_manifest(tiny_dataset, tmp_path):
    d = tmp_path / "fin"
    shutil.copytree(tiny_dataset, d)
    original = (d / ds.MANIFEST_NAME).read_bytes()
    (d / ds.MANIFEST_NAME).unlink()
    (d / ds.WIDS_INDEX_NAME).unlink()
    result = CliRunner().invoke(finalize_cmd, [str(d)])
    assert result.exit_code == 0, result.output
    assert (d / ds.MANIFEST_NAME).read_bytes() == original
    (d / ".records" / "shard-000002.json").unlink()
    result = CliRunner().invoke(finalize_cmd, [str(d)])
    assert result.exit_code == 1 and result.output.startswith("Error: shard-000002.tar: missing")


def test_manifest_records_how_the_dataset_was_made(tiny_dataset):
    m = ds.load_manifest(tiny_dataset)
    assert isinstance(m["command"], str) and m["command"]
    assert m["generator"]["name"] == "protoreg" and m["generator"]["git_commit"]
    assert m["config"]["render"]["samples"] == 4 and m["resolution"] == {"width": 64, "height": 128}
    assert m["seed"] == 0 and m["shard_size"] == 8
    assert set(m["identities"][0]) >= {"name", "id", "betas", "skin_tone", "hair_color"}
    assert m["parts"]["ids"] == list(range(16))
    assert json.loads((tiny_dataset / ds.WIDS_INDEX_NAME).read_text())["__kind__"] == "wids-shard-index-v1"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "128by256"], "Invalid value for '--resolution': '128by256': expected WIDTHxHEIGHT"),
        (["--workers", "0"], "Invalid value for '--workers'"),
        (["--samples", "many"], "Invalid value for '--samples'"),
        (["--backgrounds", "/nonexistent/backgrounds"], "--backgrounds: backgrounds folder"),
        (["--identities", "/nonexistent/people.yaml"], "people.yaml"),
        (["--body-model", "/nonexistent/body.npz"], "body.npz: body model file not found"),
        (["--colour", "red"], "No such option"),
        (["--poses", "/nonexistent/*.npz"], "poses /nonexistent/*.npz: matches no files"),
    ],
)
def test_bad_input_gives_a_one_line_error(tmp_path, extra, message):
    out = tmp_path / "out"
    body = tiny_body_model(tmp_path)
    args = ["--identities", "3", "--n", "4", "--out", str(out), "--quiet"]
    args += ["--body-model", str(body)] if body is not None else []
    args += extra
    result = CliRunner().invoke(gen_shards, args, prog_name="gen-shards")
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()


def test_config_file_with_an_unknown_key_is_refused(tmp_path):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("render:\n  sampels: 4\n")
    out = tmp_path / "out"
    args = ["--identities", "3", "--n", "4", "--out", str(out), "--config", str(cfg), "--quiet"]
    result = CliRunner().invoke(gen_shards, args, prog_name="gen-shards")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {cfg}: render: unknown key 'sampels' in RenderSettings " + (
        "(known: denoise, device, filter_width, height, jpeg_quality, png_compress_level, samples, "
        "threads_per_worker, width, write_depth, write_garments)"
    )
    assert not out.exists()


def test_folder_with_another_configuration_is_refused_untouched(tiny_dataset, tmp_path):
    d = tmp_path / "taken"
    shutil.copytree(tiny_dataset, d)
    before = folder_state(d)
    args = gen_shards_args(d, tiny_body_model(tiny_dataset.parent), samples=8)
    result = CliRunner().invoke(gen_shards, args, prog_name="gen-shards")
    assert result.exit_code == 1
    assert "holds a dataset made with another configuration (differs in: config)" in result.output
    assert folder_state(d) == before
