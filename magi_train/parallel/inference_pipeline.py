"""Pipeline-parallel inference: one stage of the DiT per pipeline rank, driven by the sampler like the whole model.

Each rank holds a contiguous block of layers (stage p: layers [p*L/pp, (p+1)*L/pp)); the first stage also
holds the embedders, the last the output head. A forward passes the chunk window through the stages:

    stage 0: embed -> run_layers -> send   ...   stage p: recv -> run_layers -> send   ...
    last stage: recv -> run_layers -> head -> broadcast the velocity to every pipeline rank

Every rank runs the same sampler loop on identical inputs (same seed, same captions), so each knows the
inputs of every call; only the residual stream and the conditioning computed by the embedders travel
(h, condition, y_xattn, sin, cos; the caption mask is an input every rank already has). The per-layer KV
caches live on the stage that owns the layer: the sampler's `kv_hook` is called with global layer indices
and the cache allocates only the layers it is asked for.

Windows go stage to stage with no overlap: while one stage computes, the others wait. That is acceptable
here because KV-cache decoding is sequential by construction: each call denoises one window, and the
next call needs its result (the Euler step, the cache it wrote) before it can start, so there are no
independent micro-batches to keep the stages busy with. Pipeline parallelism serves to fit a model that
does not fit one device; for speed, use context parallelism (`parallel.cp`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from magi_train.parallel.comm import broadcast_tensor, recv_tensor, send_tensor
from magi_train.model.attention import AttnRanges
from magi_train.model.dit import Stream, VideoDiT
from magi_train.model.layers import KVHook
from magi_train.parallel.pipeline import stage_layers


def stage_of(num_layers: int, pp: int, pp_rank: int) -> dict:
    """`build_dit` keywords of pipeline rank `pp_rank`'s stage (contiguous layers, embed first, head last)."""
    (_, layer_ids), = stage_layers(num_layers, pp, 1, pp_rank)
    return dict(layer_ids=layer_ids, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1)


class PipelinedDiT(nn.Module):
    """This rank's stage of the DiT, with the whole model's `forward`, `cfg` and `dtype` (what the sampler uses).

    Parameter names are the whole model's prefixed with `stage.`; `stage.state_dict()` has the full
    model's names of this stage's parameters."""

    def __init__(self, stage: VideoDiT, pp_group: torch.distributed.ProcessGroup):
        super().__init__()
        self.stage = stage
        self.cfg = stage.cfg
        self.dtype = stage.dtype
        self.pp_group = pp_group
        self.pp_rank, self.pp = pp_group.rank(), pp_group.size()

    def forward(self, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor,
                self_ranges: AttnRanges, adaln_uncond: Optional[torch.Tensor] = None, slice_point: int = 0,
                distill_dt: Optional[float] = None, kv_hook: Optional[KVHook] = None) -> torch.Tensor:
        stage, group, device = self.stage, self.pp_group, x.device
        if stage.pre_process:
            stream, _ = stage.embed(x, t, caption, caption_mask, adaln_uncond, slice_point, distill_dt)
        else:
            h, condition, y_xattn, sin, cos = (recv_tensor(group, self.pp_rank - 1, device) for _ in range(5))
            stream = Stream(h, condition, y_xattn, caption_mask, sin, cos)
        stream = stage.run_layers(stream, self_ranges, kv_hook)
        velocity = None
        if stage.post_process:
            cfg = self.cfg
            grid = (x.shape[2] // cfg.t_patch_size, x.shape[3] // cfg.patch_size, x.shape[4] // cfg.patch_size)
            velocity = stage.head(stream.h, grid)
        else:
            for tensor in (stream.h, stream.condition, stream.y_xattn, stream.sin, stream.cos):
                send_tensor(tensor, group, self.pp_rank + 1)
        return broadcast_tensor(velocity, group, self.pp - 1, device)
