"""The GPU plug-ins seen from a CPU machine: Transformer Engine and MagiAttention are reported missing with
errors that name the config key, and the MagiAttention backend's CPU half (range conversion, the call it
makes) is checked against `range_attention` with the kernel emulated in torch."""

from __future__ import annotations

import builtins
import contextlib
import math
import sys
import types

import pytest
import torch

from magi_train.model import magi_attention as magi
from magi_train.model import te_spec
from magi_train.model.attention import AttnRanges, block_causal_ranges, range_attention, segment_ranges
from magi_train.model.spec import get_attention_backend
from magi_train.model.spec import get_layer_spec

I32 = torch.int32


# ------------------------------------------------------------------ Transformer Engine
def test_te_is_not_available_on_this_machine():
    assert not te_spec.te_available()
    assert "GPU-only" in te_spec.te_unavailable_reason()


def test_broken_te_install_counts_as_unavailable(monkeypatch):
    # A TE wheel built for another CUDA/torch raises RuntimeError (or OSError) on import, not ImportError.
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("transformer_engine"):
            raise RuntimeError("libtransformer_engine.so: undefined symbol")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    assert not te_spec.te_available()
    assert "undefined symbol" in te_spec.te_unavailable_reason()


def test_te_layer_spec_raises_a_clear_error():
    with pytest.raises(RuntimeError, match=r"model\.layer_spec='te'.*Use model\.layer_spec=local on CPU"):
        get_layer_spec("te", "torch")
    with pytest.raises(ValueError, match=r"model\.layer_spec='cuda' is not one of \['local', 'te'\]"):
        get_layer_spec("cuda", "torch")


def test_fp8_autocast_none_is_a_null_context():
    ctx = te_spec.fp8_autocast("none", None)
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        pass


def test_fp8_autocast_rejects_unknown_recipe_by_config_key():
    with pytest.raises(ValueError, match=r"trainer\.fp8_recipe='e4m3'.*\['none', 'delayed', 'tensorwise', 'mxfp8', 'blockwise'\]"):
        te_spec.fp8_autocast("e4m3", None)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
def test_fp8_recipes_need_te(recipe):
    with pytest.raises(RuntimeError, match="GPU-only.*pip install"):
        te_spec.fp8_autocast(recipe, None)


# ------------------------------------------------------------------ MagiAttention: registration
def test_magi_backend_raises_a_clear_error_here():
    assert not magi.magi_attention_available()
    with pytest.raises(ValueError, match=r"model\.attention_backend='magi' needs MagiAttention.*Hopper"):
        get_attention_backend("magi")


def test_magi_is_registered_and_listed():
    with pytest.raises(ValueError, match=r"model\.attention_backend='flash3' is not one of \['auto', 'flash', 'flex', "
                                         r"'magi', 'sdpa', 'torch'\]"):
        get_attention_backend("flash3")


def test_magi_backend_is_the_flex_kernel_where_it_can_run(monkeypatch):
    monkeypatch.setattr(magi, "magi_unavailable_reason", lambda: None)
    assert get_attention_backend("magi") is magi.flex_attention_backend


class _Group:
    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def test_cp_impl_magi_raises_a_clear_error_here(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group: "gloo")
    with pytest.raises(ValueError, match=r"parallel\.cp_impl=magi needs MagiAttention.*here: no CUDA device"):
        magi.resolve_cp_impl("magi", _Group(2))
    assert magi.resolve_cp_impl("auto", _Group(2)) == "ulysses"
    assert magi.resolve_cp_impl("magi", _Group(1)) == "ulysses"  # no context parallelism at all
    assert magi.resolve_cp_impl("magi", None) == "ulysses"


def test_cp_impl_auto_picks_magi_where_it_can_run(monkeypatch):
    monkeypatch.setattr(magi, "magi_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group: "nccl")
    assert magi.resolve_cp_impl("auto", _Group(2)) == "magi"
    assert magi.resolve_cp_impl("ulysses", _Group(2)) == "ulysses"
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group: "gloo")
    with pytest.raises(ValueError, match="process groups use gloo"):
        magi.resolve_cp_impl("magi", _Group(2))


