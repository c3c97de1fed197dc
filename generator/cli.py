"""Commands of the generator half: gen-shards, inspect, verify, finalize (also under `protoreg`).

This module never imports bpy: rendering happens in spawned worker processes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import click

from protoreg import dataset as ds

if TYPE_CHECKING:
    from generator.config import GenConfig

DEFAULT_OUT = "shards/default"


def default_workers() -> int:
    """One worker per core (one Cycles thread each): on 2 cores, 2 workers."""
    return max(1, os.cpu_count() or 1)


def config_with_flags(
    config_file: Path | str | None,
    resolution: tuple[int, int] | None = None,
    samples: int | None = None,
    poses: str | None = None,
) -> GenConfig:
    """The generator configuration gen-shards renders with: the YAML file, then the render flags over it.
    Raises ConfigError on a bad file. The demo uses it too, to know what a set folder should hold."""
    from generator.config import load_config

    config = load_config(config_file)
    if resolution is not None:
        config.render.width, config.render.height = resolution
    if samples is not None:
        config.render.samples = samples
    if poses is not None:
        config.pose.poses_glob = poses  # the pose prior mixes these files in; part of the stored config
    return config


class Resolution(click.ParamType):
    """WIDTHxHEIGHT, e.g. 128x256."""

    name = "WxH"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, tuple):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
        if not m:
            self.fail(f"{value!r}: expected WIDTHxHEIGHT in pixels, e.g. 128x256", param, ctx)
        w, h = int(m.group(1)), int(m.group(2))
        if not (8 <= w <= 8192 and 8 <= h <= 8192):
            self.fail(f"{value!r}: width and height must lie in 8..8192 pixels", param, ctx)
        return w, h


class DatasetRoot(click.ParamType):
    """A dataset folder (returned as a Path) or a URL prefix s3:// / http(s):// (returned as text)."""

    name = "DIR|URL"

    def __init__(self, must_exist: bool = False):
        self.must_exist = must_exist

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        from protoreg import storage

        if isinstance(value, Path):
            value = str(value)
        if storage.is_remote(value):
            return str(value).rstrip("/")
        path = Path(value)
        if path.exists() and not path.is_dir():
            self.fail(f"{value}: exists and is not a folder", param, ctx)
        if self.must_exist and not path.is_dir():
            self.fail(
                f"{value}: no such folder (expected a dataset folder or an s3:// / http(s):// URL)",
                param,
                ctx,
            )
        return path


def _fail(message: str) -> None:
    raise click.ClickException(message.splitlines()[0] if message else "failed")


