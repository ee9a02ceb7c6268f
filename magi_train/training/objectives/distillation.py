"""Shortcut + CFG distillation (experiment=distill): targets from a frozen teacher and from the EMA student.

The student is the base model with the step-size embedding switched on (model.distill; it adds no weights:
the timestep embedder also embeds 1/(2s)), initialised from the teacher's weights. Step `i` trains step size
m = distill.step_cycle[i % len] (in 1/64 units of the distillation grid, magi_train/diffusion/distill.py) on
every sample of the batch:

* m = 1: the target is the frozen teacher's guided velocity, MAGI-1's three passes (text + context,
  null caption + context, null caption with each chunk alone) combined with the t-bucketed scales
  distill.prev_chunk_scales / text_scales: classifier-free guidance is distilled at the finest step.
* m > 1: the target is the shortcut average of two half steps (m/2) of the EMA student on the grid, weighted
  by their Δt (the grid is non-uniform).

Chunk times are grid points (t = G[k], k a multiple of m), so the student is trained where the m-step
sampler evaluates it. The multi-task draw is flow matching's (t2v / i2v / v2v, clean frames without loss);
there is no caption dropout (the guidance is folded into the m = 1 targets). The EMA is the run's
`EmaCallback` (magi_train/training/ema.py), saved in every checkpoint as `ema.<parameter>`.

Dense batches (data=synthetic) and packed sequences (data=webdataset) get the same targets: on a packed
sequence the teacher's passes run on the whole sequence (block-causal inside each sample; for the "alone"
pass every chunk is its own sample), and the half steps move each token by its row's Δt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch

from magi_train.checkpoint.weights import load_into, load_weights
from magi_train.config.schema import TrainConfig
from magi_train.data.packed_inputs import PackedItem, pack_inputs
from magi_train.diffusion.distill import (distill_embedding, draw_distill_times, guided_velocity, shortcut_target,
                                          step_size_at)
from magi_train.diffusion.guidance import cfg_scales, combine_cfg3
from magi_train.diffusion.objective import ObjectiveDraw
from magi_train.model.attention import block_causal_ranges
from magi_train.parallel.groups import Parallel
from magi_train.parallel.parallelize import build_whole
from magi_train.training.batches import micro_batch_shape
from magi_train.training.ema import EmaCallback
from magi_train.training.objectives.base import generator
from magi_train.training.objectives.flow_matching import FlowMatching

_GRID_STREAM = 3  # offset of the grid-time seed from the sample's objective seed


@dataclass
class GridDraw(ObjectiveDraw):
    """An objective draw whose noisy chunks sit on the distillation grid, with the half-step times."""

    t_mid: torch.Tensor = None  # (chunks,) t after the first half step (= t for clean chunks)
    dt1: torch.Tensor = None  # (chunks,) the two half steps (0 for clean chunks)
    dt2: torch.Tensor = None


def _per_token(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(R,) per caption row -> (1, 1, S) per token (0 on padding)."""
    return torch.where(rows >= 0, values[rows.clamp(min=0)], values.new_zeros(())).reshape(1, 1, -1)


def _velocity(model, patches, t, caption, mask, adaln, coords, token_map, dt=None) -> torch.Tensor:
    """(1, P, S) fp32 velocity of a packed sequence (captions already dropped where they should be)."""
    return model.forward_packed(patches, t, caption, mask, adaln, coords, token_map, distill_dt=dt).float()


