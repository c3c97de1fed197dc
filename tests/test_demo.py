"""The demo's own planning (the end-to-end run is `make demo`, recorded in docs/benchmarks.md)."""

from __future__ import annotations

from protoreg.demo import DemoConfig, shard_size_for


def test_every_render_worker_gets_a_shard_of_each_demo_set():
    cfg = DemoConfig()  # 2 workers, shards of at most 250
    assert shard_size_for(cfg.n_train, cfg) == 250  # 1,500 images: 6 shards
    assert shard_size_for(cfg.n_test, cfg) == 100  # 200 images: 2 shards, not one that idles a worker
    assert shard_size_for(cfg.n_val, cfg) == 30
    assert shard_size_for(1, cfg) == 1
    cfg.workers = 3
    assert shard_size_for(200, cfg) == 67  # ceil(200 / 3): three shards
