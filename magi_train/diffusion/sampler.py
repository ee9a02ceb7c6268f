"""Chunk-wise generation: the staircase schedule driving the DiT with guidance, a KV cache and Euler steps.

`StaircaseSampler.sample` yields each chunk as soon as it is fully denoised, so the caller can decode and
write it while later chunks are still being generated. It follows the released `SampleTransport` (model/README.md §2-§4):

* every DiT call denoises the chunks of the current window (oldest = least noisy) and, at the first step of
  a stage, re-forwards the chunk that just finished at t = clean_t so that its clean keys/values enter the
  cache (null caption, attending only to itself by default);
* cfg_number 3: pass 1 text + context (reads the cache), pass 2 null text + context (writes it), pass 3 null
  text without context (each chunk alone), combined per chunk with t-bucketed scales;
  cfg_number 1: one text pass that writes the cache; for distilled models the oldest chunk, once nearly
  clean, also runs alone in the same call and the two predictions are blended;
* a prefix (i2v image latent, v2v prefix video latents) is pasted over its frames before every call; chunks
  entirely inside the prefix are run once, clean, to fill the cache, and never denoised.

The cache holds only the chunks later calls read (a window of the kv ranges' reach, magi_train/diffusion/
kv_cache.py), so its memory and the tokens each call reads do not grow with the video; key ranges given to the
model start at the first chunk a call reads.

With `kv_cache=False` nothing is cached: every call prepends the earlier chunks it reads, as they were when
cached (same latents, t, caption and adaLN row, same lookback), and those their keys depend on in turn (with the
released clean_chunk_kvrange=1 a clean chunk attends only to itself: just the lookback window). It must give
the same video.

Under model parallelism every rank runs this same loop on identical inputs (same noise, captions and
velocities): the model is then a tensor/context-parallel DiT, whose output is gathered on every rank, or a
pipeline stage (`InferencePipeline` in `magi_train/parallel/pipeline.py`), which broadcasts it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from magi_train.config.schema import SamplerConfig
from magi_train.diffusion.guidance import blend_nearly_clean, cfg_scales, combine_cfg3
from magi_train.diffusion.kv_cache import KVCache, cache_window
from magi_train.diffusion.schedule import StepPlan, staircase
from magi_train.diffusion.time_grid import TimeGrid
from magi_train.model.attention import AttnRanges

# Lookback of prefix chunks when neither clean_chunk_kvrange nor noise2clean_kvrange says (released).
_DEFAULT_PREFIX_LOOKBACK = 8


@dataclass
class Captions:
    """Caption rows of one generation (released layout): row 0 conditional, row 1 null, one entry per chunk."""

    y: torch.Tensor  # (2, num_chunks, L, C)
    mask: torch.Tensor  # (2, num_chunks, L)


@dataclass
class EmittedChunk:
    index: int  # absolute chunk index
    latent: torch.Tensor  # (1, C, chunk_width, H, W), the whole chunk
    prefix_frames: int  # leading latent frames of this chunk that belong to the prefix
    step: int  # sampler step after which it was emitted
    total_steps: int


@dataclass
class _Call:
    """One DiT evaluation: the chunks in x, their t, caption rows, key ranges (absolute chunk units)."""

    x: torch.Tensor
    chunks: Tuple[int, ...]
    t: torch.Tensor  # (len(chunks),) fp32
    rows: torch.Tensor  # (len(chunks), L, C)
    masks: torch.Tensor  # (len(chunks), L)
    kv_chunks: Tuple[Tuple[int, int], ...]
    adaln_uncond: bool
    dt: Optional[float]
    cached: bool  # released: the KV-cache path (read earlier chunks, the writing pass stores these)
    keep: Optional[int] = None  # earliest chunk this or a later call reads (the cache may drop earlier ones)


class StaircaseSampler:
    def __init__(self, model: torch.nn.Module, cfg: SamplerConfig, forward: Optional[Callable] = None):
        """`forward`: what runs the DiT (default the model; inference may pass a torch.compile wrapper of it)."""
        self.model = model
        self._dit = model if forward is None else forward
        self.cfg = cfg
        mc = model.cfg
        self.chunk_width = mc.chunk_width
        self.distill = mc.distill
        if cfg.cfg_number not in (1, 3):
            raise ValueError(f"sampler.cfg_number must be 1 or 3, got {cfg.cfg_number}")
        if self.chunk_width % mc.t_patch_size:
            raise ValueError(f"model.chunk_width ({self.chunk_width}) must be divisible by t_patch_size ({mc.t_patch_size})")
        self.grid = TimeGrid(cfg.num_steps, cfg.shortcut_mode)
        self.ts = self.grid.t
        self.intervals = self.grid.intervals
        # The cache is written by the pass whose result it must hold: null caption (cfg 3, adaLN row -1) or
        # the single text pass (cfg 1, row -2).
        self.write_uncond = cfg.cfg_number == 3
        # Distilled one-pass guidance appends the nearly-clean chunk's duplicate after a call's last chunk.
        self.duplicates = cfg.cfg_number == 1 and self.distill

    # ------------------------------------------------------------------ public
    def plans(self, num_chunks: int, prefix_chunks: int) -> List[StepPlan]:
        c = self.cfg
        return staircase(num_chunks, c.window_size, c.num_steps, prefix_chunks, tuple(c.noise2clean_kvrange),
                         c.clean_chunk_kvrange)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, captions: Captions, prefix: Optional[torch.Tensor] = None,
               on_step: Optional[Callable[[StepPlan], None]] = None,
               before_step: Optional[Callable[[StepPlan], None]] = None) -> Iterator[EmittedChunk]:
        """noise (1, C, n*chunk_width, H, W) fp32; prefix (1, C, P, H, W) clean latents or None.
        `before_step(plan)` / `on_step(plan)` run before / after each step (the engine applies live prompts
        before a step, so that one given while a chunk is being decoded still reaches the next step)."""
        n = self.prepare(noise, captions, prefix)
        cw = self.chunk_width
        P = 0 if prefix is None else prefix.shape[2]
        off = P // cw
        plans = self.plans(n, off)
        for plan in plans:
            if before_step is not None:
                before_step(plan)
            if plan.extract_prefix:
                self._extract_prefix(off)
            self._step(plan)
            if on_step is not None:
                on_step(plan)
            if plan.emit is not None:
                c = plan.emit
                latent = self._x[:, :, c * cw:(c + 1) * cw].clone()
                yield EmittedChunk(c, latent, max(0, min(P - c * cw, cw)), plan.step, len(plans))

    def prepare(self, noise: torch.Tensor, captions: Captions, prefix: Optional[torch.Tensor] = None) -> int:
        """Set up one generation (latents, captions, an empty KV cache); returns the number of chunks."""
        cw = self.chunk_width
        if noise.ndim != 5 or noise.shape[0] != 1 or noise.shape[2] % cw:
            raise ValueError(f"noise must be (1, C, num_chunks*{cw}, H, W), got {tuple(noise.shape)}")
        n = noise.shape[2] // cw
        if captions.y.shape[:2] != (2, n) or captions.mask.shape[:2] != (2, n):
            raise ValueError(f"captions must have shape (2, {n}, L, C) / (2, {n}, L); got {tuple(captions.y.shape)}")
        P = 0 if prefix is None else prefix.shape[2]
        if P >= n * cw:
            raise ValueError(f"prefix of {P} latent frames leaves nothing to generate in {n} chunks")
        self._x = noise.float().clone()
        self._prefix = prefix
        self._captions = captions
        self._tokens = self._tokens_per_chunk(noise)
        # Indexed by global layer; a pipeline stage's cache allocates only its own layers (on first write).
        # Under context parallelism each rank caches all tokens of its heads (the keys after the all-to-all).
        plans = self.plans(n, P // cw)
        self.window = cache_window(plans, P // cw, duplicate=self.duplicates)
        self._keep = dict(zip(plans, self.window.keep))
        self._cache = KVCache(self.model.cfg.num_layers, self._tokens, self.window.capacity, self.cfg.kv_offload) \
            if self.cfg.kv_cache else None
        # Tokens fed to the model per call -> calls (counted, for tests and benchmarks).
        self.fed_tokens: Counter = Counter()
        # What each cached chunk was computed from, for the cache-free oracle: latent and lookback.
        self._context: dict = {}
        return n

    # ------------------------------------------------------------------ one sampler step
    def _step(self, plan: StepPlan) -> None:
        cfg, cw, ts = self.cfg, self.chunk_width, self.ts
        per_stage = cfg.num_steps // cfg.window_size
        idx = plan.step % per_stage
        forwarded = plan.forwarded
        x = torch.cat([self._chunk_latent(c) for c in forwarded], dim=2)
        t = torch.stack([ts[k] for k in plan.step_index])
        if plan.clean_chunk is not None:
            t = torch.cat([torch.tensor([cfg.clean_t], dtype=torch.float32), t])
        x, t = self._paste_prefix(x, t, plan.slice_point)
        if plan.clean_chunk is not None:
            self._context[plan.clean_chunk] = (x[:, :, :cw].clone(), plan.kv_chunks[0][0])
        v = self.velocity(plan, x, t, idx)

        # Euler step per chunk, from the (prefix-pasted) input latents.
        dn = len(plan.chunks)
        x_active = x[:, :, -dn * cw:]
        k = torch.tensor(plan.step_index)
        delta = ts[k + 1] - ts[k]
        N, C, T, H, W = x_active.shape
        x_new = x_active.reshape(N, C, dn, cw, H, W) + v.reshape(N, C, dn, cw, H, W) * delta.reshape(1, 1, -1, 1, 1, 1)
        self._x[:, :, plan.chunks[0] * cw:(plan.chunks[-1] + 1) * cw] = x_new.reshape(N, C, T, H, W)

    @torch.no_grad()
    def velocity(self, plan: StepPlan, x: torch.Tensor, t: torch.Tensor, idx: int) -> torch.Tensor:
        """The guided velocity of the denoising chunks of one call (the released `forward_dispatcher`).

        x holds the forwarded chunks (the clean re-forward first, if any) and t their times; `idx` is the step
        inside the stage (for the shortcut step size)."""
        cfg, cw = self.cfg, self.chunk_width
        y, mask = self._captions.y, self._captions.mask
        dn, forwarded = len(plan.chunks), plan.forwarded
        # The clean re-forward always takes the null caption (row 1), in the text pass too.
        cond_rows = torch.cat([y[1, :1]] * (plan.clean_chunk is not None) + [y[0, plan.chunks[0]:plan.range_num]])
        cond_masks = torch.cat([mask[1, :1]] * (plan.clean_chunk is not None) + [mask[0, plan.chunks[0]:plan.range_num]])
        null_rows = torch.cat([y[1, :1]] * (plan.clean_chunk is not None) + [y[1, plan.chunks[0]:plan.range_num]])
        null_masks = torch.cat([mask[1, :1]] * (plan.clean_chunk is not None) + [mask[1, plan.chunks[0]:plan.range_num]])
        dt = self.grid.step_size_input(float(self.intervals[idx])) if self.distill else None
        # Released: decided on the oldest denoising chunk's fp32 t as a Python float (0.3 rounds above 0.3).
        nearly_clean = t[1 if plan.clean_chunk is not None else 0].item() > cfg.nearly_clean_threshold
        cached = plan.clean_chunk is not None or plan.slice_point > 0
        keep = self._keep.get(plan)
        full = lambda rows, masks, uncond: _Call(x, forwarded, t, rows, masks, plan.kv_chunks, uncond, dt, cached, keep)

        if cfg.cfg_number == 3:
            text = self._forward(full(cond_rows, cond_masks, False), write=False)
            context = self._forward(full(null_rows, null_masks, True), write=True, skip_last_write=nearly_clean)
            alone = self._forward_alone(x[:, :, -dn * cw:], t[-dn:], null_rows[-dn:], null_masks[-dn:], True, dt)
            s_prev, s_text = cfg_scales(t[-dn:], cfg.cfg_t_range, cfg.prev_chunk_scales, cfg.text_scales)
            v = torch.cat([combine_cfg3(alone[:, :, m * cw:(m + 1) * cw],
                                        context[:, :, -dn * cw:][:, :, m * cw:(m + 1) * cw],
                                        text[:, :, -dn * cw:][:, :, m * cw:(m + 1) * cw], s_prev[m], s_text[m])
                           for m in range(dn)], dim=2)
        elif self.distill and nearly_clean:
            # The oldest denoising chunk again, appended, attending only to itself (keys after all others).
            first = 1 if plan.clean_chunk is not None else 0
            dup = slice(first * cw, (first + 1) * cw)
            end = plan.kv_chunks[-1][1]
            call = _Call(torch.cat([x, x[:, :, dup]], dim=2), forwarded + (forwarded[first],),
                         torch.cat([t, t[first:first + 1]]), torch.cat([cond_rows, cond_rows[first:first + 1]]),
                         torch.cat([cond_masks, cond_masks[first:first + 1]]),
                         plan.kv_chunks + ((end, end + 1),), False, dt, cached, keep)
            out = self._forward(call, write=True, skip_last_write=True)
            out, out_alone = out[:, :, :-cw], out[:, :, -cw:]
            out[:, :, dup] = blend_nearly_clean(out[:, :, dup], out_alone, cfg.nearly_clean_weight)
            v = out[:, :, -dn * cw:]
        else:
            v = self._forward(full(cond_rows, cond_masks, False), write=True, skip_last_write=nearly_clean)[:, :, -dn * cw:]
        return v

    # ------------------------------------------------------------------ model calls
    def _forward(self, call: _Call, write: bool, skip_last_write: bool = False) -> torch.Tensor:
        """Run the DiT on one call, with the KV cache (or, without one, with recomputed context).

        Key coordinates start at chunk `lo`, the first one the call reads: the cache or the recomputed
        context supplies the chunks [lo, first) before the first one in `call.x`."""
        tokens, cw = self._tokens, self.chunk_width
        first = call.chunks[0]
        x, t, rows, masks, kv = call.x, call.t, call.rows, call.masks, list(call.kv_chunks)
        uncond = torch.full((len(call.chunks),), call.adaln_uncond)
        hook, x_first = None, first
        lo = min([first] + [s for s, _ in kv])
        if self._cache is not None:
            if not call.cached:
                lo = first  # released: such a call attends only to its own chunks
            else:
                n_write = len(call.chunks) - int(skip_last_write) if write else 0
                hook = self._cache.hook(first, lo, len(call.chunks), n_write, call.keep)
        elif lo < first:
            # No cache: prepend the earlier chunks the call reads as they were cached (clean latent, clean_t,
            # null caption, the writing pass's adaLN row, own lookback), and those their keys read in turn.
            lo = self._context_start(lo, first)
            n = first - lo
            x = torch.cat([self._context[c][0] for c in range(lo, first)] + [x], dim=2)
            t = torch.cat([torch.full((n,), self.cfg.clean_t, dtype=torch.float32), t])
            rows = torch.cat([self._captions.y[1, :1].expand(n, -1, -1), rows])
            masks = torch.cat([self._captions.mask[1, :1].expand(n, -1), masks])
            uncond = torch.cat([torch.full((n,), self.write_uncond), uncond])
            kv = [(self._context[c][1], c + 1) for c in range(lo, first)] + kv
            x_first = lo
        else:
            lo = first
        ranges = AttnRanges.from_lists([(m * tokens, (m + 1) * tokens) for m in range(len(kv))],
                                       [((s - lo) * tokens, (e - lo) * tokens) for s, e in kv])
        # One adaLN flag for the sample unless recomputed context needs another row than the current chunks.
        flags = uncond[None] if bool(uncond.any()) != bool(uncond.all()) else uncond[:1]
        self.fed_tokens[x.shape[2] // cw * tokens] += 1
        out = self._dit(x, t[None], rows, masks, ranges, adaln_uncond=flags, slice_point=x_first,
                        distill_dt=call.dt, kv_hook=hook)
        return out[:, :, (first - x_first) * cw:]

    def _context_start(self, lo: int, first: int) -> int:
        """First chunk the recomputed context needs: the chunks [lo, first) and, transitively, their lookbacks."""
        while True:
            start = min([lo] + [self._context[c][1] for c in range(lo, first)])
            if start == lo:
                return lo
            lo = start

    def _forward_alone(self, x, t, rows, masks, uncond: bool, dt) -> torch.Tensor:
        """Each chunk as its own sample, attending only to itself (the unconditional pass of cfg 3)."""
        cw, tokens = self.chunk_width, self._tokens
        dn = t.shape[0]
        xb = x.reshape(1, x.shape[1], dn, cw, *x.shape[3:]).squeeze(0).transpose(0, 1)  # (dn, C, cw, H, W)
        ranges = AttnRanges.from_lists([(b * tokens, (b + 1) * tokens) for b in range(dn)],
                                       [(b * tokens, (b + 1) * tokens) for b in range(dn)])
        self.fed_tokens[dn * tokens] += 1
        out = self._dit(xb, t[:, None], rows, masks, ranges, adaln_uncond=torch.full((dn,), uncond),
                        slice_point=0, distill_dt=dt)
        return out.transpose(0, 1).reshape(1, out.shape[1], dn * cw, *out.shape[3:])

    def _extract_prefix(self, off: int) -> None:
        """Fill the cache with the clean prefix chunks 0..off-1 (each attending to its lookback only)."""
        cw, cfg = self.chunk_width, self.cfg
        lookback = cfg.clean_chunk_kvrange if cfg.clean_chunk_kvrange != -1 else (
            cfg.noise2clean_kvrange[-1] if cfg.noise2clean_kvrange else _DEFAULT_PREFIX_LOOKBACK)
        kv = tuple((max(0, c + 1 - lookback), c + 1) for c in range(off))
        x = self._prefix[:, :, :off * cw].float()
        for c in range(off):
            self._context[c] = (x[:, :, c * cw:(c + 1) * cw], kv[c][0])
        if self._cache is None:
            return
        y, mask = self._captions.y, self._captions.mask
        dt = self.grid.step_size_input(float(self.intervals[0])) if self.distill else None
        call = _Call(x, tuple(range(off)), torch.full((off,), cfg.clean_t, dtype=torch.float32), y[1, :off],
                     mask[1, :off], kv, self.write_uncond, dt, cached=True, keep=self.window.prefix_keep)
        self._forward(call, write=True)

    # ------------------------------------------------------------------ helpers
    def _chunk_latent(self, c: int) -> torch.Tensor:
        return self._x[:, :, c * self.chunk_width:(c + 1) * self.chunk_width]

    def _paste_prefix(self, x: torch.Tensor, t: torch.Tensor, first_chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Overwrite the prefix frames inside x (released `try_pad_prefix_video`); chunks entirely inside the
        prefix get t = 1. Partially covered chunks keep their noisy t."""
        if self._prefix is None:
            return x, t
        start = first_chunk * self.chunk_width
        P = self._prefix.shape[2]
        if P <= start:
            return x, t
        n = min(P - start, x.shape[2])
        x = x.clone()
        x[:, :, :n] = self._prefix[:, :, start:start + n]
        full = (P - start) // self.chunk_width
        if full > 0:
            t = t.clone()
            t[:full] = 1.0
        return x, t

    def _tokens_per_chunk(self, x: torch.Tensor) -> int:
        mc = self.model.cfg
        _, _, _, H, W = x.shape
        if H % mc.patch_size or W % mc.patch_size:
            raise ValueError(f"latent size {H}x{W} is not divisible by model.patch_size={mc.patch_size}")
        return (self.chunk_width // mc.t_patch_size) * (H // mc.patch_size) * (W // mc.patch_size)
