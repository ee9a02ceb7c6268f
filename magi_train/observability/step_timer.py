"""Wall-clock time of a training step, split into phases (data, forward, backward, comm, optimizer).

On a GPU the kernels of a phase run asynchronously, so each phase ends with a device synchronisation
(`trainer.step_timers`; off removes the synchronisations and keeps only the step time). The phases:

* data: building this rank's micro-batches (reading, packing, objective draws, host-to-device copies; with
  distillation also the teacher's / EMA's forward passes that make the targets);
* forward / backward: the model, per micro-batch (with a pipeline the schedule interleaves them, so one
  `forward_backward` phase is reported instead); tensor- and context-parallel communication happens inside
  the layers and is counted here, as are pipeline sends and receives;
* comm: data-parallel gradient reduction and the loss / gradient-norm / stop-flag reductions;
* optimizer: clipping and the sharded AdamW update, including its parameter all-gather.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict

import torch


class StepTimer:
    def __init__(self, device: torch.device, synchronize: bool):
        self.sync = synchronize and device.type == "cuda"
        self.enabled = synchronize
        self.phases: Dict[str, float] = {}

    def reset(self) -> None:
        self.phases = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def record(self) -> Dict[str, float]:
        """{"time/<phase>": seconds} of the step so far."""
        return {f"time/{name}": seconds for name, seconds in self.phases.items()}
