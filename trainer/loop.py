"""The training loop: AdamW, warm-up + cosine, clipping, bf16 autocast on CUDA, DDP via torchrun,
atomic checkpoints with exact resume, metrics.csv + TensorBoard + curves.png, validation.

Exact resume: the data stream is a pure function of (shards, seed, rank, world, batch size) and
batch b is what step b+1 trains on (see trainer.data), the pixel sampling of step s is seeded by
(seed, rank, s), and the checkpoint holds model, optimiser, scheduler and RNG states. So a run of 2N
steps equals N steps + --resume + N steps (deterministic CPU mode).
"""

from __future__ import annotations

import csv
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from trainer.checkpoint import (
    LAST_NAME,
    CheckpointError,
    check_compatible,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from trainer.config import TrainConfig, save_config
from trainer.data import (
    PrototypeBank,
    ShardStream,
    attach_body_vertices,
    load_prototype_bank,
    make_loader,
    resolve_spec,
    to_device_batch,
)
from trainer.losses import registration_losses
from trainer.models import RegistrationNet, count_parameters, identity_dims, knn_graph

LOSS_TERMS = ("loss", "contrast", "identity", "dense", "seg", "spread", "material")
METRIC_FIELDS = [
    "step",
    *LOSS_TERMS,
    "lr",
    "grad_norm",
    "temperature",
    "samples_per_s",
    "skipped",
    "val_miou",
    "val_part_accuracy",
    "val_vertex_error_m",
    "val_rank1",
]


class TrainError(RuntimeError):
    """A run cannot start or continue; the message is one line."""


def check_material_labels(cfg: TrainConfig, manifest: dict[str, Any] | None) -> None:
    """The material head learns from garments.png: a training set that says it has none would leave the head
    untrained while its masks still feed the colour code."""
    if not cfg.model.material_head or manifest is None:
        return
    if "garments.png" not in manifest.get("sample_entries", []):
        raise TrainError(
            f"--shards {cfg.data.shards}: model.material_head needs garments.png in every sample (generate "
            "with render.write_garments: true), or turn model.material_head off"
        )


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return DistInfo(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    )


def seed_everything(seed: int, rank: int) -> None:
    import random

    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to min_ratio at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model: RegistrationNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; norms, biases and the temperature get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name == "log_temperature" else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total, warm, low = cfg.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, low))


