"""The math of MAGI-1 shortcut + CFG distillation (report §2.3 and §2.4.3; Frans et al. 2024, shortcut models).

A distilled model v(x, t, s) is conditioned on a step size s as well as on t, and one step moves a chunk from
t to t + Δt by x += Δt v(x, t, s). Step sizes live on the 64-step inference grid G = DISTILL_GRID.t: a step of
size m (an integer, in 1/64 units of the grid coordinate u) takes grid index k to k + m, so s = m / 64. The
grid is non-uniform (u², then the 1/3 shift: magi_train/diffusion/time_grid.py), which is why the two half
steps that define the target of a step m carry their own Δt's:

    v(x_t, t, m) = [Δt1 v(x_t, t, m/2) + Δt2 v(x', t_mid, m/2)] / (Δt1 + Δt2),   x' = x_t + Δt1 v(x_t, t, m/2)

with t = G[k], t_mid = G[k + m/2], Δt1 = t_mid - t, Δt2 = G[k + m] - t_mid. Training cycles over the step
sizes: 8 of every 11 iterations at m = 1 (plain flow matching with the classifier-free guidance of the
three-pass teacher folded in), then one each at m = 2, 4, 8 (self-consistency, targets from the EMA student).

Everything here is pure tensor math; the distillation objective (magi_train/training/objectives/distillation.py)
binds the model calls. Convention: t = 0 noise, t = 1 clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from magi_train.diffusion.guidance import cfg_scales, combine_cfg3
from magi_train.diffusion.time_grid import TimeGrid

# The grid every step size lives on: the released 64-step sampler grid (the finest step, s = 1/64).
DISTILL_GRID = TimeGrid(64)
GRID_STEPS = DISTILL_GRID.num_steps
# Released recipe: s cycles through [1/64] x 8 + [1/32, 1/16, 1/8] (in grid units m = 64 s).
STEP_CYCLE: Tuple[int, ...] = (1,) * 8 + (2, 4, 8)


# ---------------------------------------------------------------------------------------------- step sizes
def _is_step_size(m, grid_steps: int = GRID_STEPS) -> bool:
    """A positive power of two dividing the grid (bool is an int in Python; it is not a step size)."""
    return (isinstance(m, int) and not isinstance(m, bool) and m > 0 and m & (m - 1) == 0
            and grid_steps % m == 0)


def check_step_cycle(cycle: Sequence[int]) -> Tuple[int, ...]:
    """The cycle as a tuple, or a ValueError naming `distill.step_cycle`."""
    cycle = tuple(cycle)
    if not cycle:
        raise ValueError("distill.step_cycle must not be empty")
    bad = [m for m in cycle if not _is_step_size(m)]
    if bad:
        raise ValueError(f"distill.step_cycle={list(cycle)}: every entry must be a positive power of two dividing "
                         f"{GRID_STEPS} (a step of m/{GRID_STEPS} of the grid), got {bad}")
    return cycle


def step_size_at(step: int, cycle: Sequence[int] = STEP_CYCLE) -> int:
    """Step size m (in 1/64 grid units) of training iteration `step`: cyclic, so every window of len(cycle)
    consecutive iterations sees each entry once (deterministic: a resumed run continues the same cycle)."""
    cycle = check_step_cycle(cycle)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"training step must be a non-negative int, got {step!r}")
    return cycle[step % len(cycle)]


def distill_embedding(m: int) -> float:
    """Input of the step-size embedding (t_emb += t_embedder(this)) for step size m: a step of m/64 is the
    step of a 64/m-step sampler, whose grid feeds TimeGrid(64 // m).step_size_input(1) (64 -> 32, 8 -> 4)."""
    if not _is_step_size(m):
        raise ValueError(f"step size m must be a positive power of two dividing {GRID_STEPS}, got {m!r}")
    return TimeGrid(GRID_STEPS // m).step_size_input(1)


# ---------------------------------------------------------------------------------------------- times
@dataclass
class DistillDraw:
    """Per-chunk times of one sample for a step of size m (all (chunks,) fp32 except k).

    Noisy chunks sit on grid points: t = G[k], t_mid = G[k + m/2], t_end = G[k + m] (t_mid = t_end for m = 1).
    Clean chunks (the v2v context prefix) keep the caller's t and never move: t_mid = t_end = t, dt1 = dt2 = 0.
    """
    m: int
    k: torch.Tensor  # (chunks,) int64 grid index of each noisy chunk, -1 for clean chunks
    t: torch.Tensor
    t_mid: torch.Tensor
    t_end: torch.Tensor
    dt1: torch.Tensor  # t_mid - t
    dt2: torch.Tensor  # t_end - t_mid
    clean_chunks: torch.Tensor  # (chunks,) bool

    @property
    def dt(self) -> torch.Tensor:
        """(chunks,) Δt of the full step (the student's step), dt1 + dt2."""
        return self.dt1 + self.dt2

    @property
    def embedding(self) -> float:
        """Step-size embedding input of the student (step m)."""
        return distill_embedding(self.m)

    @property
    def half_embedding(self) -> float:
        """Step-size embedding input of the two half steps (the EMA teacher, step m/2); m must be > 1."""
        if self.m < 2:
            raise ValueError("a step of size 1 has no half steps (its target is the flow-matching/CFG teacher)")
        return distill_embedding(self.m // 2)


def draw_distill_times(num_chunks: int, clean_chunks: torch.Tensor, m: int, g: torch.Generator,
                       grid: Optional[torch.Tensor] = None, clean_t: Optional[torch.Tensor] = None) -> DistillDraw:
    """Grid times of one sample's chunks for a step of size m.

    Each noisy chunk gets a grid index k, uniform over the valid starts {0, m, 2m, ..., L - m} (L = len(grid)
    - 1): t on multiples of the step, as the shortcut-model recipe, so a step never leaves the grid. The k's
    are drawn i.i.d. and sorted descending: earlier chunks are cleaner (larger t). The generator always
    yields `num_chunks` draws, whatever the clean mask (a fixed draw order). Clean chunks must be a leading
    prefix and take their times from `clean_t` ((chunks,), e.g. ObjectiveDraw.t; only the clean entries are
    read). `grid` defaults to DISTILL_GRID.t.
    """
    grid = DISTILL_GRID.t if grid is None else grid.to(torch.float32)
    steps = grid.numel() - 1
    if not _is_step_size(m, steps):
        raise ValueError(f"step size m must be a positive power of two dividing the grid's {steps} steps, got {m!r}")
    clean_chunks = torch.as_tensor(clean_chunks, dtype=torch.bool).reshape(-1)
    if clean_chunks.numel() != num_chunks:
        raise ValueError(f"clean_chunks has {clean_chunks.numel()} entries for {num_chunks} chunks")
    n_clean = int(clean_chunks.sum())
    if n_clean and not bool(clean_chunks[:n_clean].all()):
        raise ValueError(f"clean chunks must be a leading prefix (v2v context), got {clean_chunks.tolist()}")
    if n_clean and clean_t is None:
        raise ValueError("clean_t is required when the sample has clean chunks")

    starts = steps // m  # number of valid grid starts
    draws = torch.randint(0, starts, (num_chunks,), generator=g)
    noisy_k = torch.sort(draws[: num_chunks - n_clean] * m, descending=True).values
    k = torch.cat([torch.full((n_clean,), -1, dtype=torch.long), noisy_k])

    # Index the grid (no float additions), so t, t_mid and t_end are exactly grid points.
    noisy = ~clean_chunks
    safe_k = k.clamp(min=0)
    t = grid[safe_k]
    t_mid = grid[safe_k + (m // 2 if m > 1 else m)]  # m = 1 has no midpoint: t_mid = t_end, dt2 = 0
    t_end = grid[safe_k + m]
    if n_clean:
        given = torch.as_tensor(clean_t, dtype=torch.float32).reshape(-1)
        if given.numel() != num_chunks:
            raise ValueError(f"clean_t must have one time per chunk ({num_chunks}), got {given.numel()}")
        t = torch.where(noisy, t, given)
        t_mid = torch.where(noisy, t_mid, given)
        t_end = torch.where(noisy, t_end, given)
    zero = torch.zeros(num_chunks, dtype=torch.float32)
    dt1 = torch.where(noisy, t_mid - t, zero)
    dt2 = torch.where(noisy, t_end - t_mid, zero)
    return DistillDraw(m, k, t, t_mid, t_end, dt1, dt2, clean_chunks)


# ---------------------------------------------------------------------------------------------- targets
def _per_frame(values: torch.Tensor, chunk_frames: int, x: torch.Tensor, name: str) -> torch.Tensor:
    """(N, n) or (n,) per-chunk values -> fp32 (N or 1, 1, T, 1, 1), each repeated over its chunk's frames."""
    values = values.to(device=x.device, dtype=torch.float32)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[1] * chunk_frames != x.shape[2] or values.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{name} of shape {tuple(values.shape)} does not match x {tuple(x.shape)} with "
                         f"{chunk_frames} latent frames per chunk (expected (N, T / chunk_frames))")
    return values.repeat_interleave(chunk_frames, dim=1)[:, None, :, None, None]


def shortcut_target(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_t: torch.Tensor,
                    t: torch.Tensor, t_mid: torch.Tensor, dt1: torch.Tensor, dt2: torch.Tensor,
                    chunk_frames: int) -> torch.Tensor:
    """Self-consistency target of a step (t -> t + dt1 + dt2) from two half steps of `velocity`.

    velocity(x, t) -> v is the EMA student conditioned on the half step (the caller binds the embedding and the
    caption); it is called twice, with x of x_t's dtype and per-chunk t (N, n) (t, then t_mid). x_t is
    (N, C, T, H, W); t, t_mid, dt1, dt2 are (N, n) or (n,) with T = n * chunk_frames. The two velocities are
    weighted by their Δt's (the grid is non-uniform, so a ½/½ mean would not be the two-step displacement).
    Returns fp32, without grad.
    """
    with torch.no_grad():
        d1 = _per_frame(dt1, chunk_frames, x_t, "dt1")
        d2 = _per_frame(dt2, chunk_frames, x_t, "dt2")
        v1 = velocity(x_t, t).float()
        if not bool((d2 != 0).any()):
            return v1  # every second half step is empty (m = 1, or all chunks clean): the target is v1
        x_mid = (x_t.float() + d1 * v1).to(x_t.dtype)
        v2 = velocity(x_mid, t_mid).float()
        total = d1 + d2
        # Clean chunks do not move (Δt = 0): return v1 there; their loss weight is 0 anyway, this only keeps
        # the target finite.
        moving = total != 0
        target = (d1 * v1 + d2 * v2) / torch.where(moving, total, torch.ones_like(total))
        return torch.where(moving, target, v1)


def guided_velocity(v_text: torch.Tensor, v_context: torch.Tensor, v_alone: torch.Tensor, t: torch.Tensor,
                    chunk_frames: int, t_range: Sequence[float], prev_scales: Sequence[float],
                    text_scales: Sequence[float]) -> torch.Tensor:
    """CFG-distillation target: the three-pass guidance of the base sampler (cfg_number 3), per chunk.

    v_text: text + context pass; v_context: null text + context; v_alone: null text, each chunk attending only
    to itself; all (N, C, T, H, W). Each chunk's (w_prev, w_text) is the `cfg_scales` bucket of its t ((N, n) or
    (n,)), combined by `combine_cfg3`: (1 - w_prev) v_alone + (w_prev - w_text) v_context + w_text v_text.
    Computed and returned in fp32 (bit-equal to the sampler for fp32 velocities).
    """
    if not v_text.shape == v_context.shape == v_alone.shape:
        raise ValueError(f"teacher velocities differ in shape: text {tuple(v_text.shape)}, context "
                         f"{tuple(v_context.shape)}, alone {tuple(v_alone.shape)}")
    t2 = t[None] if t.ndim == 1 else t
    s_prev, s_text = cfg_scales(t2.reshape(-1).cpu(), t_range, prev_scales, text_scales)
    s_prev = _per_frame(s_prev.reshape(t2.shape), chunk_frames, v_text, "t")
    s_text = _per_frame(s_text.reshape(t2.shape), chunk_frames, v_text, "t")
    return combine_cfg3(v_alone.float(), v_context.float(), v_text.float(), s_prev, s_text)
