"""Training objectives (base.py: the interface) and the step callbacks a run keeps: built from the config.

experiment=distill (distill.enabled) trains shortcut + CFG distillation with an EMA of the student;
everything else trains flow matching."""

from __future__ import annotations

from typing import List, Sequence

from magi_train.config.schema import TrainConfig
from magi_train.training.ema import EmaCallback, StepCallback
from magi_train.training.objectives.base import Objective


def build_callbacks(cfg: TrainConfig) -> List[StepCallback]:
    """The optimizer-step callbacks of a run: distillation keeps an EMA of the student."""
    if cfg.distill.enabled:
        return [EmaCallback(cfg.distill.ema_decay, field="distill.ema_decay")]
    return []


def build_objective(cfg: TrainConfig, parallel, cp_impl: str, full_shapes, models: Sequence,
                    callbacks: Sequence[StepCallback], fresh: bool) -> Objective:
    """The run's objective; `fresh`: the run starts at step 0 rather than from a checkpoint (a fresh
    distillation run starts its student as the teacher)."""
    if not cfg.distill.enabled:
        from magi_train.training.objectives.flow_matching import FlowMatching

        return FlowMatching(cfg.diffusion)
    from magi_train.training.objectives.distillation import Distillation

    ema = [cb for cb in callbacks if isinstance(cb, EmaCallback)]
    if len(ema) != 1 or len(models) != 1:
        raise ValueError(f"distillation needs the whole student on each rank (parallel.pp=1, got {len(models)} model "
                         f"chunks) and one EMA callback (got {len(ema)})")
    return Distillation(cfg, parallel, cp_impl, full_shapes, models[0], ema[0], fresh)
