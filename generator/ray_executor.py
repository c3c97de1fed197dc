"""`gen-shards --executor ray`: one Ray task per shard, each running one spawned Blender worker.

Ray schedules and retries; the work inside a task is exactly what a local worker does
(generator.workers.run_workers with one process), so a shard's bytes do not depend on the executor.
A task whose output is remote renders into a temporary folder on its own node and uploads the shard
and then its record, so Ray nodes need no shared filesystem. Ray is imported only here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from generator.workers import GenJob, WorkerError
from generator.write import ShardPlan, ShardRecord

FORWARDED_ENV = ("PROTOREG_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
MAX_RETRIES = 2  # a Ray task is re-run this often when its worker or node dies, or Blender fails


def render_one_shard(job: GenJob, plan: tuple[int, int, int], destination: str | None) -> dict[str, Any]:
    """Body of one Ray task: render and write shard `plan` with one Blender process; returns its record.

    destination None: write straight into job.out_dir (a local or shared folder). Otherwise render into
    a temporary folder and publish to `destination` (s3://...), record last.
    """
    from generator.location import DatasetLocation
    from generator.workers import run_workers

    shard = ShardPlan(*plan)
    if destination is None:
        return run_workers(job, [shard], 1)[0].to_json()
    staging = Path(tempfile.mkdtemp(prefix="protoreg-ray-"))
    try:
        local_job = dataclasses.replace(job, out_dir=str(staging))
        record = run_workers(local_job, [shard], 1)[0]
        DatasetLocation(destination).publish_shard(staging, record)
        return record.to_json()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def start_ray(address: str | None, num_cpus: int) -> bool:
    """Connect to a Ray cluster at `address`, or start a light local instance; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    # Tasks upload to the same S3-compatible endpoint as the driver; credentials stay with each node.
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    runtime_env = {"env_vars": env} if env else None
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env
        )
    return True


def run_ray(
    job: GenJob,
    plans: list[ShardPlan],
    address: str | None,
    num_cpus: int,
    destination: str | None = None,
    on_shard: Callable[[ShardRecord], None] | None = None,
) -> list[ShardRecord]:
    """Map `plans` to Ray tasks (1 CPU each), wait for all; records in plan order.

    Failures are retried MAX_RETRIES times by Ray; a shard that still fails raises WorkerError.
    """
    import ray

    if not plans:
        return []
    started = start_ray(address, num_cpus)
    try:
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=[WorkerError])(
            render_one_shard
        )
        pending = {
            task.remote(job, (p.index, p.start, p.stop), destination): p for p in plans
        }  # fmt: skip
        records: dict[int, ShardRecord] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                plan = pending.pop(ref)
                try:
                    record = ShardRecord.from_json(ray.get(ref))
                except ray.exceptions.RayError as e:
                    cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    raise WorkerError(
                        f"ray task for {plan.name} failed after {MAX_RETRIES} retries: {cause}"
                    ) from None
                records[record.index] = record
                if on_shard is not None:
                    on_shard(record)
        return [records[p.index] for p in plans]
    finally:
        if started:
            ray.shutdown()
