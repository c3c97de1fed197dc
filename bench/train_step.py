"""Training-step throughput: samples/s of one optimisation step (forward, the losses, backward, AdamW) of
the default RegistrationNet on random inputs (no data loading), on CPU and, when present, CUDA.

Usage: python bench/train_step.py [--steps 20] [--batch-size 16] [--device cpu|cuda|all]
Writes its section of docs/benchmarks.md (between <!-- bench:train_step --> markers).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from sections import write_section as write_bench_section  # bench/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
SECTION = "train_step"


def fake_batch(batch: int, hw: tuple[int, int], identities: int, points: int, gen):  # noqa: ANN001
    import torch

    h, w = hw
    parts = torch.randint(0, 15, (batch, h, w), generator=gen)
    return {
        "images": torch.rand(batch, 3, h, w, generator=gen),
        "parts": parts,
        "vid": torch.randint(0, 4000, (batch, h, w), generator=gen),
        "valid": torch.ones(batch, h, w, dtype=torch.bool),
        "rows": torch.randint(0, identities, (batch,), generator=gen),
        "points": torch.randn(identities, points, 3, generator=gen) * 0.4,
        "point_parts": torch.randint(1, 15, (points,), generator=gen),
    }


def measure(device: str, steps: int, batch: int, identities: int, threads: int = 1) -> dict:
    import torch

    if device == "cpu":
        torch.set_num_threads(threads)
    from trainer.config import TrainConfig
    from trainer.loop import make_optimizer, point_sample
    from trainer.losses import registration_losses
    from trainer.models import RegistrationNet, count_parameters, identity_dims, knn_graph

    cfg = TrainConfig()
    dev = torch.device(device)
    model = RegistrationNet(cfg.model).to(dev)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    b = fake_batch(batch, tuple(cfg.model.image_size), identities, cfg.data.max_points, gen)
    b = {k: v.to(dev) for k, v in b.items()}
    vtp = torch.randint(0, cfg.data.max_points, (4000,)).to(dev)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    model.set_point_graph(knn_graph(b["points"].mean(0).cpu(), cfg.model.knn))

    def step() -> None:
        with autocast:
            feats, emb = model(b["images"], b["points"], b["points"], torch.rand_like(b["points"]))
        idx = point_sample(b["points"].shape[1], cfg.loss.points_per_identity, gen).to(dev)
        terms = registration_losses(
            feats, emb[:, idx].float(), b["points"][:, idx], b["point_parts"][idx], b["rows"], b["parts"],
            b["vid"], b["valid"], model.temperature, cfg.loss, gen, vtp, idx, identity_dims(cfg.model),
        )  # fmt: skip
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    )
    return {"device": name, "sps": steps * batch / wall, "ms": 1000 * wall / steps, "cpu_s": cpu,
            "params": count_parameters(model)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--identities", type=int, default=10, help="prototypes encoded per step")
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    import torch

    from trainer.config import TrainConfig

    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    load0 = os.getloadavg()[0]
    rows = [
        measure("cpu", args.steps, args.batch_size, args.identities, t) for t in (1, 2) if "cpu" in devices
    ]
    rows += [measure(d, args.steps, args.batch_size, args.identities) for d in devices if d != "cpu"]
    load1 = os.getloadavg()[0]
    for r in rows:
        print(f"{r['device']}: {r['sps']:.1f} samples/s ({r['ms']:.0f} ms/step)")
    m = TrainConfig().model
    text = [
        "## Training step (`bench/train_step.py`)",
        "",
        f"Default RegistrationNet ({rows[0]['params'] / 1e6:.2f} M parameters, D={m.embed_dim}, input "
        f"{m.image_size[1]}x{m.image_size[0]}), batch {args.batch_size}, {args.identities} prototypes x "
        f"{TrainConfig().data.max_points} points encoded per step, all losses, AdamW; random "
        f"tensors, no data loading; {args.steps} timed steps after 3 warm-up steps. "
        f"torch {torch.__version__}; "
        f"1-minute load average {load0:.1f} before / {load1:.1f} after on {os.cpu_count()} cores "
        "(other jobs slow the CPU rows; with other jobs running, 2 threads lose to 1 because idle OpenMP "
        "threads spin, which is why `threads: 1` is the training default).",
        "",
        "| device | samples/s | ms/step |",
        "|---|---:|---:|",
        *[f"| {r['device']} | {r['sps']:.1f} | {r['ms']:.0f} |" for r in rows],
    ]
    if "cuda" not in devices:
        text += ["", "No GPU was available to this run (the device tool lent none to this task)."]
    if not args.no_write:
        write_bench_section(SECTION, "\n".join(text))
        print(f"wrote section '{SECTION}' of {BENCHMARKS}")


if __name__ == "__main__":
    main()