@click.command("gen-shards", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--identities",
    "identities",
    required=True,
    metavar="SPEC",
    help="Who appears: a number N (N identities sampled from the body's shape space with --seed) "
    "or a YAML/JSONL identities file.",
)
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Number of samples to generate.")
@click.option(
    "--out",
    "out",
    type=DatasetRoot(),
    default=DEFAULT_OUT,
    show_default=True,
    help="Output folder, or s3://bucket/prefix (endpoint from PROTOREG_S3_ENDPOINT_URL for S3-compatible "
    "stores). Re-running the same command into it resumes (keeps finished shards); "
    "a folder holding another configuration is refused.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Master seed: sample i depends only on (seed, config, i), whatever the worker count.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Blender worker processes, one Cycles thread each [default: number of CPU cores].",
)
@click.option(
    "--resolution",
    type=Resolution(),
    default=None,
    help="Image size WIDTHxHEIGHT in pixels [default: 128x256, or the config file's render.width/height].",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=None,
    help="Cycles samples per pixel [default: 16, or the config file's render.samples].",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Samples per shard (shard k holds samples k*K .. (k+1)*K-1).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML file setting any generator distribution (pose, appearance, scene, render sections); "
    "unknown keys are errors. The resolved configuration is stored in manifest.json.",
)
@click.option(
    "--body-model",
    type=click.Path(dir_okay=False),
    default=None,
    help="SMPL-format body model file (.npz/.pkl) [default: the embedded default body].",
)
@click.option(
    "--poses",
    default=None,
    metavar="GLOB",
    help="AMASS-style .npz pose files to draw poses from, besides the built-in pose prior.",
)
@click.option(
    "--backgrounds",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of background images (jpg/png/exr/...) used besides procedural backdrops.",
)
@click.option(
    "--task-index",
    type=click.IntRange(min=0),
    default=None,
    help="Job-array task I of --num-tasks T: render only shards k with k % T == I and write their records, "
    "not the manifest (run `protoreg finalize OUT` when all tasks are done) "
    "[default: from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX when set, else 0].",
)
@click.option(
    "--num-tasks",
    type=click.IntRange(min=1),
    default=None,
    help="Number of job-array tasks T [default: SLURM_ARRAY_TASK_COUNT, or PROTOREG_NUM_TASKS, else 1].",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: --workers Blender processes here; ray: one Ray task (one Blender process) per shard.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDR",
    help="Ray cluster to use with --executor ray (e.g. ray://head:10001 or auto) "
    "[default: start a local Ray instance with --workers CPUs].",
)
@click.option(
    "--staging",
    type=click.Path(file_okay=False),
    default=None,
    help="Local folder where shards wait for upload to a remote --out [default: a temporary folder].",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def gen_shards(
    identities: str,
    n: int,
    out: Path,
    seed: int,
    workers: int | None,
    resolution: tuple[int, int] | None,
    samples: int | None,
    shard_size: int,
    config_file: Path | None,
    body_model: str | None,
    poses: str | None,
    backgrounds: str | None,
    task_index: int | None,
    num_tasks: int | None,
    executor: str,
    ray_address: str | None,
    staging: str | None,
    quiet: bool,
) -> None:
    """Render N samples of posed, clothed, lit persons with exact part labels into WebDataset shards.

    Writes OUT/shard-000000.tar ..., manifest.json, prototypes.h5 and wids-index.json
    (format: docs/dataset-format.md). Interrupted runs resume when re-run with the same command.
    """
    from generator.config import ConfigError
    from generator.pipeline import GenerationError, GenRequest
    from generator.scaleout import ScaleOptions, command_without_task_flags, resolve_task, run_generation

    try:
        config = config_with_flags(config_file, resolution, samples, poses)
    except ConfigError as e:
        _fail(str(e))
    request = GenRequest(
        out_dir=out,
        n=n,
        identities=identities,
        seed=seed,
        workers=workers or default_workers(),
        shard_size=shard_size,
        config=config,
        body_model=body_model,
        backgrounds=backgrounds,
        poses=poses,
        progress=not quiet,
        command=command_without_task_flags(),
    )
    from generator.workers import WorkerError

    try:
        index, count = resolve_task(task_index, num_tasks)
        scale = ScaleOptions(index, count, executor, ray_address, staging)
        summary = run_generation(request, scale, echo=click.echo)
    except GenerationError as e:
        _fail(str(e))
    except WorkerError as e:
        click.echo(str(e), err=True)  # the worker's traceback, then a one-line summary
        last = [line for line in str(e).splitlines() if line.strip()][-1]
        _fail(f"generation failed in a worker: {last.strip()} (finished shards are kept; re-run to resume)")
    click.echo(f"{out}: {summary.describe()}")


@click.command("verify")
@click.argument("dataset", type=DatasetRoot(must_exist=True))
@click.option("--no-samples", is_flag=True, help="Check checksums and sizes only, not every sample's schema.")
def verify_cmd(dataset: Path | str, no_samples: bool) -> None:
    """Check every shard's sha256 and size against manifest.json, then every sample's schema.

    DATASET is a folder, s3://bucket/prefix or http(s)://host/path (remote shards are streamed).
    Exits non-zero naming the first bad or missing shard.
    """
    from generator.location import DatasetLocation, verify_location

    try:
        totals = verify_location(DatasetLocation(dataset), check_samples=not no_samples)
    except ds.DatasetFormatError as e:
        _fail(str(e))
    what = "checksums" if no_samples else f"checksums and {totals['samples']} samples"
    click.echo(f"{dataset}: OK ({totals['shards']} shards, {what}, {totals['bytes']} bytes)")


@click.command("finalize")
@click.argument("dataset", type=DatasetRoot(must_exist=True))
def finalize_cmd(dataset: Path | str) -> None:
    """Assemble manifest.json, wids-index.json and DATASET.md from the per-shard records (.records/).

    For shards written by independent job-array tasks (DATASET: a folder or s3://bucket/prefix);
    names every missing shard.
    """
    from generator.scaleout import finalize

    try:
        manifest = finalize(dataset)
    except ds.DatasetFormatError as e:
        _fail(str(e))
    t = manifest["totals"]
    click.echo(f"{dataset}: manifest for {t['shards']} shards, {t['samples']} samples, {t['bytes']} bytes")


@click.command("inspect")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Contact-sheet PNG to write [default: DATASET/contact-sheet.png].",
)
@click.option(
    "--n", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Samples on the sheet."
)
def inspect_cmd(dataset: Path, out: Path | None, n: int) -> None:
    """Write a contact sheet (RGB | part overlay | correspondence colours) and print dataset statistics."""
    from generator.inspect import inspect_dataset

    try:
        stats, sheet = inspect_dataset(dataset, out, n)
    except ds.DatasetFormatError as e:
        _fail(str(e))
    click.echo(stats.describe())
    click.echo(f"contact sheet: {sheet}")
