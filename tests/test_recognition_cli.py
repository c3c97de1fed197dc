"""`protoreg enroll / recognize / evaluate` end to end on real files: a real checkpoint (tiny random-weight
model), real prototypes.h5 and real webdataset shards (tests/train_fakes.py), the astronaut photograph."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from protoreg.cli import main as protoreg_main
from tests.train_fakes import synthetic_body, write_fake_dataset
from trainer.checkpoint import save_checkpoint
from trainer.config import DataConfig, ModelConfig, TrainConfig
from trainer.models import RegistrationNet

TINY = ModelConfig(
    embed_dim=8, widths=(8, 8, 16, 16), decoder_width=8, point_widths=(8, 8), point_global=16, knn=6
)


def make_checkpoint(path: Path, model_cfg: ModelConfig = TINY, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    cfg = TrainConfig(model=model_cfg, data=DataConfig(max_points=128))
    return save_checkpoint(path, RegistrationNet(model_cfg), cfg, step=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: several times faster than two when other jobs share the 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reccli")
    data = write_fake_dataset(root / "data", n_identities=3, n_samples=9, shard_size=5)
    return {"root": root, "data": data, "ckpt": make_checkpoint(root / "a.pt")}


def cli(*args: str) -> object:
    return CliRunner().invoke(protoreg_main, [str(a) for a in args], catch_exceptions=False)


def test_enroll_twice_gives_identical_gallery_files(setup, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for out in (a, b):
        r = cli("enroll", "--checkpoint", setup["ckpt"], "--prototypes", setup["data"], "--out", out)
        assert r.exit_code == 0, r.output
    assert a.read_bytes() == b.read_bytes()
    with h5py.File(a) as f:
        assert f["embeddings"].shape == (3, 128, 8)  # the checkpoint's max_points subset, D = 8
        assert [n.decode() for n in f["names"][()]] == ["id0000", "id0001", "id0002"]
        assert f.attrs["model_fingerprint"]
        assert len(f.attrs["prototypes_sha256"]) == 64


def test_enroll_add_appends_and_refuses_duplicates_and_other_models(setup, tmp_path):
    from protoreg.identities import sample_identities
    from protoreg.prototypes import write_prototypes

    gallery = tmp_path / "g.h5"
    assert (
        cli(
            "enroll", "--checkpoint", setup["ckpt"], "--prototypes", setup["data"], "--out", gallery
        ).exit_code
        == 0
    )
    body, _ = synthetic_body(tmp_path)
    newcomers = sample_identities(2, 99, body)
    for i in newcomers:
        i.name = f"new{i.id}"
    extra = write_prototypes(tmp_path / "extra.h5", newcomers, body, n_points=448, min_per_part=16)
    r = cli("enroll", "--checkpoint", setup["ckpt"], "--prototypes", extra, "--out", gallery, "--add")
    assert r.exit_code == 0, r.output
    with h5py.File(gallery) as f:
        assert [n.decode() for n in f["names"][()]] == ["id0000", "id0001", "id0002", "new0", "new1"]
        assert len(json.loads(f.attrs["sources"])) == 2
    before = gallery.read_bytes()
    r = cli("enroll", "--checkpoint", setup["ckpt"], "--prototypes", extra, "--out", gallery, "--add")
    assert r.exit_code != 0 and "already enrolled" in r.output
    other = make_checkpoint(
        tmp_path / "other.pt",
        ModelConfig(
            embed_dim=8, widths=(8, 8, 16, 24), decoder_width=8, point_widths=(8, 8), point_global=16, knn=6
        ),
    )
    r = cli("enroll", "--checkpoint", other, "--prototypes", extra, "--out", gallery, "--add")
    assert r.exit_code != 0 and "enrolled with another model" in r.output
    assert gallery.read_bytes() == before  # refused: nothing written


def test_recognize_a_real_photograph_writes_table_json_sentence_and_png(setup, tmp_path):
    from skimage import data

    gallery = tmp_path / "g.h5"
    cli("enroll", "--checkpoint", setup["ckpt"], "--prototypes", setup["data"], "--out", gallery)
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo)
    out = tmp_path / "rec"
    r = cli(
        "recognize", "--checkpoint", setup["ckpt"], "--gallery", gallery, photo, "--out", out, "--top", "3"
    )
    assert r.exit_code == 0, r.output
    assert "rank" in r.output and "id000" in r.output
    rec = json.loads((out / "astronaut.json").read_text())
    assert rec["best_match"] in ("id0000", "id0001", "id0002")
    assert [x["rank"] for x in rec["ranking"]] == [1, 2, 3]
    assert set(rec["parts"]) == {
        "head",
        "torso",
        "left_upper_arm",
        "right_upper_arm",
        "left_lower_arm",
        "right_lower_arm",
        "left_hand",
        "right_hand",
        "left_upper_leg",
        "right_upper_leg",
        "left_lower_leg",
        "right_lower_leg",
        "left_foot",
        "right_foot",
    }
    assert rec["justification"].endswith(".") and rec["justification"] in r.output
    with Image.open(out / rec["explanation_png"]) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]


def test_bad_inputs_give_one_line_errors(setup, tmp_path):
    gallery = tmp_path / "g.h5"
    cli("enroll", "--checkpoint", setup["ckpt"], "--prototypes", setup["data"], "--out", gallery)
    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((32, 16, 3), np.uint8)).save(ok)
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((32, 16), np.uint8)).save(grey)
    other = make_checkpoint(
        tmp_path / "other.pt",
        ModelConfig(
            embed_dim=8, widths=(8, 8, 16, 24), decoder_width=8, point_widths=(8, 8), point_global=16, knn=6
        ),
    )
    empty = tmp_path / "empty.h5"
    with h5py.File(gallery) as src, h5py.File(empty, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for k in src:
            dst.create_dataset(k, data=src[k][()][:0])
    cases = [
        (["--gallery", gallery, junk], "not a readable image"),
        (["--gallery", gallery, grey], "expected an RGB colour image, got mode L"),
        (["--gallery", gallery, tmp_path / "missing.png"], "image file not found"),
        (["--gallery", empty, ok], "gallery is empty"),
        (["--gallery", tmp_path / "none.h5", ok], "gallery file not found"),
        (["--gallery", junk, ok], "not a readable HDF5 gallery"),
    ]
    for args, message in cases:
        r = cli("recognize", "--checkpoint", setup["ckpt"], "--out", tmp_path / "o", *args)
        assert r.exit_code == 1, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (message, r.output)
    r = cli("recognize", "--checkpoint", other, "--gallery", gallery, "--out", tmp_path / "o", ok)
    assert r.exit_code == 1 and "enrolled with another model" in r.output
    assert len(r.output.strip().splitlines()) == 1
    # the same architecture with other weights (another run or step) is another model too
    retrained = make_checkpoint(tmp_path / "retrained.pt", seed=1)
    r = cli("recognize", "--checkpoint", retrained, "--gallery", gallery, "--out", tmp_path / "o", ok)
    assert r.exit_code == 1 and "enrolled with another model" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = cli("recognize", "--checkpoint", junk, "--gallery", gallery, ok)
    assert r.exit_code == 1 and "junk.jpg" in r.output


def test_evaluate_writes_report_and_figures(setup, tmp_path):
    gallery = tmp_path / "g.h5"
    r = cli(
        "enroll",
        "--checkpoint",
        setup["ckpt"],
        "--prototypes",
        setup["data"],
        "--out",
        gallery,
        "--calibrate",
        setup["data"],
    )
    assert r.exit_code == 0, r.output
    assert "calibrated on 9 validation images" in r.output
    out = tmp_path / "report"
    r = cli(
        "evaluate",
        "--checkpoint",
        setup["ckpt"],
        "--shards",
        setup["data"],
        "--gallery",
        gallery,
        "--out",
        out,
        "--examples",
        "2",
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["images"] == 9 and rep["gallery_identities"] == 3
    assert len(rep["cmc"]) == 3 and rep["cmc"][-1] == 1.0
    assert np.array(rep["confusion"]).sum() == 9
    for key in (
        "rank1",
        "rank5",
        "rank10",
        "mAP",
        "verification",
        "segmentation",
        "correspondence_error_m",
        "threshold_sweep",
    ):
        assert key in rep
    assert rep["correspondence_error_m"]["pixels"] > 0  # vid.png + the dataset's body model
    for fig in ("cmc", "confusion", "roc", "rate_histograms", "threshold_curve", "part_accuracy"):
        assert (out / rep["figures"][fig]).exists()
    assert len(rep["examples"]) >= 1
    md = (out / "report.md").read_text()
    assert "Rank-1" in md and "![confusion](confusion.png)" in md
