"""gen-shards throughput against the bare-Cycles floor, bytes per sample, and worker memory over a long run.

In one run:
1. the render-only floor: ONE process, 2 Cycles threads, the renderer's scenes of a few samples at the same
   resolution and samples, each rendered again and again with bpy.ops.render.render (no sampling, no passes
   read, no encoding);
2. end to end: the real `gen-shards` command (default 128x256, 16 spp, 2 workers), timed from launch to
   exit, with the resident memory (VmRSS) of each worker process sampled every few seconds;
then writes its section of docs/benchmarks.md (between <!-- bench:gen_throughput --> markers).

    .venv/bin/python bench/gen_throughput.py --n 2000          # the documented run (about 5 minutes)
    .venv/bin/python bench/gen_throughput.py --n 100 --no-write  # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sections import write_section as write_bench_section  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "gen_throughput"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
POLL_S = 2.0


# ----------------------------------------------------------------------------------------------- floor


def floor_main(args: argparse.Namespace) -> None:
    """Child process: bare Cycles on the renderer's scene, 2 threads (prints one JSON line)."""
    import bpy

    from generator.config import GenConfig
    from generator.render import BlenderRenderer
    from generator.sample import GenContext, describe_sample
    from protoreg.body import load_body_model
    from protoreg.identities import resolve_identities

    config = GenConfig()
    config.render.width, config.render.height = args.width, args.height
    config.render.samples = args.samples
    config.render.threads_per_worker = 2
    body = load_body_model(args.body_model)
    identities = resolve_identities("4", 0, body)
    ctx = GenContext(config=config, seed=0, identities=identities, body=body)
    renderer = BlenderRenderer(config.render, body, None)
    specs = [describe_sample(i, ctx) for i in range(args.specs)]
    t = time.perf_counter()
    for (
        spec
    ) in specs:  # the renderer path: scene update + render + EXR read + labels/vid (no sampling/encode)
        renderer.render(spec)
    renderer_path = (time.perf_counter() - t) / len(specs)
    timings = []
    per_spec = max(1, args.frames // len(specs))
    for spec in specs:  # the floor: each sample's scene, set up once, then rendered again and again
        renderer.render(spec)
        for _ in range(per_spec):
            t = time.perf_counter()
            bpy.ops.render.render(write_still=False)
            timings.append(time.perf_counter() - t)
    timings.sort()
    print(
        json.dumps(
            {
                "floor_s_per_image": sum(timings) / len(timings),
                "floor_median_s": timings[len(timings) // 2],
                "renderer_path_s_per_image": renderer_path,
                "frames": len(timings),
            }
        )
    )


def combine_floors(before: dict, after: dict) -> dict:
    """The floor as the mean of the runs before and after the end-to-end run (brackets load changes)."""
    out = {k: (before[k] + after[k]) / 2 for k in ("floor_s_per_image", "renderer_path_s_per_image")}
    out["frames"] = before["frames"] + after["frames"]
    out["runs_images_per_s"] = [1.0 / before["floor_s_per_image"], 1.0 / after["floor_s_per_image"]]
    return out


def run_floor(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_floor", "--frames", str(args.floor_frames)]
    cmd += ["--resolution", f"{args.width}x{args.height}", "--samples", str(args.samples)]
    if args.body_model:
        cmd += ["--body-model", args.body_model]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"floor run failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------ end to end


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            kids.append(int(entry.name))
    return kids


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def is_worker(pid: int) -> bool:
    """A spawned gen-shards worker (not multiprocessing's resource tracker)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def run_end_to_end(args: argparse.Namespace, out: Path, n: int, resolution: str, samples: int) -> dict:
    shard_size = min(1000, math.ceil(n / args.workers))  # every worker gets a shard
    cmd = [
        sys.executable, "-c", "from generator.cli import gen_shards; gen_shards()",
        "--identities", "8", "--n", str(n), "--out", str(out), "--workers", str(args.workers),
        "--resolution", resolution, "--samples", str(samples),
        "--shard-size", str(shard_size), "--quiet",
    ]  # fmt: skip
    if args.body_model:
        cmd += ["--body-model", args.body_model]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    series: dict[int, list[tuple[float, float]]] = {}
    while proc.poll() is None:
        for pid in children(proc.pid):
            if is_worker(pid):
                mb = rss_mb(pid)
                if mb is not None:
                    series.setdefault(pid, []).append((time.perf_counter() - start, mb))
        time.sleep(POLL_S)
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"gen-shards failed ({proc.returncode}):\n{stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "wall_s": wall,
        "images_per_s": n / wall,
        "n": n,
        "resolution": resolution,
        "samples": samples,
        "bytes_per_sample": manifest["totals"]["bytes"] / manifest["totals"]["samples"],
        "shard_size": shard_size,
        "rss": summarise_rss(series, wall),
        "summary": stdout.strip().splitlines()[-1] if stdout.strip() else "",
    }


def _at(points: list[tuple[float, float]], t: float) -> float:
    """RSS of the first sample taken at or after time t."""
    return next((mb for s, mb in points if s >= t), points[-1][1])


def summarise_rss(series: dict[int, list[tuple[float, float]]], wall: float) -> list[dict]:
    """Per worker: RSS warmed up (first sample after 10% of the run and 30 s), at the end, and the peak."""
    out = []
    for pid, points in sorted(series.items()):
        warm = [mb for t, mb in points if t >= max(0.1 * wall, 30.0)] or [points[-1][1]]
        end = [mb for t, mb in points if t >= 0.9 * wall] or [points[-1][1]]
        out.append(
            {
                "pid": pid,
                "samples": len(points),
                "warm_mb": warm[0],
                "end_mb": max(end),
                "peak_mb": max(mb for _, mb in points),
                "growth_mb": max(end) - warm[0],
                "quartiles_mb": [_at(points, q * wall) for q in (0.25, 0.5, 0.75)],
            }
        )
    return out


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"Linux {platform.release()}, Python {platform.python_version()}"
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {system}"


def section_text(args: argparse.Namespace, floor: dict, e2e: dict, mem: dict, load: tuple[float, ...]) -> str:
    floor_ips = 1.0 / floor["floor_s_per_image"]
    ratio = e2e["images_per_s"] / floor_ips
    growth = max((r["growth_mb"] for r in mem["rss"]), default=float("nan"))
    mem_run = f"{mem['n']} images at {mem['resolution']}, {mem['samples']} spp"
    lines = [
        f"<!-- bench:{SECTION} -->",
        "## gen-shards throughput (`bench/gen_throughput.py`)",
        "",
        f"Machine: {machine()}. Load average (1 min / 5 min) before the run: {load[0]:.2f} / {load[1]:.2f}, "
        f"after: {load[2]:.2f} / {load[3]:.2f} (other jobs shared the machine when these exceed about 2).",
        f"Run: `bench/gen_throughput.py --n {args.n}"
        + (f" --rss-n {args.rss_n}" if args.rss_n is not None else "")
        + f"`; {args.width}x{args.height}, "
        f"{args.samples} Cycles samples, "
        f"{args.workers} worker processes x 1 Cycles thread, shards of {e2e['shard_size']}, 8 identities.",
        "",
        "| measure | value |",
        "|---|---|",
        "| render-only floor: bare Cycles, 1 process x 2 threads, the scenes of 6 samples re-rendered "
        f"({floor['frames']} frames, mean of a run before and after the end-to-end run: "
        f"{floor['runs_images_per_s'][0]:.2f} and {floor['runs_images_per_s'][1]:.2f} images/s) "
        f"| {floor_ips:.2f} images/s ({1000 * floor['floor_s_per_image']:.0f} ms/image) |",
        f"| renderer path in that process (scene update + render + EXR read + labels/vid) "
        f"| {1.0 / floor['renderer_path_s_per_image']:.2f} images/s |",
        f"| end to end: `gen-shards --n {args.n}` launch to exit (start-up, sampling, render, encode, write, "
        f"manifest) | {e2e['images_per_s']:.2f} images/s ({e2e['wall_s']:.0f} s) |",
        f"| ratio end-to-end / floor (target >= 0.85) | {ratio:.2f} |",
        "| bytes per sample (rgb.jpg + parts.png + vid.png + json, tar headers) "
        f"| {e2e['bytes_per_sample'] / 1e3:.1f} kB |",
        f"| worker RSS growth over {mem_run}, warmed-up -> end, worst worker (target < 50 MB) "
        f"| {growth:+.1f} MB |",
        "",
        f"Worker memory over {mem_run} ({mem['wall_s']:.0f} s; VmRSS sampled every 2 s):",
        "",
        "| worker | warmed up | 25% | 50% | 75% | end | peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(mem["rss"]):
        q = " | ".join(f"{v:.0f} MB" for v in r["quartiles_mb"])
        lines.append(f"| {k} | {r['warm_mb']:.0f} MB | {q} | {r['end_mb']:.0f} MB | {r['peak_mb']:.0f} MB |")
    lines += ["", f"gen-shards summary (throughput run): `{e2e['summary']}`"]
    if mem is not e2e:
        lines += ["", f"gen-shards summary (memory run): `{mem['summary']}`"]
    lines.append(f"<!-- /bench:{SECTION} -->")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="samples in the end-to-end run")
    p.add_argument("--workers", type=int, default=2, help="gen-shards worker processes")
    p.add_argument("--resolution", default="128x256", help="WIDTHxHEIGHT")
    p.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel")
    p.add_argument(
        "--floor-frames", dest="floor_frames", type=int, default=60, help="frames of the floor run"
    )
    p.add_argument("--frames", type=int, default=60, help=argparse.SUPPRESS)
    p.add_argument("--specs", type=int, default=6, help=argparse.SUPPRESS)
    p.add_argument("--body-model", default=None, help="body model file [default: the embedded default body]")
    p.add_argument(
        "--rss-n",
        type=int,
        default=None,
        help="measure worker memory in a separate run of this many images [default: in the throughput run]",
    )
    p.add_argument("--rss-resolution", default="64x128", help="WIDTHxHEIGHT of the separate memory run")
    p.add_argument("--rss-samples", type=int, default=4, help="Cycles samples of the separate memory run")
    p.add_argument(
        "--no-write", action="store_true", help="print the section instead of writing docs/benchmarks.md"
    )
    p.add_argument("--keep", action="store_true", help="keep the generated dataset (printed path)")
    p.add_argument("--_floor", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.width, args.height = (int(v) for v in args.resolution.lower().split("x"))
    return args


def main() -> None:
    args = parse_args()
    if args._floor:
        floor_main(args)
        return
    load = os.getloadavg()[:2]
    print(f"floor: bare Cycles, {args.floor_frames} frames ...", flush=True)
    floor = run_floor(args)
    print(f"  {1.0 / floor['floor_s_per_image']:.2f} images/s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gen_throughput-"))
    try:
        print(f"end to end: gen-shards --n {args.n} --workers {args.workers} ...", flush=True)
        e2e = run_end_to_end(args, tmp / "dataset", args.n, f"{args.width}x{args.height}", args.samples)
        print(f"  {e2e['images_per_s']:.2f} images/s", flush=True)
        mem = e2e
        if args.rss_n is not None:
            print(f"memory: gen-shards --n {args.rss_n} at {args.rss_resolution}, {args.rss_samples} spp ...")
            mem = run_end_to_end(args, tmp / "memory", args.rss_n, args.rss_resolution, args.rss_samples)
            print(f"  {mem['images_per_s']:.2f} images/s", flush=True)
    finally:
        if args.keep:
            print(f"dataset kept in {tmp / 'dataset'}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("floor again (the machine's load may have changed) ...", flush=True)
    after = run_floor(args)
    print(f"  {1.0 / after['floor_s_per_image']:.2f} images/s", flush=True)
    floor = combine_floors(floor, after)
    load = (*load, *os.getloadavg()[:2])
    text = section_text(args, floor, e2e, mem, load)
    print(text)
    if not args.no_write:
        write_bench_section(SECTION, text)
        print(f"wrote section '{SECTION}' of {BENCHMARKS}")


if __name__ == "__main__":
    main()