# ------------------------------------------------------------------ MagiAttention: range conversion
def test_to_magi_ranges_block_causal():
    q, k, types_, max_q, max_k = magi.to_magi_ranges(block_causal_ranges(2, 3, 4))
    assert q.dtype == k.dtype == types_.dtype == I32
    assert q.tolist() == [[0, 4], [4, 8], [8, 12], [12, 16], [16, 20], [20, 24]]
    assert k.tolist() == [[0, 4], [0, 8], [0, 12], [12, 16], [12, 20], [12, 24]]
    assert types_.tolist() == [0] * 6  # all FULL
    assert (max_q, max_k) == (4, 12)
    assert q.is_contiguous() and k.is_contiguous()


def test_to_magi_ranges_block_causal_window():
    _, k, _, max_q, max_k = magi.to_magi_ranges(block_causal_ranges(1, 4, 3, window_chunks=2))
    assert k.tolist() == [[0, 3], [0, 6], [3, 9], [6, 12]]
    assert (max_q, max_k) == (3, 6)


def test_to_magi_ranges_drops_empty_slices():
    # Segments 1 (no queries) and 2 (no keys) contribute nothing and are dropped.
    q, k, types_, max_q, max_k = magi.to_magi_ranges(segment_ranges([3, 0, 5, 2], [2, 4, 0, 7]))
    assert q.tolist() == [[0, 3], [8, 10]]
    assert k.tolist() == [[0, 2], [6, 13]]
    assert types_.tolist() == [0, 0]
    assert (max_q, max_k) == (3, 7)

    q, k, types_, max_q, max_k = magi.to_magi_ranges(segment_ranges([0, 4], [3, 0]))
    assert q.shape == k.shape == (0, 2) and types_.shape == (0,) and q.dtype == I32
    assert (max_q, max_k) == (0, 0)


# ------------------------------------------------------------------ what the kernel is asked to compute
def emulate_flex_flash_attn(q, k, v, q_ranges, k_ranges, attn_type_map, softmax_scale):
    """FULL slices from int32 ranges, written as one dense masked softmax with an explicit GQA head map."""
    assert q_ranges.dtype == k_ranges.dtype == attn_type_map.dtype == I32
    assert (attn_type_map == 0).all()
    tq, hq, _ = q.shape
    mask = torch.zeros(tq, k.shape[0], dtype=torch.bool)
    for (qs, qe), (ks, ke) in zip(q_ranges.tolist(), k_ranges.tolist()):
        mask[qs:qe, ks:ke] = True
    kv_head = torch.arange(hq) // (hq // k.shape[1])  # flash-attn convention
    scores = torch.einsum("qhd,khd->hqk", q.float(), k[:, kv_head].float()) * softmax_scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)  # rows with no key
    return torch.einsum("hqk,khd->qhd", probs, v[:, kv_head].float())


def random_qkv(tq, tk, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tq, hq, d, generator=g).to(dtype), torch.randn(tk, hkv, d, generator=g).to(dtype),
            torch.randn(tk, hkv, d, generator=g).to(dtype))


CASES = {
    "block_causal": (block_causal_ranges(2, 3, 5), 30, 30),
    "block_causal_window": (block_causal_ranges(1, 4, 6, window_chunks=2), 24, 24),
    # Cross-attention to caption segments, with an empty caption (its 4 queries stay zero) and a trailing
    # query segment without keys.
    "segments": (segment_ranges([6, 4, 7, 3], [5, 0, 9, 0]), 20, 14),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 4)])