class Distillation(FlowMatching):
    def __init__(self, cfg: TrainConfig, parallel: Parallel, cp_impl: str, full_shapes, student, ema: EmaCallback,
                 fresh: bool):
        """`fresh`: the run starts at step 0, so the student starts as the teacher (the same weights; its
        step-size embedding is the timestep embedder it already has); a resumed one keeps its own."""
        super().__init__(cfg.diffusion)
        self.run, self.student, self.ema = cfg, student, ema
        self.tokens_per_chunk = micro_batch_shape(cfg)[1]
        self.m = 1  # the step size of the batch being built
        x, mc, p = cfg.distill, cfg.model, parallel
        state, source = load_weights(x.teacher, replace(mc, distill=False), fp8=False)
        self.teacher = build_whole(replace(mc, distill=False), p, cp_impl)
        # A teacher of another preset fails here, naming the keys and shapes that differ.
        load_into(self.teacher, state, source, full_shapes, p.tp_rank, p.tp)
        self.teacher.eval().requires_grad_(False)
        if fresh:
            load_into(student, state, source, full_shapes, p.tp_rank, p.tp)
        del state
        if p.is_main:
            print(f"distillation: teacher {source}; step sizes {list(x.step_cycle)} / 64", flush=True)

    # ------------------------------------------------------------------ the interface
    def begin_step(self, step: int) -> None:
        self.m = step_size_at(step, self.run.distill.step_cycle)

    def begin_eval(self) -> None:
        self.m = 1  # the student at m = 1 against the guided teacher

    def scale_flops(self, flops: int) -> int:
        # Model FLOPs of the targets: forward-only passes over the same samples, three of the teacher at
        # m = 1, two half steps of the EMA (or student) otherwise. The teacher's "alone" pass attends less
        # than a whole-sample forward, so this counts its attention slightly high.
        passes = 3 if self.m == 1 else 2
        return flops * (3 + passes) // 3

    def metrics(self) -> Dict[str, float]:
        return {"step_size": self.m / 64}

    def draw(self, latent_frames: int, chunk_frames: int, seed: int, fixed_t: Optional[float]) -> ObjectiveDraw:
        draw = super().draw(latent_frames, chunk_frames, seed, fixed_t)
        chunks = draw.t.shape[0]
        zero = torch.zeros(chunks)
        if fixed_t is not None:
            return GridDraw(**vars(draw), t_mid=draw.t, dt1=zero, dt2=zero)
        grid = draw_distill_times(chunks, draw.clean_chunks, self.m, generator(seed + _GRID_STREAM), clean_t=draw.t)
        frames = latent_frames // chunks
        frame_t = torch.where(draw.clean_frames, draw.frame_t, grid.t.repeat_interleave(frames))
        return GridDraw(draw.task, grid.t, draw.clean_chunks, draw.clean_frames, frame_t, False,
                        t_mid=grid.t_mid, dt1=grid.dt1, dt2=grid.dt2)

    def _shortcut_model(self):
        """The weights the half steps run with: the EMA's swapped in, or the live student's."""
        if self.run.distill.shortcut_model == "ema":
            return self.ema.swapped(self.student)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ dense batches (data=synthetic)
    def dense_targets(self, draws, inputs, target):
        x_t, t, caption, mask, null_rows = inputs[:5]
        dev = x_t.device
        per_sample = lambda name: torch.stack([getattr(d, name) for d in draws]).to(dev)  # noqa: E731
        v = self._target(self.m, x_t, t, caption, mask, null_rows, per_sample("clean_frames"), per_sample("t_mid"),
                         per_sample("dt1"), per_sample("dt2"))
        dt = torch.full((len(draws),), distill_embedding(self.m), device=dev)
        return inputs + (dt,), torch.cat([v, target[:, -1:]], dim=1)

    @torch.no_grad()
    def _target(self, m, x_t, t, caption, mask, clean_rows, clean_frames, t_mid, dt1, dt2):
        """(N, C, T, H, W) fp32 target of step size m for the micro-batch (clean_rows: the rows that see the null
        caption; clean_frames (N, T); t_mid, dt1, dt2 (N, n): the half steps)."""
        N, n = t.shape
        ranges = block_causal_ranges(N, n, self.tokens_per_chunk)
        if m == 1:
            # Clean context chunks always see the null caption (as in the base objective and at inference).
            text_caption, text_mask = self.teacher.drop_captions(caption, mask.bool(), clean_rows)
            return self._guided_teacher(x_t, t, text_caption, text_mask, caption, mask, ranges)
        half = distill_embedding(m // 2)
        student = self.student
        # The student's own null caption (it is trained; the teacher's stays as it was).
        s_caption, s_mask = student.drop_captions(caption, mask.bool(), clean_rows)
        frames = clean_frames[:, None, :, None, None]
        keep = torch.zeros(N, dtype=torch.bool, device=x_t.device)

        def velocity(x, tt):
            # Clean frames (the i2v image frame inside a noisy chunk) are pasted back, as the sampler does.
            x = torch.where(frames, x_t, x)
            return student(x, tt, s_caption, s_mask, ranges, adaln_uncond=keep, distill_dt=half).float()

        was_training = student.training
        student.eval()
        try:
            with self._shortcut_model():
                return shortcut_target(velocity, x_t, t, t_mid, dt1, dt2, self.run.data.latent_frames_per_chunk)
        finally:
            student.train(was_training)

    def _guided_teacher(self, x_t, t, text_caption, text_mask, caption, mask, ranges):
        """MAGI-1's three-pass guided velocity of the teacher (the sampler's cfg_number 3)."""
        teacher, x = self.teacher, self.run.distill
        N, n = t.shape
        cw = self.run.data.latent_frames_per_chunk
        every = torch.ones(N * n, dtype=torch.bool, device=x_t.device)
        null_caption, null_mask = teacher.drop_captions(caption, mask.bool(), every)
        yes = torch.ones(N, dtype=torch.bool, device=x_t.device)
        v_text = teacher(x_t, t, text_caption, text_mask, ranges, adaln_uncond=~yes).float()
        v_context = teacher(x_t, t, null_caption, null_mask, ranges, adaln_uncond=yes).float()
        # Each chunk alone: its own sample, attending only to itself, at temporal positions from 0.
        C, T, H, W = x_t.shape[1:]
        alone = x_t.reshape(N, C, n, cw, H, W).permute(0, 2, 1, 3, 4, 5).reshape(N * n, C, cw, H, W)
        v_alone = teacher(alone, t.reshape(N * n, 1), null_caption, null_mask,
                          block_causal_ranges(N * n, 1, self.tokens_per_chunk),
                          adaln_uncond=torch.ones(N * n, dtype=torch.bool, device=x_t.device)).float()
        v_alone = v_alone.reshape(N, n, C, cw, H, W).permute(0, 2, 1, 3, 4, 5).reshape(N, C, T, H, W)
        return guided_velocity(v_text, v_context, v_alone, t, cw, x.cfg_t_range, x.prev_chunk_scales, x.text_scales)

    # ------------------------------------------------------------------ packed sequences (data=webdataset)
    def packed_targets(self, items: List[PackedItem], draws, inputs, target):
        m, R = self.m, self.run.data.max_rows_per_sequence
        patches, t, caption, mask, null_rows, adaln, coords, token_map = inputs
        weight = target[:, -1:]
        with torch.no_grad():
            if m == 1:
                v = self._packed_guided(items, inputs)
            else:
                per_row = [torch.zeros(R, device=t.device) for _ in range(3)]
                row = 0
                for draw in draws:
                    n = draw.t.shape[0]
                    for values, src in zip(per_row, (draw.t_mid, draw.dt1, draw.dt2)):
                        values[row:row + n] = src.to(t.device)
                    row += n
                v = self._packed_shortcut(inputs, weight, *per_row)
        dt = torch.full((1,), distill_embedding(m), device=t.device)
        return (patches, t, caption, mask, null_rows, adaln, dt, coords, token_map), torch.cat([v, weight], dim=1)

    def _packed_guided(self, items: List[PackedItem], inputs) -> torch.Tensor:
        """The teacher's three-pass guided velocity on a packed sequence (as `_guided_teacher` per sample)."""
        teacher, x, d = self.teacher, self.run.distill, self.run.data
        patches, t, caption, mask, null_rows, adaln, coords, token_map = inputs
        R = t.shape[1]
        text_caption, text_mask = teacher.drop_captions(caption, mask.bool(), null_rows.bool())
        null_caption, null_mask = teacher.drop_captions(caption, mask.bool(), torch.ones_like(null_rows, dtype=torch.bool))
        yes = torch.ones(1, R, dtype=torch.bool, device=t.device)
        v_text = _velocity(teacher, patches, t, text_caption, text_mask, adaln.bool(), coords, token_map)
        v_context = _velocity(teacher, patches, t, null_caption, null_mask, yes, coords, token_map)
        # Each chunk alone: the same tokens in the same places, each chunk its own sample with RoPE from frame 0.
        chunk_items = []
        for item in items:
            n = item.t.shape[0]
            frames = item.x_t.shape[1] // n
            for c in range(n):
                f = slice(c * frames, (c + 1) * frames)
                chunk_items.append(PackedItem(item.x_t[:, f], item.target[:, f], item.frame_weight[f], item.t[c:c + 1],
                                              item.caption[c:c + 1], item.caption_mask[c:c + 1],
                                              item.null_rows[c:c + 1], item.adaln_uncond[c:c + 1]))
        (_, _, _, _, _, _, alone_coords, alone_map), _ = pack_inputs(chunk_items, self.run.model, d.seq_length, R)
        v_alone = _velocity(teacher, patches, t, null_caption, null_mask, yes, alone_coords.to(t.device),
                            alone_map.to(t.device))
        s_prev, s_text = cfg_scales(t[0].cpu(), x.cfg_t_range, x.prev_chunk_scales, x.text_scales)
        rows = token_map[0, :, 0].round().long()
        return combine_cfg3(v_alone, v_context, v_text, _per_token(s_prev.to(t.device), rows),
                            _per_token(s_text.to(t.device), rows))

    def _packed_shortcut(self, inputs, weight, t_mid, dt1, dt2) -> torch.Tensor:
        """Δt-weighted two half steps (m/2) of the EMA student on a packed sequence."""
        patches, t, caption, mask, null_rows, adaln, coords, token_map = inputs
        student = self.student
        rows = token_map[0, :, 0].round().long()
        caption, mask = student.drop_captions(caption, mask.bool(), null_rows.bool())
        half = distill_embedding(self.m // 2)
        d1, d2 = _per_token(dt1, rows), _per_token(dt2, rows)
        given = (weight == 0).transpose(1, 2)  # (1, S, 1): clean frames (and padding) are pasted back

        def velocity(x, tt):
            x = torch.where(given, patches, x)
            return _velocity(student, x, tt, caption, mask, adaln.bool(), coords, token_map, dt=half)

        was_training = student.training
        student.eval()
        try:
            with self._shortcut_model():
                v1 = velocity(patches, t)
                v2 = velocity(patches + (d1 * v1).transpose(1, 2), t_mid[None])
        finally:
            student.train(was_training)
        total = d1 + d2
        return torch.where(total > 0, (d1 * v1 + d2 * v2) / torch.where(total > 0, total, torch.ones_like(total)), v1)
