"""Shortcut + CFG distillation (experiment=distill): the trainer loop with targets from a teacher and an EMA.

The student is the base model with the step-size embedding switched on (model.distill; it adds no weights:
the timestep embedder also embeds 1/(2s)), initialised from the teacher's weights. Step `i` trains step size
m = distill.step_cycle[i % len] (in 1/64 units of the inference grid's coordinate, see
magi_train/diffusion/distill.py) on every sample of the batch:

* m = 1: the target is the frozen teacher's guided velocity, MAGI-1's three passes (text + context,
  null caption + context, null caption with each chunk alone) combined with the t-bucketed scales
  distill.prev_chunk_scales / text_scales: classifier-free guidance is distilled at the finest step.
* m > 1: the target is the shortcut average of two half steps (m/2) of the EMA student on the grid, weighted
  by their Δt (the grid is non-uniform).

Chunk times are grid points (t = G[k], k a multiple of m), so the student is trained where the m-step
sampler evaluates it. The multi-task draw is the base trainer's (t2v / i2v / v2v, clean frames without loss);
there is no caption dropout (the guidance is folded into the m = 1 targets). The EMA of the student is kept
in fp32 beside each rank's parameters and saved in every checkpoint as `ema.<parameter>` (reshardable like
the weights; `read_full_weights(path, "ema")` exports them).

Dense batches (data=synthetic) and packed sequences (data=webdataset) get the same targets: on a packed
sequence the teacher's passes run on the whole sequence (block-causal inside each sample; for the "alone"
pass every chunk is its own sample), and the half steps move each token by its row's Δt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from magi_train.checkpoint.weights import load_into, load_weights
from magi_train.checkpoint.distributed import checkpoint_has, is_distributed_checkpoint
from magi_train.diffusion.distill import (EmaWeights, distill_embedding, draw_distill_times, guided_velocity,
                                          shortcut_target, step_size_at)
from magi_train.data.packed_inputs import PackedItem, pack_inputs
from magi_train.diffusion.guidance import cfg_scales, combine_cfg3
from magi_train.diffusion.objective import ObjectiveDraw
from magi_train.model.attention import block_causal_ranges
from magi_train.parallel.parallelize import build_whole
from magi_train.parallel.sharding import shard_state_dict
from magi_train.training.trainer import _SAMPLE_STREAM, Trainer, _generator

_DISTILL_STREAM = 3  # offset of the grid-time generator from the sample's objective generator


@dataclass
class GridDraw(ObjectiveDraw):
    """An objective draw whose noisy chunks sit on the distillation grid, with the half-step times."""

    t_mid: torch.Tensor = None  # (chunks,) t after the first half step (= t for clean chunks)
    dt1: torch.Tensor = None  # (chunks,) the two half steps (0 for clean chunks)
    dt2: torch.Tensor = None


def _per_token(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(R,) per caption row -> (1, 1, S) per token (0 on padding)."""
    return torch.where(rows >= 0, values[rows.clamp(min=0)], values.new_zeros(())).reshape(1, 1, -1)


