"""`trainer.compile`: torch.compile of each transformer layer (regional compilation).

Why per layer and not the whole model: every layer has the same code and shapes, so dynamo's cache holds one
layer's graphs and compile time is one layer's, whatever model.num_layers; the embedders, the head and the
pipeline/parallel plumbing between layers stay eager.

What stays out of the compiled regions, and why:
- The core attention slots (`core_attention`, `core_cross_attention`): their inputs include the micro-batch's
  attention ranges, Python structures that change with the data (packed sequences, caption lengths); traced,
  every new structure would recompile. The kernels are compiled on their own where that pays (flex) or are
  custom kernels (flash-attn, MagiAttention) already.
- Shapes are static (`dynamic=False`: no symbolic shapes, no automatic re-tracing as dynamic) except the caption
  token count: `y_flat` (the valid caption tokens of the micro-batch) is marked dynamic on dim 0 at each call,
  since caption lengths change every step while every other layer input keeps its shape for a run. The residual
  stream is handed over contiguous, so the first layer (fed the embedder's transposed view) reuses the others'
  graphs: dynamo's cache then holds one layer's graphs for all of them.

The compile wraps each layer's `forward` on the instance (the module tree is untouched), so parameter names and
state-dict keys are the eager model's (no `_orig_mod.` prefix) and checkpoints move freely between the two.
torch's compiler stack is imported here only when `compile_layers` runs.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Union

import torch
from torch import nn

# torch.compile modes (trainer.compile_mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The layer input whose first dimension varies from step to step (the valid caption tokens).
CAPTION_INPUT = "y_flat"
STREAM_INPUT = "x"  # the residual stream (S, N, H)


def _layers(model: nn.Module):
    blocks = getattr(model, "videodit_blocks", None)
    if blocks is None:
        raise TypeError(f"compile_layers takes a VideoDiT (or a pipeline stage of one), got {type(model).__name__}")
    return list(blocks.layers)


def _layer_call(compiled: Callable, signature: inspect.Signature) -> Callable:
    """`compiled` called with the caption input marked dynamic along its tokens and a contiguous stream."""
    from torch._dynamo import maybe_mark_dynamic  # imported only once compiling was asked for

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        y_flat = bound.arguments.get(CAPTION_INPUT)
        if isinstance(y_flat, torch.Tensor) and y_flat.dim() > 0:
            # "maybe": a 0- or 1-token caption batch is specialised (dynamo's 0/1 rule) instead of failing.
            maybe_mark_dynamic(y_flat, 0)
        stream = bound.arguments.get(STREAM_INPUT)
        if isinstance(stream, torch.Tensor):
            # The first layer gets the embedder's transposed view, the others a contiguous tensor: with static
            # strides that would compile the first layer twice. A copy for the first layer only (same values).
            bound.arguments[STREAM_INPUT] = stream.contiguous()
        return compiled(*bound.args, **bound.kwargs)

    return forward


def compile_layers(model: nn.Module, mode: str = "default", backend: Union[str, Callable] = "inductor") -> int:
    """Compile each transformer layer of `model` in place (after parallelisation, before the optimizer; see the
    module docstring). `mode`: trainer.compile_mode (inductor only); `backend`: torch.compile's (tests use
    "aot_eager" or a counting backend). Returns the number of layers compiled."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"trainer.compile_mode={mode!r} is not one of {list(COMPILE_MODES)}")
    kwargs = dict(dynamic=False, backend=backend)
    if backend == "inductor":
        kwargs["mode"] = mode
    elif mode != "default":
        raise ValueError(f"trainer.compile_mode={mode!r} applies to the inductor backend only (backend={backend!r})")
    layers = _layers(model)
    for layer in layers:
        if getattr(layer, "compiled", False):
            raise RuntimeError("compile_layers was already applied to this model (trainer.compile compiles once)")
        signature = inspect.signature(layer.forward)
        missing = [name for name in (STREAM_INPUT, CAPTION_INPUT) if name not in signature.parameters]
        if missing:
            raise TypeError(f"{type(layer).__name__}.forward has no input {missing} (the layer contract of dit.py)")
        attention = layer.self_attention
        for name in ("core_attention", "core_cross_attention"):
            core: Optional[nn.Module] = getattr(attention, name, None)
            if core is not None:
                core.forward = torch.compiler.disable(core.forward)
        layer.forward = _layer_call(torch.compile(layer.forward, **kwargs), signature)
        layer.compiled = True
    return len(layers)
