"""Process groups, created once by the entry point and passed explicitly to everything that communicates.

The grid is megatron-core's `HyperCommGrid` in the order tp-cp-pp-dp: tensor-parallel ranks are
neighbours (the heaviest traffic stays inside a node), data-parallel ranks the farthest apart. Its groups
are handed on as a `ProcessGroupCollection`; no module looks them up from globals.

    rank = tp_rank + tp * (cp_rank + cp * (pp_rank + pp * dp_rank))
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from magi_train.config.schema import ParallelConfig

if TYPE_CHECKING:
    from magi_train.mcore import ProcessGroupCollection

# The groups of every layout, and the megatron-core group combinations they are made from.
_GROUP_DIMS = {"tp": "tp", "cp": "cp", "pp": "pp", "dp": "dp",
               # Gradients are summed over data and context parallel ranks alike (both see different tokens).
               "dp_cp": ["cp", "dp"], "tp_cp": ["tp", "cp"], "mp": ["tp", "cp", "pp"],
               # fp8 amax reduction (megatron's choice): every rank of one pipeline stage.
               "tp_dp_cp": ["tp", "cp", "dp"]}


def _build_groups(sizes: list, backend: str) -> ProcessGroupCollection:
    from magi_train.mcore import HyperCommGrid, ProcessGroupCollection

    # HyperCommGrid logs one INFO line per group it makes, on every rank: chatter, not information.
    logging.getLogger("megatron.core.hyper_comm_grid").setLevel(logging.WARNING)
    grid = HyperCommGrid(sizes, ["tp", "cp", "pp", "dp"], backend=backend)
    return ProcessGroupCollection(**{name: grid.create_pg(dims) for name, dims in _GROUP_DIMS.items()})


class OneProcessGroups:
    """The groups of a one-process job, made when one is first asked for.

    A single process (one-GPU inference, `python train.py`) needs no group to generate: its layers never
    communicate. Making the grid eagerly would import megatron-core (1 s) into every such start-up. Deferring
    it is safe only here: creating a group is collective over the world, and with one process nobody waits.
    The made collection is kept, so every caller gets the same group objects."""

    def __init__(self, make: Callable[[], ProcessGroupCollection]) -> None:
        self._make = make
        self._made = None

    def __getattr__(self, name: str):
        if name.startswith("_"):  # the instance's own fields, before __init__ set them (copy, pickle)
            raise AttributeError(name)
        if self._made is None:
            self._made = self._make()
        return getattr(self._made, name)


@dataclass
class Parallel:
    groups: ProcessGroupCollection  # or OneProcessGroups: the same attributes
    rank: int
    world_size: int
    device: torch.device
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False

    @property
    def tp_group(self):
        return self.groups.tp

    @property
    def cp_group(self):
        return self.groups.cp if self.cp > 1 else None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def pp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.pp)

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


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


def check_world(cfg: ParallelConfig, world: int) -> int:
    """The data-parallel size the world leaves, or a ValueError naming the fields that do not fit."""
    model_parallel = cfg.tp * cfg.cp * cfg.pp
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by parallel.tp x parallel.cp x parallel.pp "
            f"= {cfg.tp} x {cfg.cp} x {cfg.pp} = {model_parallel}"
        )
    dp = world // model_parallel
    if cfg.dp not in (-1, dp):
        raise ValueError(f"parallel.dp={cfg.dp} but the world of {world} ranks with tp x cp x pp = {model_parallel} leaves {dp}")
    return dp


def init_parallel(cfg: ParallelConfig, backend: str | None = None) -> Parallel:
    backend = resolve_backend(backend or cfg.backend)
    if backend == "nccl":
        # torchrun's LOCAL_RANK says which GPU of the node this process drives.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed(backend)
    world = dist.get_world_size()
    dp = check_world(cfg, world)
    sizes = [cfg.tp, cfg.cp, cfg.pp, dp]
    groups = OneProcessGroups(lambda: _build_groups(sizes, backend)) if world == 1 else _build_groups(sizes, backend)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Parallel(groups, dist.get_rank(), world, device, tp=cfg.tp, cp=cfg.cp, pp=cfg.pp, dp=dp,
                    sequence_parallel=cfg.sequence_parallel)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
