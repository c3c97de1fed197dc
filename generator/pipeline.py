"""One gen-shards run: check inputs, claim the output folder, render the missing shards, finalise.

The order matters for "nothing already written is damaged": every input is resolved and the folder's
existing configuration compared BEFORE anything is written. Resuming is the normal path: shards that
exist and match their record (sha256) are kept, the rest (and stale temporaries) are redone.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from generator.config import GenConfig
from generator.workers import DEFAULT_BACKEND, GenJob, run_workers
from generator.write import (
    ShardPlan,
    existing_fingerprint,
    finalize_dataset,
    fingerprint_differences,
    holds_dataset_files,
    plan_shards,
    remove_stale_temporaries,
    shard_is_complete,
    write_run_config,
)
from protoreg import dataset as ds


class GenerationError(RuntimeError):
    """A one-line, user-facing reason why a run cannot start (bad input, foreign output folder)."""


@dataclass
class GenRequest:
    """What the user asked for (the CLI's flags, resolved)."""

    out_dir: Path
    n: int
    identities: str
    seed: int = 0
    workers: int = 2
    shard_size: int = 1000
    config: GenConfig | None = None
    body_model: str | None = None
    backgrounds: str | None = None
    poses: str | None = None
    backend: str = DEFAULT_BACKEND
    command: str | None = None
    progress: bool = True


@dataclass
class GenSummary:
    samples: int
    shards: int
    rendered_samples: int
    rendered_shards: int
    kept_shards: int
    bytes: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over workers and samples

    @property
    def images_per_second(self) -> float:
        return self.rendered_samples / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.samples} samples in {self.shards} shards, {self.bytes / 1e6:.1f} MB "
            f"({self.bytes / max(self.samples, 1) / 1e3:.1f} kB/sample); rendered {self.rendered_samples} "
            f"samples ({self.rendered_shards} shards, {self.kept_shards} kept) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s"
        ) + self.describe_stages()

    def describe_stages(self) -> str:
        """Worker time per image by stage (why a run is as fast as it is)."""
        n = max(self.rendered_samples, 1)
        order = ("describe", "update", "render", "read", "post", "produce", "encode")
        parts = [f"{k} {1000 * self.stage_seconds[k] / n:.0f}" for k in order if k in self.stage_seconds]
        return f"; worker ms/image: {', '.join(parts)}" if parts else ""


def git_commit() -> str:
    """HEAD of the checkout the generator runs from, or "unknown" (installed copy, no git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def generator_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("protoreg")
    except PackageNotFoundError:
        return "unknown"


def default_command() -> str:
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def list_folder_files(folder: str | None, what: str) -> list[list[Any]] | None:
    """[name, size] of a backgrounds folder's images: part of the fingerprint, cheap to compute."""
    if folder is None:
        return None
    from generator.scene import BackgroundsError, list_backgrounds

    try:
        files = list_backgrounds(str(folder))
    except BackgroundsError as e:
        raise GenerationError(f"{what}: {e}") from None
    return [[Path(f).name, Path(f).stat().st_size] for f in files]


def list_pose_files(pattern: str | None) -> list[list[Any]] | None:
    if pattern is None:
        return None
    import glob

    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise GenerationError(f"poses {pattern}: matches no files")
    return [[os.path.basename(f), os.path.getsize(f)] for f in files]


def resolve_inputs(req: GenRequest) -> tuple[Any, list[Any], dict[str, Any], dict[str, Any]]:
    """Body, identities, fingerprint and run description; raises GenerationError on bad input."""
    from protoreg.body import BodyModelError, load_body_model
    from protoreg.identities import IdentityError, resolve_identities

    config = req.config or GenConfig()
    if req.n < 1:
        raise GenerationError(f"--n {req.n}: expected a positive number of samples")
    if req.shard_size < 1:
        raise GenerationError(f"--shard-size {req.shard_size}: expected a positive number of samples")
    backgrounds = list_folder_files(req.backgrounds, "--backgrounds")
    poses = list_pose_files(req.poses or getattr(config.pose, "poses_glob", None))
    try:
        body = load_body_model(req.body_model)
    except BodyModelError as e:
        raise GenerationError(str(e)) from None
    try:
        identities = resolve_identities(req.identities, req.seed, body)
    except (IdentityError, OSError) as e:
        raise GenerationError(str(e)) from None
    body_info = {
        "file": Path(body.path).name,
        "path": str(Path(body.path).resolve()),
        "sha256": body.sha256,
        "num_vertices": int(body.num_vertices),
        "num_betas": int(body.num_betas),
    }
    ident_json = [i.to_json() for i in identities]
    fingerprint = {
        "config": config.to_dict(),
        "seed": int(req.seed),
        "n": int(req.n),
        "shard_size": int(req.shard_size),
        "identities": ident_json,
        "body_model": {"file": body_info["file"], "sha256": body_info["sha256"]},
        "backgrounds": backgrounds,
        "poses": poses,
        "format_version": ds.FORMAT_VERSION,
    }
    run = {
        "fingerprint": fingerprint,
        "generator": {"name": "protoreg", "version": generator_version(), "git_commit": git_commit()},
        "command": req.command or default_command(),
        "body_model": body_info,
        "identities": ident_json,
    }
    return body, identities, ds.to_jsonable(fingerprint), ds.to_jsonable(run)


