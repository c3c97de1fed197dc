"""Shared fixtures. `tiny_dataset`: one real gen-shards run (Blender renders) that other areas' tests read.

3 identities, 24 samples, 64x128 pixels, 4 Cycles samples, shards of 8 (3 shards), 2 workers, seed 0.
It uses the embedded default body when it has been baked, else the project's synthetic tube body.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY = {
    "identities": 3,
    "n": 24,
    "resolution": "64x128",
    "samples": 4,
    "shard_size": 8,
    "workers": 2,
    "seed": 0,
}


def tiny_body_model(tmp_dir: Path) -> Path | None:
    """None (= the embedded default body) when baked, else a synthetic body written into tmp_dir."""
    from protoreg.body import DEFAULT_BODY_MODEL

    if DEFAULT_BODY_MODEL.exists():
        return None
    from protoreg.body.synthetic import synthetic_body_arrays

    path = Path(tmp_dir) / "synthetic_body.npz"
    if not path.exists():
        np.savez(path, **synthetic_body_arrays())
    return path


def gen_shards_args(out: Path, body: Path | None, **overrides) -> list[str]:
    """Command-line arguments of a tiny gen-shards run (overrides by option name, e.g. workers=1)."""
    opts = {**TINY, **overrides}
    args = [
        "--identities", str(opts["identities"]), "--n", str(opts["n"]), "--out", str(out),
        "--resolution", opts["resolution"], "--samples", str(opts["samples"]),
        "--shard-size", str(opts["shard_size"]), "--workers", str(opts["workers"]),
        "--seed", str(opts["seed"]), "--quiet",
    ]  # fmt: skip
    if body is not None:
        args += ["--body-model", str(body)]
    return args


def run_gen_shards(args: list[str]) -> None:
    """Run the real gen-shards command in this process (workers are spawned; bpy stays out of here)."""
    from generator.cli import gen_shards

    try:
        gen_shards.main(args, prog_name="gen-shards", standalone_mode=False)
    except SystemExit as e:  # pragma: no cover - click exits only on errors here
        if e.code:
            raise


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Path of a small real dataset (shards, manifest.json, prototypes.h5, wids-index.json)."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    out = root / "dataset"
    run_gen_shards(gen_shards_args(out, tiny_body_model(root)))
    return out
