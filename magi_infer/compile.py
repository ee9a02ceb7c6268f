"""The `compile` option of inference: the per-step DiT forward under torch.compile.

Shapes repeat from step to step: within a stage every call has the same chunks, and since the KV cache holds a
window (magi_train/diffusion/kv_cache.py) the keys a call attends over, and its key ranges relative to them, are
the same from stage to stage however long the video. Each distinct call is compiled once (`dynamic=False`) and
replayed. The cache's hook stays eager (it is `torch.compiler.disable`d: its slots move from call to call).

mode "reduce-overhead" is inductor with CUDA graphs: a replay reuses its output buffers, so the wrapper marks a
new step before each call and returns a copy of the output (the sampler holds several passes' outputs at once).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from magi_train.model.compile import COMPILE_MODES as TRAIN_COMPILE_MODES

# torch.compile's modes, as trainer.compile_mode takes them; "none" runs the model eagerly.
COMPILE_MODES = ("none", *TRAIN_COMPILE_MODES)
RECOMPILE_LIMIT = 64  # compiled variants per function during a generation (see `forward`)


def compiled_forward(model: torch.nn.Module, mode: str, backend: str = "inductor") -> Optional[Callable]:
    """A callable with the model's forward signature, or None for mode "none" (the model runs as it is).
    `backend`: torch.compile's backend; modes other than "default" are inductor's."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile={mode!r} is not one of {list(COMPILE_MODES)}")
    if mode == "none":
        return None
    if backend != "inductor" and mode != "default":
        raise ValueError(f"compile={mode} is a mode of the inductor backend, not of compile_backend={backend}")
    kwargs = dict(mode=mode) if backend == "inductor" else {}
    compiled = torch.compile(model, backend=backend, dynamic=False, **kwargs)
    cudagraphs = mode == "reduce-overhead"

    def forward(*args, **kw):
        import torch._dynamo

        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        # A generation has more distinct calls than dynamo's default of 8 per frame (the window filling up and
        # draining, the duplicate, the unconditional pass), but a bounded number: raised for these calls only.
        limits = dict(recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=4 * RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(**limits):
            out = compiled(*args, **kw)
        return out.clone() if cudagraphs else out

    return forward
