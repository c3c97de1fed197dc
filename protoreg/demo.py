"""`make demo`: the whole path on embedded defaults, into demo/ (git-ignored).

1. identities: 10 people sampled from the embedded default body (demo/identities.jsonl), shared by all sets;
2. gen-shards: a training set (configs/demo-train.yaml), a small validation set from the same distribution
   (for calibrating the thresholds) and a SHIFTED test set (configs/demo-shifted-test.yaml: other garment
   colours and patterns, backgrounds, light, camera ranges, more occlusion), with contact sheets;
3. train-from-shards (configs/demo-train-model.yaml);
4. enroll the 10 prototypes into a gallery, calibrated on the validation set;
5. evaluate on the shifted test set: demo/report/report.md with its figures;
6. recognize the scikit-image astronaut photograph (a real person the system never saw).

Steps whose outputs are complete and verified are skipped, so a rerun is fast; `--fresh` starts over.
The clean run fits in 15 minutes on a 2-core machine (timings in demo/timings.json).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@dataclass
class DemoConfig:
    """Sizes of the demo (the defaults fit 15 minutes on 2 cores)."""

    identities: int = 10
    identity_seed: int = 7
    n_train: int = 1500
    n_val: int = 60
    n_test: int = 200
    resolution: str = "64x128"  # the model's input size: rendering bigger would only be downscaled
    samples: int = 16  # Cycles samples per pixel of the shifted test set
    # ... and of the training and validation sets: their render noise is one more augmentation, and at half
    # the samples the training set renders in about 60% of the time, which goes to training instead
    train_samples: int = 8
    shard_size: int = 250  # at most; smaller sets are cut so that every worker gets a shard
    workers: int = 2
    steps: int = 2300
    batch_size: int = 16


def protoreg_command(*args: str) -> list[str]:
    """Run a `protoreg` subcommand with this interpreter (works without the console scripts on PATH)."""
    return [sys.executable, "-c", "import sys; from protoreg.cli import main; sys.exit(main())", *args]


def run_step(cmd: list[str], what: str) -> None:
    click.echo(f"\n== {what}\n$ protoreg {' '.join(cmd[3:])}", err=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise click.ClickException(
            f"demo step '{what}' failed (exit code {proc.returncode}); rerun `make demo` "
            "to continue from the last completed step"
        )


class Timer:
    """Wall-clock seconds per step, written to demo/timings.json."""

    def __init__(self, path: Path):
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, fn, *args) -> None:  # noqa: ANN001
        t = time.perf_counter()
        skipped = fn(*args)
        dt = time.perf_counter() - t
        if not skipped:
            self.times[name] = round(dt, 1)
        else:
            click.echo(f"== {name}: already complete, skipped ({dt:.1f} s to check)", err=True)
        self.path.write_text(json.dumps(self.times, indent=2))


def write_identities(out: Path, cfg: DemoConfig) -> bool:
    """The demo's people, written once so train, validation and test show the same identities."""
    path = out / "identities.jsonl"
    if path.exists():
        return True
    from protoreg.body import load_body_model
    from protoreg.identities import sample_identities, write_identities_jsonl

    body = load_body_model(None)
    write_identities_jsonl(path, sample_identities(cfg.identities, cfg.identity_seed, body))
    return False


def dataset_complete(folder: Path, n: int) -> bool:
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return False
    try:
        data = json.loads(manifest.read_text())
        return int(data.get("totals", {}).get("samples", 0)) >= n
    except (OSError, ValueError):
        return False


