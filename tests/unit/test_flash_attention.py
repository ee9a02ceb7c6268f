"""model.attention_backend=flash (magi_train/model/flash.py) from a CPU machine: a stand-in `flash_attn` module whose
`flash_attn_varlen_func` is an exact fp32 torch implementation of the documented varlen semantics (per segment,
non-causal, GQA, optional log-sum-exp) takes the place of the GPU kernel, and the backend's packing (views,
gathered keys, scattered queries) must then equal the exact `torch` backend, forward and backward."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from magi_train.model import flash
from magi_train.model.attention import AttnRanges, block_causal_ranges, range_attention
from magi_train.model.spec import get_attention_backend


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                     deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn 2's varlen contract: segment i's queries q[cu_q[i]:cu_q[i+1]] attend, non-causal, to the keys
    k[cu_k[i]:cu_k[i+1]]; query head h reads KV head h // (Hq / Hkv); fp32 softmax, output in q's dtype;
    with return_attn_probs, (out, lse of shape (Hq, total_q), None)."""
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and not causal and dropout_p == 0.0
    assert cu_seqlens_q.device == q.device and cu_seqlens_q.shape == cu_seqlens_k.shape
    assert q.shape[0] == int(cu_seqlens_q[-1]) and k.shape[0] == v.shape[0] == int(cu_seqlens_k[-1])
    lq, lk = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    assert int(lq.max()) == max_seqlen_q and int(lk.max()) == max_seqlen_k
    assert bool((lq > 0).all()) and bool((lk > 0).all()), "the backend never passes empty segments"
    hq, d = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    outs, lses = [], []
    for i in range(lq.shape[0]):
        qs, qe, ks, ke = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        qi = q[qs:qe].float().transpose(0, 1)
        ki = k[ks:ke].repeat_interleave(group, dim=1).float().transpose(0, 1)
        vi = v[ks:ke].repeat_interleave(group, dim=1).float().transpose(0, 1)
        scores = torch.matmul(qi, ki.transpose(1, 2)) * scale
        outs.append(torch.matmul(torch.softmax(scores, dim=-1), vi).transpose(0, 1).to(q.dtype))
        lses.append(torch.logsumexp(scores, dim=-1))
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1), None) if return_attn_probs else out


