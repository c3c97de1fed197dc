"""Time the body forward (protoreg.body) on the embedded default body and write docs/benchmarks.md's
`body_forward` section.

    .venv/bin/python bench/body_forward.py [--threads N] [--repeats R]

Measures batch 1 and 64, float32, CPU, with the default body's zero pose correctives skipped (as shipped)
and forced on (a dense zero 207 x 3V product), plus the smplx package's SMPL on the same arrays when it
is installed (for comparison only; smplx is never needed).
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

from protoreg.body import DEFAULT_BODY_MODEL, load_body_model

SECTION = "body_forward"
BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _inputs(batch: int, num_betas: int):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, num_betas, generator=gen),
        0.3 * torch.randn(batch, 72, generator=gen),
        torch.randn(batch, 3, generator=gen),
    )


def _smplx_model(batch: int):
    try:
        import smplx
    except ImportError:
        return None
    with np.load(DEFAULT_BODY_MODEL) as npz:
        names = ("v_template", "f", "posedirs", "J_regressor", "weights", "kintree_table")
        arrays = {k: npz[k] for k in names}
        shapedirs = npz["shapedirs"]
    padded = np.zeros((shapedirs.shape[0], 3, 300))
    padded[..., : shapedirs.shape[2]] = shapedirs
    return smplx.SMPL(
        model_path="unused",
        data_struct=smplx.utils.Struct(**arrays, shapedirs=padded),
        num_betas=shapedirs.shape[2],
        vertex_ids={k: 0 for k in ("nose", "reye", "leye", "rear", "lear")},
        use_feet_keypoints=False,
        use_hands=False,
        batch_size=batch,
    )


def _forwards(batch: int, body, forced_on):
    """(name, zero-argument call) of each forward to time at this batch size."""
    betas, pose, transl = _inputs(batch, body.num_betas)
    calls = [
        ("protoreg forward (zero correctives skipped)", lambda: body(betas, pose, transl)),
        ("protoreg forward (zero correctives multiplied)", lambda: forced_on(betas, pose, transl)),
    ]
    reference = _smplx_model(batch)
    if reference is not None:
        calls.append(
            (
                "smplx SMPL, same arrays (reference only)",
                lambda: reference(
                    betas=betas, global_orient=pose[:, :3], body_pose=pose[:, 3:], transl=transl
                ),
            )
        )
    return calls


def measure(repeats: int) -> list[tuple[str, int, float]]:
    body = load_body_model()
    forced_on = _with_forced_correctives(body)
    rows = []
    with torch.no_grad():
        for batch in (1, 64):
            for name, call in _forwards(batch, body, forced_on):
                rows.append((name, batch, _median_ms(call, repeats)))
    return rows


def _with_forced_correctives(body):
    """A copy of `body` that multiplies its (zero) pose correctives instead of skipping them."""
    import copy

    forced = copy.deepcopy(body)
    forced.has_pose_correctives = True
    forced._pose_basis = torch.zeros(207, 3 * body.num_vertices, dtype=body.v_template.dtype)
    return forced


def write_section(rows: list[tuple[str, int, float]], threads: int) -> None:
    body = load_body_model()
    lines = [
        f"<!-- bench:{SECTION} -->",
        "## Body forward (`bench/body_forward.py`)",
        "",
        f"Default body `{body.path.name}` ({body.num_vertices} vertices, K={body.num_betas}), float32, CPU "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} thread(s)); "
        "median of repeated calls under `torch.no_grad()`; 1-minute load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when it ran (other jobs slow every row alike).",
        "",
        "| forward | batch | ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {batch} | {ms:.1f} |" for name, batch, ms in rows]
    lines.append(f"<!-- /bench:{SECTION} -->")
    write_bench_section(SECTION, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per row (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.repeats)
    for name, batch, ms in rows:
        print(f"{name:50s} B={batch:3d} {ms:8.1f} ms")
    write_section(rows, args.threads)
    print(f"wrote section '{SECTION}' of {BENCHMARKS}")


if __name__ == "__main__":
    main()