class DistillTrainer(Trainer):
    def __init__(self, cfg, parallel):
        self._m = 1
        self._ema: Optional[EmaWeights] = None
        self._want_ema = self._resumed = False
        super().__init__(cfg, parallel)  # builds the student; a resume loads it, the step and the EMA
        x, m, p = cfg.distill, cfg.model, parallel
        state, source = load_weights(x.teacher, replace(m, distill=False), fp8=False)
        self.teacher = build_whole(replace(m, distill=False), p, self.cp_impl)
        # A teacher of another preset fails here, naming the keys and shapes that differ.
        load_into(self.teacher, state, source, self.full_shapes, p.tp_rank, p.tp)
        self.teacher.eval().requires_grad_(False)
        if self.step == 0 and not self._resumed:
            # The student starts as the teacher (the same weights; its step-size embedding is the timestep
            # embedder it already has).
            self.student.load_state_dict(shard_state_dict(state, m, p.tp_rank, p.tp, keys=list(self.student.state_dict())))
        del state
        if self._ema is None:
            self._ema = EmaWeights(self.student.named_parameters())
        if p.is_main:
            print(f"distillation: teacher {source}; step sizes {list(x.step_cycle)} / 64", flush=True)

    @property
    def student(self):
        return self.model

    # ------------------------------------------------------------------ hooks of Trainer
    def _extra_weights(self) -> Optional[Dict[str, List[Dict[str, torch.Tensor]]]]:
        return {"ema": [self._ema.state_dict()]}

    def load(self, path: Path) -> None:
        # The EMA is filled by the checkpoint when it has one (a distillation checkpoint), else from the weights.
        self._ema = EmaWeights(self.student.named_parameters())
        self._want_ema = is_distributed_checkpoint(path) and checkpoint_has(path, "ema")
        super().load(path)
        if not self._want_ema:
            self._ema = EmaWeights(self.student.named_parameters())
        self._resumed = True

    def _extra_weights_to_load(self) -> Optional[Dict[str, List[Dict[str, torch.Tensor]]]]:
        return {"ema": [self._ema.state_dict()]} if self._want_ema else None

    def _after_optimizer_step(self) -> None:
        self._ema.update(self.student.named_parameters(), self.cfg.distill.ema_decay)

    def step_micro_batches(self, step: int):
        self._m = step_size_at(step, self.cfg.distill.step_cycle)
        micro = super().step_micro_batches(step)
        # Model FLOPs of the targets: forward-only passes over the same samples, three of the teacher at
        # m = 1, two half steps of the EMA (or student) otherwise. The teacher's "alone" pass attends less
        # than a whole-sample forward, so this counts its attention slightly high.
        passes = 3 if self._m == 1 else 2
        self.last_flops = self.last_flops * (3 + passes) // 3
        return micro

    def train_step(self) -> Dict[str, float]:
        rec = super().train_step()
        rec["step_size"] = self._m / 64
        return rec

    def evaluate(self) -> Dict[str, float]:
        """The student at m = 1 against the guided teacher, at the fixed eval times."""
        self._m = 1
        return super().evaluate()

    # ------------------------------------------------------------------ dense batches (data=synthetic)
    def _dense_targets(self, draws, inputs, target):
        x_t, t, caption, mask, null_rows = inputs[:5]
        dev = x_t.device
        per_sample = lambda name: torch.stack([getattr(d, name) for d in draws]).to(dev)  # noqa: E731
        v = self._target(self._m, x_t, t, caption, mask, null_rows, per_sample("clean_frames"), per_sample("t_mid"),
                         per_sample("dt1"), per_sample("dt2"))
        dt = torch.full((len(draws),), distill_embedding(self._m), device=dev)
        return inputs + (dt,), torch.cat([v, target[:, -1:]], dim=1)

    @torch.no_grad()
    def _target(self, m, x_t, t, caption, mask, clean_rows, clean_frames, t_mid, dt1, dt2):
        """(N, C, T, H, W) fp32 target of step size m for the micro-batch (clean_rows: the rows that see the null
        caption; clean_frames (N, T); t_mid, dt1, dt2 (N, n): the half steps)."""
        N, n = t.shape
        tokens = self.tokens_per_chunk
        ranges = block_causal_ranges(N, n, tokens)
        if m == 1:
            # Clean context chunks always see the null caption (as in the base objective and at inference).
            text_caption, text_mask = self.teacher.drop_captions(caption, mask.bool(), clean_rows)
            return self._guided_teacher(x_t, t, text_caption, text_mask, caption, mask, ranges)
        half = distill_embedding(m // 2)
        # The student's own null caption (it is trained; the teacher's stays as it was).
        s_caption, s_mask = self.student.drop_captions(caption, mask.bool(), clean_rows)
        frames = clean_frames[:, None, :, None, None]

        def velocity(x, tt):
            # Clean frames (the i2v image frame inside a noisy chunk) are pasted back, as the sampler does.
            x = torch.where(frames, x_t, x)
            return self.student(x, tt, s_caption, s_mask, ranges, adaln_uncond=torch.zeros(N, dtype=torch.bool,
                                                                                            device=x.device),
                                distill_dt=half).float()

        was_training = self.student.training
        self.student.eval()
        try:
            if self.cfg.distill.shortcut_model == "ema":
                with self._ema.swapped(self.student.named_parameters()):
                    return shortcut_target(velocity, x_t, t, t_mid, dt1, dt2, self.cfg.data.latent_frames_per_chunk)
            return shortcut_target(velocity, x_t, t, t_mid, dt1, dt2, self.cfg.data.latent_frames_per_chunk)
        finally:
            self.student.train(was_training)

    def _guided_teacher(self, x_t, t, text_caption, text_mask, caption, mask, ranges):
        """MAGI-1's three-pass guided velocity of the teacher (the sampler's cfg_number 3)."""
        teacher, x = self.teacher, self.cfg.distill
        N, n = t.shape
        cw = self.cfg.data.latent_frames_per_chunk
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
    def _sample_draw(self, latent_frames: int, stream: int, position: int, fixed_t: Optional[float]) -> ObjectiveDraw:
        draw = super()._sample_draw(latent_frames, stream, position, fixed_t)
        chunks = draw.t.shape[0]
        zero = torch.zeros(chunks)
        if fixed_t is not None:
            return GridDraw(**vars(draw), t_mid=draw.t, dt1=zero, dt2=zero)
        grid = draw_distill_times(chunks, draw.clean_chunks, self._m,
                                  _generator(stream + position * _SAMPLE_STREAM + _DISTILL_STREAM), clean_t=draw.t)
        frames = latent_frames // chunks
        frame_t = torch.where(draw.clean_frames, draw.frame_t, grid.t.repeat_interleave(frames))
        return GridDraw(draw.task, grid.t, draw.clean_chunks, draw.clean_frames, frame_t, False,
                        t_mid=grid.t_mid, dt1=grid.dt1, dt2=grid.dt2)

    def _packed_targets(self, items: List[PackedItem], draws, inputs, target):
        m, R = self._m, self.cfg.data.max_rows_per_sequence
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

    def _packed_velocity(self, model, patches, t, caption, mask, adaln, coords, token_map, dt=None) -> torch.Tensor:
        """(1, P, S) fp32 velocity of a packed sequence (captions already dropped where they should be)."""
        return model.forward_packed(patches, t, caption, mask, adaln, coords, token_map, distill_dt=dt).float()

    def _packed_guided(self, items: List[PackedItem], inputs) -> torch.Tensor:
        """The teacher's three-pass guided velocity on a packed sequence (as `_guided_teacher` per sample)."""
        teacher, x, d = self.teacher, self.cfg.distill, self.cfg.data
        patches, t, caption, mask, null_rows, adaln, coords, token_map = inputs
        R = t.shape[1]
        text_caption, text_mask = teacher.drop_captions(caption, mask.bool(), null_rows.bool())
        null_caption, null_mask = teacher.drop_captions(caption, mask.bool(), torch.ones_like(null_rows, dtype=torch.bool))
        yes = torch.ones(1, R, dtype=torch.bool, device=t.device)
        v_text = self._packed_velocity(teacher, patches, t, text_caption, text_mask, adaln.bool(), coords, token_map)
        v_context = self._packed_velocity(teacher, patches, t, null_caption, null_mask, yes, coords, token_map)
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
        (_, _, _, _, _, _, alone_coords, alone_map), _ = pack_inputs(chunk_items, self.cfg.model, d.seq_length, R)
        v_alone = self._packed_velocity(teacher, patches, t, null_caption, null_mask, yes, alone_coords.to(t.device),
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
        half = distill_embedding(self._m // 2)
        d1, d2 = _per_token(dt1, rows), _per_token(dt2, rows)
        given = (weight == 0).transpose(1, 2)  # (1, S, 1): clean frames (and padding) are pasted back

        def velocity(x, tt):
            x = torch.where(given, patches, x)
            return self._packed_velocity(student, x, tt, caption, mask, adaln.bool(), coords, token_map, dt=half)

        was_training = student.training
        student.eval()
        try:
            swap = self._ema.swapped(student.named_parameters()) if self.cfg.distill.shortcut_model == "ema" \
                else contextlib.nullcontext()
            with swap:
                v1 = velocity(patches, t)
                v2 = velocity(patches + (d1 * v1).transpose(1, 2), t_mid[None])
        finally:
            student.train(was_training)
        total = d1 + d2
        return torch.where(total > 0, (d1 * v1 + d2 * v2) / torch.where(total > 0, total, torch.ones_like(total)), v1)
