"""Checkpoints that load with `torch.load(..., weights_only=True)`: tensors and primitive containers only.

A checkpoint holds the model, optimiser and scheduler states, the step, the RNG states (as tensors), the
resolved training config and two fingerprints: `model_fingerprint` (sha256 of the model config) and
`train_fingerprint` (what a resumed run must share). Galleries store `weights_fingerprint(model)` (the
architecture and every saved tensor) to refuse embeddings from any other checkpoint. Files are written to a
temporary name in the same folder and renamed (atomic).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import (
    ModelConfig,
    TrainConfig,
    config_from_dict,
    fingerprint,
    model_fingerprint,
    to_dict,
    training_identity,
)
from trainer.models import RegistrationNet

CHECKPOINT_FORMAT = "protoreg-train-checkpoint-1"
LAST_NAME = "checkpoint-last.pt"


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another configuration (one-line message)."""


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors (weights_only-safe)."""
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py[1], dtype=torch.int64),
        "python_version": int(py[0]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_pos"]),
            int(state["numpy_gauss"][0]),
            float(state["numpy_gauss"][1]),
        )
    )
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python"].tolist()), None))


def unwrap(model: torch.nn.Module) -> RegistrationNet:
    """The RegistrationNet inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model  # type: ignore[return-value]


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    cfg: TrainConfig,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint atomically: a crash mid-write leaves the previous file intact. `ema`: the
    averaged weights (optim.ema_decay), which inference loads instead of the last step's."""
    path = Path(path)
    net = unwrap(model)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "rng": rng_state(),
        "config": to_dict(cfg),
        "model_config": to_dict(net.config),
        "model_fingerprint": model_fingerprint(net.config),
        "train_fingerprint": fingerprint(training_identity(cfg)),
        "torch_version": str(torch.__version__),
        "extra": extra or {},
        **({} if ema is None else {"ema": {k: v.detach().cpu() for k, v in ema.items()}}),
        "point_graph": net.point_graph
        if net.point_graph is not None
        else torch.zeros(0, 0, dtype=torch.long),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict (weights_only=True); a missing or foreign file gives a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means "not our checkpoint"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable protoreg checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a protoreg training checkpoint (expected format {CHECKPOINT_FORMAT})"
        )
    return state


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two plain config dicts differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += config_differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]


def check_compatible(state: dict[str, Any], cfg: TrainConfig, path: str | Path) -> None:
    """Refuse to resume from a checkpoint written by another configuration (one line naming the key)."""
    if state.get("train_fingerprint") == fingerprint(training_identity(cfg)):
        return
    saved_cfg = config_from_dict(state.get("config", {}), TrainConfig, where=str(path))
    diffs = config_differences(training_identity(saved_cfg), training_identity(cfg))
    first = diffs[0] if diffs else "fingerprint differs"
    more = f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""
    raise CheckpointError(
        f"{path}: checkpoint comes from another configuration ({first}{more}); "
        "use the same config to --resume, or another --out"
    )


def model_from_state(state: dict[str, Any], device: str | torch.device = "cpu") -> RegistrationNet:
    model_cfg = config_from_dict(state["model_config"], ModelConfig, where="checkpoint model_config")
    if state.get("model_fingerprint") != model_fingerprint(model_cfg):
        raise CheckpointError("checkpoint: model_fingerprint does not match its model_config")
    model = RegistrationNet(model_cfg)
    model.load_state_dict(state.get("ema", state["model"]))  # the averaged weights when training kept them
    graph = state.get("point_graph")
    if graph is not None and graph.numel() > 0:
        model.set_point_graph(graph)
    return model.to(device).eval()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the architecture and every saved tensor (weights, normalisation statistics, the fixed point
    graph): what galleries store, so that embeddings enrolled with one checkpoint are never compared with
    pixels embedded by another one, even of the same architecture (another step, another run)."""
    net = unwrap(model)
    h = hashlib.sha256(model_fingerprint(net.config).encode())
    tensors = dict(net.state_dict())
    if net.point_graph is not None:
        tensors["<point_graph>"] = net.point_graph
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model(path: str | Path, device: str = "cpu") -> tuple[RegistrationNet, dict[str, Any]]:
    """(model in eval mode, saved config dict) from a checkpoint; the dict also carries
    'model_fingerprint' (architecture), 'weights_fingerprint' (architecture and weights) and 'step'."""
    state = load_checkpoint(path, map_location=device)
    model = model_from_state(state, device)
    cfg = dict(state["config"])
    cfg["model_fingerprint"] = state["model_fingerprint"]
    cfg["weights_fingerprint"] = weights_fingerprint(model)
    cfg["step"] = state["step"]
    return model, cfg
