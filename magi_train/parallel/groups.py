"""Process groups, created once by the entry point and passed explicitly to everything that communicates.

megatron-core's `parallel_state` builds the groups (it works as is on CPU with gloo); we hand them on as a
`ProcessGroupCollection` instead of letting modules look them up from its globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from magi_train.config.schema import ParallelConfig


@dataclass
class Parallel:
    groups: ProcessGroupCollection
    rank: int
    world_size: int
    device: torch.device

    @property
    def tp_group(self):
        return self.groups.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    # torchrun / srun export these; they describe the launch, not a behaviour switch.
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(backend: str = "gloo", timeout_minutes: int = 10) -> None:
    """Join the job's process group (torchrun), or form a one-process group when run directly."""
    if dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if _launched_by_torchrun():
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def default_tp_group() -> dist.ProcessGroup:
    """A one-rank tensor-parallel group for single-process use (tests, one-GPU inference).

    megatron-core's linears need a real group even at TP=1 (their reductions assert one). In a
    multi-process job the caller must pass the job's TP group instead: guessing it would be wrong.
    """
    init_distributed()
    if dist.get_world_size() != 1:
        raise ValueError("tp_group must be given explicitly when the job has more than one process")
    return dist.new_group([0])


def init_parallel(cfg: ParallelConfig, backend: str = "gloo") -> Parallel:
    init_distributed(backend)
    world = dist.get_world_size()
    model_parallel = cfg.tensor_parallel * cfg.context_parallel * cfg.pipeline_parallel
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by parallel.tensor_parallel x context_parallel x pipeline_parallel "
            f"= {cfg.tensor_parallel} x {cfg.context_parallel} x {cfg.pipeline_parallel}"
        )
    if cfg.data_parallel not in (-1, world // model_parallel):
        raise ValueError(f"parallel.data_parallel={cfg.data_parallel} but the world of {world} ranks leaves {world // model_parallel}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel,
            pipeline_model_parallel_size=cfg.pipeline_parallel,
            context_parallel_size=cfg.context_parallel,
        )
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Parallel(ProcessGroupCollection.use_mpu_process_groups(), dist.get_rank(), world, device)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
