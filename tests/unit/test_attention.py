"""Range attention: the (q range, k range) description, its validation, MAGI-1's block-causal pattern, and the
two CPU kernels, checked against a dense masked softmax attention written here."""

from __future__ import annotations

import math

import pytest
import torch

from magi_train.model.attention import (
    AttnRanges,
    block_causal_ranges,
    range_attention,
    sdpa_attention,
    segment_ranges,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_attention(q, k, v, mask):
    """fp32 reference: softmax(q kᵀ/√d) v over the allowed keys; rows without keys are 0.
    GQA: query head h reads KV head h // (Hq / Hkv)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.zeros(tq, hq, d, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for h in range(hq):
        j = h // group
        scores = q[:, h] @ k[:, j].T / math.sqrt(d)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)  # rows with no key at all
        out[:, h] = probs @ v[:, j]
    return out


def random_qkv(tq, tk, hq, hkv, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tq, hq, d, generator=g, dtype=dtype), torch.randn(tk, hkv, d, generator=g, dtype=dtype),
            torch.randn(tk, hkv, d, generator=g, dtype=dtype))


# ------------------------------------------------------------------ AttnRanges


def test_attn_ranges_rejects_overlapping_query_ranges():
    with pytest.raises(ValueError, match="overlap"):
        AttnRanges.from_lists([(0, 4), (3, 8)], [(0, 4), (0, 8)])
    # Unsorted but disjoint is fine; touching ends are not an overlap.
    r = AttnRanges.from_lists([(4, 8), (0, 4)], [(0, 8), (0, 4)])
    assert len(r) == 2


def test_attn_ranges_rejects_shape_mismatch_and_reversed_ranges():
    with pytest.raises(ValueError):
        AttnRanges(torch.tensor([[0, 4], [4, 8]]), torch.tensor([[0, 4]]))
    with pytest.raises(ValueError):
        AttnRanges(torch.tensor([0, 4]), torch.tensor([0, 4]))
    with pytest.raises(ValueError):
        AttnRanges(torch.tensor([[0, 4, 5]]), torch.tensor([[0, 4, 5]]))
    with pytest.raises(ValueError):
        AttnRanges.from_lists([(4, 0)], [(0, 4)])
    with pytest.raises(ValueError):
        AttnRanges.from_lists([(0, 4)], [(4, 0)])


def test_to_mask_is_the_union_of_rectangles():
    r = AttnRanges.from_lists([(0, 2), (2, 5)], [(1, 3), (0, 4)])
    m = r.to_mask(6, 5)
    want = torch.zeros(6, 5, dtype=torch.bool)
    want[0:2, 1:3] = True
    want[2:5, 0:4] = True
    assert torch.equal(m, want)


def test_block_causal_ranges_two_samples_three_chunks():
    c = 4  # tokens per chunk, 12 per sample
    r = block_causal_ranges(2, 3, c)
    assert r.pairs() == [
        (0, 4, 0, 4), (4, 8, 0, 8), (8, 12, 0, 12),
        (12, 16, 12, 16), (16, 20, 12, 20), (20, 24, 12, 24),
    ]


def test_block_causal_ranges_with_window():
    r = block_causal_ranges(2, 3, 4, window_chunks=2)
    assert r.pairs() == [
        (0, 4, 0, 4), (4, 8, 0, 8), (8, 12, 4, 12),
        (12, 16, 12, 16), (16, 20, 12, 20), (20, 24, 16, 24),
    ]
    # window 1: every chunk sees only itself
    assert block_causal_ranges(1, 3, 4, window_chunks=1).pairs() == [(0, 4, 0, 4), (4, 8, 4, 8), (8, 12, 8, 12)]
    with pytest.raises(ValueError):
        block_causal_ranges(1, 3, 4, window_chunks=0)


def test_segment_ranges_are_consecutive_pairs():
    r = segment_ranges([3, 3, 3], [2, 0, 5])
    assert r.pairs() == [(0, 3, 0, 2), (3, 6, 2, 2), (6, 9, 2, 7)]
    with pytest.raises(ValueError):
        segment_ranges([3, 3], [1])


# ------------------------------------------------------------------ kernels

# Block causal over 2 samples of 3 chunks, plus a query block (rows 24..27 of a 28-row q) that no range covers.
RANGES = AttnRanges.from_lists(
    [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24)],
    [(0, 4), (0, 8), (4, 12), (12, 16), (12, 20), (12, 24)],
)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
def test_range_attention_equals_dense_masked_attention(hq, hkv):
    q, k, v = random_qkv(28, 24, hq, hkv, 16, seed=hq * 10 + hkv)
    got = range_attention(q, k, v, RANGES)
    want = dense_attention(q, k, v, RANGES.to_mask(28, 24))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[24:], torch.zeros_like(got[24:])), "uncovered query rows must be 0"


def test_range_attention_gqa_maps_query_head_to_kv_head_by_integer_division():
    # nq = 4, nkv = 2: heads 0,1 -> KV 0; heads 2,3 -> KV 1 (flash-attn), not h % nkv.
    q, k, v = random_qkv(8, 8, 4, 2, 16, seed=3)
    ranges = AttnRanges.from_lists([(0, 8)], [(0, 8)])
    out = range_attention(q, k, v, ranges)
    for h in range(4):
        kv = h // 2
        one = range_attention(q[:, h:h + 1], k[:, kv:kv + 1], v[:, kv:kv + 1], ranges)
        torch.testing.assert_close(out[:, h:h + 1], one, atol=1e-6, rtol=1e-6)
    # Head 1 must NOT be what the modulo mapping (KV head 1) would give.
    wrong = range_attention(q[:, 1:2], k[:, 1:2], v[:, 1:2], ranges)
    assert (out[:, 1:2] - wrong).abs().max() > 1e-2


def test_range_attention_uses_softmax_scale_one_over_sqrt_d():
    # One query, two keys: the output weight of key 0 is sigmoid((s0 - s1)/sqrt(d)).
    d = 128
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 4.0
    k = torch.zeros(2, 1, d)
    k[0, 0, 0] = 4.0  # s0 = 16, s1 = 0
    v = torch.zeros(2, 1, d)
    v[0, 0, 1] = 1.0
    out = range_attention(q, k, v, AttnRanges.from_lists([(0, 1)], [(0, 2)]))
    want = 1.0 / (1.0 + math.exp(-16.0 / math.sqrt(d)))
    assert abs(out[0, 0, 1].item() - want) < 1e-6


def test_range_attention_rounds_once_to_input_dtype():
    q, k, v = random_qkv(12, 12, 2, 1, 16, seed=5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ranges = AttnRanges.from_lists([(0, 6), (6, 12)], [(0, 6), (0, 12)])
    got = range_attention(qb, kb, vb, ranges)
    assert got.dtype == torch.bfloat16
    want = dense_attention(qb.float(), kb.float(), vb.float(), ranges.to_mask(12, 12)).bfloat16()
    # fp32 maths on the bf16 inputs, one rounding: at most one bf16 ulp away from the exactly rounded value.
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all()


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
def test_sdpa_attention_equals_range_attention(hq, hkv):
    q, k, v = random_qkv(28, 24, hq, hkv, 32, seed=7 + hq)
    a = range_attention(q, k, v, RANGES)
    b = sdpa_attention(q, k, v, RANGES)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert torch.equal(b[24:], torch.zeros_like(b[24:])), "uncovered query rows must be 0"


def test_range_attention_gradients_match_dense_attention():
    q, k, v = random_qkv(28, 24, 4, 2, 16, seed=11)
    g = torch.Generator().manual_seed(12)
    w = torch.randn(28, 4, 16, generator=g)

    def grads(fn):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        (fn(qq, kk, vv) * w).sum().backward()
        return qq.grad, kk.grad, vv.grad

    mask = RANGES.to_mask(28, 24)
    got = grads(lambda a, b, c: range_attention(a, b, c, RANGES))
    want = grads(lambda a, b, c: dense_attention(a, b, c, mask).float())
    for name, x, y in zip("qkv", got, want):
        assert x is not None, name
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0
    # sdpa kernel has the same gradients
    got_sdpa = grads(lambda a, b, c: sdpa_attention(a, b, c, RANGES))
    for x, y in zip(got_sdpa, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