@pytest.fixture
def fake_flash(monkeypatch):
    """Installs the stand-in `flash_attn`; returns the list of its calls' (cu_seqlens_q, cu_seqlens_k, k rows)."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs):
        calls.append((cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), k.shape[0]))
        return reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


def test_the_reference_returns_the_log_sum_exp():
    q, k, v = _qkv(10, 7)
    cu_q, cu_k = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    out, lse, _ = reference_varlen(q, k, v, cu_q, cu_k, 6, 4, return_attn_probs=True)
    assert lse.shape == (4, 10)
    scores = q[4:].transpose(0, 1) @ k[3:].repeat_interleave(2, 1).permute(1, 2, 0) * 32 ** -0.5
    torch.testing.assert_close(lse[:, 4:], torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, reference_varlen(q, k, v, cu_q, cu_k, 6, 4))


def _qkv(tq: int, tk: int, hq: int = 4, hkv: int = 2, d: int = 32, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, h, d, generator=g).to(dtype).requires_grad_() for t, h in
                 ((tq, hq), (tk, hkv), (tk, hkv)))


# name: (ranges, Tq, Tk, packed queries are a view, packed keys are a view)
CASES = {
    # Packed training: 2 samples of 3 chunks, block-causal: key ranges overlap, so the keys are gathered.
    "block-causal": (block_causal_ranges(2, 3, 20), 120, 120, True, False),
    # Inference with a KV cache: 2 new chunks of 10 after 40 cached keys, a lookback of 3 chunks.
    "kv window": (AttnRanges.from_lists([(0, 10), (10, 20)], [(30, 60), (40, 70)]), 20, 70, True, False),
    # Cross-attention, every run of queries to its own caption row: keys back to back, no copy at all.
    "captions": (AttnRanges.from_lists([(0, 15), (15, 30), (30, 40)], [(0, 7), (7, 19), (19, 20)]), 40, 20,
                 True, True),
    # Cross-attention where some rows have no caption tokens: queries gathered, their outputs scattered back;
    # the slices are listed out of order and one is empty.
    "captions with gaps": (AttnRanges.from_lists([(30, 38), (0, 12), (12, 20), (20, 25)],
                                                 [(9, 13), (0, 5), (5, 5), (5, 9)]), 44, 13, False, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_equal_the_torch_backend(fake_flash, name):
    ranges, tq, tk, q_view, k_view = CASES[name]
    plan = flash.varlen_plan(ranges)
    assert (plan.q_index is None, plan.k_index is None) == (q_view, k_view)
    q, k, v = _qkv(tq, tk, seed=1)
    grad = torch.randn(tq, 4, 32, generator=torch.Generator().manual_seed(2))
    results = []
    for kernel in (range_attention, flash.varlen_attention):
        out = kernel(q, k, v, ranges)
        (out * grad).sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (call,) = fake_flash
    covered = ranges.to_mask(tq, tk).any(-1)
    assert bool((results[1][0][~covered] == 0).all())
    assert call[2] == (flash.gathered_keys(ranges) or int(plan.cu_seqlens_k[-1]))


def test_block_causal_segments_and_gathered_keys(fake_flash):
    ranges = block_causal_ranges(2, 3, 20)
    q, k, v = _qkv(120, 120)
    flash.varlen_attention(q, k, v, ranges)
    (call,) = fake_flash
    # One segment per chunk; chunk c of a sample sees its sample's chunks 0..c: 20, 40, 60 keys each.
    assert call[0] == [0, 20, 40, 60, 80, 100, 120]
    assert call[1] == [0, 20, 60, 120, 140, 180, 240]
    assert flash.gathered_keys(ranges) == 240 and not flash.gather_fits(ranges, 120)
    assert flash.gathered_keys(CASES["captions"][0]) == 0 and flash.gather_fits(CASES["captions"][0], 20)


def test_the_plan_is_built_once_per_ranges_object(fake_flash, monkeypatch):
    built = []
    real = flash.varlen_plan
    monkeypatch.setattr(flash, "varlen_plan", lambda r: built.append(r) or real(r))
    ranges = block_causal_ranges(1, 2, 8)
    q, k, v = _qkv(16, 16)
    for _ in range(3):  # three layers of one forward
        flash.varlen_attention(q, k, v, ranges)
    assert len(built) == 1 and len(fake_flash) == 3
    flash.varlen_attention(q, k, v, block_causal_ranges(1, 2, 8))  # the next forward's ranges
    assert len(built) == 2


def test_no_slice_with_keys_gives_zeros_without_a_call(fake_flash):
    q, k, v = _qkv(6, 4)
    out = flash.varlen_attention(q, k, v, AttnRanges.from_lists([(0, 6)], [(2, 2)]))
    assert out.shape == q.shape and bool((out == 0).all()) and fake_flash == []


def test_bf16_in_bf16_out_and_fp32_refused(fake_flash):
    ranges, tq, tk, _, _ = CASES["block-causal"]
    q, k, v = _qkv(tq, tk, dtype=torch.bfloat16)
    out = flash.flash_range_attention(q, k, v, ranges)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, range_attention(q, k, v, ranges), rtol=0, atol=0)
    q, k, v = _qkv(tq, tk)
    with pytest.raises(ValueError, match=r"model.attention_backend='flash' computes in bf16/fp16 only.*float32"):
        flash.flash_range_attention(q, k, v, ranges)


def test_flash_is_registered_and_refused_here_with_the_reason():
    assert not flash.flash_attention_available()
    with pytest.raises(ValueError, match=r"model.attention_backend='flash' needs flash-attn 2.*no CUDA device.*auto"):
        get_attention_backend("flash")


def test_flash_backend_is_the_varlen_kernel_where_it_can_run(monkeypatch):
    monkeypatch.setattr(flash, "flash_unavailable_reason", lambda: None)
    assert get_attention_backend("flash") is flash.flash_range_attention


def test_a_broken_flash_attn_install_counts_as_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    broken = types.ModuleType("flash_attn")  # imports, but without the function (a mismatched wheel)
    monkeypatch.setitem(sys.modules, "flash_attn", broken)
    assert "flash_attn is not importable (ImportError" in flash.flash_unavailable_reason()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert "compute capability 7.5" in flash.flash_unavailable_reason()
