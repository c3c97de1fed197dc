"""`train-from-shards` (also `protoreg train`): train RegistrationNet from shards. See docs/trainer.md."""

from __future__ import annotations

from pathlib import Path

import click

from trainer.config import ConfigError, TrainConfig, load_config


def _apply_overrides(cfg: TrainConfig, **flags) -> TrainConfig:  # noqa: ANN003
    """Command-line flags win over the config file; unset flags leave the file's values."""
    data_keys = {"shards", "val", "prototypes", "batch_size", "workers"}
    for key, value in flags.items():
        if value is None:
            continue
        if key in data_keys:
            setattr(cfg.data, key, value)
        elif key == "lr":
            cfg.optim.lr = value
        else:
            setattr(cfg, key, value)
    return cfg


@click.command(name="train-from-shards", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--shards",
    "shards",
    default=None,
    help="SPEC of the training data: a dataset folder (its manifest.json names shards and prototypes), "
    "a brace-expanded shard list 'dir/shard-{000000..000009}.tar', or URLs (pipe:, http(s)).",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder (RUN): checkpoint-last.pt, metrics.csv, config.yaml, curves.png, tensorboard/.",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Total optimisation steps (default 1000)."
)
@click.option(
    "--batch-size",
    "batch_size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per step per process (default 16).",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Where to train (default cpu)."
)
@click.option(
    "--resume", is_flag=True, help="Continue from RUN/checkpoint-last.pt (same configuration required)."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML TrainConfig (sections model, data, augment, loss, optim + top-level keys); flags override it.",
)
@click.option(
    "--val", default=None, help="SPEC of a validation set, evaluated every --val-every steps and at the end."
)
@click.option(
    "--prototypes", default=None, help="prototypes.h5 path/URL when SPEC does not tell (e.g. pipe: URLs)."
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Peak AdamW learning rate (default 4e-3).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="DataLoader worker processes per rank (default 2; 0 = load in the training process).",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed of data order, augmentation, init and pixel sampling (default 0).",
)
@click.option(
    "--log-every",
    "log_every",
    type=click.IntRange(min=1),
    default=None,
    help="Write a metrics.csv/TensorBoard row every N steps (default 10).",
)
@click.option(
    "--ckpt-every",
    "ckpt_every",
    type=click.IntRange(min=1),
    default=None,
    help="Write RUN/checkpoint-last.pt every N steps (default 200; always at the end).",
)
@click.option(
    "--val-every",
    "val_every",
    type=click.IntRange(min=0),
    default=None,
    help="Validate every N steps (default 0 = only at the end; needs --val).",
)
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option(
    "--stop-after",
    "stop_after",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after N steps in this invocation (checkpointed); resume later with --resume, "
    "e.g. to split a long run across job time limits. The schedule still spans --steps.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=None,
    help="torch threads of the training process (default 1; 0 = torch's choice).",
)
@click.option(
    "--verify",
    "verify",
    is_flag=True,
    help="Before training, hash every shard of the --shards dataset against its manifest.json "
    "(local, s3://, http(s)://) and stop naming a missing or damaged shard.",
)
@click.option("--no-progress", is_flag=True, help="Hide the tqdm progress bar.")
def train_from_shards(
    shards,
    out,
    steps,
    batch_size,
    device,
    resume,
    config_file,
    val,
    prototypes,
    lr,
    workers,
    seed,  # noqa: ANN001
    log_every,
    ckpt_every,
    val_every,
    compile_,
    stop_after,
    threads,
    verify,
    no_progress,  # noqa: ANN001
) -> None:
    """Train the 2D-3D registration network from WebDataset shards and prototypes.h5.

    Writes RUN/checkpoint-last.pt (atomically, every --ckpt-every steps and at the end), RUN/metrics.csv,
    RUN/config.yaml (resolved), TensorBoard logs and RUN/curves.png. Multi-process: launch with
    `torchrun --nproc_per_node K train-from-shards ...` (gloo on CPU, nccl on CUDA).
    """
    from protoreg.dataset import DatasetFormatError
    from trainer.checkpoint import CheckpointError
    from trainer.data import DataSpecError
    from trainer.loop import TrainError, train
    from trainer.validation import summarize

    try:
        cfg = load_config(config_file) if config_file else TrainConfig()
        if resume and config_file is None and (Path(out) / "config.yaml").exists():
            cfg = load_config(Path(out) / "config.yaml")
        cfg = _apply_overrides(
            cfg,
            shards=shards,
            val=val,
            prototypes=prototypes,
            batch_size=batch_size,
            workers=workers,
            lr=lr,
            steps=steps,
            device=device,
            seed=seed,
            log_every=log_every,
            ckpt_every=ckpt_every,
            val_every=val_every,
            compile=compile_,
            threads=threads,
        )
        if not cfg.data.shards:
            raise click.BadParameter("a SPEC is required (or data.shards in --config)", param_hint="--shards")
        if verify:
            from protoreg.integrity import verify_checksums

            verify_checksums(cfg.data.shards)
        summary = train(cfg, out, resume=resume, stop_after=stop_after, progress=not no_progress)
    except (ConfigError, CheckpointError, DataSpecError, DatasetFormatError, TrainError) as e:
        raise click.ClickException(str(e)) from None
    line = f"done: step {summary['step']}, skipped samples {summary['skipped']}"
    val_line = summarize(summary)
    click.echo(line + (f"; validation: {val_line}" if val_line else ""))


if __name__ == "__main__":  # `torchrun ... -m trainer.cli ...`
    train_from_shards()
