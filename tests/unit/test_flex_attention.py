"""model.attention_backend=flex (magi_train/model/flex.py): the BlockMask is built from tile indices with memory
O(tiles + tokens), and flex's forward equals the exact `torch` backend on every pattern the DiT uses. (torch
2.13 has no flex backward on the CPU: the gradients are checked in tests/gpu.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

from magi_train.model.attention import AttnRanges, block_causal_ranges, range_attention
from magi_train.model.flex import BLOCK, flex_range_attention, ranges_block_mask


def _qkv(tq: int, tk: int, hq: int = 4, hkv: int = 2, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tq, hq, d, generator=g), torch.randn(tk, hkv, d, generator=g),
            torch.randn(tk, hkv, d, generator=g))


PATTERNS = {
    # Packed training: 3 samples of 2-3 chunks of 96 tokens, block-causal, edges inside 128-token tiles.
    "block-causal": lambda: (block_causal_ranges(3, 3, 96), 864, 864),
    # Inference with a KV cache: 2 new chunks after a 4-chunk cached prefix, lookback of 3 chunks.
    "kv window": lambda: (AttnRanges.from_lists([(0, 100), (100, 200)], [(100, 500), (200, 600)]), 200, 600),
    # Cross-attention: runs of query tokens to their own caption's tokens; some queries see no caption.
    "captions": lambda: (AttnRanges.from_lists([(0, 150), (150, 300), (400, 520)], [(0, 37), (37, 101), (101, 102)]),
                         520, 102),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_forward_equals_the_torch_backend(name):
    ranges, tq, tk = PATTERNS[name]()
    q, k, v = _qkv(tq, tk)
    want = range_attention(q, k, v, ranges)
    got = flex_range_attention(q, k, v, ranges)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Queries that no range covers get zeros, as in every backend.
    covered = ranges.to_mask(tq, tk).any(-1)
    assert bool((got[~covered] == 0).all())


def test_bf16_inputs_come_back_in_bf16_computed_in_fp32():
    ranges, tq, tk = PATTERNS["block-causal"]()
    q, k, v = (x.bfloat16() for x in _qkv(tq, tk, seed=1))
    got = flex_range_attention(q, k, v, ranges)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, range_attention(q, k, v, ranges), rtol=1e-2, atol=1e-2)


def test_tiles_are_whole_partial_or_absent_as_the_ranges_say():
    # One sample, 2 chunks of 192 tokens (1.5 tiles each): chunk 0 sees keys [0, 192), chunk 1 sees [0, 384).
    mask = ranges_block_mask(block_causal_ranges(1, 2, 192), 384, 384)
    full = mask.full_kv_num_blocks[0, 0].tolist()
    partial = mask.kv_num_blocks[0, 0].tolist()
    # Query tile 0 (tokens 0-127, chunk 0): key tile 0 whole, key tile 1 (128-255) partial (keys < 192).
    # Query tile 1 (128-255, both chunks): key tile 0 whole (both chunks see it), tiles 1 and 2 partial (chunk 0
    # sees keys < 192 only). Query tile 2 (256-383, chunk 1): all 3 key tiles whole.
    assert (full, partial) == ([1, 1, 3], [1, 2, 0])
    assert mask.full_kv_indices[0, 0, 2, :3].tolist() == [0, 1, 2]


def test_a_64k_token_mask_is_small_and_quick_to_build():
    """A 24B-shaped training sample: 65,536 tokens in 16 chunks of 4,096, block-causal. A dense boolean mask
    would be 4 GiB; the BlockMask's tensors take O(tiles^2) int32 + O(T) int64."""
    ranges = block_causal_ranges(1, 16, 4096)
    mask = ranges_block_mask(ranges, 65536, 65536)
    tensors = [mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices]
    tensors += [t for t in (mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)
                if t is not None]
    total = sum(t.numel() * t.element_size() for t in tensors) + 2 * 65536 * 8  # + the per-token ranges
    assert total <= 64 * 2**20, f"{total / 2**20:.1f} MiB"
    tiles = 65536 // BLOCK
    # Block-causal over 32-tile chunks: chunk c's 32 query tiles see (c + 1) * 32 key tiles, all of them whole.
    want = [(c + 1) * 32 for c in range(16) for _ in range(32)]
    assert mask.full_kv_num_blocks[0, 0].tolist() == want and int(mask.kv_num_blocks.sum()) == 0
    assert mask.kv_indices.shape[-2:] == (tiles, tiles)


