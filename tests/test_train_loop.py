"""Training runs end to end on tiny shards: the loss falls, resume is exact, DDP ranks read disjoint shards,
foreign checkpoints and bad configs are refused with one-line messages."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from trainer.checkpoint import load_checkpoint, load_model
from trainer.cli import train_from_shards

pytestmark = pytest.mark.slow

# A tiny network so that a step takes well under a second on 2 cores.
TINY_CONFIG = {
    "model": {
        "embed_dim": 16,
        "widths": [8, 16, 16, 24],
        "decoder_width": 16,
        "point_widths": [16, 16],
        "point_global": 32,
        "knn": 8,
        "image_size": [64, 32],
    },
    "data": {"batch_size": 4, "workers": 0, "shuffle_buffer": 8, "max_points": 256},
    "loss": {"pixels_per_batch": 256},
    "optim": {"lr": 0.004, "warmup_steps": 2},
    # repainted backdrops make 40 steps of batch 4 too noisy to compare losses (test_train_data covers them)
    "augment": {"background_p": 0.0},
    "threads": 1,
}


@pytest.fixture(scope="module")
def data(tiny_dataset) -> Path:
    """The shared real dataset (Blender renders: 3 identities, 24 samples, 64x128, 3 shards)."""
    return tiny_dataset


def config_file(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(TINY_CONFIG))
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / f"cfg-{abs(hash(str(sorted(changes.items()))))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(train_from_shards, args + ["--no-progress"], catch_exceptions=False)
    return result.exit_code, result.output


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_few_cpu_steps_lower_the_loss(data, tmp_path):
    run = tmp_path / "run"
    cfg = config_file(tmp_path)
    code, out = run_cli(["--shards", str(data), "--out", str(run), "--steps", "60", "--config", str(cfg),
                         "--log-every", "4", "--val", str(data)])  # fmt: skip
    assert code == 0, out
    rows = metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(4, 61, 4))
    first = sum(float(r["loss"]) for r in rows[:2]) / 2
    last = sum(float(r["loss"]) for r in rows[-2:]) / 2
    assert last < 0.85 * first, (first, last)
    for key in ("contrast", "dense", "seg", "lr", "samples_per_s"):
        assert all(r[key] != "" for r in rows)
    assert all(float(r["grad_norm"]) > 0 for r in rows)  # before clipping: not capped at optim.grad_clip
    assert rows[-1]["val_miou"] != "" and 0 <= float(rows[-1]["val_rank1"]) <= 1
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "config.yaml").exists() and any((run / "tensorboard").iterdir())
    model, saved = load_model(run / "checkpoint-last.pt")
    assert saved["model"]["embed_dim"] == 16 and saved["step"] == 60 and not model.training
    state = torch.load(run / "checkpoint-last.pt", weights_only=True)
    assert state["step"] == 60 and len(state["model_fingerprint"]) == 64


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_two_n_steps_equal_n_plus_resume_plus_n(data, tmp_path, ema):
    cfg = config_file(tmp_path, **{"optim.ema_decay": ema})
    base = [
        "--shards",
        str(data),
        "--steps",
        "8",
        "--config",
        str(cfg),
        "--ckpt-every",
        "100",
        "--workers",
        "2",
    ]
    code, out = run_cli(base + ["--out", str(tmp_path / "full")])
    assert code == 0, out
    code, out = run_cli(base + ["--out", str(tmp_path / "split"), "--stop-after", "4"])
    assert code == 0, out
    assert load_checkpoint(tmp_path / "split" / "checkpoint-last.pt")["step"] == 4
    code, out = run_cli(base + ["--out", str(tmp_path / "split"), "--resume"])
    assert code == 0, out
    a = load_checkpoint(tmp_path / "full" / "checkpoint-last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint-last.pt")
    assert a["step"] == b["step"] == 8
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5, rtol=1e-4), k
    assert ("ema" in a) == ("ema" in b) == (ema > 0)
    if ema:  # the average resumes too, differs from the last weights, and is what inference loads
        for k, v in a["ema"].items():
            assert torch.allclose(v.float(), b["ema"][k].float(), atol=1e-5, rtol=1e-4), k
        name = "image_encoder.embed.weight"
        assert not torch.allclose(a["ema"][name], a["model"][name])
        model, _ = load_model(tmp_path / "full" / "checkpoint-last.pt")
        assert torch.equal(model.state_dict()[name], a["ema"][name])
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert "8" in full and full["8"] == split["8"] and "4" in split


def test_checkpoint_from_another_configuration_is_refused(data, tmp_path):
    run = tmp_path / "run"
    code, out = run_cli(["--shards", str(data), "--out", str(run), "--steps", "3", "--stop-after", "1",
                         "--config", str(config_file(tmp_path))])  # fmt: skip
    assert code == 0, out
    other = config_file(tmp_path, **{"model.embed_dim": 8})
    code, out = run_cli(
        ["--shards", str(data), "--out", str(run), "--steps", "3", "--resume", "--config", str(other)]
    )
    assert code != 0
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "another configuration" in lines[0] and "model.embed_dim: 16 vs 8" in lines[0]
    code, out = run_cli(
        ["--shards", str(data), "--out", str(run), "--steps", "3", "--config", str(config_file(tmp_path))]
    )
    assert code != 0 and "--resume" in out  # a run folder is never silently overwritten


def test_bad_config_and_spec_give_one_line_errors(data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embed_dimm: 3\n")
    code, out = run_cli(["--shards", str(data), "--out", str(tmp_path / "r1"), "--config", str(bad)])
    assert code != 0 and "unknown key 'embed_dimm'" in out and len(out.strip().splitlines()) == 1
    code, out = run_cli(["--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")])
    assert code != 0 and "nowhere" in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "r2" / "checkpoint-last.pt").exists()
    no_labels = config_file(tmp_path, **{"model.material_head": True})  # the tiny dataset has no garments.png
    code, out = run_cli(["--shards", str(data), "--out", str(tmp_path / "r3"), "--config", str(no_labels)])
    assert code != 0 and "material_head needs garments.png" in out and len(out.strip().splitlines()) == 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_read_disjoint_shards(data, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "trainer.cli", "--shards", str(data), "--out", str(run), "--steps", "3",
           "--config", str(config_file(tmp_path)), "--no-progress"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = {}
    for rank in (0, 1):
        lines = (run / f"shards-rank{rank}.tsv").read_text().splitlines()
        read[rank] = {ln.split("\t")[2] for ln in lines}
        assert read[rank] and all(ln.split("\t")[0] == str(rank) for ln in lines)
    assert not read[0] & read[1]
    assert len(read[0] | read[1]) == len(json.loads((data / "manifest.json").read_text())["shards"])
    assert load_checkpoint(run / "checkpoint-last.pt")["step"] == 3


def test_protoreg_train_is_the_same_command():
    from protoreg.cli import main

    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0 and "--shards" in result.output and "--resume" in result.output
    for flag in ("--steps", "--batch-size", "--device", "--config", "--val", "--lr", "--workers", "--seed",
                 "--log-every", "--ckpt-every", "--val-every", "--compile"):  # fmt: skip
        assert flag in result.output


def test_a_step_adds_absent_identities_as_negatives():
    from trainer.data import PrototypeBank
    from trainer.loop import batch_points, step_generator

    p, n = 6, 4
    points = torch.arange(p, dtype=torch.float32)[:, None, None].expand(p, n, 3).contiguous()  # row r = r
    bank = PrototypeBank(
        names=[f"id{i}" for i in range(p)], ids=torch.arange(p) * 10, points=points, normals=points,
        albedo=points, parts=torch.ones(n, dtype=torch.long), vertex_ids=torch.arange(n),
        subset=torch.arange(n), row_of_id={10 * i: i for i in range(p)},
    )  # fmt: skip
    batch = torch.tensor([30, 10, 30])  # rows 3, 1, 3
    pts, _, _, rows = batch_points(bank, batch, torch.device("cpu"))
    assert pts[:, 0, 0].tolist() == [1, 3] and rows.tolist() == [1, 0, 1]
    pts, _, _, rows = batch_points(bank, batch, torch.device("cpu"), extra=8)  # room for all: every row
    assert pts[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5] and rows.tolist() == [3, 1, 3]
    cpu = torch.device("cpu")
    draws = [batch_points(bank, batch, cpu, 2, step_generator(0, 0, s, salt=1))[0] for s in range(6)]
    for pts in draws:  # the batch's two and two of the other four, each step its own
        got = pts[:, 0, 0].long().tolist()
        assert len(got) == 4 and {1, 3} <= set(got) and got == sorted(got)
    assert len({tuple(d[:, 0, 0].tolist()) for d in draws}) > 1
