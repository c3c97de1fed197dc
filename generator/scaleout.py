"""gen-shards beyond one process: job-array tasks, Ray, and output in object stores.

No home-made scheduler: the engines that exist on clusters run the tasks.
- Job arrays (SLURM, Kubernetes indexed jobs): task I of T renders shards k with k % T == I (a disjoint,
  deterministic split that needs no coordination), writes their records, and leaves the manifest to
  `protoreg finalize DIR` (except when it is the only task).
- Ray: each shard becomes a Ray task running one spawned Blender worker (generator.ray_executor).
- `--out s3://...`: shards are rendered into a local staging folder and uploaded, shard first, record
  last; resuming looks at the remote records.
Every path writes each shard with generator.write.write_shard, so the bytes never depend on how the
work was split. A plain local run keeps using generator.pipeline.generate_dataset.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generator.config import GenConfig
from generator.location import DatasetLocation, finalize_location
from generator.pipeline import (
    GenerationError,
    GenRequest,
    GenSummary,
    claim_output_folder,
    generate_dataset,
    job_for,
    resolve_inputs,
)
from generator.workers import GenJob, run_workers
from generator.write import (
    ShardPlan,
    ShardRecord,
    fingerprint_differences,
    plan_shards,
    remove_stale_temporaries,
)
from protoreg import dataset as ds

EXECUTORS = ("local", "ray")
TASK_FLAGS = ("--task-index", "--num-tasks")


@dataclass
class ScaleOptions:
    """How the work is split and where it runs (gen-shards' cluster flags, resolved)."""

    task_index: int = 0
    num_tasks: int = 1
    executor: str = "local"
    ray_address: str | None = None
    staging: str | None = None  # local folder for shards on their way to a remote --out

    @property
    def only_task(self) -> bool:
        return self.num_tasks == 1


# ---------------------------------------------------------------------------------------------------
# Job arrays


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise GenerationError(f"environment variable {name}={value!r}: expected an integer") from None


def resolve_task(
    task_index: int | None, num_tasks: int | None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """(index, count) of this job-array task: flags first, then SLURM, then Kubernetes, else (0, 1).

    SLURM: index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP, count =
    SLURM_ARRAY_TASK_COUNT (so `--array=1-8` and `--array=0-7` both give indices 0..7).
    Kubernetes indexed jobs set JOB_COMPLETION_INDEX only: the count comes from --num-tasks or
    PROTOREG_NUM_TASKS (set it to the job's `completions`).
    """
    env = os.environ if env is None else env
    index, count, source = task_index, num_tasks, "--task-index" if task_index is not None else None
    if index is None and _env_int(env, "SLURM_ARRAY_TASK_ID") is not None:
        task_id = _env_int(env, "SLURM_ARRAY_TASK_ID") or 0
        lowest = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
        index, source = (task_id - lowest) // step, "SLURM_ARRAY_TASK_ID"
        if count is None:
            count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None and _env_int(env, "SLURM_ARRAY_TASK_MAX") is not None:
            count = ((_env_int(env, "SLURM_ARRAY_TASK_MAX") or 0) - lowest) // step + 1
    for name in ("JOB_COMPLETION_INDEX", "PROTOREG_TASK_INDEX"):
        if index is None and _env_int(env, name) is not None:
            index, source = _env_int(env, name), name
    if count is None:
        count = _env_int(env, "PROTOREG_NUM_TASKS")
    if source is None:
        index = 0
        if count not in (None, 1):
            raise GenerationError(
                f"{count} tasks but no task index: set --task-index (or run as a job array)"
            )
    elif count is None:
        raise GenerationError(
            f"{source}={index} without a task count: set --num-tasks (or PROTOREG_NUM_TASKS)"
        )
    count = 1 if count is None else count
    if count < 1 or not 0 <= index < count:
        raise GenerationError(f"{source}: task index {index} outside 0..{count - 1} (of {count} tasks)")
    return int(index), int(count)


def task_shards(plans: list[ShardPlan], task_index: int, num_tasks: int) -> list[ShardPlan]:
    """Shard k belongs to task k % T: disjoint, covering, deterministic, balanced to within one shard."""
    return [p for p in plans if p.index % num_tasks == task_index]


def command_without_task_flags(argv: list[str] | None = None) -> str:
    """The command line as run, minus the task flags: every task of an array records the same command."""
    args = list(sys.argv if argv is None else argv)
    kept, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in TASK_FLAGS:
            skip = True
            continue
        if i > 0 and any(a.startswith(f + "=") for f in TASK_FLAGS):
            continue
        kept.append(a)
    if kept:
        kept[0] = Path(kept[0]).name
    return shlex.join(kept)


# ---------------------------------------------------------------------------------------------------
# One run


@dataclass
class TaskSummary:
    """What one task of a job array did (it writes no manifest)."""

    task_index: int
    num_tasks: int
    shards: int
    rendered_shards: int
    rendered_samples: int
    seconds: float
    finalize_hint: str

    def describe(self) -> str:
        return (
            f"task {self.task_index} of {self.num_tasks}: {self.shards} shard(s) owned, rendered "
            f"{self.rendered_shards} ({self.rendered_samples} samples) in {self.seconds:.1f} s, "
            f"kept {self.shards - self.rendered_shards}; when every task is done: {self.finalize_hint}"
        )


def run_generation(
    req: GenRequest, opts: ScaleOptions | None = None, echo: Callable[[str], None] = print
) -> GenSummary | TaskSummary:
    """gen-shards with any split, executor and output location; writes DATASET.md when finalised."""
    from generator.card import write_dataset_card

    opts = opts or ScaleOptions()
    check_executor(opts)
    location = DatasetLocation(req.out_dir)
    if opts.only_task and opts.executor == "local" and not location.remote:
        summary = generate_dataset(req, echo=echo)
        write_dataset_card(location)
        return summary
    return _generate_scaled(req, opts, location, echo)


def check_executor(opts: ScaleOptions) -> None:
    """Refuse executor settings that cannot work, before anything is written."""
    if opts.executor not in EXECUTORS:
        raise GenerationError(f"--executor {opts.executor}: expected one of {', '.join(EXECUTORS)}")
    if opts.ray_address and opts.executor != "ray":
        raise GenerationError(f"--ray-address {opts.ray_address}: only used with --executor ray")
    if opts.executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise GenerationError("--executor ray: Ray is not installed (pip install 'protoreg[cluster]')")


def _claim(location: DatasetLocation, fingerprint: dict[str, Any]) -> None:
    """Refuse an output that holds another configuration, before anything is written."""
    if not location.remote:
        claim_output_folder(Path(location.root), fingerprint)
        return
    run = location.read_run_config()
    if run is None:
        if location.exists(ds.MANIFEST_NAME):
            raise GenerationError(
                f"--out {location}: holds a dataset without {ds.RUN_CONFIG_NAME}; choose another prefix"
            )
        return
    differ = fingerprint_differences(run.get("fingerprint", {}), fingerprint)
    if differ:
        raise GenerationError(
            f"--out {location}: holds a dataset made with another configuration (differs in: "
            f"{', '.join(differ)}); choose another prefix or re-run with the same settings"
        )


def _generate_scaled(
    req: GenRequest, opts: ScaleOptions, location: DatasetLocation, echo: Callable[[str], None]
) -> GenSummary | TaskSummary:
    from generator.card import write_dataset_card
    from protoreg.prototypes import write_prototypes

    start = time.perf_counter()
    config = req.config or GenConfig()
    body, identities, fingerprint, run = resolve_inputs(req)
    _claim(location, fingerprint)
    own_staging = location.remote and opts.staging is None
    staging = Path(location.root) if not location.remote else _staging_dir(opts.staging)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        if location.read_run_config() != json.loads(ds.canonical_json(run)):
            location.write_json(ds.RUN_CONFIG_NAME, run)  # tasks of one array share it: the first writes it
        if not location.exists(ds.PROTOTYPES_NAME):
            write_prototypes(staging / ds.PROTOTYPES_NAME, identities, body, seed=req.seed)
            location.put(staging / ds.PROTOTYPES_NAME, ds.PROTOTYPES_NAME)
        plans = plan_shards(req.n, req.shard_size)
        mine = task_shards(plans, opts.task_index, opts.num_tasks)
        todo = [p for p in mine if not location.shard_is_complete(p)]
        if not location.remote:
            remove_stale_temporaries(staging, todo)
        if len(todo) < len(mine):
            echo(f"keeping {len(mine) - len(todo)} finished shard(s); rendering {len(todo)}")
        job = job_for(req, config, run, body, staging)
        _render(job, todo, req, opts, location, staging)
    finally:
        if own_staging:
            shutil.rmtree(staging, ignore_errors=True)
    if not opts.only_task:
        return TaskSummary(
            task_index=opts.task_index,
            num_tasks=opts.num_tasks,
            shards=len(mine),
            rendered_shards=len(todo),
            rendered_samples=sum(p.count for p in todo),
            seconds=time.perf_counter() - start,
            finalize_hint=f"protoreg finalize {location}",
        )
    manifest = finalize_location(location)
    write_dataset_card(location, manifest)
    return GenSummary(
        samples=manifest["totals"]["samples"],
        shards=manifest["totals"]["shards"],
        rendered_samples=sum(p.count for p in todo),
        rendered_shards=len(todo),
        kept_shards=len(plans) - len(todo),
        bytes=manifest["totals"]["bytes"],
        seconds=time.perf_counter() - start,
    )


def _staging_dir(requested: str | None) -> Path:
    if requested:
        return Path(requested)
    return Path(tempfile.mkdtemp(prefix="protoreg-staging-"))


def _render(
    job: GenJob,
    todo: list[ShardPlan],
    req: GenRequest,
    opts: ScaleOptions,
    location: DatasetLocation,
    staging: Path,
) -> list[ShardRecord]:
    """Render `todo` with the chosen executor, publishing each shard as soon as it is finished."""
    from tqdm import tqdm

    if not todo:
        return []
    total = sum(p.count for p in todo)
    with tqdm(total=total, unit="img", desc="rendering", disable=not req.progress, smoothing=0.1) as bar:
        if opts.executor == "ray":
            from generator.ray_executor import run_ray

            return run_ray(
                job,
                todo,
                opts.ray_address,
                num_cpus=req.workers,
                destination=location.root if location.remote else None,
                on_shard=lambda r: bar.update(r.count),
            )

        def publish(record: ShardRecord) -> None:
            if location.remote:
                location.publish_shard(staging, record)

        return run_workers(job, todo, req.workers, on_sample=lambda _i: bar.update(1), on_shard=publish)


# ---------------------------------------------------------------------------------------------------
# Finalize


def finalize(root: str | Path) -> dict[str, Any]:
    """`protoreg finalize`: manifest.json + wids-index.json from the records, then DATASET.md."""
    from generator.card import write_dataset_card

    location = DatasetLocation(root)
    manifest = finalize_location(location)
    write_dataset_card(location, manifest)
    return manifest
