"""Worker processes: each spawned worker owns one long-lived renderer and writes whole shards.

Why spawn: bpy must never be imported in a process that forks (facts: deadlock), so the parent never
imports it and workers start fresh interpreters. Each worker builds its renderer once (Blender start-up
and scene building cost about a second) and then renders every shard it takes from a shared task
queue; which worker renders a shard never changes its bytes, because sample i depends only on
(seed, config, i). Workers report per-sample progress and finished shard records through a queue.
"""

from __future__ import annotations

import importlib
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from generator.config import GenConfig
from generator.write import ShardPlan, ShardRecord, encode_sample, write_shard

DEFAULT_BACKEND = "generator.workers:BlenderBackend"


@dataclass
class GenJob:
    """Everything a worker needs, picklable (sent to spawned processes)."""

    out_dir: str
    config: GenConfig
    seed: int
    identities: list[dict[str, Any]]  # Identity.to_json() of each identity, in id order
    body_model: str | None = None  # None = the embedded default body
    backgrounds: str | None = None
    poses: str | None = None
    backend: str = DEFAULT_BACKEND  # "module:attr" of a SampleBackend factory (tests swap in a fake)
    extra: dict[str, Any] = field(default_factory=dict)


class SampleBackend(Protocol):
    """Produces sample i: (RenderedSample-like with rgb/parts/vid/depth, json metadata dict)."""

    def produce(self, index: int) -> tuple[Any, dict[str, Any]]: ...


class BlenderBackend:
    """The real backend: describe_sample (numpy) + one long-lived BlenderRenderer (bpy) per worker."""

    def __init__(self, job: GenJob):
        from generator.render import BlenderRenderer  # imports bpy: only ever inside a spawned worker
        from generator.sample import GenContext
        from protoreg.body import load_body_model
        from protoreg.identities import Identity

        body = load_body_model(job.body_model)
        identities = [Identity.from_json(d) for d in job.identities]
        self.ctx = GenContext(
            config=job.config,
            body=body,
            identities=identities,
            seed=job.seed,
            poses=job.poses,
            backgrounds=job.backgrounds,
        )
        self.renderer = BlenderRenderer(job.config.render, body, job.backgrounds)

    def produce(self, index: int) -> tuple[Any, dict[str, Any]]:
        from generator.sample import describe_sample

        t0 = time.perf_counter()
        spec = describe_sample(index, self.ctx)
        t1 = time.perf_counter()
        rendered = self.renderer.render(spec)
        timings = getattr(rendered, "timings", None)
        if isinstance(timings, dict):
            timings["describe"] = t1 - t0
        return rendered, spec.metadata()

    def close(self) -> None:
        close = getattr(self.renderer, "close", None)
        if close is not None:
            close()


def load_backend(job: GenJob) -> SampleBackend:
    module_name, attr = job.backend.split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(job)


# ---------------------------------------------------------------------------------------------------
# Inside a worker


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its parent (kill -9 of the run): orphans would race a re-run's writers."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _silence_stdout() -> None:
    """Blender prints a line per render ("Saved: ...") to fd 1; it would tear the parent's progress bar.

    Errors still reach stderr, and results travel through the queue.
    """
    try:
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


def _add_timings(total: dict[str, float], timings: dict[str, float]) -> None:
    for key, value in timings.items():
        total[key] = total.get(key, 0.0) + float(value)


def worker_main(worker_id: int, parent_pid: int, job: GenJob, tasks: Any, events: Any) -> None:
    """Spawned process entry: build the backend once, then write every shard taken from `tasks`."""
    _die_with_parent(parent_pid)
    _silence_stdout()
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
        backend = load_backend(job)
        events.put(("ready", worker_id, os.getpid()))
        out_dir = Path(job.out_dir)
        settings = job.config.render
        while True:
            task = tasks.get()
            if task is None:
                break
            plan = ShardPlan(*task)

            stages: dict[str, float] = {}

            def samples(plan: ShardPlan = plan, stages: dict[str, float] = stages):
                for i in range(plan.start, plan.stop):
                    t0 = time.perf_counter()
                    rendered, metadata = backend.produce(i)
                    t1 = time.perf_counter()
                    encoded = encode_sample(i, rendered, metadata, settings)
                    _add_timings(stages, getattr(rendered, "timings", None) or {"produce": t1 - t0})
                    _add_timings(stages, {"encode": time.perf_counter() - t1})
                    yield encoded

            t_shard = time.perf_counter()
            record = write_shard(
                out_dir, plan, samples(), on_sample=lambda i: events.put(("sample", worker_id, i))
            )
            stages["shard_total"] = time.perf_counter() - t_shard
            events.put(("shard", worker_id, record.to_json()))
            events.put(("timing", worker_id, stages))
        close = getattr(backend, "close", None)
        if close is not None:
            close()
        events.put(("done", worker_id, None))
    except BaseException:
        events.put(("error", worker_id, traceback.format_exc()))
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------
# In the parent


class WorkerError(RuntimeError):
    """A worker failed; the message carries its traceback's last line and the shard context."""


def run_workers(
    job: GenJob,
    plans: list[ShardPlan],
    workers: int,
    on_sample: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardRecord], None] | None = None,
    on_ready: Callable[[int], None] | None = None,
    on_timing: Callable[[dict[str, float]], None] | None = None,
) -> list[ShardRecord]:
    """Render and write `plans` with `workers` spawned processes; returns the records in plan order."""
    import multiprocessing as mp

    if not plans:
        return []
    ctx = mp.get_context("spawn")
    tasks = ctx.Queue()
    events = ctx.Queue()
    for p in plans:
        tasks.put((p.index, p.start, p.stop))
    n_proc = max(1, min(workers, len(plans)))
    for _ in range(n_proc):
        tasks.put(None)
    procs = [
        ctx.Process(
            target=worker_main, args=(w, os.getpid(), job, tasks, events), name=f"gen-worker-{w}", daemon=True
        )
        for w in range(n_proc)
    ]
    for p in procs:
        p.start()
    records: dict[int, ShardRecord] = {}
    done = 0
    try:
        while done < n_proc:
            try:
                kind, wid, payload = events.get(timeout=1.0)
            except queue.Empty:
                _check_alive(procs, events)
                continue
            if kind == "sample" and on_sample is not None:
                on_sample(payload)
            elif kind == "ready" and on_ready is not None:
                on_ready(wid)
            elif kind == "timing" and on_timing is not None:
                on_timing(payload)
            elif kind == "shard":
                record = ShardRecord.from_json(payload)
                records[record.index] = record
                if on_shard is not None:
                    on_shard(record)
            elif kind == "done":
                done += 1
            elif kind == "error":
                raise WorkerError(f"worker {wid} failed:\n{payload}")
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
    missing = [p.name for p in plans if p.index not in records]
    if missing:
        raise WorkerError(f"workers finished without writing {', '.join(missing)}")
    return [records[p.index] for p in plans]


def _check_alive(procs: list[Any], events: Any) -> None:
    """A worker that died without reporting (killed, segfault in Blender) is an error, not a hang."""
    for p in procs:
        if p.exitcode is not None and p.exitcode != 0:
            time.sleep(0.2)  # let a last error message arrive
            try:
                kind, wid, payload = events.get_nowait()
                if kind == "error":
                    raise WorkerError(f"worker {wid} failed:\n{payload}")
            except queue.Empty:
                pass
            raise WorkerError(f"{p.name} died with exit code {p.exitcode} (killed or crashed)")
