"""MAGI-1's multi-task training objective: one model learns t2v, i2v and video continuation (v2v).

The tasks differ only in which latent frames are given clean (MAGI-1 report §2.2.3):
- t2v: every chunk is noisy;
- i2v: the first latent frame of chunk 0 is clean, the rest of chunk 0 keeps its noisy time (as at
  inference, where the image latent is pasted into a chunk that is being denoised);
- v2v: the leading 1..chunks-1 chunks are clean context.

Clean frames carry up to 5% noise (exposure bias: their time is U[clean_t_min, 1]) and no loss, but they
stay in the graph: their gradients through attention are kept (blocking them degrades the model). Clean
context chunks see the learned null caption. Per-chunk times never increase along the chunk index (earlier
chunks are cleaner). Images are one-frame videos and always t2v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from magi_train.config.schema import DiffusionConfig
from magi_train.diffusion.time_grid import grid_time, logit_normal, shift_time

TASKS = ("t2v", "i2v", "v2v")


@dataclass
class ObjectiveDraw:
    task: str
    t: torch.Tensor  # (chunks,) fp32 time of each chunk (what the timestep embedder sees)
    clean_chunks: torch.Tensor  # (chunks,) bool: clean context chunks (null caption)
    clean_frames: torch.Tensor  # (T,) bool: latent frames given (nearly) clean, no loss
    frame_t: torch.Tensor  # (T,) fp32 interpolation time of each latent frame
    dropped: bool  # caption dropout (classifier-free guidance)

    @property
    def frame_weight(self) -> torch.Tensor:
        """(T,) loss weight of each latent frame."""
        return (~self.clean_frames).float()


def task_probabilities(cfg: DiffusionConfig, chunks: int, is_image: bool) -> torch.Tensor:
    """(t2v, i2v, v2v) probabilities for a sample; tasks that do not fit it (v2v needs two chunks, an image
    has nothing to generate after its frame) give their share to t2v."""
    i2v = 0.0 if is_image else cfg.i2v_prob
    v2v = 0.0 if is_image or chunks < 2 else cfg.clean_prefix_prob
    return torch.tensor([1.0 - i2v - v2v, i2v, v2v])


def draw_objective(latent_frames: int, chunk_frames: int, is_image: bool, cfg: DiffusionConfig,
                   generator: torch.Generator) -> ObjectiveDraw:
    """One sample's task, times and caption dropout; every draw comes from `generator`, in a fixed order."""
    chunks = latent_frames // chunk_frames
    g = generator
    task = TASKS[int(torch.multinomial(task_probabilities(cfg, chunks, is_image), 1, generator=g))]
    t = shift_time(logit_normal((chunks,), cfg.t_logit_mean, cfg.t_logit_std, g), cfg.t_shift)
    t = torch.sort(t, descending=True).values
    if cfg.staircase_prob > 0 and bool(torch.rand(1, generator=g) < cfg.staircase_prob):
        t = staircase_times(chunks, cfg, g)
    # Clean times for every chunk, and one for the i2v frame (drawn whatever the task: a fixed draw order).
    clean_t = cfg.clean_t_min + (1 - cfg.clean_t_min) * torch.rand(chunks + 1, generator=g)
    n_clean = int(torch.randint(1, max(chunks, 2), (1,), generator=g))
    dropped = bool(torch.rand(1, generator=g) < cfg.caption_dropout)

    clean_chunks = torch.zeros(chunks, dtype=torch.bool)
    if task == "v2v":
        clean_chunks[:n_clean] = True
        t = torch.where(clean_chunks, clean_t[:chunks], t)
        # Keep the order if a noisy draw exceeded a clean one (vanishingly rare with the 1/3 shift).
        t = torch.cummin(t, dim=0).values
    clean_frames = clean_chunks.repeat_interleave(chunk_frames)
    frame_t = t.repeat_interleave(chunk_frames)
    if task == "i2v":
        clean_frames[0] = True
        frame_t[0] = clean_t[chunks]
    return ObjectiveDraw(task, t, clean_chunks, clean_frames, frame_t, dropped)


def staircase_times(chunks: int, cfg: DiffusionConfig, generator: torch.Generator) -> torch.Tensor:
    """(chunks,) times as the inference window holds them: chunk 0 at grid position u ~ U[0, 1], chunk k at
    u - k / staircase_stages (clamped at 0: not started), each t = shift(u²) (the sampler's TimeGrid map)."""
    u0 = torch.rand(1, generator=generator)
    u = (u0 - torch.arange(chunks, dtype=torch.float32) / cfg.staircase_stages).clamp(min=0.0)
    return grid_time(u, cfg.t_shift)


def fixed_draw(latent_frames: int, chunk_frames: int, t: float) -> ObjectiveDraw:
    """Validation: text-to-video with every chunk at time `t` and the caption kept."""
    chunks = latent_frames // chunk_frames
    times = torch.full((chunks,), float(t))
    return ObjectiveDraw("t2v", times, torch.zeros(chunks, dtype=torch.bool),
                         torch.zeros(latent_frames, dtype=torch.bool), times.repeat_interleave(chunk_frames), False)


def motion_weight(x: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """Loss weight of each latent element's position, (T, H, W) for x (C, T, H, W) or (N, T, H, W) for
    (N, C, T, H, W): 1 + motion_weight * min(d / motion_scale, 1), d the RMS over channels of x's departure
    from its temporal median (the still background departs by VAE noise only, a moving shape by its whole
    contrast; a still shape is in the median and keeps weight 1). All ones for one-frame samples."""
    c = x.ndim - 4  # the channel dim
    median = x.median(dim=c + 1, keepdim=True).values
    d = (x - median).square().mean(dim=c).sqrt()
    return 1.0 + cfg.motion_weight * (d / cfg.motion_scale).clamp(max=1.0)


def noisy_input(x: torch.Tensor, noise: torch.Tensor, frame_t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) noise + t x per latent frame; x, noise (C, T, H, W) or (N, C, T, H, W), frame_t (T,) or (N, T)."""
    tt = frame_t.to(x.dtype)
    tt = tt[:, None, :, None, None] if tt.ndim == 2 else tt[None, :, None, None]
    return (1 - tt) * noise + tt * x
