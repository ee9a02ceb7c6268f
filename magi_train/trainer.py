"""The flow-matching trainer (single process in this release; the groups it receives carry TP/CP/PP/DP later).

One step:
    x (N, C, T, H, W) clean latents of `n` chunks, captions per chunk
    t (N, n)  per-chunk times, non-increasing along the chunk index; leading chunks may be clean context
    x_t = (1 - t) noise + t x,  v* = x - noise
    loss = mean over noisy chunks of |DiT(x_t, t, captions, block-causal ranges) - v*|^2
Everything random in a step (noise, times, caption dropout) comes from a generator seeded by
(trainer.seed, step), and the batch of step s is a pure function of s, so a resumed run repeats the
uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from magi_train.checkpoint.magi1 import check_state_dict
from magi_train.checkpoint.manager import CheckpointManager
from magi_train.config.schema import TrainConfig
from magi_train.data.synthetic import SyntheticBlobDataset, collate
from magi_train.diffusion.flow_matching import interpolate, masked_mse, velocity_target
from magi_train.diffusion.timesteps import sample_training_times
from magi_train.metrics import MetricsLogger
from magi_train.model.attention import block_causal_ranges
from magi_train.model.dit import build_dit
from magi_train.optim import build_optimizer, grad_norm, lr_at, set_lr
from magi_train.parallel.groups import Parallel

# Streams derived from the run seed; distinct multipliers keep them independent.
_STEP_STREAM = 1_000_003
_EVAL_STREAM = 7_919


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % (2**63))


class Trainer:
    def __init__(self, cfg: TrainConfig, parallel: Parallel):
        self.cfg = cfg
        self.parallel = parallel
        tc = cfg.trainer
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        torch.use_deterministic_algorithms(tc.deterministic)
        torch.manual_seed(tc.seed)  # model initialisation
        self.model = build_dit(cfg.model, tp_group=parallel.tp_group).to(parallel.device)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.dataset = SyntheticBlobDataset(cfg.data, cfg.model.caption_channels, cfg.model.caption_max_length)
        # Another data seed gives held-out samples that the training stream never shows.
        self.held_out = SyntheticBlobDataset(replace(cfg.data, seed=cfg.data.seed + 1_000_000),
                                             cfg.model.caption_channels, cfg.model.caption_max_length)
        self.out_dir = Path(tc.output_dir)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", tc.keep_last)
        p = cfg.model.patch_size
        self.tokens_per_chunk = (cfg.data.latent_frames_per_chunk // cfg.model.t_patch_size) * (
            cfg.data.latent_height // p) * (cfg.data.latent_width // p)
        self.step = 0
        resume_from = self.checkpoints.resolve_resume(tc.resume)
        if resume_from is not None:
            self.load(resume_from)

    # ------------------------------------------------------------------ data
    def batch_indices(self, step: int, batch_size: int) -> List[int]:
        """Sample indices of a step: consecutive slices of per-epoch permutations (seeded by data.seed)."""
        n = len(self.dataset)
        perms: Dict[int, torch.Tensor] = {}  # a batch spans at most two epochs
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(pos, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=_generator(self.cfg.data.seed * 7_777 + epoch))
            out.append(int(perms[epoch][offset]))
        return out

    def get_batch(self, step: int) -> Dict[str, torch.Tensor]:
        return collate([self.dataset[i] for i in self.batch_indices(step, self.cfg.data.micro_batch_size)])

    # ------------------------------------------------------------------ loss
    def loss(self, batch: Dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        device = self.parallel.device
        x = batch["latent"].to(device)
        N, n = x.shape[0], cfg.data.chunks_per_sample
        frames = cfg.data.latent_frames_per_chunk
        t, clean = sample_training_times(N, n, cfg.diffusion, gen)
        noise = torch.randn(x.shape, generator=gen).to(device)
        dropped = torch.rand(N, generator=gen) < cfg.diffusion.caption_dropout
        x_t = interpolate(x, noise, t.to(device), frames)

        caption = batch["caption"].flatten(0, 1).to(device)
        caption_mask = batch["caption_mask"].flatten(0, 1).to(device)
        # Dropped samples (for CFG) and clean context chunks see the learned null caption, as at inference.
        null_rows = (dropped.repeat_interleave(n) | clean.flatten()).to(device)
        caption, caption_mask = self.model.drop_captions(caption, caption_mask, null_rows)
        ranges = block_causal_ranges(N, n, self.tokens_per_chunk)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16"):
            v = self.model(x_t, t.to(device), caption, caption_mask, ranges, adaln_uncond=dropped.to(device))
        return masked_mse(v, velocity_target(x, noise), (~clean).to(device), frames)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> Dict[str, float]:
        step = self.step
        started = time.perf_counter()
        lr = lr_at(step, self.cfg.optimizer, self.cfg.trainer.max_steps)
        set_lr(self.optimizer, lr)
        batch = self.get_batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch, _generator(self.cfg.trainer.seed * _STEP_STREAM + step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.optimizer.clip_grad > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.clip_grad))
        else:
            norm = grad_norm(params)
        self.optimizer.step()
        self.step += 1
        elapsed = time.perf_counter() - started
        tokens = batch["latent"].shape[0] * self.cfg.data.chunks_per_sample * self.tokens_per_chunk
        return {"step": self.step, "loss": loss.item(), "grad_norm": norm, "lr": lr, "tokens_per_s": tokens / elapsed}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Loss on fixed held-out samples (indices past the training set) with fixed noise and times."""
        self.model.eval()
        total = 0.0
        B = self.cfg.data.micro_batch_size
        for i in range(self.cfg.trainer.eval_batches):
            batch = collate([self.held_out[j] for j in range(i * B, (i + 1) * B)])
            total += self.loss(batch, _generator(self.cfg.trainer.seed * _EVAL_STREAM + i)).item()
        self.model.train()
        return total / self.cfg.trainer.eval_batches

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> Dict[str, object]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {"step": self.step, "config": asdict(self.cfg)},
        }

    def save(self) -> Path:
        return self.checkpoints.save(self.step, self.state())

    def load(self, path: Path) -> None:
        state = self.checkpoints.load(path)
        # A checkpoint of another model preset fails here, naming the keys and shapes that differ.
        expected = {k: (tuple(v.shape), None) for k, v in self.model.state_dict().items()}
        check_state_dict(expected, state["model"], path / "model.pt")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["trainer"]["step"])
        if self.parallel.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ loop
    def fit(self, until: Optional[int] = None) -> List[Dict[str, float]]:
        """Train to `trainer.max_steps`, or stop early after step `until` (the schedule still spans
        max_steps, so a run stopped and resumed is the same run)."""
        tc = self.cfg.trainer
        last = tc.max_steps if until is None else min(until, tc.max_steps)
        logger = MetricsLogger(tc, self.out_dir, asdict(self.cfg), self.step, enabled=self.parallel.is_main)
        history: List[Dict[str, float]] = []
        try:
            if tc.eval_every and self.step == 0:
                history.append({"step": 0, "eval_loss": self.evaluate()})
                logger.log(history[-1])
            while self.step < last:
                rec = self.train_step()
                history.append(rec)
                logger.advance(1, rec["loss"])
                if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
                    rec["eval_loss"] = self.evaluate()
                if self.step % tc.log_every == 0 or self.step == tc.max_steps or "eval_loss" in rec:
                    logger.log(rec)
                if tc.save_every and self.step % tc.save_every == 0:
                    self.save()
            if not tc.save_every or self.step % tc.save_every:
                self.save()  # the final state is always kept
        finally:
            logger.close()
        return history


def summarize(history: List[Dict[str, float]], window: Optional[int] = None) -> Dict[str, float]:
    """First/last-window means of the training loss and of the held-out loss, and the relative drop."""
    losses = [h["loss"] for h in history if "loss" in h]
    w = window or max(1, math.ceil(len(losses) / 10))
    out = {"first_loss": sum(losses[:w]) / w, "last_loss": sum(losses[-w:]) / w}
    out["loss_drop"] = 1 - out["last_loss"] / out["first_loss"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if len(evals) >= 2:
        out["first_eval_loss"], out["last_eval_loss"] = evals[0], evals[-1]
        out["eval_loss_drop"] = 1 - evals[-1] / evals[0]
    return out
