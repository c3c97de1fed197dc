"""Datasets in object stores and on web servers, against real local servers (moto's S3 server, a static
HTTP server on loopback): gen-shards writes to s3:// (resuming from the remote records), verify checks
it there and names damage, train-from-shards trains from s3:// and from http://."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from generator.card import CARD_NAME, SHEET_NAME
from generator.cli import gen_shards, verify_cmd
from protoreg import dataset as ds
from protoreg import storage
from tests.conftest import gen_shards_args, tiny_body_model
from tests.servers import http_server, s3_server
from trainer.cli import train_from_shards

pytestmark = pytest.mark.slow

TRAIN_CONFIG = {  # a tiny network: a few steps take seconds on 2 cores
    "model": {
        "embed_dim": 16,
        "widths": [8, 16, 16, 24],
        "decoder_width": 16,
        "point_widths": [16, 16],
        "point_global": 32,
        "knn": 8,
        "image_size": [128, 64],
    },
    "data": {"batch_size": 4, "workers": 0, "shuffle_buffer": 8, "max_points": 256},
    "loss": {"pixels_per_batch": 256},
    "threads": 1,
}


def train(spec: str, tmp_path: Path, name: str = "run", steps: int = 3) -> tuple[int, str, Path]:
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(TRAIN_CONFIG))
    run = tmp_path / name
    args = ["--shards", spec, "--out", str(run), "--steps", str(steps), "--config", str(cfg), "--no-progress"]
    result = CliRunner().invoke(train_from_shards, args)
    return result.exit_code, result.output, run


def upload(local: Path, url: str) -> None:
    storage.write_bytes(url, local.read_bytes())


def comparable_manifest(text: str) -> dict:
    manifest = json.loads(text)
    manifest.pop("command")  # another --out
    manifest["generator"].pop("git_commit")  # others commit to this checkout while the suite runs
    return manifest


def test_gen_shards_to_s3_resumes_verifies_and_trains(tiny_dataset, tmp_path):
    with s3_server() as bucket:
        root = f"{bucket}/{tiny_dataset.name}"
        # An interrupted earlier run into the bucket: its run description and the first two shards.
        for name in (ds.RUN_CONFIG_NAME, ds.PROTOTYPES_NAME, "shard-000000.tar", "shard-000001.tar",
                     ".records/shard-000000.json", ".records/shard-000001.json"):  # fmt: skip
            upload(tiny_dataset / name, f"{root}/{name}")
        args = gen_shards_args(root, tiny_body_model(tiny_dataset.parent), workers=1)
        result = CliRunner().invoke(gen_shards, args, prog_name="gen-shards")
        assert result.exit_code == 0, result.output
        assert "keeping 2 finished shard(s); rendering 1" in result.output
        for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", ds.PROTOTYPES_NAME,
                     ds.WIDS_INDEX_NAME, SHEET_NAME):  # fmt: skip
            assert storage.read_bytes(f"{root}/{name}") == (tiny_dataset / name).read_bytes(), name
        remote_manifest = storage.read_bytes(f"{root}/{ds.MANIFEST_NAME}").decode()
        local_manifest = (tiny_dataset / ds.MANIFEST_NAME).read_text()
        assert comparable_manifest(remote_manifest) == comparable_manifest(local_manifest)
        card = storage.read_bytes(f"{root}/{CARD_NAME}").decode()
        assert f"protoreg verify {root}" in card and "| samples | 24 |" in card

        ok = CliRunner().invoke(verify_cmd, [root])
        assert ok.exit_code == 0, ok.output
        assert ok.output.strip() == f"{root}: OK (3 shards, checksums and 24 samples, " + (
            f"{json.loads(local_manifest)['totals']['bytes']} bytes)"
        )

        code, out, run = train(root, tmp_path)
        assert code == 0, out
        assert (run / "checkpoint-last.pt").exists() and "done: step 3" in out

        shard = bytearray((tiny_dataset / "shard-000001.tar").read_bytes())
        shard[len(shard) // 2] ^= 0x01
        storage.write_bytes(f"{root}/shard-000001.tar", bytes(shard))
        bad = CliRunner().invoke(verify_cmd, [root])
        assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
        assert bad.output.startswith("Error: shard-000001.tar: sha256 mismatch (expected ")

        fs, path = storage.filesystem(f"{root}/shard-000000.tar")
        fs.rm(path)
        gone = CliRunner().invoke(verify_cmd, [root])
        assert gone.exit_code == 1 and gone.output.startswith("Error: shard-000000.tar: missing")

        newer = json.loads(local_manifest) | {"format_version": "2.0"}
        storage.write_bytes(f"{root}/{ds.MANIFEST_NAME}", json.dumps(newer).encode())
        message = "format version 2.0 is newer than this reader's"
        refused = CliRunner().invoke(verify_cmd, [root])
        assert refused.exit_code == 1 and message in refused.output
        code, out, _ = train(root, tmp_path, name="refused")
        assert code == 1 and message in out and len(out.strip().splitlines()) == 1


def test_verify_and_train_from_an_http_server(tiny_dataset, tmp_path):
    served = tmp_path / "www"
    shutil.copytree(tiny_dataset, served / "data")
    with http_server(served) as base:
        url = f"{base}/data"
        ok = CliRunner().invoke(verify_cmd, [url, "--no-samples"])
        assert ok.exit_code == 0 and ok.output.startswith(f"{url}: OK (3 shards, checksums")
        code, out, run = train(url, tmp_path)
        assert code == 0, out
        assert (run / "checkpoint-last.pt").exists() and "skipped samples 0" in out


def test_job_array_into_s3_then_finalize_there(tmp_path):
    """Tasks write shards and records straight into the bucket; finalize runs on the bucket (the renderer
    is the writer tests' stand-in backend: this is about placement, not pixels)."""
    from generator.cli import finalize_cmd
    from generator.config import GenConfig
    from generator.pipeline import GenRequest
    from generator.scaleout import ScaleOptions, run_generation
    from tests.conftest import tiny_body_model

    config = GenConfig()
    config.render.width, config.render.height = 32, 64
    body = tiny_body_model(tmp_path)
    with s3_server() as bucket:
        root = f"{bucket}/array"

        def task(index: int) -> None:
            req = GenRequest(out_dir=root, n=10, identities="2", workers=1, shard_size=3, config=config,
                             body_model=str(body) if body else None, backend="tests.fake_backend:FakeBackend",
                             progress=False)  # fmt: skip
            summary = run_generation(req, ScaleOptions(task_index=index, num_tasks=2), echo=lambda _m: None)
            assert summary.shards == 2  # shards 0, 2 / 1, 3 of four

        task(1)
        assert not storage.exists(f"{root}/{ds.MANIFEST_NAME}")
        early = CliRunner().invoke(finalize_cmd, [root])
        assert early.exit_code == 1
        assert early.output.startswith("Error: shard-000000.tar, shard-000002.tar: missing (2 of 4 shards")
        task(0)
        done = CliRunner().invoke(finalize_cmd, [root])
        assert done.exit_code == 0 and "manifest for 4 shards, 10 samples" in done.output, done.output
        assert storage.exists(f"{root}/{CARD_NAME}") and storage.exists(f"{root}/{SHEET_NAME}")
        ok = CliRunner().invoke(verify_cmd, [root])
        assert ok.exit_code == 0 and "OK (4 shards, checksums and 10 samples" in ok.output, ok.output