def test_emulated_kernel_on_converted_ranges_equals_range_attention(case, hq, hkv):
    ranges, tq, tk = CASES[case]
    q, k, v = random_qkv(tq, tk, hq, hkv, 16, torch.float32)
    q_ranges, k_ranges, types_, _, _ = magi.to_magi_ranges(ranges)
    got = emulate_flex_flash_attn(q, k, v, q_ranges, k_ranges, types_, 1 / math.sqrt(16))
    torch.testing.assert_close(got, range_attention(q, k, v, ranges), rtol=1e-5, atol=1e-6)


def install_fake_magi_attention(monkeypatch, old_api: bool):
    """A stand-in `magi_attention.api` whose kernel records its arguments and computes the emulation."""
    calls = []

    def record(q, k, v, kwargs):
        calls.append(kwargs)
        out = emulate_flex_flash_attn(q, k, v, kwargs["q_ranges"], kwargs["k_ranges"], kwargs["attn_type_map"],
                                      kwargs["softmax_scale"])
        # Uncovered rows: garbage, to check that the backend zeroes them whatever the kernel leaves there.
        covered = torch.zeros(q.shape[0], dtype=torch.bool)
        for qs, qe in kwargs["q_ranges"].tolist():
            covered[qs:qe] = True
        out[~covered] = 7.0
        return out

    if old_api:  # v1.0.0-v1.0.3: max seqlens are required; returns (out, lse)
        def flex_flash_attn_func(q, k, v, q_ranges, k_ranges, max_seqlen_q, max_seqlen_k, attn_type_map=None,
                                 softmax_scale=None):
            kw = dict(q_ranges=q_ranges, k_ranges=k_ranges, attn_type_map=attn_type_map, softmax_scale=softmax_scale,
                      max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
            return record(q, k, v, kw), None
    else:  # v1.1: returns (out, AttnForwardMeta)
        def flex_flash_attn_func(q, k, v, q_ranges=None, k_ranges=None, attn_type_map=None, *, softmax_scale=None,
                                 max_seqlen_q=None):
            kw = dict(q_ranges=q_ranges, k_ranges=k_ranges, attn_type_map=attn_type_map, softmax_scale=softmax_scale,
                      max_seqlen_q=max_seqlen_q)
            return record(q, k, v, kw), object()

    package = types.ModuleType("magi_attention")
    api = types.ModuleType("magi_attention.api")
    api.flex_flash_attn_func = flex_flash_attn_func
    package.api = api
    monkeypatch.setitem(sys.modules, "magi_attention", package)
    monkeypatch.setitem(sys.modules, "magi_attention.api", api)
    return calls


@pytest.mark.parametrize("old_api", [False, True])
def test_flex_backend_call_matches_range_attention(monkeypatch, old_api):
    calls = install_fake_magi_attention(monkeypatch, old_api)
    ranges, tq, tk = CASES["segments"]
    q, k, v = random_qkv(tq, tk, 6, 2, 16, torch.bfloat16, seed=3)
    out = magi.flex_attention_backend(q, k, v, ranges)

    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out, range_attention(q, k, v, ranges), rtol=1.6e-2, atol=1e-2)
    assert (out[6:10] == 0).all() and (out[17:] == 0).all(), "queries without keys must be zero"
    (kw,) = calls
    assert kw["q_ranges"].tolist() == [[0, 6], [10, 17]] and kw["k_ranges"].tolist() == [[0, 5], [5, 14]]
    assert kw["q_ranges"].dtype == kw["k_ranges"].dtype == kw["attn_type_map"].dtype == I32
    assert kw["softmax_scale"] == 1 / math.sqrt(16)
    if old_api:
        assert (kw["max_seqlen_q"], kw["max_seqlen_k"]) == (7, 9)
    else:
        assert kw["max_seqlen_q"] is None  # v1.1's max_seqlen_q is a sparse-attention knob: left alone


def test_flex_backend_refuses_fp32(monkeypatch):
    install_fake_magi_attention(monkeypatch, old_api=False)
    q, k, v = random_qkv(8, 8, 2, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        magi.flex_attention_backend(q, k, v, AttnRanges.from_lists([(0, 8)], [(0, 8)]))