def shard_size_for(n: int, cfg: DemoConfig) -> int:
    """At most cfg.shard_size, and small enough that every worker gets a shard (workers take whole shards:
    one 200-image shard would leave the second core idle)."""
    return max(1, min(cfg.shard_size, -(-n // max(1, cfg.workers))))


def move_aside(folder: Path, why: str) -> Path:
    """Rename an outdated output folder (kept, never deleted) so the step runs afresh."""
    stale = folder.with_name(f"{folder.name}-stale-{int(time.time())}")
    folder.rename(stale)
    click.echo(f"== {folder} {why}: moved to {stale}", err=True)
    return stale


def render_samples(cfg: DemoConfig, name: str) -> int:
    """Cycles samples per pixel of a demo set: the training distribution's (train, val) or the test sets'."""
    return cfg.train_samples if name in ("train", "val") else cfg.samples


def requested_fingerprint(out: Path, cfg: DemoConfig, name: str, n: int, seed: int, config: str) -> dict:
    """The fingerprint gen-shards records for this set: what tells a reusable folder from one made with other
    settings (an edited configs/*.yaml, another --n-train)."""
    from generator.cli import Resolution, config_with_flags
    from generator.pipeline import GenRequest, resolve_inputs

    resolution = Resolution().convert(cfg.resolution, None, None)
    gen = config_with_flags(CONFIGS / config, resolution, render_samples(cfg, name))
    request = GenRequest(
        out_dir=out / name,
        n=n,
        identities=str(out / "identities.jsonl"),
        seed=seed,
        workers=cfg.workers,
        shard_size=shard_size_for(n, cfg),
        config=gen,
    )
    return resolve_inputs(request)[2]


def set_aside_if_made_otherwise(folder: Path, wanted: dict) -> None:
    """Move a set made with other settings out of the way (kept, not deleted) so it is generated afresh;
    gen-shards itself would refuse the folder, and a complete one would be silently reused."""
    from generator.write import existing_fingerprint, fingerprint_differences

    stored = existing_fingerprint(folder) if folder.is_dir() else None
    if stored is None:
        return
    differ = fingerprint_differences(stored, wanted)
    if differ:
        move_aside(folder, f"was made with other settings ({', '.join(differ)})")


def generate(out: Path, cfg: DemoConfig, name: str, n: int, seed: int, config: str) -> bool:
    """gen-shards (it resumes by itself and keeps verified shards), then the contact sheet."""
    folder = out / name
    set_aside_if_made_otherwise(folder, requested_fingerprint(out, cfg, name, n, seed, config))
    if dataset_complete(folder, n) and (folder / "contact-sheet.png").exists():
        return True
    run_step(
        protoreg_command(
            "gen-shards",
            "--identities",
            str(out / "identities.jsonl"),
            "--n",
            str(n),
            "--out",
            str(folder),
            "--seed",
            str(seed),
            "--workers",
            str(cfg.workers),
            "--resolution",
            cfg.resolution,
            "--samples",
            str(render_samples(cfg, name)),
            "--shard-size",
            str(shard_size_for(n, cfg)),
            "--config",
            str(CONFIGS / config),
        ),
        f"generate {name} set ({n} images, {config})",
    )
    run_step(protoreg_command("inspect", str(folder), "--n", "16"), f"contact sheet of the {name} set")
    return False


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint the current code can load; -1 when missing, and a checkpoint of an older
    architecture (the model code changed) is moved aside so the demo trains afresh."""
    if not path.exists():
        return -1
    from trainer.checkpoint import CheckpointError, load_model

    try:
        return int(load_model(path)[1]["step"])  # the model is built too: an older architecture fails here
    except (CheckpointError, RuntimeError, KeyError):
        move_aside(path.parent, f"holds {path.name}, which this code cannot load; training afresh")
        return -1


def train(out: Path, cfg: DemoConfig) -> bool:
    run = out / "run"
    ckpt = run / "checkpoint-last.pt"
    step = checkpoint_step(ckpt)
    if step >= cfg.steps:
        return True
    cmd = protoreg_command(
        "train-from-shards",
        "--shards",
        str(out / "train"),
        "--out",
        str(run),
        "--steps",
        str(cfg.steps),
        "--batch-size",
        str(cfg.batch_size),
        "--config",
        str(CONFIGS / "demo-train-model.yaml"),
    )
    if step >= 0:
        cmd.append("--resume")
    run_step(cmd, f"train ({cfg.steps} steps, batch {cfg.batch_size})")
    return False


def _newer(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.stat().st_mtime >= b.stat().st_mtime


def enroll(out: Path, cfg: DemoConfig) -> bool:
    gallery, ckpt = out / "gallery.h5", out / "run" / "checkpoint-last.pt"
    if _newer(gallery, ckpt):
        from trainer.recognition import load_gallery

        if load_gallery(gallery).calibrated:
            return True
    run_step(
        protoreg_command(
            "enroll",
            "--checkpoint",
            str(ckpt),
            "--prototypes",
            str(out / "train"),
            "--out",
            str(gallery),
            "--calibrate",
            str(out / "val"),
        ),
        "enroll the prototypes, calibrate on the validation set",
    )
    return False


def evaluate(out: Path, cfg: DemoConfig) -> bool:
    report = out / "report" / "report.json"
    if _newer(report, out / "gallery.h5"):
        return True
    run_step(
        protoreg_command(
            "evaluate",
            "--checkpoint",
            str(out / "run" / "checkpoint-last.pt"),
            "--shards",
            str(out / "test"),
            "--gallery",
            str(out / "gallery.h5"),
            "--out",
            str(out / "report"),
            "--title",
            "Demo: zero-shot recognition on the shifted test set",
        ),
        "evaluate on the shifted test set",
    )
    return False


def recognize_photo(out: Path, cfg: DemoConfig) -> bool:
    """The astronaut photograph (public domain, shipped with scikit-image), when scikit-image is installed."""
    result = out / "photo" / "astronaut.json"
    if _newer(result, out / "gallery.h5"):
        return True
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        click.echo("== recognize a photograph: scikit-image not installed, skipped", err=True)
        return True
    photo = out / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    run_step(
        protoreg_command(
            "recognize",
            "--checkpoint",
            str(out / "run" / "checkpoint-last.pt"),
            "--gallery",
            str(out / "gallery.h5"),
            str(photo),
            "--out",
            str(out / "photo"),
        ),
        "recognize a real photograph (astronaut)",
    )
    return False


def write_index(out: Path, timings: dict[str, float]) -> Path:
    """demo/README.md: where everything is, with the headline numbers."""
    report = json.loads((out / "report" / "report.json").read_text())
    photo = out / "photo" / "astronaut.json"
    lines = [
        "# protoreg demo",
        "",
        f"Shifted test set: Rank-1 **{100 * report.get('rank1', 0):.1f}%** over {report['images']} images of "
        f"{report['gallery_identities']} identities (chance {100 * report['chance_rank1']:.0f}%), "
        f"mAP {100 * report.get('mAP', 0):.1f}%, EER {100 * report['verification']['eer']:.1f}%.",
        "",
        "- report: [report/report.md](report/report.md)",
        "- training set: [train/contact-sheet.png](train/contact-sheet.png)",
        "- shifted test set: [test/contact-sheet.png](test/contact-sheet.png)",
        "- training curves: [run/curves.png](run/curves.png)",
    ]
    if photo.exists():
        rec = json.loads(photo.read_text())
        lines += [f"- a real photograph: [photo/astronaut.png](photo/astronaut.png) — {rec['justification']}"]
    lines += [
        "",
        "Timings (s): "
        + ", ".join(f"{k} {v}" for k, v in timings.items())
        + f"; total {sum(timings.values()):.0f}",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


@click.command("demo")
@click.option(
    "--out",
    "out",
    default=str(ROOT / "demo"),
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for everything the demo makes.",
)
@click.option("--fresh", is_flag=True, help="Delete the folder first (a clean, timed run).")
@click.option(
    "--steps", type=click.IntRange(1), default=None, help=f"Training steps [default: {DemoConfig.steps}]."
)
@click.option(
    "--n-train",
    type=click.IntRange(1),
    default=None,
    help=f"Training images [default: {DemoConfig.n_train}].",
)
def main(out: str, fresh: bool, steps: int | None, n_train: int | None) -> None:
    """Generate, train, enroll, evaluate and explain, end to end on embedded defaults."""
    cfg = DemoConfig()
    if steps:
        cfg.steps = steps
    if n_train:
        cfg.n_train = n_train
    root = Path(out)
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo-config.json").write_text(json.dumps(asdict(cfg), indent=2))
    timer = Timer(root / "timings.json")
    start = time.perf_counter()
    timer.run("identities", write_identities, root, cfg)
    timer.run("generate_train", generate, root, cfg, "train", cfg.n_train, 1, "demo-train.yaml")
    timer.run("generate_val", generate, root, cfg, "val", cfg.n_val, 2, "demo-train.yaml")
    timer.run("generate_test", generate, root, cfg, "test", cfg.n_test, 3, "demo-shifted-test.yaml")
    timer.run("train", train, root, cfg)
    timer.run("enroll", enroll, root, cfg)
    timer.run("evaluate", evaluate, root, cfg)
    timer.run("recognize_photo", recognize_photo, root, cfg)
    index = write_index(root, timer.times)
    report = json.loads((root / "report" / "report.json").read_text())
    click.echo(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s (this run); "
        f"shifted-test Rank-1 {100 * report.get('rank1', 0):.1f}% "
        f"(chance {100 * report['chance_rank1']:.0f}%)"
    )
    click.echo(f"read {index} -> report {root / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
