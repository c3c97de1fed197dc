"""The demo's own planning (the end-to-end run is `make demo`, recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json

from protoreg.demo import (
    DemoConfig,
    requested_fingerprint,
    set_aside_if_made_otherwise,
    shard_size_for,
    write_identities,
)


def test_every_render_worker_gets_a_shard_of_each_demo_set():
    cfg = DemoConfig()  # 2 workers, shards of at most 250
    assert shard_size_for(cfg.n_train, cfg) == 250  # 1,500 images: 6 shards
    assert shard_size_for(cfg.n_test, cfg) == 100  # 200 images: 2 shards, not one that idles a worker
    assert shard_size_for(cfg.n_val, cfg) == 30
    assert shard_size_for(1, cfg) == 1
    cfg.workers = 3
    assert shard_size_for(200, cfg) == 67  # ceil(200 / 3): three shards


def _fake_set(folder, fingerprint) -> None:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint}))


def test_a_set_made_with_other_settings_is_moved_aside_and_kept(tmp_path):
    cfg = DemoConfig()
    write_identities(tmp_path, cfg)
    wanted = requested_fingerprint(tmp_path, cfg, "val", cfg.n_val, 2, "demo-train.yaml")
    assert wanted["n"] == cfg.n_val and wanted["config"]["render"]["width"] == 64

    _fake_set(tmp_path / "val", wanted)
    set_aside_if_made_otherwise(tmp_path / "val", wanted)
    assert (tmp_path / "val" / "manifest.json").exists()  # same settings: reused

    shifted = requested_fingerprint(tmp_path, cfg, "val", cfg.n_val, 2, "demo-shifted-test.yaml")
    set_aside_if_made_otherwise(tmp_path / "val", shifted)
    assert not (tmp_path / "val").exists()
    (stale,) = tmp_path.glob("val-stale-*")
    assert json.loads((stale / "manifest.json").read_text())["fingerprint"] == wanted  # kept, not deleted


def test_training_sets_render_at_their_own_samples_and_test_sets_at_the_full_count(tmp_path):
    cfg = DemoConfig(train_samples=8, samples=16)
    write_identities(tmp_path, cfg)

    def samples(name: str, config: str) -> int:
        return requested_fingerprint(tmp_path, cfg, name, 10, 1, config)["config"]["render"]["samples"]

    assert samples("train", "demo-train.yaml") == 8 and samples("val", "demo-train.yaml") == 8
    assert samples("test", "demo-shifted-test.yaml") == 16
    assert samples("shift-factors/all", "demo-shifted-test.yaml") == 16
