"""The multi-task objective against formulas written here: time distribution, monotone chunk times, task
shares, the clean frames (loss mask) of each task, and the noisy input."""

import math

import torch

from magi_train.config.schema import DiffusionConfig
from magi_train.diffusion.objective import draw_objective, motion_weight, noisy_input


def _draws(n, cfg, frames=24, chunk=6, is_image=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [draw_objective(frames, chunk, is_image, cfg, g) for _ in range(n)]


def test_noisy_chunk_times_put_about_69_percent_below_0_3():
    # t' = w t / (1 - (1 - w) t) with w = 1/3 is below 0.3 iff t < 0.3 / (w + 0.3 (1 - w)) = 0.5625; with
    # t = sigmoid(z), z ~ N(0, 0.5): P = Phi(logit(0.5625) / 0.5).
    cut = 0.3 / (1 / 3 + 0.3 * (2 / 3))
    expected = 0.5 * (1 + math.erf(math.log(cut / (1 - cut)) / 0.5 / math.sqrt(2)))
    assert abs(expected - 0.692) < 1e-3
    draws = _draws(3000, DiffusionConfig(clean_prefix_prob=0.0, i2v_prob=0.0), frames=6)
    t = torch.cat([d.t for d in draws])
    assert abs(float((t < 0.3).float().mean()) - expected) < 0.02


def test_chunk_times_never_increase_and_tasks_follow_their_shares():
    cfg = DiffusionConfig(clean_prefix_prob=0.3, i2v_prob=0.4, clean_t_min=0.95)
    draws = _draws(4000, cfg)
    for d in draws:
        assert torch.all(d.t[1:] <= d.t[:-1]), d.t
    shares = {task: sum(d.task == task for d in draws) / len(draws) for task in ("t2v", "i2v", "v2v")}
    assert abs(shares["t2v"] - 0.3) < 0.03 and abs(shares["i2v"] - 0.4) < 0.03 and abs(shares["v2v"] - 0.3) < 0.03


def test_clean_frames_and_loss_mask_of_each_task():
    cfg = DiffusionConfig(clean_prefix_prob=0.3, i2v_prob=0.4, clean_t_min=0.95)
    seen = set()
    for d in _draws(600, cfg):
        seen.add(d.task)
        chunk_of_frame = torch.arange(24) // 6
        if d.task == "t2v":
            assert not d.clean_frames.any() and not d.clean_chunks.any()
            assert torch.equal(d.frame_t, d.t[chunk_of_frame])
        elif d.task == "i2v":
            # Only the first latent frame is clean; its chunk keeps its noisy time and its caption.
            assert d.clean_frames.tolist() == [True] + [False] * 23 and not d.clean_chunks.any()
            assert d.frame_t[0] >= 0.95 and torch.equal(d.frame_t[1:], d.t[chunk_of_frame][1:])
        else:
            n = int(d.clean_chunks.sum())
            assert 1 <= n <= 3 and d.clean_chunks.tolist() == [True] * n + [False] * (4 - n)
            assert torch.equal(d.clean_frames, d.clean_chunks[chunk_of_frame])
            assert torch.all(d.t[:n] >= 0.95) and torch.equal(d.frame_t, d.t[chunk_of_frame])
        assert torch.equal(d.frame_weight, (~d.clean_frames).float())
    assert seen == {"t2v", "i2v", "v2v"}


def test_images_and_single_chunks_fall_back_to_feasible_tasks():
    cfg = DiffusionConfig(clean_prefix_prob=0.5, i2v_prob=0.5)
    assert {d.task for d in _draws(200, cfg, frames=1, chunk=1, is_image=True)} == {"t2v"}
    assert {d.task for d in _draws(200, cfg, frames=6)} == {"t2v", "i2v"}  # one chunk: no continuation


def test_caption_dropout_rate():
    draws = _draws(4000, DiffusionConfig(caption_dropout=0.2), frames=6)
    assert abs(sum(d.dropped for d in draws) / len(draws) - 0.2) < 0.02


def test_noisy_input_interpolates_per_frame():
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    out = noisy_input(x, noise, t)
    for f in range(3):
        torch.testing.assert_close(out[:, f], (1 - t[f]) * noise[:, f] + t[f] * x[:, f])


def test_staircase_times_are_the_sampler_window():
    from magi_train.diffusion.objective import staircase_times
    from magi_train.diffusion.time_grid import TimeGrid

    cfg = DiffusionConfig(staircase_prob=1.0, clean_prefix_prob=0.0, i2v_prob=0.0)
    g = torch.Generator().manual_seed(3)
    u0 = float(torch.rand(1, generator=torch.Generator().manual_seed(3)))
    t = staircase_times(4, cfg, g)
    # Chunk k sits k stages (of 4) behind chunk 0 on the sampler's grid u -> shift(u^2); not started = 0.
    grid = TimeGrid(64).shift
    expected = [max(u0 - k / 4, 0.0) for k in range(4)]
    expected = [grid * u * u / (1 + (grid - 1) * u * u) for u in expected]
    assert torch.allclose(t, torch.tensor(expected), atol=1e-6), (t, expected)
    # Over many draws chunk 0 is spread like the sampler's own grid: half its steps lie below t = shift(1/4).
    draws = _draws(4000, cfg, frames=12)
    first = torch.stack([d.t[0] for d in draws])
    assert abs(float((first < 0.1).float().mean()) - 0.5) < 0.03
    assert all(torch.all(d.t[1:] <= d.t[:-1]) for d in draws)


def test_staircase_prob_zero_draws_exactly_as_before_and_a_share_mixes():
    # No random number is drawn for the option at 0: the released draws stay bit-identical.
    base, off = _draws(200, DiffusionConfig()), _draws(200, DiffusionConfig(staircase_prob=0.0))
    assert all(torch.equal(a.t, b.t) and a.task == b.task and a.dropped == b.dropped for a, b in zip(base, off))
    # With sorted draws alone the first of two chunks is (almost) never near noise; with half staircase it is.
    sorted_first = torch.stack([d.t[0] for d in _draws(2000, DiffusionConfig(clean_prefix_prob=0.0), frames=12)])
    mixed = DiffusionConfig(clean_prefix_prob=0.0, staircase_prob=0.5)
    mixed_first = torch.stack([d.t[0] for d in _draws(2000, mixed, frames=12)])
    assert float((sorted_first < 0.1).float().mean()) < 0.005
    assert 0.2 < float((mixed_first < 0.1).float().mean()) < 0.3


def test_motion_weight_marks_what_moves_and_nothing_else():
    # A gradient background that never changes, a 2x2 block of contrast 2 moving one column per frame, and a
    # still block of the same contrast (it is in the temporal median: no weight).
    C, T, H, W = 4, 6, 8, 8
    x = torch.linspace(-1, 1, W).expand(C, T, H, W).clone()
    for f in range(T):
        x[:, f, 0:2, f:f + 2] += 2.0
    x[:, :, 5:7, 5:7] -= 2.0
    cfg = DiffusionConfig(motion_weight=3.0, motion_scale=0.5)
    w = motion_weight(x, cfg)
    assert w.shape == (T, H, W)
    moving = torch.zeros(T, H, W, dtype=torch.bool)
    for f in range(T):
        moving[f, 0:2, f:f + 2] = True
    # Where the block is, it departs by its whole contrast (the median is the background there, as the block
    # covers a position for at most 2 of 6 frames): weight 1 + 3. Everywhere else the latent is its median.
    assert torch.equal(w[moving], torch.full((int(moving.sum()),), 4.0))
    assert torch.equal(w[~moving], torch.ones(int((~moving).sum())))
    # Batched (N, C, T, H, W) gives each sample's own weights; one-frame samples (images) weigh 1 everywhere.
    batch = torch.stack([x, torch.zeros_like(x)])
    wb = motion_weight(batch, cfg)
    assert torch.equal(wb[0], w) and torch.equal(wb[1], torch.ones(T, H, W))
    assert torch.equal(motion_weight(x[:, :1], cfg), torch.ones(1, H, W))
    # Departures below motion_scale weigh in proportion: d = 0.25 -> 1 + 3 * 0.5.
    y = torch.zeros(C, 3, 2, 2)
    y[:, 0, 0, 0] = 0.25
    assert float(motion_weight(y, cfg)[0, 0, 0]) == 2.5
