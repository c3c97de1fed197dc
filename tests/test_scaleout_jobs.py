"""Cluster generation on existing engines, with real Blender renders (64x128, 4 samples):
a 4-task job array (the documented sbatch script, run by bash with the environment SLURM gives each
array task), then `protoreg finalize`, and a run with
`--executor ray` on a local Ray instance, both byte-identical to the single local run (tiny_dataset).

"Byte-identical" covers every shard, prototypes.h5, wids-index.json, contact-sheet.png and manifest.json.
Two manifest fields are compared with the command-specific parts removed, deliberately: `command`
(each run is another command line: another --out, --executor) and `generator.git_commit` (other
people commit to this shared checkout while the suite runs; in one checkout it is equal too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from generator.card import CARD_NAME, SHEET_NAME
from generator.cli import finalize_cmd
from protoreg import dataset as ds
from tests.conftest import TINY, gen_shards_args, run_gen_shards, tiny_body_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = REPO / "docs" / "examples" / "gen-shards.sbatch"
COMPARED_FILES = (ds.PROTOTYPES_NAME, ds.WIDS_INDEX_NAME, SHEET_NAME)


def comparable_manifest(path: Path) -> dict:
    manifest = json.loads(path.read_text())
    manifest.pop("command")
    manifest["generator"].pop("git_commit")
    return manifest


def assert_same_dataset(ours: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("shard-*.tar"))
    assert sorted(p.name for p in ours.glob("shard-*.tar")) == names and len(names) == 3
    for name in (*names, *COMPARED_FILES):
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
    assert comparable_manifest(ours / ds.MANIFEST_NAME) == comparable_manifest(reference / ds.MANIFEST_NAME)


def slurm_task(settings: dict[str, str], task_id: int, count: int) -> subprocess.Popen:
    """One task of docs/examples/gen-shards.sbatch as SLURM starts it for `--array=1-COUNT`."""
    env = {
        **os.environ,
        **settings,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "SLURM_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": str(task_id),
        "SLURM_ARRAY_TASK_MIN": "1",
        "SLURM_ARRAY_TASK_COUNT": str(count),
        "SLURM_CPUS_PER_TASK": "1",
    }
    return subprocess.Popen(
        ["bash", str(SBATCH_SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_tasks(settings: dict[str, str], task_ids: list[int], count: int) -> list[str]:
    procs = [slurm_task(settings, t, count) for t in task_ids]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    return outputs


def sbatch_settings(out: Path, body: Path | None) -> dict[str, str]:
    """The sbatch example's settings for the tiny dataset (same fingerprint as tests.conftest.TINY)."""
    settings = {
        "OUT": str(out),
        "N": str(TINY["n"]),
        "IDENTITIES": str(TINY["identities"]),
        "SEED": str(TINY["seed"]),
        "SHARD_SIZE": str(TINY["shard_size"]),
        "RESOLUTION": TINY["resolution"],
        "SAMPLES": str(TINY["samples"]),
    }
    if body is not None:
        settings["EXTRA_ARGS"] = f"--body-model {body}"
    return settings


def test_four_task_job_array_then_finalize_equals_a_single_run(tiny_dataset, tmp_path):
    out = tmp_path / "array" / tiny_dataset.name  # same folder name: the wids index is named after it
    settings = sbatch_settings(out, tiny_body_model(tiny_dataset.parent))
    first = run_tasks(settings, [1, 2], count=4)  # two at a time, as a busy cluster would run them
    assert "task 0 of 4: 1 shard(s) owned" in first[0] and "task 1 of 4" in first[1]
    assert not (out / ds.MANIFEST_NAME).exists()  # a task of many never writes the manifest
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]

    early = CliRunner().invoke(finalize_cmd, [str(out)])
    assert early.exit_code == 1
    assert early.output.startswith("Error: shard-000002.tar: missing (1 of 3 shards")
    assert len(early.output.strip().splitlines()) == 1

    last = run_tasks(settings, [3, 4], count=4)  # task 3 owns shard 2; task 4 (index 3) owns none of 3 shards
    assert "task 2 of 4: 1 shard(s) owned" in last[0] and "task 3 of 4: 0 shard(s) owned" in last[1]
    done = CliRunner().invoke(finalize_cmd, [str(out)])
    assert done.exit_code == 0, done.output
    assert "manifest for 3 shards, 24 samples" in done.output
    assert_same_dataset(out, tiny_dataset)
    assert (out / CARD_NAME).read_text().startswith(f"# Dataset `{tiny_dataset.name}`")


def test_ray_executor_writes_the_same_dataset(tiny_dataset, tmp_path):
    out = tmp_path / "ray" / tiny_dataset.name
    args = gen_shards_args(out, tiny_body_model(tiny_dataset.parent), workers=2)
    run_gen_shards([*args, "--executor", "ray"])  # a local Ray instance with 2 CPUs, shut down after
    assert_same_dataset(out, tiny_dataset)
    assert (out / CARD_NAME).exists()
