"""Training objectives (base.py: the interface) and the step callbacks a run keeps: built from the config.

experiment=distill (distill.enabled) trains shortcut + CFG distillation with an EMA of the student;
everything else trains flow matching, with an EMA of the weights when trainer.ema_decay > 0."""

from __future__ import annotations

from typing import List, Optional, Sequence

from magi_train.config.schema import TrainConfig
from magi_train.training.ema import EmaCallback, StepCallback
from magi_train.training.objectives.base import Objective


def build_callbacks(cfg: TrainConfig) -> List[StepCallback]:
    """The optimizer-step callbacks of a run: distillation keeps an EMA of the student (distill.ema_decay), any
    other run one when trainer.ema_decay > 0."""
    decay = cfg.trainer.ema_decay
    if cfg.distill.enabled:
        if decay:
            raise ValueError(f"trainer.ema_decay={decay} with distill.enabled: distillation keeps its EMA with "
                             f"distill.ema_decay ({cfg.distill.ema_decay}); set trainer.ema_decay=0 and choose "
                             "the decay with distill.ema_decay")
        return [EmaCallback(cfg.distill.ema_decay, field="distill.ema_decay")]
    if decay:
        return [EmaCallback(decay, field="trainer.ema_decay")]
    return []


def ema_callback(callbacks: Sequence[StepCallback]) -> Optional[EmaCallback]:
    """The run's EMA, if it keeps one."""
    return next((cb for cb in callbacks if isinstance(cb, EmaCallback)), None)


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
