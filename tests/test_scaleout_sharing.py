"""Datasets other teams can trust and read: job-array task resolution, format versions (newer major
refused, older minor read) on every reader path, DATASET.md, and reading the shards with ordinary tools
(plain webdataset through the card's own snippet, wids random access, Hugging Face datasets)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner

from generator.card import CARD_NAME, HF_FEATURES_NAME, SHEET_NAME, body_licence
from generator.cli import finalize_cmd, inspect_cmd, verify_cmd
from generator.pipeline import GenerationError
from generator.scaleout import command_without_task_flags, resolve_task, task_shards
from generator.write import plan_shards
from protoreg import dataset as ds
from tests.conftest import TINY
from trainer.cli import train_from_shards
from trainer.data import DataSpecError, resolve_spec

# ---------------------------------------------------------------------------------------------------
# Job-array tasks (no renders)


@pytest.mark.parametrize(
    "env, flags, expected",
    [
        ({}, (None, None), (0, 1)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"},
         (None, None), (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "8"}, (None, None), (0, 8)),
        ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_STEP": "2",
          "SLURM_ARRAY_TASK_MAX": "8"}, (None, None), (2, 4)),
        ({"JOB_COMPLETION_INDEX": "5"}, (None, 6), (5, 6)),
        ({"JOB_COMPLETION_INDEX": "5", "PROTOREG_NUM_TASKS": "6"}, (None, None), (5, 6)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (1, 2), (1, 2)),  # flags win
    ],
)  # fmt: skip
def test_task_index_and_count_come_from_flags_or_the_engine(env, flags, expected):
    assert resolve_task(*flags, env=env) == expected


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({"JOB_COMPLETION_INDEX": "2"}, (None, None), "JOB_COMPLETION_INDEX=2 without a task count"),
        ({}, (4, 4), "--task-index: task index 4 outside 0..3"),
        ({"SLURM_ARRAY_TASK_ID": "x"}, (None, None), "SLURM_ARRAY_TASK_ID='x': expected an integer"),
        ({"PROTOREG_NUM_TASKS": "3"}, (None, None), "3 tasks but no task index"),
    ],
)
def test_bad_task_settings_are_named(env, flags, message):
    with pytest.raises(GenerationError, match=re.escape(message)):
        resolve_task(*flags, env=env)


def test_task_shards_are_disjoint_and_cover_every_shard():
    plans = plan_shards(1000, 64)  # 16 shards
    parts = [task_shards(plans, i, 5) for i in range(5)]
    owned = sorted(p.index for part in parts for p in part)
    assert owned == list(range(16))
    assert [len(p) for p in parts] == [4, 3, 3, 3, 3]
    assert [p.index for p in parts[1]] == [1, 6, 11]


def test_tasks_record_one_command():
    argv = ["/x/bin/gen-shards", "--n", "8", "--task-index", "2", "--num-tasks=4", "--out", "d"]
    assert command_without_task_flags(argv) == "gen-shards --n 8 --out d"


# ---------------------------------------------------------------------------------------------------
# Format versions on every reader path


def with_version(src: Path, dst: Path, version: str) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / ds.MANIFEST_NAME).read_text())
    manifest["format_version"] = version
    (dst / ds.MANIFEST_NAME).write_text(json.dumps(manifest))
    run = json.loads((dst / ds.RUN_CONFIG_NAME).read_text())
    run["fingerprint"]["format_version"] = version
    (dst / ds.RUN_CONFIG_NAME).write_text(json.dumps(run))
    return dst


def readers(d: Path, tmp_path: Path) -> dict[str, tuple[int, str]]:
    """Exit code and output of every command that reads a dataset folder."""
    runner = CliRunner()
    out = {
        "verify": runner.invoke(verify_cmd, [str(d), "--no-samples"]),
        "inspect": runner.invoke(inspect_cmd, [str(d), "--out", str(tmp_path / f"{d.name}.png"), "--n", "2"]),
        "finalize": runner.invoke(finalize_cmd, [str(d)]),
    }
    return {k: (r.exit_code, r.output) for k, r in out.items()}


def test_older_minor_is_read_and_newer_major_is_refused_everywhere(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "FORMAT_VERSION", "1.1")  # this reader is 1.1: datasets of 1.0 are older minors
    older = with_version(tiny_dataset, tmp_path / "older", "1.0")
    for name, (code, output) in readers(older, tmp_path).items():
        assert code == 0, (name, output)
    assert resolve_spec(str(older)).manifest["format_version"] == "1.1"  # finalize rewrote it as 1.1

    newer = with_version(tiny_dataset, tmp_path / "newer", "2.0")
    for name, (code, output) in readers(newer, tmp_path).items():
        assert code == 1, (name, output)
        assert len(output.strip().splitlines()) == 1, (name, output)
        assert "format version 2.0 is newer than this reader's 1.1; upgrade protoreg" in output, (
            name,
            output,
        )
    with pytest.raises(DataSpecError, match=r"format version 2.0 is newer than this reader's 1.1"):
        resolve_spec(str(newer))

    garbled = with_version(tiny_dataset, tmp_path / "garbled", "one")
    code, output = readers(garbled, tmp_path)["verify"]
    assert code == 1 and "format version 'one': expected MAJOR.MINOR" in output


def test_training_names_a_missing_shard_a_damaged_one_and_a_newer_format(tiny_dataset, tmp_path):
    def train(d: Path, *extra: str) -> tuple[int, str]:
        args = ["--shards", str(d), "--out", str(tmp_path / f"run-{d.name}"), "--steps", "1", "--no-progress"]
        result = CliRunner().invoke(train_from_shards, [*args, *extra])
        return result.exit_code, result.output

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_dataset, damaged)
    data = bytearray((damaged / "shard-000002.tar").read_bytes())
    data[len(data) // 4] ^= 0x04
    (damaged / "shard-000002.tar").write_bytes(bytes(data))
    code, output = train(damaged, "--verify")  # hashes every shard before the first step
    assert code == 1 and output.startswith("Error: shard-000002.tar: sha256 mismatch (expected ")
    assert len(output.strip().splitlines()) == 1

    missing = tmp_path / "missing"
    shutil.copytree(tiny_dataset, missing)
    (missing / "shard-000001.tar").unlink()
    code, output = train(missing)
    assert code == 1 and output.startswith("Error: shard-000001.tar: missing (listed in ")
    code, output = train(with_version(tiny_dataset, tmp_path / "newer", "2.0"))
    assert code == 1 and "format version 2.0 is newer than this reader's" in output


# ---------------------------------------------------------------------------------------------------
# DATASET.md


def test_dataset_card_says_what_how_and_under_which_licence(tiny_dataset):
    card = (tiny_dataset / CARD_NAME).read_text()
    manifest = ds.load_manifest(tiny_dataset)
    for text in (
        "| samples | 24 |",
        "| shards | 3 (8 samples a shard) |",
        "| identities | 3 |",
        "| resolution | 64x128 (width x height) |",
        "| scene.camera_distance | 2.0 .. 15.0 |",
        "| 15 | occluder |",
        f"![contact sheet: RGB | part labels | surface correspondence]({SHEET_NAME})",
        manifest["command"],
        f"| git commit | {manifest['generator']['git_commit']} |",
        "| bpy (finalizing environment) | 5.0",
        manifest["body_model"]["sha256"],
        "CC0-1.0",
        f"train-from-shards --shards {tiny_dataset}",
    ):
        assert text in card, text
    assert ", ".join(f"{i['name']} (id {i['id']})" for i in manifest["identities"]) in card
    with open(tiny_dataset / SHEET_NAME, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert body_licence({"sha256": "0" * 64}).startswith("user-supplied SMPL-format file")


# ---------------------------------------------------------------------------------------------------
# Ordinary readers


def card_snippet(card: str, marker: str) -> str:
    """The python code block of DATASET.md that contains `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    return next(b for b in blocks if marker in b)


def test_plain_webdataset_reads_the_shards_with_the_cards_own_snippet(tiny_dataset):
    scope: dict = {}
    exec(card_snippet((tiny_dataset / CARD_NAME).read_text(), "wds.WebDataset"), scope)
    samples = list(scope["ds"])
    assert [s["key"] for s in samples] == [ds.sample_key(i) for i in range(TINY["n"])]
    for i, s in enumerate(samples):
        assert s["rgb"].shape == (128, 64, 3) and s["parts"].dtype == np.uint8
        assert s["vid"].max() > 255  # the 16-bit correspondence survives an ordinary PNG reader
        assert s["meta"]["index"] == i


def test_wids_random_access_and_hugging_face_datasets(tiny_dataset, tmp_path, monkeypatch):
    import wids
    from datasets import Features, load_dataset

    urls = [str(p) for p in sorted(tiny_dataset.glob("shard-*.tar"))]
    reference = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}

    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids"))
    indexed = wids.ShardListDataset(str(tiny_dataset / ds.WIDS_INDEX_NAME), transformations=[])
    assert len(indexed) == TINY["n"]
    for i in (17, 3, 23, 0, 8):  # random order across shards
        sample = indexed[i]
        assert sample["__key__"] == ds.sample_key(i)
        assert sample[".vid.png"].getvalue() == reference[ds.sample_key(i)]["vid.png"]

    features = Features.from_dict(json.loads((tiny_dataset / HF_FEATURES_NAME).read_text()))
    hf = load_dataset(
        "webdataset",
        data_files={"train": [str(p) for p in sorted(tiny_dataset.glob("shard-*.tar"))]},
        features=features,  # without it the json column's type is guessed from 5 samples and fails later
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert hf.num_rows == TINY["n"]
    assert {"__key__", "rgb.jpg", "parts.png", "vid.png", "json"} <= set(hf.column_names)
    row = hf[17]
    assert row["__key__"] == ds.sample_key(17) and row["json"]["index"] == 17
    vid = np.asarray(row["vid.png"], dtype=np.int32)
    assert np.array_equal(vid, ds.decode_vid(reference[ds.sample_key(17)]["vid.png"]))
    assert np.array_equal(
        np.asarray(row["parts.png"]), ds.decode_parts(reference[ds.sample_key(17)]["parts.png"])
    )


def test_cluster_flags_refuse_what_cannot_work(tmp_path):
    from generator.cli import gen_shards

    out = tmp_path / "out"
    base = ["--identities", "2", "--n", "4", "--out", str(out), "--quiet"]
    for extra, message in (
        (["--ray-address", "auto"], "Error: --ray-address auto: only used with --executor ray"),
        (["--task-index", "4", "--num-tasks", "4"], "Error: --task-index: task index 4 outside 0..3"),
        (["--executor", "spark"], "Invalid value for '--executor'"),
    ):
        result = CliRunner().invoke(gen_shards, base + extra, prog_name="gen-shards")
        assert result.exit_code != 0 and message in result.output, result.output
        assert not out.exists()