def test_the_dit_runs_with_the_flex_backend_like_the_torch_backend_one_mask_per_forward(monkeypatch):
    from dataclasses import replace

    from magi_train.model import flex
    from magi_train.model.dit import build_dit
    from tests.configs import tiny_model

    built = []
    real = flex.ranges_block_mask
    monkeypatch.setattr(flex, "ranges_block_mask", lambda *args: built.append(args[1:3]) or real(*args))
    cfg = tiny_model(num_layers=3)
    torch_model = build_dit(cfg, init_seed=0).eval()
    flex_model = build_dit(replace(cfg, attention_backend="flex"), init_seed=0).eval()
    flex_model.load_state_dict(torch_model.state_dict())
    g = torch.Generator().manual_seed(0)
    n, chunks, hw = 2, 2, 8
    x = torch.randn(n, cfg.in_channels, chunks * cfg.chunk_width, hw, hw, generator=g)
    t = torch.rand(n, chunks, generator=g)
    caption = torch.randn(n * chunks, cfg.caption_max_length, cfg.caption_channels, generator=g)
    mask = torch.ones(n * chunks, cfg.caption_max_length, dtype=torch.bool)
    tokens = cfg.chunk_width * (hw // cfg.patch_size) ** 2
    ranges = block_causal_ranges(n, chunks, tokens)
    with torch.no_grad():
        want = torch_model(x, t, caption, mask, ranges)
        got = flex_model(x, t, caption, mask, ranges)
        # One BlockMask per distinct ranges of the forward, whatever the layer count: self-attention's
        # (tokens x tokens) and cross-attention's (tokens x caption tokens), not 2 per layer.
        total = n * chunks * tokens
        assert built == [(total, total), (total, n * chunks * cfg.caption_max_length)]
        flex_model(x, t, caption, mask, block_causal_ranges(n, chunks, tokens))  # a second forward: 2 more
        assert len(built) == 4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sdpa_refuses_a_dense_mask_above_its_limit_naming_the_knob(monkeypatch):
    from magi_train.model import attention

    ranges, tq, tk = PATTERNS["block-causal"]()
    q, k, v = _qkv(tq, tk)
    attention.sdpa_attention(q, k, v, ranges)  # 864 x 864: under the limit
    monkeypatch.setattr(attention, "SDPA_MAX_MASK_ELEMENTS", tq * tk - 1)
    with pytest.raises(ValueError, match=r"model.attention_backend=sdpa .* 864 x 864 .* model.attention_backend=flex"):
        attention.sdpa_attention(q, k, v, ranges)


def test_auto_picks_by_device_package_dtype_and_size(monkeypatch):
    from magi_train.model import attention, flash, magi_attention, spec

    # CPU: sdpa while its dense mask fits its limit, then the per-range torch kernel; never eager flex.
    ranges, tq, tk = PATTERNS["block-causal"]()
    q, k, v = _qkv(tq, tk)
    cpu = torch.device("cpu")
    assert spec.auto_backend_name(cpu, tq, tk) == "sdpa"
    assert torch.equal(spec.auto_attention(q, k, v, ranges), attention.sdpa_attention(q, k, v, ranges))
    monkeypatch.setattr(spec, "SDPA_MAX_MASK_ELEMENTS", tq * tk - 1)
    assert spec.auto_backend_name(cpu, tq, tk) == "torch"
    # auto decided once for this ranges object (sdpa): a new one is decided again.
    ranges = PATTERNS["block-causal"]()[0]
    assert torch.equal(spec.auto_attention(q, k, v, ranges), range_attention(q, k, v, ranges))
    # CUDA: MagiAttention > flash-attn > flex by package, bf16/fp16 only for the first two, flash only while its
    # gathered keys fit (the device itself is not touched here).
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    cuda = torch.device("cuda", 0)
    captions = PATTERNS["captions"]()[0]  # keys back to back: flash copies nothing
    for magi, fl, dtype, r, want in [
        (True, True, torch.bfloat16, ranges, "magi"),
        (False, True, torch.bfloat16, captions, "flash"),
        (False, True, torch.float16, None, "flash"),
        (False, True, torch.bfloat16, ranges, "flex"),  # 3 block-causal chunks: the copy is 2 x the keys
        (True, True, torch.float32, captions, "flex"),  # both GPU kernels are bf16/fp16 only
        (False, False, torch.bfloat16, captions, "flex"),
    ]:
        monkeypatch.setattr(magi_attention, "magi_attention_available", lambda: magi)
        monkeypatch.setattr(flash, "flash_attention_available", lambda: fl)
        assert spec.auto_backend_name(cuda, tq, tk, dtype, r) == want, (magi, fl, dtype, want)
        assert spec.available_backends(cuda) == ["magi"] * magi + ["flash"] * fl + ["flex", "sdpa", "torch"]
    assert spec.available_backends(cpu) == ["sdpa", "torch", "flex"]
