"""Sampler arithmetic against independent formulas, and generation with the KV cache against generation
that recomputes every earlier chunk (fp32, same noise): they must agree to 1e-5 relative."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from magi_train.config.schema import SamplerConfig
from magi_train.diffusion.guidance import blend_nearly_clean, cfg_scales, combine_cfg3
from magi_train.diffusion.sampler import Captions, StaircaseSampler
from magi_train.diffusion.time_grid import TimeGrid
from tests.configs import tiny_model as shared_tiny_model
from magi_train.model.dit import build_dit

RELEASED = SamplerConfig()


# ------------------------------------------------------------------ formulas


@pytest.mark.parametrize("steps", [4, 8, 16, 32, 64])
def test_time_grid_is_u_squared_then_shift_3(steps):
    t = TimeGrid(steps).t
    for k in range(steps + 1):
        s = (k / steps) ** 2
        assert t[k].item() == pytest.approx(s / (3 - 2 * s), abs=2e-7)  # fp32: t[S] is 1 + 1 ulp, as released
    assert t.dtype == torch.float32 and t[0] == 0 and t[-1].item() == pytest.approx(1.0, abs=1e-6)


def test_time_grid_notable_values_are_the_cfg_breakpoints():
    t = TimeGrid(64).t
    for k, value in [(16, 0.021739), (32, 0.1), (48, 0.3)]:
        assert t[k].item() == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("mode,steps16", [("8,16,16", [2, 1, 1]), ("16,16,8", [1, 1, 2])])
def test_shortcut_grid_has_12_steps_of_the_mode(mode, steps16):
    t = TimeGrid(12, mode).t
    s = [(k / 16) for k in [0]]
    u = [0.0]
    for _ in range(4):
        for d in steps16:
            u.append(u[-1] + d / 16)
    expected = [(v * v) / (3 - 2 * v * v) for v in u]
    assert t.shape == (13,)
    assert torch.allclose(t, torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert TimeGrid(12, mode).intervals.tolist() == steps16 * 4
    del s


def test_step_size_input():
    step_input = lambda steps, interval: TimeGrid(steps).step_size_input(interval)  # noqa: E731
    assert step_input(64, 1) == 32.0 and step_input(16, 1) == 8.0 and step_input(32, 1) == 16.0
    # shortcut: 4 / interval * 2 -> the double step gets 4, the single steps 8
    assert [step_input(12, i) for i in TimeGrid(12, "8,16,16").intervals[:3].tolist()] == [4.0, 8.0, 8.0]


def test_cfg_buckets_and_combination():
    t = torch.tensor([0.0, 0.0217, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9999])
    s_prev, s_text = cfg_scales(t, RELEASED.cfg_t_range, RELEASED.prev_chunk_scales, RELEASED.text_scales)
    # edges shifted by -1e-7: a t equal to an edge falls in the bucket above it
    assert s_prev.tolist() == [1.5, 1.5, 1.5, 1.5, 1.5, 1.0, 1.0, 1.0]
    assert s_text.tolist() == [7.5, 7.5, 7.5, 7.5, 7.5, 0.0, 0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    u, c, ct = (torch.randn(2, 3, generator=g) for _ in range(3))
    for sp, st in [(1.5, 7.5), (1.0, 0.0), (2.0, 3.0)]:
        expected = u + sp * (c - u) + st * (ct - c)
        got = combine_cfg3(u, c, ct, torch.tensor(sp), torch.tensor(st))
        assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(blend_nearly_clean(c, u, 0.7), 0.7 * c + 0.3 * u)


def test_bad_scale_lists_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        cfg_scales(torch.tensor([0.5]), [0.0, 0.5], [1.0], [1.0, 2.0])


# ------------------------------------------------------------------ KV cache == recompute


def tiny_model(distill: bool, group) -> torch.nn.Module:
    cfg = shared_tiny_model(ffn_hidden_size=256, num_attention_heads=2, num_query_groups=1, kv_channels=128,
                            caption_channels=32, caption_max_length=60, distill=distill)
    torch.manual_seed(0)
    model = build_dit(cfg, tp_group=group)
    with torch.no_grad():  # the zero-initialised output layer would make every velocity 0
        model.final_linear.linear.weight.normal_(0, 0.05)
        model.y_embedder.null_caption_embedding.normal_(0, 1.0)
    return model.eval()


def captions(num_chunks: int, model, g) -> Captions:
    L, C = model.cfg.caption_max_length, model.cfg.caption_channels
    y = torch.randn(2, num_chunks, L, C, generator=g)
    y[1] = model.y_embedder.null_caption_embedding.detach()
    mask = torch.zeros(2, num_chunks, L)
    mask[0, :, :17] = 1
    mask[1, :, :50] = 1
    return Captions(y, mask)


CASES = {
    "t2v cfg3": dict(distill=False, cfg=dict(cfg_number=3, num_steps=8), chunks=4, prefix=0),
    "t2v cfg3 lookback 2": dict(distill=False, cfg=dict(cfg_number=3, num_steps=8, clean_chunk_kvrange=2), chunks=4, prefix=0),
    "i2v distill": dict(distill=True, cfg=dict(cfg_number=1, num_steps=8), chunks=3, prefix=1),
    "v2v distill 2 chunks of prefix": dict(distill=True, cfg=dict(cfg_number=1, num_steps=4, window_size=2,
                                                                 noise2clean_kvrange=[3, 2]), chunks=5, prefix=14),
    "v2v cfg3 shortcut": dict(distill=False, cfg=dict(cfg_number=3, num_steps=12, window_size=4,
                                                      noise2clean_kvrange=[]), chunks=3, prefix=8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kv_cache_equals_recompute(name, single_process_group):
    case = CASES[name]
    model = tiny_model(case["distill"], single_process_group)
    g = torch.Generator().manual_seed(1)
    n = case["chunks"]
    noise = torch.randn(1, 16, 6 * n, 4, 4, generator=g)
    caps = captions(n, model, g)
    prefix = torch.randn(1, 16, case["prefix"], 4, 4, generator=g) if case["prefix"] else None
    outs = {}
    for kv_cache in (True, False):
        cfg = dataclasses.replace(SamplerConfig(), kv_cache=kv_cache, **case["cfg"])
        outs[kv_cache] = {c.index: c for c in StaircaseSampler(model, cfg).sample(noise, caps, prefix)}
    off = case["prefix"] // 6
    assert sorted(outs[True]) == list(range(off, n))
    for c in outs[True]:
        a, b = outs[True][c].latent, outs[False][c].latent
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= 1e-5, f"chunk {c}: {err:.2e}"
        assert outs[True][c].prefix_frames == max(0, min(case["prefix"] - 6 * c, 6))
    # the generation moved away from the noise and is not trivially zero
    last = outs[True][n - 1].latent
    assert not torch.allclose(last, noise[:, :, -6:], atol=1e-3)


def test_context_matters(single_process_group):
    """Sanity for the oracle: cutting all context (lookback 1 everywhere) changes the result, so the
    equality above is not vacuous."""
    model = tiny_model(False, single_process_group)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 18, 4, 4, generator=g)
    caps = captions(3, model, g)
    base = dataclasses.replace(SamplerConfig(), num_steps=8)
    cut = dataclasses.replace(base, noise2clean_kvrange=[1, 1, 1, 1])
    a = list(StaircaseSampler(model, base).sample(noise, caps))[-1].latent
    b = list(StaircaseSampler(model, cut).sample(noise, caps))[-1].latent
    assert (a - b).abs().max() / a.abs().max() > 1e-3


def test_kv_offload_is_numerically_neutral(single_process_group):
    model = tiny_model(False, single_process_group)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 16, 12, 4, 4, generator=g)
    caps = captions(2, model, g)
    base = dataclasses.replace(SamplerConfig(), num_steps=4, window_size=2, noise2clean_kvrange=[2])
    a = [c.latent for c in StaircaseSampler(model, base).sample(noise, caps)]
    offloaded = StaircaseSampler(model, dataclasses.replace(base, kv_offload=True))
    b = [c.latent for c in offloaded.sample(noise, caps)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert offloaded._cache.offload and offloaded._cache.nbytes() > 0
