"""Record the demo's zero-shot domain-shift figures (after `make demo`) in docs/benchmarks.md.

Reads demo/report/report.json, demo/timings.json and demo/demo-config.json; writes the `demo_shift`
section: Rank-1/5, mAP, EER, TAR at FAR 1%, segmentation and correspondence quality on the shifted test
set, the thresholds, and how long each demo step took on this machine.

    python bench/demo_shift.py [--demo demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402

SECTION = "demo_shift"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def interval(rep: dict) -> str:
    """' (95% interval a-b)' when the report has Rank-1's Wilson interval."""
    ci = rep.get("rank1_ci95")
    return f" (95% interval {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)" if ci else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default=str(ROOT / "demo"), help="the demo folder")
    ap.add_argument("--note", default="", help="a sentence about the run (machine load, ...)")
    ap.add_argument("--extra", default="", help="a markdown file appended to the section (further runs)")
    args = ap.parse_args()
    demo = Path(args.demo)
    rep = json.loads((demo / "report" / "report.json").read_text())
    times = json.loads((demo / "timings.json").read_text())
    cfg = json.loads((demo / "demo-config.json").read_text())
    v, seg, ce = rep["verification"], rep["segmentation"], rep["correspondence_error_m"]
    lines = [
        "## Demo: zero-shot domain shift (`make demo`, recorded by `bench/demo_shift.py`)",
        "",
        f"{cfg['identities']} identities; {cfg['n_train']} training images (configs/demo-train.yaml), "
        f"{cfg['n_val']} validation images for calibration (same distribution), {rep['images']} SHIFTED test "
        f"images (configs/demo-shifted-test.yaml: other garment colours and patterns, backgrounds, light, "
        f"camera ranges, more occlusion); {cfg['resolution']} renders, the training and validation sets at "
        f"{cfg.get('train_samples', cfg['samples'])} samples, the test set at {cfg['samples']}; "
        f"{cfg['steps']} training steps of batch {cfg['batch_size']} on CPU. "
        f"Machine: {os.cpu_count()} cores, {platform.machine()}. {args.note}",
        "",
        "| shifted test set | value |",
        "|---|---|",
        f"| **Rank-1** (chance {pct(rep['chance_rank1'])}) | **{pct(rep.get('rank1'))}**{interval(rep)} |",
        f"| Rank-5 | {pct(rep.get('rank5'))} |",
        f"| mAP | {pct(rep.get('mAP'))} |",
        f"| verification EER | {pct(v['eer'])} |",
        f"| TAR at FAR 1% | {pct(v['tar_at_far_1pct'])} |",
        f"| confidence threshold T / open-set threshold U (calibrated) | {rep['similarity_threshold']:.3f} / "
        f"{rep['unknown_threshold']:.3f} |",
        f"| answered unknown (all enrolled) | {pct(rep['open_set']['answered_unknown'])} |",
        f"| part segmentation mean IoU (body parts) | {pct(seg['mean_iou_body'])} |",
        f"| correspondence error median, all / corresponding pixels | {ce['median']} m / "
        f"{ce['matched_median']} m |",
        "",
        "Demo step times (s, this run): " + ", ".join(f"{k} {v}" for k, v in times.items())
        + f"; total {sum(times.values()):.0f} s.",
    ]
    if args.extra:
        lines += ["", Path(args.extra).read_text().rstrip()]
    write_section(SECTION, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
