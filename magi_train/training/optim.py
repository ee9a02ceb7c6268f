"""Which parameters AdamW decays (parallel/zero.py builds the optimizer) and a warm-up-then-decay learning
rate that is a pure function of the step."""

from __future__ import annotations

import math

import torch

from magi_train.config.schema import OptimizerConfig


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    # Norm gains, biases, the RoPE frequency bands and the learned null caption are not weights to shrink.
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name or name.endswith("null_caption_embedding")


def lr_at(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to `lr`, then constant or a
    cosine / linear decay to `min_lr` at `decay_steps` (default: the end of training)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    end = cfg.decay_steps if cfg.decay_steps > 0 else max_steps
    span = max(1, end - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    if cfg.decay == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.decay == "linear":
        factor = 1 - progress
    else:
        raise ValueError(f"optimizer.decay={cfg.decay!r} is not one of constant, cosine, linear")
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

