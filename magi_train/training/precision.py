"""The numeric precision a training step runs in: trainer.precision (fp32, or bf16 autocast over fp32 weights)
and, with Transformer Engine layers (model.layer_spec=te), trainer.fp8_recipe's fp8 autocast inside it. torchao's
float8 linears (trainer.fp8_backend=torchao, model/float8.py) scale their own operands: no context for them."""

from __future__ import annotations

import contextlib

import torch

from magi_train.config.schema import TrainerConfig
from magi_train.model.float8 import resolve_fp8_backend
from magi_train.parallel.groups import Parallel


@contextlib.contextmanager
def autocast(tc: TrainerConfig, parallel: Parallel, layer_spec: str):
    """The forward (and, by autograd, its backward) of one micro-batch or pipeline step."""
    with torch.autocast(parallel.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
        if resolve_fp8_backend(tc.fp8_backend, tc.fp8_recipe, layer_spec) != "te":
            yield
            return
        from magi_train.model.te_spec import fp8_autocast

        # Scaling factors (amaxes) are agreed over every rank of the pipeline stage (as megatron does).
        with fp8_autocast(tc.fp8_recipe, parallel.groups.tp_dp_cp):
            yield
