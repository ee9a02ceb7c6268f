"""The one place megatron-core enters: every module takes the megatron names it uses from here.

megatron-core decorates its fused kernels (bias-GeLU, SwiGLU, ...) with `torch.compile` when its modules are
imported. `torch.compile(fn)` does nothing until `fn` is first called, but merely decorating imports
torch._dynamo and torch._inductor, paid by each rank and each test program: importing magi_train.train took
9.2 s of CPU with it and takes 6.2 s without (2-core CI machine). We use none of those kernels (our layers call
megatron's linear layers and communication ops), so megatron is imported here with `torch.compile` standing in
as a decorator that makes the same call on the function's first use instead. `torch.compile` itself is
restored before this module finishes; anything that calls one of megatron's compiled functions gets it
compiled then, exactly as it would have been.

megatron-core also imports wandb at import time, if it is installed, for two things we never use (its Timers'
wandb writer and its dynamic inference engine's logging): 0.7-0.8 s of CPU per process. While megatron is
imported, `wandb` is marked unimportable so those modules take their own "wandb not installed" branch; the mark
is removed afterwards, so our metrics writer (observability/metrics.py) imports the real wandb when a run asks
for it.

Only what needs megatron imports this module: tensor / context parallelism, training's backward through
megatron's linear function, the process-group grid of a multi-process job. One-process inference never does
(model/linear.py, parallel/groups.py), which saves it a second of start-up.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import threading
import warnings

import torch


def _compile_on_first_call(compile_fn):
    """A stand-in for `torch.compile` (either `torch.compile(fn, **kw)` or `@torch.compile(**kw)`) that calls
    `compile_fn(fn, **kw)` when the returned function is first called."""

    def deferred(model=None, **kwargs):
        if model is None:
            return lambda fn: deferred(fn, **kwargs)
        lock = threading.Lock()
        compiled = []

        @functools.wraps(model)
        def call(*args, **kw):
            if not compiled:
                with lock:
                    if not compiled:
                        compiled.append(compile_fn(model, **kwargs))
            return compiled[0](*args, **kw)

        return call

    return deferred


def _import_megatron():
    real = torch.compile
    torch.compile = _compile_on_first_call(real)
    # A None entry in sys.modules makes `import wandb` raise ImportError (only if wandb is not already imported).
    hide_wandb = "wandb" not in sys.modules
    if hide_wandb:
        sys.modules["wandb"] = None
    # megatron's modules log INFO lines as they are imported ("Detected Megatron Core, using Megatron-FSDP ..."),
    # on every rank, about features we do not use; its later warnings still come through.
    megatron_log = logging.getLogger("megatron")
    log_level = megatron_log.level
    megatron_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # hyper_comm_grid warns on import, on every rank, that absl-py is missing and it logs through the
            # standard logging module instead: that fallback is what we want (our log levels apply to it).
            warnings.filterwarnings("ignore", message="absl.logging is not installed")
            # megatron.core's __init__ imports tensor_parallel, the fusions and parallel_state; the other two are
            # what it leaves out of the modules below.
            for name in ("megatron.core", "megatron.core.hyper_comm_grid", "megatron.core.process_groups_config"):
                importlib.import_module(name)
    finally:
        megatron_log.setLevel(log_level)
        torch.compile = real
        if hide_wandb and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


_import_megatron()

from megatron.core.hyper_comm_grid import HyperCommGrid  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,  # noqa: E402
                                                  linear_with_grad_accumulation_and_async_allreduce)
from megatron.core.tensor_parallel.mappings import (all_to_all, copy_to_tensor_model_parallel_region,  # noqa: E402
                                                    gather_from_sequence_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)

__all__ = ["ColumnParallelLinear", "HyperCommGrid", "ModelParallelConfig", "ProcessGroupCollection",
           "RowParallelLinear", "all_to_all", "copy_to_tensor_model_parallel_region",
           "gather_from_sequence_parallel_region",
           "linear_with_grad_accumulation_and_async_allreduce", "reduce_from_tensor_model_parallel_region",
           "reduce_scatter_to_sequence_parallel_region"]


def megatron_ddp():
    """megatron-core's DistributedDataParallel, its config, TransformerConfig and parallel_state, imported when
    asked for: only tools/bench_dp_sync.py uses them, to measure megatron's gradient sync beside ours."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    return parallel_state, DistributedDataParallel, DistributedDataParallelConfig, TransformerConfig