class WeightAverage:
    """Exponential moving average of a model's floating-point state (weights and BatchNorm statistics): a
    smoother model than the last step's, at one lerp per tensor and step. Integer buffers are copied.
    The model's tensors are paired with the average's once: training and `load_state_dict` change them in
    place, so the pairs stay valid for the whole run."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        live = model.state_dict()
        self.state = {k: v.detach().clone() for k, v in live.items()}
        self._floats = [(self.state[k], v.detach()) for k, v in live.items() if v.is_floating_point()]
        self._others = [(self.state[k], v) for k, v in live.items() if not v.is_floating_point()]

    def update(self, step: int) -> None:
        """Fold the weights after `step` optimiser steps into the average."""
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_([a for a, _ in self._floats], [v for _, v in self._floats], weight)
        for a, v in self._others:
            a.copy_(v)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)


def step_generator(seed: int, rank: int, step: int, salt: int = 0x1055) -> torch.Generator:
    """A generator of one step (the loss's pixel sampling by default; another `salt`, another stream): a
    function of the step, so resume replays it."""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, rank, step, salt]).generate_state(1)[0])
    )


def point_sample(n_points: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """The prototype points (same for every identity) that enter this step's similarity matrix."""
    if k <= 0 or k >= n_points:
        return torch.arange(n_points)
    return torch.randperm(n_points, generator=generator)[:k].sort().values


def batch_points(
    bank: PrototypeBank,
    identity: torch.Tensor,
    device: torch.device,
    extra: int = 0,
    generator: torch.Generator | None = None,
):
    """The prototypes of a step: the batch's identities plus up to `extra` others of the bank (all of them
    when it holds fewer, else a random draw), and each image's index among them. The others are pure
    negatives: with 16 images of 10 people a batch shows about 8, and the pixels never met the other two."""
    rows = bank.rows(identity)
    uniq = torch.unique(rows, sorted=True)
    if extra > 0:
        absent = torch.ones(len(bank.names), dtype=torch.bool)
        absent[uniq] = False
        others = absent.nonzero().squeeze(1)
        if len(others) > extra:
            others = others[torch.randperm(len(others), generator=generator)[:extra]]
        uniq = torch.cat([uniq, others]).sort().values
    inverse = torch.searchsorted(uniq, rows)
    return (
        bank.points[uniq].to(device),
        bank.normals[uniq].to(device),
        bank.albedo[uniq].to(device),
        inverse.to(device),
    )


class MetricsLog:
    """RUN/metrics.csv (appending on resume, rows after the resume step dropped) + TensorBoard."""

    def __init__(self, out: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step > 0 and self.path.exists():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = self.path.with_name("metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # noqa: BLE001 - TensorBoard is a convenience, not a requirement
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v != "":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    """Loss terms, learning rate and validation figures against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in LOSS_TERMS:
        axes[0].plot(*series(key), label=key)
    axes[0].set_title("training losses")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot(*series("lr"), label="learning rate")
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    for key in ("val_miou", "val_part_accuracy", "val_rank1"):
        xs, ys = series(key)
        if xs:
            axes[2].plot(xs, ys, marker="o", label=key)
    axes[2].set_title("validation")
    axes[2].set_xlabel("step")
    if axes[2].lines:
        axes[2].legend()
    else:  # say why the panel is empty rather than leave blank axes
        axes[2].text(0.5, 0.5, "no validation set\n(train with --val SPEC)", ha="center", va="center")
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)


def configure_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or continue) training into folder `out`; returns a summary dict."""
    out = Path(out)
    dist = setup_distributed(cfg.device)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device available (use --device cpu)")
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    configure_determinism(cfg, device)
    seed_everything(cfg.seed, dist.rank)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / LAST_NAME

    state = None
    if resume:
        if not ckpt_path.exists():
            raise TrainError(f"--resume: {ckpt_path} not found (nothing to resume)")
        state = load_checkpoint(ckpt_path)
        check_compatible(state, cfg, ckpt_path)
    elif ckpt_path.exists():
        raise TrainError(
            f"{out}: holds a run already ({LAST_NAME}); pass --resume to continue or choose another --out"
        )

    source = resolve_spec(cfg.data.shards, cfg.data.prototypes)
    if not source.prototypes:
        raise TrainError(f"--shards {cfg.data.shards}: cannot tell where prototypes.h5 is; pass --prototypes")
    check_material_labels(cfg, source.manifest)
    bank = load_prototype_bank(source.prototypes, cfg.data.max_points, cache_dir=out / ".cache")
    vt_info = attach_body_vertices(bank, source.manifest)
    if dist.main:
        save_config(cfg, out / "config.yaml")

    model = RegistrationNet(cfg.model).to(device)
    mean_prototype = bank.points.mean(dim=0)  # one topology: the graph and the anchors are set on its mean
    model.set_point_graph(knn_graph(mean_prototype, cfg.model.knn))
    model.set_anchors(mean_prototype)  # a resumed run gets the stored anchors back with the weights
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    step = 0
    skipped_total = 0
    if state is not None:
        model.load_state_dict(state["model"])
    average = WeightAverage(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    if state is not None:
        if average is not None and "ema" in state:  # a checkpoint from before averaging: start it here
            average.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        skipped_total = int(state.get("extra", {}).get("skipped_total", 0))
    if step >= cfg.steps:
        if dist.main:
            print(f"{out}: already at step {step} of {cfg.steps}; nothing to do")
        return {"step": step, "skipped": skipped_total}

    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(model)
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    stream = ShardStream(
        source.urls,
        cfg.data.batch_size,
        tuple(cfg.model.image_size),
        seed=cfg.seed,
        rank=dist.rank,
        world=dist.world,
        start_batch=step,
        shuffle_buffer=cfg.data.shuffle_buffer,
        augment=cfg.augment,
        shard_log_path=str(out / f"shards-rank{dist.rank}.tsv"),
    )
    loader = make_loader(stream, cfg.data.workers)
    log = MetricsLog(out, step, dist.main)
    val_source = resolve_spec(cfg.data.val, "") if cfg.data.val else None
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    if dist.main:
        n_params = count_parameters(model)
        print(
            f"training {n_params / 1e6:.2f} M parameters on {device} x{dist.world}: steps {step}->{end}, "
            f"{len(source.urls)} shards, {len(bank.names)} identities x {bank.num_points} points ({vt_info})"
        )
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    who_dims = identity_dims(model.config)  # the who-half the spread term reads
    bar = tqdm(total=end, initial=step, desc="train", unit="step", disable=not (progress and dist.main))
    window_t, window_n = time.perf_counter(), 0
    last_val: dict[str, float] = {}
    net.train()
    try:
        for batch in loader:
            skipped_total += int(batch["skipped"])
            if batch["images"].shape[0] == 0:
                step += 1  # every sample of this batch was corrupt: the step is spent, position kept
                scheduler.step()
                continue
            batch = to_device_batch(batch, device)  # uint8 -> float in [0,1], labels -> long, on the device
            images = batch["images"]
            extra = cfg.loss.extra_identities
            negatives = step_generator(cfg.seed, dist.rank, step, salt=0x1D5) if extra > 0 else None
            pts, nrm, alb, rows = batch_points(bank, batch["identity"], device, extra, negatives)
            with autocast:
                feats, point_emb = net(images, pts, nrm, alb)
            gen = step_generator(cfg.seed, dist.rank, step)
            idx = point_sample(bank.num_points, cfg.loss.points_per_identity, gen).to(device)
            terms = registration_losses(
                feats,
                point_emb[:, idx].float(),
                pts[:, idx],
                bank.parts.to(device)[idx],
                rows,
                batch["parts"],
                batch["vid"],
                batch["valid"],
                model.temperature,
                cfg.loss,
                gen,
                bank.vertex_to_point,
                idx,
                who_dims,
                batch.get("garments"),
            )
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # the norm before clipping
            optimizer.step()
            scheduler.step()
            step += 1
            if average is not None:
                average.update(step)
            window_n += images.shape[0]
            bar.update(1)
            if not math.isfinite(float(terms["loss"].detach())):
                raise TrainError(f"step {step}: loss is {float(terms['loss'])} (lower --lr?)")
            do_val = val_source is not None and cfg.val_every > 0 and step % cfg.val_every == 0 and step < end
            if step % cfg.log_every == 0 or step == end or do_val:
                now = time.perf_counter()
                row = {
                    "step": step,
                    **{k: round(float(terms[k].detach()), 6) for k in LOSS_TERMS},
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": round(float(grad_norm), 4),
                    "temperature": round(float(model.temperature.detach()), 6),
                    "samples_per_s": round(window_n * dist.world / max(now - window_t, 1e-9), 2),
                    "skipped": skipped_total,
                }
                if do_val or (step == end and val_source is not None):
                    last_val = run_validation(model, val_source, cfg, device, dist, average)
                    row.update(last_val)
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                window_t, window_n = time.perf_counter(), 0
            if step % cfg.ckpt_every == 0 or step == end:
                save_ckpt(ckpt_path, model, cfg, step, optimizer, scheduler, skipped_total, dist, average)
            if step >= end:
                break
    finally:
        bar.close()
        log.close()
    if step < end:
        raise TrainError(f"the data stream ended at step {step} before step {end}")
    if dist.main and (out / "metrics.csv").exists():
        plot_curves(out / "metrics.csv", out / "curves.png")
    if dist.world > 1:
        torch.distributed.barrier()
    return {"step": step, "skipped": skipped_total, **last_val}


def save_ckpt(path: Path, model, cfg, step, optimizer, scheduler, skipped_total: int, dist: DistInfo,  # noqa: ANN001
              average: WeightAverage | None = None) -> None:  # fmt: skip
    if dist.main:
        save_checkpoint(
            path,
            model,
            cfg,
            step,
            optimizer,
            scheduler,
            extra={"skipped_total": int(skipped_total)},
            ema=None if average is None else average.state,
        )
    if dist.world > 1:
        torch.distributed.barrier()


def run_validation(  # noqa: ANN001
    model: RegistrationNet,
    source,
    cfg: TrainConfig,
    device,
    dist: DistInfo,
    average: WeightAverage | None = None,
) -> dict[str, float]:
    """Validation on rank 0 only (others wait at the barrier) of the weights checkpoints give to inference
    (the average, when kept); the model returns to train mode with its own weights."""
    from trainer.validation import validate

    result: dict[str, float] = {}
    if dist.main:
        net = unwrap(model)
        live = None if average is None else {k: v.clone() for k, v in net.state_dict().items()}
        if average is not None:
            net.load_state_dict(average.state)
        net.eval()
        try:
            result = validate(net, source, cfg, device)
        finally:
            if live is not None:
                net.load_state_dict(live)
            net.train()
    if dist.world > 1:
        torch.distributed.barrier()
    return result


__all__ = ["CheckpointError", "TrainError", "lr_factor", "plot_curves", "train"]
