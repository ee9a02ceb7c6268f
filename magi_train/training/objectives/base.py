"""What a training run optimises: the objective interface the trainer is extended through.

The trainer and its batch builder (magi_train/training/batches.py) own the data, the seeds, the noise and
the loss; an objective decides, per sample and per micro-batch, what the model is trained to predict:

    begin_step(step)        per-step state before the step's batch is built (distillation: the step size m)
    begin_eval()            the state validation losses are measured in
    draw(...)               one sample's task, per-chunk times, clean frames and caption dropout
    dense_targets(...)      a dense micro-batch's stage-0 inputs and [target | loss weight] channels, from the
    packed_targets(...)     flow-matching ones the builder made (x_t and v* = x - noise); they may add stage
                            inputs (the step-size embedding input) and replace the target
    scale_flops(flops)      model FLOPs of a step including the target passes (for throughput and MFU)
    metrics()               extra per-step numbers for the log (distillation: step_size)
    state_dict() / load_state_dict()   extra JSON state saved in trainer.json (none so far)

A sample's random draws come from `seed` (a pure function of the run seed, the step and the sample's place
in the global batch), so every parallel layout and every resume sees the same numbers.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from magi_train.data.packed_inputs import PackedItem
from magi_train.diffusion.objective import ObjectiveDraw

Batch = Tuple[Tuple[torch.Tensor, ...], torch.Tensor]  # (stage-0 inputs, [target | weight])


def generator(seed: int) -> torch.Generator:
    """A CPU generator for one stream of draws (seeds may exceed int64: taken mod 2^63)."""
    return torch.Generator().manual_seed(seed % (2**63))


class Objective:
    """The interface (and flow matching's no-op defaults for the hooks that only distillation needs)."""

    def begin_step(self, step: int) -> None:
        pass

    def begin_eval(self) -> None:
        pass

    def draw(self, latent_frames: int, chunk_frames: int, seed: int, fixed_t: Optional[float]) -> ObjectiveDraw:
        raise NotImplementedError

    def dense_targets(self, draws: List[ObjectiveDraw], inputs: Tuple[torch.Tensor, ...],
                      target: torch.Tensor) -> Batch:
        return inputs, target

    def packed_targets(self, items: List[PackedItem], draws: List[ObjectiveDraw], inputs: Tuple[torch.Tensor, ...],
                       target: torch.Tensor) -> Batch:
        return inputs, target

    def scale_flops(self, flops: int) -> int:
        return flops

    def metrics(self) -> Dict[str, float]:
        return {}

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass
