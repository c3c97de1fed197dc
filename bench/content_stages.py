"""Time the generator's content stages (pose prior, outfit sampling, dressing) on the default body and write
docs/benchmarks.md's `content_stages` section.

These stages run once per sample beside the render, so each must stay at a few milliseconds for gen-shards to
reach 0.85 of the bare render speed. CPU time (time.process_time) is reported beside wall time, because the
shared 2-core machine is often busy with other jobs and wall time then measures the queue, not the code.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sections import write_section as write_bench_section  # bench/ is on sys.path

from generator.appearance import AppearanceConfig, Dresser, sample_outfit
from generator.pose import PoseConfig, PosePrior
from protoreg.body import load_body_model
from protoreg.identities import resolve_identities

SECTION = "content_stages"
BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _timed(fn, *args):
    """(result, CPU ms, wall ms) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn(*args)
    return result, (time.process_time() - c0) * 1000, (time.perf_counter() - w0) * 1000


def measure(n: int, seed: int) -> dict[str, np.ndarray]:
    body = load_body_model()
    identities = resolve_identities("8", seed, body)
    prior = PosePrior(PoseConfig(), body)
    t0 = time.process_time()
    dresser = Dresser(body, AppearanceConfig())
    setup_ms = (time.process_time() - t0) * 1000
    surfaces = []
    with torch.no_grad():
        for ident in identities:
            prior.geometry(np.asarray(ident.betas))  # first-use cost per shape, measured separately below
            betas = torch.as_tensor(np.asarray(ident.betas, np.float32)[None])
            v = body.forward(betas=betas, pose=torch.zeros(1, 72)).vertices
            surfaces.append(
                (body.rest_vertices(betas)[0].numpy(), v[0].numpy(), body.vertex_normals(v)[0].numpy())
            )
    times: dict[str, list] = {"pose": [], "outfit": [], "dress": []}
    tries = []
    cfg = AppearanceConfig()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        k = i % len(identities)
        ident = identities[k]
        _, *t = _timed(prior.sample, rng, np.asarray(ident.betas))
        times["pose"].append(t)
        tries.append(prior.last_tries)
        outfit, *t = _timed(sample_outfit, rng, cfg)
        times["outfit"].append(t)
        rest, posed, normals = surfaces[k]
        _, *t = _timed(dresser.dress, outfit, ident, rng, rest, posed, normals)
        times["dress"].append(t)
    t0 = time.process_time()
    prior.geometry(np.full(body.num_betas, 0.37))
    geometry_ms = (time.process_time() - t0) * 1000
    out = {k: np.array(v) for k, v in times.items()}
    out["tries"] = np.array(tries)
    out["setup_ms"] = np.array([setup_ms])
    out["geometry_ms"] = np.array([geometry_ms])
    return out


def write_section(r: dict[str, np.ndarray], n: int) -> None:
    body = load_body_model()
    lines = [
        f"<!-- bench:{SECTION} -->",
        "## Content stages: pose, outfit, dressing (`bench/content_stages.py`)",
        "",
        f"Default body `{body.path.name}` ({body.num_vertices} vertices), {n} samples over 8 identities, "
        f"CPU ({platform.processor() or platform.machine()}); 1-minute load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when it ran (wall time includes waiting for a "
        "core; CPU time does not).",
        "",
        "| call | CPU ms median | CPU ms p90 | wall ms median |",
        "|---|---:|---:|---:|",
    ]
    names = {"pose": "`PosePrior.sample`", "outfit": "`sample_outfit`", "dress": "`Dresser.dress`"}
    for key, label in names.items():
        cpu, wall = r[key][:, 0], r[key][:, 1]
        lines.append(
            f"| {label} | {np.median(cpu):.2f} | {np.percentile(cpu, 90):.2f} | {np.median(wall):.2f} |"
        )
    lines += [
        "",
        f"Pose proposals per sample: mean {r['tries'].mean():.2f}, max {int(r['tries'].max())} "
        f"(collision rejections). Once per process: `Dresser(...)` {r['setup_ms'][0]:.0f} ms CPU; "
        f"first pose of a new body shape (rest joints, capsule radii) {r['geometry_ms'][0]:.0f} ms CPU.",
        f"<!-- /bench:{SECTION} -->",
    ]
    write_bench_section(SECTION, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="samples to time")
    parser.add_argument("--seed", type=int, default=0, help="seed of identities and samples")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = measure(args.n, args.seed)
    for key in ("pose", "outfit", "dress"):
        cpu, wall = np.median(r[key][:, 0]), np.median(r[key][:, 1])
        print(f"{key:8s} CPU median {cpu:.2f} ms, wall median {wall:.2f} ms")
    write_section(r, args.n)
    print(f"wrote section '{SECTION}' of {BENCHMARKS}")


if __name__ == "__main__":
    main()
