"""Held-out evaluation of a training run: fixed-t validation losses and validation videos.

Held-out samples are, for data=synthetic, the samples of another data seed (BatchBuilder.held_out) and, for
data=webdataset, the first packed sequences of data.val_shards. Losses use fixed noise and every chunk at
the same t (trainer.eval_t); the videos use the inference sampler from the held-out captions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from magi_train.config.schema import SamplerConfig, TrainConfig
from magi_train.data.loader import PackedSequence, WebDatasetLoader
from magi_train.data.packed_inputs import caption_rows
from magi_train.parallel.groups import Parallel
from magi_train.training.batches import EVAL_STREAM, Batch, BatchBuilder
from magi_train.training.objectives.base import Objective

VIDEO_FPS = 24


class HeldOut:
    def __init__(self, cfg: TrainConfig, parallel: Parallel, batches: BatchBuilder, objective: Objective):
        self.cfg, self.parallel, self.batches, self.objective = cfg, parallel, batches, objective
        self._sequences: Optional[List[PackedSequence]] = None
        self._decoder = None  # built at the first validation video

    @torch.no_grad()
    def losses(self, models: Sequence[torch.nn.Module], loss: Callable[[List[Batch]], float]) -> Dict[str, float]:
        """Validation loss at each trainer.eval_t (`loss`: the global loss of a list of micro-batches, no
        backward). Returns eval_loss/t=<t> per t and their mean as eval_loss."""
        tc, b = self.cfg.trainer, self.batches
        self.objective.begin_eval()
        for model in models:
            model.eval()
        out: Dict[str, float] = {}
        try:
            for t in tc.eval_t:
                total = 0.0
                for i in range(tc.eval_batches):
                    stream = tc.seed * EVAL_STREAM + i  # the same noise at every t and every evaluation
                    if b.packed:
                        micro = b.packed_micro_batches(self.sequences()[i:i + 1], stream, fixed_t=t)
                    else:
                        B = b.global_batch
                        micro = b.micro_batches(b.held_out, list(range(i * B, (i + 1) * B)), stream, fixed_t=t)
                    total += loss(micro)
                out[f"eval_loss/t={t:g}"] = total / tc.eval_batches
        finally:
            for model in models:
                model.train()
        out["eval_loss"] = sum(out.values()) / len(out)
        return out

    def sequences(self) -> List[PackedSequence]:
        """The held-out packed sequences of this data-parallel rank, read once (unshuffled, one stream per rank)."""
        if self._sequences is None:
            d, p = self.cfg.data, self.parallel
            if not d.val_shards:
                raise ValueError("trainer.eval_every / trainer.sample_every > 0 with data.kind=webdataset need "
                                 "data.val_shards (held-out shards)")
            val = replace(d, shards=d.val_shards, num_streams=p.dp, num_workers=0, shuffle_buffer=0)
            need = self.cfg.trainer.eval_batches
            sequences = []
            for seq in WebDatasetLoader(val, self.cfg.model, p.dp_rank, p.dp):
                if seq.epoch > 0:
                    break
                sequences.append(seq)
                if len(sequences) == need:
                    break
            if len(sequences) < need:
                raise ValueError(f"data.val_shards ({d.val_shards!r}) gives data-parallel rank {p.dp_rank} only "
                                 f"{len(sequences)} packed sequence(s); trainer.eval_batches asks for {need}")
            self._sequences = sequences
        return self._sequences

    def videos(self, model, out_dir: Path, step: int) -> Dict[str, Path]:
        """trainer.sample_count videos from held-out captions with the inference sampler (collective over the
        model-parallel ranks; every data-parallel replica runs it too, rank 0 writes). {name: mp4 path}."""
        from magi_train.training.evaluation.videos import latent_channels, make_decoder, sample_validation_videos

        tc, p = self.cfg.trainer, self.parallel
        prompts, latent_hw = self.video_prompts()
        if self._decoder is None:
            self._decoder = make_decoder(tc.sample_vae, tc.sample_vae_dir, p.device,
                                         latent_channels=latent_channels(model))
        # Distilled models sample with one pass per step; base models with MAGI-1's three-pass guidance.
        sampler = SamplerConfig(num_steps=tc.sample_steps, cfg_number=1 if model.cfg.distill else 3)
        paths = sample_validation_videos(
            model, prompts, model.y_embedder.null_caption_embedding.detach(), latent_hw=latent_hw,
            num_chunks=tc.sample_chunks, sampler_cfg=sampler, seed=tc.seed, decode=self._decoder,
            out_dir=out_dir / "videos", step=step, fps=VIDEO_FPS, write=p.is_main)
        return {f"video/{i}": path for i, path in enumerate(paths)}

    def video_prompts(self):
        """([(caption (sample_chunks, L, Cc), mask)], latent (H, W) or one per prompt) of the first held-out
        samples, each sampled at its own size. A sample with fewer chunks than trainer.sample_chunks repeats
        its last caption row."""
        tc, d = self.cfg.trainer, self.cfg.data
        n = tc.sample_chunks
        prompts = []

        def rows(caption, mask):
            idx = torch.arange(n).clamp(max=caption.shape[0] - 1)
            return caption[idx], mask[idx]

        if not self.batches.packed:
            for i in range(tc.sample_count):
                item = self.batches.held_out[i]
                prompts.append(rows(item["caption"], item["caption_mask"]))
            return prompts, (d.latent_height, d.latent_width)
        sizes = []
        held = [s for seq in self.sequences() for s in seq.samples]
        if len(held) < tc.sample_count:
            raise ValueError(f"trainer.sample_count ({tc.sample_count}) validation videos, but the "
                             f"trainer.eval_batches ({tc.eval_batches}) held-out sequences of data.val_shards "
                             f"({d.val_shards!r}) hold {len(held)} samples: lower trainer.sample_count or raise "
                             "trainer.eval_batches")
        for s in held[:tc.sample_count]:
            caption, mask = caption_rows(s.caption, s.caption_lengths, s.caption.shape[0], d.caption_length)
            prompts.append(rows(caption, mask))
            sizes.append(tuple(s.latent.shape[2:]))
        return prompts, sizes
