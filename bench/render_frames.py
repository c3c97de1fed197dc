"""Per-frame cost and memory of the renderer: describe -> update -> Cycles -> read EXR -> labels/vid.

Renders N consecutive samples in ONE process with one long-lived BlenderRenderer (as a worker does),
records the time of each step, the resident memory every 50 frames, and the bare render floor (the
same Cycles call on an unchanged scene), then writes a PNG strip of the first frames
(rgb | parts | correspondence) and its figures into docs/benchmarks.md (section bench:render_frames).

    .venv/bin/python bench/render_frames.py --frames 300 --png /tmp/render_check.png
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
from sections import write_section as write_bench_section  # bench/ is on sys.path

REPO = Path(__file__).resolve().parents[1]
SECTION = "render_frames"


def rss_mb() -> float:
    """Current resident set size (MB) from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def vid_picture(vid: np.ndarray, rest: np.ndarray) -> np.ndarray:
    lo, hi = rest.min(0), rest.max(0)
    col = ((rest - lo) / (hi - lo) * 255).astype(np.uint8)
    out = np.zeros(vid.shape + (3,), np.uint8)
    m = vid > 0
    out[m] = col[vid[m].astype(np.int64) - 1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300, help="frames to render in one process")
    ap.add_argument("--width", type=int, default=128, help="image width (pixels)")
    ap.add_argument("--height", type=int, default=256, help="image height (pixels)")
    ap.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel")
    ap.add_argument("--threads", type=int, default=2, help="Cycles threads")
    ap.add_argument("--seed", type=int, default=0, help="run seed")
    ap.add_argument("--png", default="/tmp/render_check.png", help="PNG strip of the first frames")
    ap.add_argument("--strip", type=int, default=6, help="frames in the PNG strip")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from generator.config import GenConfig, RenderSettings
    from generator.sample import GenContext, describe_sample
    from protoreg.body import load_body_model
    from protoreg.identities import sample_identities
    from protoreg.parts import colorize

    torch.set_num_threads(1)
    settings = RenderSettings(
        width=args.width, height=args.height, samples=args.samples, threads_per_worker=args.threads
    )
    config = GenConfig(render=settings)
    body = load_body_model()
    ctx = GenContext(
        config=config, seed=args.seed, identities=sample_identities(8, seed=1, body=body), body=body
    )

    from generator.render import BlenderRenderer  # bpy: imported here, never before forking anything

    t = time.perf_counter()
    renderer = BlenderRenderer(settings, body)
    build_s = time.perf_counter() - t
    rest = np.asarray(body.rest_vertices(np.zeros((1, 1), np.float32)))[0]
    steps = {"describe": [], "update": [], "render": [], "read": [], "post": [], "total": []}
    rss = []
    strip = []
    floor = []  # the same Cycles call on an unchanged scene (no describe, no update, no read-back)
    start = time.perf_counter()
    for i in range(args.frames):
        t0 = time.perf_counter()
        spec = describe_sample(i, ctx)
        t1 = time.perf_counter()
        out = renderer.render(spec)
        t2 = time.perf_counter()
        steps["describe"].append(t1 - t0)
        for k, v in out.timings.items():
            steps[k].append(v)
        steps["total"].append(t2 - t0)
        if i % 5 == 0:  # bare floor, interleaved so it sees the same machine load: re-render, no update
            import bpy

            t = time.perf_counter()
            bpy.ops.render.render(write_still=True)
            floor.append(time.perf_counter() - t)
        if i % 50 == 0 or i == args.frames - 1:
            rss.append((i + 1, rss_mb()))
        if i < args.strip:
            strip.append(np.concatenate([out.rgb, colorize(out.parts), vid_picture(out.vid, rest)], 1))
        if i % 50 == 0:
            print(
                f"frame {i}: total {steps['total'][-1]:.3f}s render {out.timings['render']:.3f}s "
                f"rss {rss_mb():.0f} MB",
                flush=True,
            )
    wall = time.perf_counter() - start - sum(floor)
    if os.path.exists(renderer.exr_path):
        os.remove(renderer.exr_path)
    renderer.close()

    if strip:
        img = np.concatenate(strip, 1)
        Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(args.png)
    med = {k: float(np.median(v)) * 1000 for k, v in steps.items()}
    bare = float(np.median(floor)) * 1000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    overhead = med["describe"] + med["update"] + med["read"] + med["post"]
    lines = [
        "## Renderer per frame (bench/render_frames.py)",
        "",
        f"{args.frames} frames at {args.width}x{args.height}, {args.samples} spp, "
        f"{args.threads} Cycles threads, one process; {platform.machine()}, {os.cpu_count()} cores, "
        f"load average at the end {os.getloadavg()[0]:.1f}. Scene build {build_s:.2f} s.",
        "",
        "| step (median ms) | describe | update | Cycles render + EXR | read EXR | labels + vid | total |",
        "|---|---|---|---|---|---|---|",
        f"| | {med['describe']:.1f} | {med['update']:.1f} | {med['render']:.1f} | {med['read']:.1f} | "
        f"{med['post']:.1f} | {med['total']:.1f} |",
        "",
        f"- Bare render floor (re-render of the unchanged scene, every 5th frame): {bare:.1f} ms; "
        f"end-to-end {args.frames / wall:.2f} images/s; floor / end-to-end = {bare / med['total']:.2f}.",
        f"- Python overhead per frame (describe + update + read + post): {overhead:.1f} ms.",
        "- RSS (MB) by frame: "
        + ", ".join(f"{n}: {m:.0f}" for n, m in rss)
        + f"; growth {rss[-1][1] - rss[0][1]:+.1f} MB; peak {peak:.0f} MB.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        write_bench_section(SECTION, text)


if __name__ == "__main__":
    main()