def job_for(req: GenRequest, config: GenConfig, run: dict[str, Any], body: Any, out_dir: Path) -> GenJob:
    """What every worker of this request needs to render into `out_dir` (local runs and job arrays alike)."""
    return GenJob(
        out_dir=str(out_dir),
        config=config,
        seed=req.seed,
        identities=run["identities"],
        body_model=str(body.path) if req.body_model is not None else None,
        backgrounds=req.backgrounds,
        poses=req.poses,
        backend=req.backend,
    )


def claim_output_folder(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a folder that holds another configuration's dataset; touch nothing when refusing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GenerationError(f"--out {out_dir}: exists and is not a folder")
    if not out_dir.exists():
        return
    stored = existing_fingerprint(out_dir)
    if stored is None:
        if holds_dataset_files(out_dir):
            raise GenerationError(
                f"--out {out_dir}: holds shards of an unknown configuration (no {ds.RUN_CONFIG_NAME}); "
                "choose another folder"
            )
        return
    differ = fingerprint_differences(stored, fingerprint)
    if differ:
        raise GenerationError(
            f"--out {out_dir}: holds a dataset made with another configuration (differs in: "
            f"{', '.join(differ)}); choose another folder or re-run with the same settings"
        )


def generate_dataset(req: GenRequest, echo: Callable[[str], None] = print) -> GenSummary:
    """Run gen-shards: resume-safe, deterministic; returns what was done."""
    from protoreg.prototypes import write_prototypes

    out_dir = Path(req.out_dir)
    config = req.config or GenConfig()
    body, identities, fingerprint, run = resolve_inputs(req)
    claim_output_folder(out_dir, fingerprint)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(out_dir, run)
    if not (out_dir / ds.PROTOTYPES_NAME).exists():
        write_prototypes(out_dir / ds.PROTOTYPES_NAME, identities, body, seed=req.seed)
    plans = plan_shards(req.n, req.shard_size)
    todo = [p for p in plans if not shard_is_complete(out_dir, p)]
    remove_stale_temporaries(out_dir, todo)
    if len(todo) < len(plans):
        echo(f"keeping {len(plans) - len(todo)} verified shard(s); rendering {len(todo)}")
    if 0 < len(todo) < req.workers:
        echo(
            f"note: {len(todo)} shard(s) to render for {req.workers} workers; workers take whole shards, "
            "so a smaller --shard-size would keep all of them busy"
        )
    job = job_for(req, config, run, body, out_dir)
    stages: dict[str, float] = {}
    rendered = _render_with_progress(job, todo, req.workers, req.progress, stages)
    remove_stale_temporaries(out_dir, plans)  # writers killed just before this run may have been alive then
    manifest = finalize_dataset(out_dir)
    summary = GenSummary(
        samples=manifest["totals"]["samples"],
        shards=manifest["totals"]["shards"],
        rendered_samples=sum(p.count for p in todo),
        rendered_shards=len(rendered),
        kept_shards=len(plans) - len(todo),
        bytes=manifest["totals"]["bytes"],
        seconds=time.perf_counter() - start,
        stage_seconds=stages,
    )
    return summary


def _render_with_progress(
    job: GenJob, todo: list[ShardPlan], workers: int, progress: bool, stages: dict[str, float] | None = None
) -> list[Any]:
    from tqdm import tqdm

    total = sum(p.count for p in todo)
    if not todo:
        return []
    started: list[int] = []

    def ready(_worker: int) -> None:
        if not started:  # rate and ETA count from the first ready worker, not from Blender's start-up
            bar.reset(total=total)
            bar.set_description("rendering")
        started.append(_worker)

    with tqdm(total=total, unit="img", desc="starting workers", disable=not progress, smoothing=0.1) as bar:

        def add(timings: dict[str, float]) -> None:
            for key, value in timings.items():
                if stages is not None:
                    stages[key] = stages.get(key, 0.0) + value

        return run_workers(
            job, todo, workers, on_sample=lambda _i: bar.update(1), on_ready=ready, on_timing=add
        )
