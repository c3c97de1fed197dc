"""Which part of the domain shift costs how much: the demo model on one shifted factor at a time.

The demo's shifted test set (configs/demo-shifted-test.yaml) changes five things at once. This bench renders,
for the demo's identities, one small set per factor: the training distribution (configs/demo-train.yaml) with
only that factor's keys taken from the test configuration, plus an in-distribution reference (no factor) and
the full shift (all factors). It then evaluates the demo's checkpoint and gallery on each set and writes the
`shift_factors` section of docs/benchmarks.md (Rank-1 with its 95% interval and part-segmentation IoU).

    python bench/shift_factors.py [--demo demo] [--n 100]     # after `make demo`; about 5 minutes

Each factor's set (with its contact sheet and report) lands in DEMO/shift-factors/<factor>/; sets already
complete are reused.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import require_demo_outputs, write_section  # noqa: E402
from protoreg.demo import CONFIGS, DemoConfig, generate, protoreg_command, run_step  # noqa: E402

SECTION = "shift_factors"

# Which keys of the shifted configuration belong to which factor (section, key prefixes).
FACTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "garments": ("appearance", ("",)),
    "light": ("scene", ("sun_", "sky_", "area_light_", "exposure_ev")),
    "camera": ("scene", ("camera_", "focal_length_mm")),
    "backdrop": ("scene", ("ground_", "backdrop_")),
    "occlusion": ("scene", ("occluder_",)),
}


# Parts of a factor, measured on their own too: which part of the garments or of the light costs.
SUBFACTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "garment-colours": ("appearance", ("top_palette", "bottom_palette", "coat_palette")),
    "garment-patterns": ("appearance", ("pattern_",)),
    "warm-light": ("scene", ("sun_warmth",)),
    "dim-low-light": ("scene", ("sun_strength", "sun_elevation", "sky_", "exposure_ev")),
    "area-lights": ("scene", ("area_light_",)),
}


def covers(spec: tuple[str, tuple[str, ...]], section: str, key: str) -> bool:
    """Whether a (section, key prefixes) entry of FACTORS or SUBFACTORS names this shifted key."""
    sec, prefixes = spec
    return sec == section and any(key.startswith(p) for p in prefixes)


def factor_of(section: str, key: str) -> str:
    """The factor a shifted key belongs to; an unknown key is an error, so no change goes unattributed."""
    for name, spec in FACTORS.items():
        if covers(spec, section, key):
            return name
    raise SystemExit(f"shift_factors: {section}.{key} of the shifted configuration belongs to no factor")


def factor_configs(train: dict, shifted: dict) -> dict[str, dict]:
    """{'none': train, <factor>: train + that factor's shifted keys, 'all': train + every shifted key,
    <subfactor>: train + the subfactor's shifted keys}."""
    out = {"none": copy.deepcopy(train)}
    every = copy.deepcopy(train)
    parts = {}
    for section, values in shifted.items():
        for key, value in values.items():
            name = factor_of(section, key)
            cfg = out.setdefault(name, copy.deepcopy(train))
            cfg.setdefault(section, {})[key] = value
            every.setdefault(section, {})[key] = value
            for sub, spec in SUBFACTORS.items():
                if covers(spec, section, key):
                    parts.setdefault(sub, copy.deepcopy(train)).setdefault(section, {})[key] = value
    out["all"] = every
    out.update(parts)
    return out


def changed_keys(train: dict, cfg: dict) -> list[str]:
    return sorted(
        f"{sec}.{k}"
        for sec, values in cfg.items()
        for k, v in values.items()
        if train.get(sec, {}).get(k) != v
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default=str(ROOT / "demo"), help="the demo folder (after `make demo`)")
    ap.add_argument("--n", type=int, default=100, help="images per factor set")
    ap.add_argument("--seed", type=int, default=4, help="generation seed of the factor sets")
    ap.add_argument("--note", default="", help="a sentence about the run (machine load, ...)")
    args = ap.parse_args()
    demo = Path(args.demo).resolve()
    require_demo_outputs("shift_factors", demo, ("identities.jsonl", "run/checkpoint-last.pt", "gallery.h5"))
    saved = json.loads((demo / "demo-config.json").read_text())
    demo_cfg = DemoConfig(**{k: v for k, v in saved.items() if k in DemoConfig.__dataclass_fields__})
    train = yaml.safe_load((CONFIGS / "demo-train.yaml").read_text()) or {}
    shifted = yaml.safe_load((CONFIGS / "demo-shifted-test.yaml").read_text()) or {}
    root = demo / "shift-factors"
    root.mkdir(exist_ok=True)
    rows = []
    for name, cfg in factor_configs(train, shifted).items():
        cfg_path = root / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        generate(demo, demo_cfg, f"shift-factors/{name}", args.n, args.seed, str(cfg_path))
        report = root / name / "report"
        run_step(
            protoreg_command(
                "evaluate",
                "--checkpoint",
                str(demo / "run" / "checkpoint-last.pt"),
                "--shards",
                str(root / name),
                "--gallery",
                str(demo / "gallery.h5"),
                "--out",
                str(report),
                "--examples",
                "0",
                "--title",
                f"Demo model, shifted factor: {name}",
            ),
            f"evaluate on the '{name}' set",
        )
        rep = json.loads((report / "report.json").read_text())
        rows.append((name, changed_keys(train, cfg), rep))
    write_section(SECTION, render(rows, args, demo_cfg))


def render(rows: list, args: argparse.Namespace, demo_cfg: DemoConfig) -> str:
    lines = [
        "## Shift factors: the demo model on one shifted factor at a time (`bench/shift_factors.py`)",
        "",
        f"The demo's checkpoint and gallery; {args.n} images per set of the demo's {demo_cfg.identities} "
        f"identities (seed {args.seed}, {demo_cfg.resolution}, {demo_cfg.samples} samples). Each set is "
        "configs/demo-train.yaml with only the listed keys taken from configs/demo-shifted-test.yaml; "
        "`none` is an in-distribution reference, `all` the full shift (the test distribution, other images); "
        "the rows after `all` split the garments and the light into their parts. All sets share the seed, so "
        "row for row they show the same people in the same poses. "
        f"Machine: {os.cpu_count()} cores, {platform.machine()}. {args.note}",
        "",
        "| set | keys taken from the shifted configuration | Rank-1 (95% interval) | part IoU |",
        "|---|---|---|---|",
    ]
    for name, keys, rep in rows:
        lo, hi = rep.get("rank1_ci95", [0, 0])
        shown = ", ".join(k.split(".", 1)[1] for k in keys) if keys else "-"
        if name == "all":
            shown = "all of the above"
        lines.append(
            f"| {name} | {shown} | {100 * rep['rank1']:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%) | "
            f"{100 * rep['segmentation']['mean_iou_body']:.1f}% |"
        )
    lines += [
        "",
        f"Chance is {100 / max(demo_cfg.identities, 1):.0f}%. With {args.n} images a Rank-1 is known to "
        "about +-10 points, so only differences larger than that between rows are evidence.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
