"""Loader throughput: decoded + augmented samples/s of the trainer's shard stream (2 workers, 128x256 shards).

Usage: python bench/loader_throughput.py [--shards SPEC] [--workers 2] [--batches 60]
Without --shards it writes a 256-sample dataset of 128x256 splat renders (tests/train_fakes.py) to a
temporary folder. Writes its section of docs/benchmarks.md (between <!-- bench:loader_throughput --> markers).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from sections import write_section as write_bench_section  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
SECTION = "loader_throughput"


def measure(urls: list[str], workers: int, batches: int, out_hw: tuple[int, int], batch_size: int) -> float:
    from trainer.config import AugmentConfig
    from trainer.data import ShardStream, make_loader

    stream = ShardStream(urls, batch_size, out_hw, seed=0, shuffle_buffer=64, augment=AugmentConfig())
    n, t0 = 0, None
    for i, b in enumerate(make_loader(stream, workers)):
        if i == 4:  # workers started and prefetch queues warm
            t0, n = time.perf_counter(), 0
        n += len(b["keys"])
        if i == 4 + batches:
            break
    return n / (time.perf_counter() - t0)


def cpu_rate(urls: list[str], batches: int, out_hw: tuple[int, int], batch_size: int) -> float:
    """Samples per CPU-second of the whole per-sample path in this process (workers=0): unlike wall time
    this hardly depends on other jobs, and x cores estimates an unloaded machine's ceiling."""
    import torch

    from trainer.config import AugmentConfig
    from trainer.data import ShardStream

    torch.set_num_threads(1)
    it = iter(ShardStream(urls, batch_size, out_hw, seed=0, shuffle_buffer=64, augment=AugmentConfig()))
    next(it)
    n, c0 = 0, time.process_time()
    for _ in range(batches):
        n += len(next(it)["keys"])
    return n / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", default="", help="dataset SPEC (default: a temporary 128x256 fake dataset)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--describe", default="", help="words for the data in the section (default: the SPEC)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    import torch

    from trainer.data import resolve_spec

    tmp = None
    if args.shards:
        spec, origin = args.shards, args.describe or f"`{args.shards}`"
    else:
        from tests.train_fakes import write_fake_dataset

        tmp = tempfile.TemporaryDirectory()
        spec = str(
            write_fake_dataset(
                Path(tmp.name) / "ds", n_identities=10, n_samples=256, shard_size=32, hw=(256, 128)
            )
        )
        origin = "256 synthetic 128x256 splat renders (tests/train_fakes.py), 8 shards"
    urls = resolve_spec(spec).urls
    load0 = os.getloadavg()[0]
    rows = []
    for out_hw in ((256, 128), (128, 64)):
        sps = measure(urls, args.workers, args.batches, out_hw, args.batch_size)
        cpu = cpu_rate(urls, max(4, args.batches // 3), out_hw, args.batch_size)
        rows.append((out_hw, sps, cpu))
        size = f"{out_hw[1]}x{out_hw[0]}"
        print(f"output {size}: {sps:.0f} samples/s ({args.workers} workers), {cpu:.0f} per CPU-s")
    load1 = os.getloadavg()[0]
    text = [
        "## Loader throughput (`bench/loader_throughput.py`)",
        "",
        f"Data: {origin}. Decoding with SAFE_DECODERS, full augmentation (JPEG re-compression per sample "
        "with its probability; random resized crop, colour jitter, blur, noise and erasing vectorised per "
        f"batch in torch), {args.workers} DataLoader workers, "
        f"batch {args.batch_size}, "
        f"{args.batches} batches after 4 warm-up batches. CPU: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; 1-minute load average {load0:.1f} before / {load1:.1f} after "
        "(other jobs on the machine slow every row alike). Target: >= 1,500 samples/s.",
        "",
        "| output size (W x H) | samples/s (wall, 2 workers) | samples per CPU-second (1 process) |",
        "|---|---:|---:|",
        *[f"| {hw[1]}x{hw[0]} | {sps:.0f} | {cpu:.0f} |" for hw, sps, cpu in rows],
        "",
        "Wall figures depend on what else runs; samples per CPU-second x 2 cores is the unloaded ceiling "
        "(every worker also parses the tar headers of the batches it skips).",
    ]
    if not args.no_write:
        write_bench_section(SECTION, "\n".join(text))
        print(f"wrote section '{SECTION}' of {BENCHMARKS}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
