"""A tiny model trained for a few seconds on easy data (tests/train_fakes.py: three people who differ in
shape, skin tone and hair colour, in random clothes on random backgrounds) recognises them: the sample
rendered from identity k ranks k first. Uses the real trainer (trainer.loop.train), a real checkpoint,
`protoreg enroll --calibrate` and the Recognizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from protoreg.cli import main as protoreg_main
from tests.train_fakes import write_fake_dataset
from trainer.config import AugmentConfig, DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig

STEPS = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from trainer.loop import train

    root = tmp_path_factory.mktemp("trained")
    data = write_fake_dataset(root / "data", n_identities=3, n_samples=24, hw=(64, 32))
    cfg = TrainConfig(
        model=ModelConfig(embed_dim=16, widths=(8, 16, 16, 24), decoder_width=16, point_widths=(16, 16),
                          point_global=16, knn=8, image_size=(64, 32)),
        data=DataConfig(shards=str(data), batch_size=6, workers=0, shuffle_buffer=24, max_points=128),
        augment=AugmentConfig(enabled=False),
        loss=LossConfig(pixels_per_batch=256),
        optim=OptimConfig(lr=1e-2, warmup_steps=5),
        steps=STEPS, log_every=50, ckpt_every=10_000, threads=1,  # one thread: fast on a busy machine
    )  # fmt: skip
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        train(cfg, root / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    ckpt = root / "run" / "checkpoint-last.pt"
    gallery = root / "gallery.h5"
    r = CliRunner().invoke(protoreg_main, ["enroll", "--checkpoint", str(ckpt), "--prototypes", str(data),
                                           "--out", str(gallery), "--calibrate", str(data)])
    assert r.exit_code == 0, r.output
    return {"data": data, "ckpt": ckpt, "gallery": gallery}


def test_a_sample_rendered_from_identity_k_ranks_k_first(trained):
    from trainer.data import iterate_samples, resolve_spec
    from trainer.recognition import Recognizer, load_gallery
    from trainer.recognition_cli import load_checkpoint, open_gallery_for

    loaded = load_checkpoint(trained["ckpt"])
    gallery = open_gallery_for(loaded, trained["gallery"])
    assert load_gallery(trained["gallery"]).calibrated
    rec = Recognizer(loaded.model, gallery, loaded.input_size)
    hits: dict[str, list[bool]] = {}
    found: list[bool] = []
    for s in iterate_samples(resolve_spec(str(trained["data"])).urls):
        name = s["json"]["identity"]["name"]
        out = rec.recognize(s["rgb"])
        hits.setdefault(name, []).append(out.decision.best == name)
        found.append(len(out.pixels.parts) > 0)
    assert sorted(hits) == ["id0000", "id0001", "id0002"]
    assert np.mean(found) > 0.8  # the person is segmented in most images (bodies are ~25 pixels tall here)
    per_identity = {k: float(np.mean(v)) for k, v in hits.items()}
    assert all(r > 0.5 for r in per_identity.values()), per_identity  # each person: mostly ranked first
    assert np.mean([h for v in hits.values() for h in v]) >= 0.75  # chance is 1/3


def test_recognize_command_explains_a_training_image(trained, tmp_path):
    from PIL import Image

    from trainer.data import iterate_samples, resolve_spec

    sample = next(iterate_samples(resolve_spec(str(trained["data"])).urls))
    img = tmp_path / "person.png"
    Image.fromarray(sample["rgb"]).save(img)
    r = CliRunner().invoke(protoreg_main, ["recognize", "--checkpoint", str(trained["ckpt"]), "--gallery",
                                           str(trained["gallery"]), str(img), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "match strongly" in r.output or "matches strongly" in r.output
    assert (tmp_path / "o" / "person.png").exists() and (tmp_path / "o" / "person.json").exists()


@pytest.mark.parametrize("mirror", [False, True])
def test_the_rates_histograms_give_back_are_the_rates_the_decision_used(trained, mirror):
    # calibration and the threshold curve recompute rates from each image's similarity histogram and pixel
    # count: at the evaluator's own T they must be the rates it decided by (with or without the mirror view)
    from trainer.data import iterate_samples, resolve_spec
    from trainer.evaluation import Evaluator, rates_at
    from trainer.recognition_cli import load_checkpoint, open_gallery_for

    loaded = load_checkpoint(trained["ckpt"])
    gallery = open_gallery_for(loaded, trained["gallery"])
    t = 0.6
    ev = Evaluator(loaded.model, gallery, loaded.input_size, t, 0.0, keep_examples=0, mirror=mirror)
    results = ev.run(iterate_samples(resolve_spec(str(trained["data"])).urls, None, 12))
    assert len(results) == 12
    for r in results:
        np.testing.assert_allclose(rates_at(r.sim_hist, r.n_foreground, t), r.rates, atol=1e-6)
        assert r.rates.max() <= 1.0
