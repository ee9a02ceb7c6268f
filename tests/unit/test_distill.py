"""Shortcut + CFG distillation math against formulas written here: the step-size cycle, the step-size
embedding, grid times per chunk, the Δt-weighted self-consistency target, the three-pass guidance target, and
the fp32 EMA of the student."""

import pytest
import torch
from torch import nn

from magi_train.diffusion.time_grid import TimeGrid
from magi_train.training.ema import EmaWeights
from magi_train.diffusion.distill import (STEP_CYCLE, distill_embedding, draw_distill_times,
                                          guided_velocity, shortcut_target, step_size_at)

G = TimeGrid(64).t


# ---------------------------------------------------------------------------------------------- step cycle
def test_step_cycle_is_eight_finest_steps_then_2_4_8():
    block = [1, 1, 1, 1, 1, 1, 1, 1, 2, 4, 8]
    expected = (block * 3)[:33]
    assert [step_size_at(s) for s in range(33)] == expected
    assert STEP_CYCLE == tuple(block)
    sizes = [step_size_at(s) for s in range(11 * 50)]
    assert sizes.count(1) / len(sizes) == 8 / 11
    assert step_size_at(7 + 11 * 1000) == 1 and step_size_at(10 + 11 * 1000) == 8


def test_custom_cycle_and_bad_cycles():
    assert [step_size_at(s, (4, 2)) for s in range(5)] == [4, 2, 4, 2, 4]
    for bad in [(), (3,), (1, 0), (128,), (1, -2), (1.0,), (True,)]:
        with pytest.raises(ValueError, match="distill.step_cycle"):
            step_size_at(0, bad)
    with pytest.raises(ValueError):
        step_size_at(-1)


def test_distill_embedding_is_the_released_sampler_input():
    for m in (1, 2, 4, 8, 16, 32, 64):
        assert distill_embedding(m) == TimeGrid(64 // m).step_size_input(1)
    # (64 / m) steps / 4 * 2: 64 steps -> 32, 8 steps -> 4.
    assert distill_embedding(1) == 32.0 and distill_embedding(8) == 4.0
    for bad in (0, 3, 128):
        with pytest.raises(ValueError):
            distill_embedding(bad)


# ---------------------------------------------------------------------------------------------- times
def _grid_index(value):
    hits = (G == value).nonzero().flatten().tolist()
    assert len(hits) == 1, f"{value} is not exactly one grid point"
    return hits[0]


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_noisy_times_are_grid_points_on_multiples_of_m_and_never_increase(m):
    g = torch.Generator().manual_seed(m)
    for _ in range(200):
        d = draw_distill_times(5, torch.zeros(5, dtype=torch.bool), m, g)
        assert d.m == m
        for c in range(5):
            k = int(d.k[c])
            assert k % m == 0 and 0 <= k <= 64 - m
            assert _grid_index(d.t[c]) == k
            assert _grid_index(d.t_end[c]) == k + m
            mid = k + m // 2 if m > 1 else k + 1
            assert _grid_index(d.t_mid[c]) == mid
            assert d.dt1[c] == G[mid] - G[k] and d.dt2[c] == G[k + m] - G[mid]
        assert torch.all(d.t[1:] <= d.t[:-1]) and torch.all(d.k[1:] <= d.k[:-1])
        if m == 1:
            assert torch.all(d.dt2 == 0) and torch.equal(d.t_mid, d.t_end)


def test_clean_prefix_keeps_its_time_and_does_not_move():
    g = torch.Generator().manual_seed(0)
    clean = torch.tensor([True, True, False, False])
    given = torch.tensor([0.99, 0.97, 0.5, 0.4])
    d = draw_distill_times(4, clean, 4, g, clean_t=given)
    assert d.t[0] == given[0] and d.t[1] == given[1]
    assert torch.equal(d.t_mid[:2], given[:2]) and torch.equal(d.t_end[:2], given[:2])
    assert torch.all(d.dt1[:2] == 0) and torch.all(d.dt2[:2] == 0) and torch.all(d.k[:2] == -1)
    assert torch.equal(d.clean_chunks, clean)
    for c in (2, 3):
        assert _grid_index(d.t[c]) == int(d.k[c])
    assert torch.all(d.t[1:] <= d.t[:-1])
    with pytest.raises(ValueError, match="prefix"):
        draw_distill_times(3, torch.tensor([False, True, False]), 1, g, clean_t=torch.ones(3))
    with pytest.raises(ValueError, match="clean_t"):
        draw_distill_times(3, torch.tensor([True, False, False]), 1, g)
    with pytest.raises(ValueError):
        draw_distill_times(3, torch.zeros(3, dtype=torch.bool), 3, g)


@pytest.mark.parametrize("m", [1, 8])
def test_grid_index_is_uniform_over_valid_starts(m):
    # Sorting within a sample does not change the pooled distribution: each start has probability m / 64.
    g = torch.Generator().manual_seed(123)
    starts = 64 // m
    counts = torch.zeros(starts)
    draws, chunks = 4000, 4
    for _ in range(draws):
        k = draw_distill_times(chunks, torch.zeros(chunks, dtype=torch.bool), m, g).k
        counts += torch.bincount(k // m, minlength=starts).float()
    expected = draws * chunks / starts
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # Mean of chi-square is dof = starts - 1; allow a generous 2 dof + 30.
    assert chi2 < 2 * (starts - 1) + 30, (chi2, counts)


def test_draws_are_deterministic_for_a_seed():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [draw_distill_times(6, torch.zeros(6, dtype=torch.bool), 2, g).k for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(draw(7), draw(7)))
    assert not all(torch.equal(a, b) for a, b in zip(draw(7), draw(8)))


# ---------------------------------------------------------------------------------------------- shortcut
def _linear_field(calls):
    """velocity(x, t) = (1 + 2 t) * x per chunk (chunk_frames = 2): its Euler steps are known in closed form."""
    def velocity(x, t):
        calls.append(t.clone())
        a = (1 + 2 * t).repeat_interleave(2, dim=1)[:, None, :, None, None]
        return a * x
    return velocity


def test_shortcut_target_is_the_two_half_step_displacement_per_chunk():
    n, cf = 3, 2
    # Three noisy chunks on the non-uniform grid with different k (so different, unequal dt1 / dt2), m = 8.
    k = torch.tensor([40, 16, 0])
    t, t_mid, t_end = G[k], G[k + 4], G[k + 8]
    dt1, dt2 = t_mid - t, t_end - t_mid
    assert torch.all((dt1 - dt2).abs() > 1e-4)
    x = torch.randn(2, 3, n * cf, 2, 2, generator=torch.Generator().manual_seed(0))
    t2 = torch.stack([t, t])
    calls = []
    out = shortcut_target(_linear_field(calls), x, t2, torch.stack([t_mid, t_mid]),
                          torch.stack([dt1, dt1]), torch.stack([dt2, dt2]), cf)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert len(calls) == 2 and torch.equal(calls[0], t2) and torch.equal(calls[1], torch.stack([t_mid, t_mid]))
    for c in range(n):
        xc = x[:, :, c * cf:(c + 1) * cf].double()
        a1, a2 = 1 + 2 * float(t[c]), 1 + 2 * float(t_mid[c])
        d1, d2 = float(dt1[c]), float(dt2[c])
        v1 = a1 * xc
        x_mid = xc + d1 * v1
        v2 = a2 * x_mid
        x_end = x_mid + d2 * v2  # two Euler half steps
        got = out[:, :, c * cf:(c + 1) * cf].double()
        torch.testing.assert_close(got * (d1 + d2), x_end - xc, rtol=1e-5, atol=1e-7)
        # The Δt weighting matters: the ½/½ mean of the two half-step velocities is a different target.
        half_half = 0.5 * v1 + 0.5 * v2
        assert float((got - half_half).abs().max()) > 1e3 * float((got * (d1 + d2) - (x_end - xc)).abs().max() + 1e-9)


def test_shortcut_target_returns_v1_for_clean_chunks_and_reads_bf16():
    cf = 2
    t = torch.tensor([[0.98, float(G[32])]])
    t_mid = torch.tensor([[0.98, float(G[33])]])
    dt1 = torch.tensor([[0.0, float(G[33] - G[32])]])
    dt2 = torch.tensor([[0.0, float(G[34] - G[33])]])
    x = torch.randn(1, 2, 2 * cf, 3, 3, generator=torch.Generator().manual_seed(1))
    out = shortcut_target(_linear_field([]), x, t, t_mid, dt1, dt2, cf)
    torch.testing.assert_close(out[:, :, :cf], (1 + 2 * 0.98) * x[:, :, :cf], rtol=1e-6, atol=0)
    assert torch.isfinite(out).all()
    out_bf16 = shortcut_target(_linear_field([]), x.bfloat16(), t, t_mid, dt1, dt2, cf)
    assert out_bf16.dtype == torch.float32
    with pytest.raises(ValueError, match="dt1"):
        shortcut_target(_linear_field([]), x, t, t_mid, torch.zeros(1, 3), dt2, cf)


def test_shortcut_target_with_no_second_half_step_is_v1_in_one_call():
    calls = []
    x = torch.randn(1, 1, 4, 1, 1)
    t = torch.tensor([[0.2, 0.1]])
    out = shortcut_target(_linear_field(calls), x, t, t, torch.tensor([[0.01, 0.02]]), torch.zeros(1, 2), 2)
    assert len(calls) == 1
    torch.testing.assert_close(out, (1 + 2 * t).repeat_interleave(2, dim=1)[:, None, :, None, None] * x)


# ---------------------------------------------------------------------------------------------- guidance
RANGE, PREV, TEXT = [0, 0.0217, 0.1, 0.3, 0.999], [1.5, 1.5, 1.5, 1, 1], [7.5, 7.5, 7.5, 0, 0]


def test_guided_velocity_matches_the_three_pass_formula_per_chunk():
    cf = 2
    t = torch.tensor([[0.95, 0.31, 0.29, 0.05], [0.3, 0.2999, 0.01, 0.0]])
    shape = (2, 3, 4 * cf, 2, 2)
    g = torch.Generator().manual_seed(3)
    v_text, v_ctx, v_alone = (torch.randn(shape, generator=g) for _ in range(3))
    out = guided_velocity(v_text, v_ctx, v_alone, t, cf, RANGE, PREV, TEXT)
    assert out.shape == shape and out.dtype == torch.float32
    for n in range(2):
        for c in range(4):
            w_prev, w_text = (1.0, 0.0) if float(t[n, c]) >= 0.3 - 1e-7 else (1.5, 7.5)
            sl = (n, slice(None), slice(c * cf, (c + 1) * cf))
            expected = (1 - w_prev) * v_alone[sl] + (w_prev - w_text) * v_ctx[sl] + w_text * v_text[sl]
            torch.testing.assert_close(out[sl], expected, rtol=1e-6, atol=1e-6)
    # Above 0.3 the guidance is off: the context pass alone.
    assert torch.equal(out[0, :, :cf], v_ctx[0, :, :cf])


def test_guided_velocity_errors():
    v = torch.zeros(1, 1, 4, 1, 1)
    with pytest.raises(ValueError):
        guided_velocity(v, v, torch.zeros(1, 1, 2, 1, 1), torch.tensor([[0.5, 0.5]]), 2, RANGE, PREV, TEXT)
    with pytest.raises(ValueError):
        guided_velocity(v, v, v, torch.tensor([[0.5, 0.5, 0.5]]), 2, RANGE, PREV, TEXT)


# ---------------------------------------------------------------------------------------------- EMA
def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False)).to(torch.bfloat16)


def test_ema_update_formula_over_three_updates():
    model = _model(0)
    ema = EmaWeights(model.named_parameters())
    expected = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    for i, decay in enumerate([0.9, 0.5, 0.99]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (i + 1))
        ema.update(model.named_parameters(), decay)
        for n, p in model.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach().float()
    state = ema.state_dict()
    assert set(state) == set(expected)
    for n in expected:
        assert state[n].dtype == torch.float32
        torch.testing.assert_close(state[n], expected[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="ema_decay"):
        ema.update(model, 1.5)


def test_ema_swapped_restores_live_weights_exactly():
    model = _model(1)
    ema = EmaWeights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3).add_(1)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(5, 3).bfloat16()
    with ema.swapped(model.named_parameters()):
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.state_dict()[n].to(p.dtype))
        inside = model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n]) and p.dtype == torch.bfloat16
    assert not torch.equal(inside, model(x))
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped(model):
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    ema.copy_to(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, ema.state_dict()[n].to(p.dtype))


def test_ema_state_dict_round_trip_and_errors():
    a, b = EmaWeights(_model(2)), EmaWeights(_model(3))
    saved = {n: v.clone() for n, v in a.state_dict().items()}
    b.load_state_dict(saved)
    for n, v in b.state_dict().items():
        assert torch.equal(v, saved[n])
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({n: v for n, v in saved.items() if n != "0.bias"})
    with pytest.raises(KeyError, match="unexpected"):
        b.load_state_dict({**saved, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict({**saved, "0.bias": torch.zeros(5)})
    with pytest.raises(KeyError):
        b.update([("0.weight", torch.zeros(4, 3))], 0.5)
