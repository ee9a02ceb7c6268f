"""Transformer Engine layer spec (`model.layer_spec: te`) and TE's fp8 autocast (`trainer.fp8_recipe`).

Transformer Engine (TE) is GPU-only. This module imports on any machine; TE itself is imported only when a TE
spec or an fp8 context is asked for, and `te_available()` says whether that can work here.

The TE linears keep the linear-slot contract of the local spec (magi_train/model/linear.py on one process,
magi_train/parallel/tensor.py under tensor parallel), so neither the model file nor a checkpoint can tell
which spec built them (`parallelize_dit` rebuilds them with the TP group):
- Constructor `(input_size, output_size, *, config, init_method, bias, tp_group, compute_dtype,
  sequence_parallel)` with global sizes; TE splits the output features (column) or the input features (row)
  over `tp_group`. `sequence_parallel` (None: `config.sequence_parallel`; effective only with TP > 1) makes the
  column layer all-gather its (S/tp, N, H) input and the row layer reduce-scatter its output along S.
- `forward(x)` returns one tensor (no deferred bias); activations are sequence-first (S, N, H).
- The parameter is TE's `weight` (and `bias`), so state-dict keys are the local spec's and the released ones.
- No `_extra_state`: TE stores its fp8 metadata (delayed-scaling amax histories and scales) there. The released
  MAGI-1 checkpoints and the local spec have no such entry; keeping it out means one checkpoint loads strictly
  into either spec and the key sets stay identical. The metadata is rebuilt from the next iterations' amaxes,
  so the cost is that delayed scaling restarts its amax history after a resume.
- `compute_dtype` computes the matmul in that dtype whatever torch autocast or fp8 autocast says (linear_proj:
  fp32 from bf16 weights, as in the released model). When it differs from the weights' dtype the layer computes
  with torch on TE's weight and the same TP collectives as the local spec (TE refuses activations of another
  dtype than its parameters outside torch autocast, and CUDA autocast has no fp32 mode).
Initialisation: with `config.perform_initialization`, TE applies `init_method` to each rank's shard on the GPU
(megatron splits one CPU master weight instead). The DiT turns that off and draws every weight itself by
parameter name, so a DiT built with either spec starts from the same weights.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from magi_train.mcore import (ModelParallelConfig, copy_to_tensor_model_parallel_region,
                               gather_from_sequence_parallel_region, reduce_from_tensor_model_parallel_region,
                               reduce_scatter_to_sequence_parallel_region)

FP8_RECIPES = ("none", "delayed", "tensorwise", "mxfp8", "blockwise")
# trainer.fp8_recipe -> (class in transformer_engine.common.recipe, first TE release that has it).
TE_RECIPE_CLASSES = {
    "delayed": ("DelayedScaling", "1.0"),
    "tensorwise": ("Float8CurrentScaling", "2.2"),
    "mxfp8": ("MXFP8BlockScaling", "2.0"),
    "blockwise": ("Float8BlockScaling", "2.3"),
}


def _import_te():
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # a broken install raises RuntimeError/OSError (missing CUDA libraries), not only ImportError
        raise RuntimeError(
            f"Transformer Engine is not importable here ({type(e).__name__}: {e}). It is GPU-only: install it on a "
            f"CUDA machine with `pip install --no-build-isolation 'transformer_engine[pytorch]'` (the project's "
            f"`gpu` extra); on CPU use model.layer_spec=local and trainer.fp8_recipe=none."
        ) from e
    return te


def te_unavailable_reason() -> Optional[str]:
    """Why the TE spec cannot be built here, or None when it can."""
    try:
        _import_te()
    except RuntimeError as e:
        return str(e)
    if not torch.cuda.is_available():
        return "Transformer Engine is installed but there is no CUDA device (its layers run only on GPUs)"
    return None


def te_available() -> bool:
    return te_unavailable_reason() is None


def _te_autocast(te, enabled: bool, recipe=None, group=None):
    if hasattr(te, "autocast"):  # TE >= 2.9 renamed it; fp8_autocast is deprecated there
        return te.autocast(enabled=enabled, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe, fp8_group=group)


def fp8_autocast(recipe: str, group=None):
    """Context for the forward pass under `trainer.fp8_recipe`: a no-op for "none", else TE's fp8 autocast.

    `group` is the process group over which TE reduces amaxes (delayed scaling). Recipes use TE's defaults;
    TE checks at entry that the GPU supports them (mxfp8 needs Blackwell, blockwise Hopper).
    """
    if recipe not in FP8_RECIPES:
        raise ValueError(f"trainer.fp8_recipe={recipe!r} is not one of {list(FP8_RECIPES)}")
    if recipe == "none":
        return contextlib.nullcontext()
    te = _import_te()
    from transformer_engine.common import recipe as te_recipe

    class_name, since = TE_RECIPE_CLASSES[recipe]
    recipe_class = getattr(te_recipe, class_name, None)
    if recipe_class is None:
        import transformer_engine

        version = getattr(transformer_engine, "__version__", "unknown")
        raise RuntimeError(f"trainer.fp8_recipe={recipe!r} ({class_name}) needs Transformer Engine >= {since}; found {version}")
    return _te_autocast(te, enabled=True, recipe=recipe_class(), group=group)


def _skip_init(weight: torch.Tensor) -> None:
    pass  # config.perform_initialization=False: the weights will be loaded


def _param_device() -> str:
    # build_dit's shapes-only path builds under `with torch.device("meta")`; TE takes the device explicitly.
    return "meta" if torch.get_default_device().type == "meta" else "cuda"


@functools.cache
def te_linear_classes() -> Tuple[type, type]:
    """(TEColumnLinear, TERowLinear). Defined on first use because their base class, TE's Linear, exists only
    where TE imports; cached so that every spec shares one pair of classes."""
    te = _import_te()

    class _TELinear(te.Linear):
        parallel_mode: str  # "column" or "row", set by the subclasses

        # nn.Module's versions: no `_extra_state` saved and none expected on load (see the module docstring).
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def __init__(
            self,
            input_size: int,
            output_size: int,
            *,
            config: ModelParallelConfig,
            init_method,
            bias: bool = False,
            tp_group: Optional[torch.distributed.ProcessGroup] = None,
            compute_dtype: Optional[torch.dtype] = None,
            sequence_parallel: Optional[bool] = None,
        ):
            super().__init__(
                input_size,
                output_size,
                sequence_parallel=config.sequence_parallel if sequence_parallel is None else sequence_parallel,
                tp_group=tp_group,
                tp_size=1 if tp_group is None else tp_group.size(),
                init_method=init_method if config.perform_initialization else _skip_init,
                bias=bias,
                params_dtype=config.params_dtype,
                parallel_mode=self.parallel_mode,
                device=_param_device(),
            )
            self.compute_dtype = compute_dtype

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.compute_dtype is None:
                return super().forward(x)
            with torch.autocast(x.device.type, enabled=False), _te_autocast(te, enabled=False):
                x = x.to(self.compute_dtype)
                if self.weight.dtype == self.compute_dtype:
                    return super().forward(x)
                return self._torch_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if self.use_bias else None)

    class TEColumnLinear(_TELinear):
        """Output features split across the TP group; input replicated (or gathered along S)."""

        parallel_mode = "column"

        def _torch_forward(self, x, weight, bias):
            if self.sequence_parallel:
                # megatron's sequence-parallel mappings (they allocate on the current CUDA device: TE is GPU-only)
                x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.tp_group)
            elif self.tp_size > 1:
                x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
            return F.linear(x, weight, bias)

    class TERowLinear(_TELinear):
        """Input features split across the TP group; output all-reduced (or reduce-scattered along S)."""

        parallel_mode = "row"

        def _torch_forward(self, x, weight, bias):
            y = F.linear(x, weight)
            if self.sequence_parallel:
                y = reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group)
            elif self.tp_size > 1:
                y = reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
            return y if bias is None else y + bias

    return TEColumnLinear, TERowLinear

