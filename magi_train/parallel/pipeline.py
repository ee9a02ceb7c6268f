"""Pipeline parallel: training with torch.distributed.pipelining (1F1B, interleaved 1F1B, GPipe), and
inference, whose stages run one after the other with p2p send/recv (`InferencePipeline`). Both pass the
same boundary tensors between stages (`boundary_tensors` / `stream_from`).

Why torch's engine and not megatron-core's schedules: megatron's hard-code CUDA tensors (and on gloo its
batched p2p silently swaps same-shape messages), while torch's runs unchanged on gloo and NCCL.

Stages are contiguous blocks of layers; with `vpp` virtual stages a rank holds vpp of them, round-robin
(stage s lives on pp rank s % pp). The conditioning reaches every stage by travelling with the residual
stream: what one stage hands to the next is

    h (S_local, N, H), condition (N, dn, Dc), y (N*dn, L, Hx + 1), sin, cos (S_cp, R/2)
    [+ token_map (1, S, 2) for packed sequences: each micro-batch has its own attention ranges]

(under MagiAttention's dispatch h is (L, 1, H) and sin/cos have a row per token of the cp rank)

where the last channel of y carries the caption mask (the engine only passes tensors; riding on y keeps
the mask in step with its rows, and its gradient is simply unused). Gradients flow back through all of
them, so the embedders on the first stage get exact gradients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from magi_train.config.schema import ParallelConfig
from magi_train.model.attention import AttnRanges, block_causal_ranges, row_block_causal_ranges
from magi_train.model.dit import KVHook, Stream, VideoDiT
from magi_train.parallel.comm import broadcast_tensor, recv_tensor, send_tensor


def boundary_tensors(stream: Stream) -> Tuple[torch.Tensor, ...]:
    """What one stage hands the next: (h, condition, y with the caption mask as its last channel, sin, cos)."""
    y = torch.cat([stream.y_xattn, stream.caption_mask[..., None].to(stream.y_xattn.dtype)], dim=-1)
    return tuple(v.contiguous() for v in (stream.h, stream.condition, y, stream.sin, stream.cos))


def stream_from(h, condition, y, sin, cos, rows=None) -> Stream:
    """The `Stream` a stage receives (inverse of `boundary_tensors`)."""
    return Stream(h, condition, y[..., :-1], y[..., -1] > 0.5, sin, cos, rows)


def stage_layers(num_layers: int, pp: int, vpp: int, pp_rank: int) -> List[Tuple[int, List[int]]]:
    """[(stage index, its global layer ids)] held by `pp_rank`: pp * vpp equal contiguous blocks."""
    stages = pp * vpp
    per = num_layers // stages
    return [(s, list(range(s * per, (s + 1) * per))) for s in range(pp_rank, stages, pp)]


@dataclass(frozen=True)
class MicroBatchShape:
    """Static shapes of one micro-batch (the pipeline engine needs them to receive)."""

    micro_batch: int
    chunks: int
    tokens_per_chunk: int
    caption_length: int
    grid: Tuple[int, int, int]  # latent (T, H, W) in patches (dense batches)
    out_shape: Tuple[int, ...]  # (N, C, T, H, W) of the velocity; (1, C*pt*p*p, S) for packed sequences
    # Packed sequences (data.kind=webdataset): tokens per sequence; `chunks` is then the caption rows per
    # sequence (data.max_rows_per_sequence) and `micro_batch` is 1. 0 = dense batches.
    seq_length: int = 0

    @property
    def packed(self) -> bool:
        return self.seq_length > 0

    @property
    def tokens(self) -> int:
        """Tokens of one sample (dense) or of the one packed sequence."""
        return self.seq_length if self.packed else self.chunks * self.tokens_per_chunk


class DiTStage(nn.Module):
    """One pipeline stage of the DiT as the engine sees it: a module from tensors to tensors.

    Inputs of the first stage: dense (x, t, caption, caption_mask, null_rows, adaln[, distill_dt]) or packed
    (patches, t, caption, caption_mask, null_rows, adaln[, distill_dt], coords, token_map), see
    `VideoDiT.embed` / `embed_packed`; distill_dt (N,) is the step-size embedding input of a distilled
    model (model.distill), one per sample."""

    def __init__(self, model: VideoDiT, shape: MicroBatchShape,
                 ranges_fn: Callable[[int, int, int], AttnRanges] = block_causal_ranges):
        super().__init__()
        self.model = model
        self.shape = shape
        self.ranges_fn = ranges_fn

    @functools.cached_property
    def placement(self):
        """The self-attention placement of a dense micro-batch: every one has the same shape, so it is built
        once (under MagiAttention's dispatch that is a collective over the cp group)."""
        s = self.shape
        if s.packed:
            raise RuntimeError("packed sequences have a placement per micro-batch (packed_placement)")
        return self.model.place(self.ranges_fn(s.micro_batch, s.chunks, s.tokens_per_chunk), s.micro_batch, s.tokens)

    def packed_placement(self, token_map: torch.Tensor):
        """A packed sequence's placement: block-causal inside each of its samples."""
        return self.model.place(row_block_causal_ranges(token_map), 1, self.shape.seq_length)

    def forward(self, *args: torch.Tensor):
        m = self.model
        packed = self.shape.packed
        token_map = args[-1] if packed else None
        placement = self.packed_placement(token_map) if packed else self.placement
        if m.pre_process:
            x, t, caption, caption_mask, null_rows, adaln = args[:6]
            # Caption dropout (and null captions for clean chunks) inside the stage: it is differentiable
            # w.r.t. the learned null caption, which lives here.
            caption, caption_mask = m.drop_captions(caption, caption_mask.bool(), null_rows.bool())
            dt = args[6] if m.cfg.distill else None
            if packed:
                stream = m.embed_packed(x, t, caption, caption_mask, adaln.bool(), args[-2], token_map, distill_dt=dt,
                                        placement=placement)
            else:
                stream, _ = m.embed(x, t, caption, caption_mask, adaln.bool(), distill_dt=dt, placement=placement)
        else:
            rows = token_map[..., 0].round().long() if packed else None
            stream = stream_from(*args[:5], rows=rows)
        stream = m.run_layers(stream, placement)
        if m.post_process:
            # The engine checks outputs against contiguous examples (head_tokens ends in a permute).
            return m.head_tokens(stream.h, placement).contiguous() if packed else m.head(stream.h, self.shape.grid, placement)
        return boundary_tensors(stream) + ((token_map.contiguous(),) if packed else ())


def _boundary_tensors(stage: DiTStage, device):
    """Example tensors of what crosses a stage boundary (shapes and dtypes only)."""
    shape, cfg, dtype = stage.shape, stage.model.cfg, stage.model.dtype
    N, dn = shape.micro_batch, shape.chunks
    # Packed sequences: the shapes of the Ulysses split only depend on the sequence length.
    placement = None if shape.packed else stage.placement
    (rows, batch), rope_rows = stage.model.stream_shapes(placement, N, shape.tokens)
    H = cfg.hidden_size
    cond = int(H * cfg.cond_hidden_ratio)
    hx = int(H * cfg.xattn_cond_hidden_ratio)
    half = 3 * (cfg.kv_channels // 8)  # RoPE: 16 bands x 3 axes for a 128 head dim
    return (
        torch.empty(rows, batch, H, dtype=dtype, device=device),
        torch.empty(N, dn, cond, dtype=dtype, device=device),
        torch.empty(N * dn, shape.caption_length, hx + 1, dtype=dtype, device=device),
        torch.empty(rope_rows, half, device=device),
        torch.empty(rope_rows, half, device=device),
    ) + ((torch.empty(1, shape.seq_length, 2, device=device),) if shape.packed else ())


def build_schedule(models: Sequence[VideoDiT], stage_ids: Sequence[int], parallel_cfg: ParallelConfig, pp_group,
                   shape: MicroBatchShape, num_microbatches: int, loss_fn, device):
    """The engine's schedule over this rank's stages (one, or vpp of them)."""
    # Imported here, where pipeline training starts: torch.distributed.pipelining imports torch._dynamo (about
    # 1 s of start-up that every other run, and every inference run, would pay for nothing).
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    num_stages = parallel_cfg.pp * parallel_cfg.vpp
    stages = []
    for model, sid in zip(models, stage_ids):
        stage = DiTStage(model, shape)
        boundary = _boundary_tensors(stage, device)
        outputs = (torch.empty(shape.out_shape, device=device),) if model.post_process else boundary
        inputs = None if model.pre_process else boundary
        stages.append(PipelineStage(stage, sid, num_stages, device,
                                    input_args=inputs, output_args=outputs, group=pp_group))
    # Gradients are sums over micro-batches; the loss is already normalised by the global token count.
    if parallel_cfg.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, num_microbatches, loss_fn=loss_fn, scale_grads=False)
    kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[parallel_cfg.pp_schedule]
    return kind(stages[0], num_microbatches, loss_fn=loss_fn, scale_grads=False)


class InferencePipeline(nn.Module):
    """This rank's stage of the DiT for inference, with the whole model's `forward`, `cfg` and `dtype` (what
    the sampler uses). A forward passes the chunk window through the stages one after the other:

        stage 0: embed -> run_layers -> send   ...   stage p: recv -> run_layers -> send   ...
        last stage: recv -> run_layers -> head -> broadcast the velocity to every pipeline rank

    Every rank runs the same sampler loop on identical inputs (same seed, same captions), so each knows the
    inputs of every call and builds the same token placement. The per-layer KV caches live on the stage that
    owns the layer (the sampler's `kv_hook` gets global layer indices). KV-cache decoding is sequential by
    construction (each call needs the previous one's result), so there are no independent micro-batches to
    keep the stages busy: pipeline parallel serves to fit a model that does not fit one device; for speed,
    use context parallel. Parameter names are the whole model's prefixed with `stage.`."""

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
        stage, group, device, cfg = self.stage, self.pp_group, x.device, self.cfg
        grid = (x.shape[2] // cfg.t_patch_size, x.shape[3] // cfg.patch_size, x.shape[4] // cfg.patch_size)
        placement = stage.place(self_ranges, x.shape[0], grid[0] * grid[1] * grid[2])
        if stage.pre_process:
            stream, _ = stage.embed(x, t, caption, caption_mask, adaln_uncond, slice_point, distill_dt, placement)
        else:
            stream = stream_from(*(recv_tensor(group, self.pp_rank - 1, device) for _ in range(5)))
        stream = stage.run_layers(stream, placement, kv_hook)
        velocity = None
        if stage.post_process:
            velocity = stage.head(stream.h, grid, placement)
        else:
            for tensor in boundary_tensors(stream):
                send_tensor(tensor, group, self.pp_rank + 1)
        return broadcast_tensor(velocity, group, self.pp - 1, device)
