"""The analytic FLOP count (magi_train/observability/flops.py): a hand count term by term, the FLOPs a real CPU forward and
backward perform (torch's dispatch-level FlopCounterMode), block-causal growth, and the GQA / SwiGLU variants."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from magi_train.config.schema import ModelConfig
from magi_train.observability.flops import SampleShape, flops_breakdown, forward_flops, mfu, train_flops
from magi_train.model.attention import block_causal_ranges
from magi_train.model.dit import build_dit


def small_cfg(**over) -> ModelConfig:
    # hidden 64 = 2 heads x 32; condition width 64 * 0.25 = 16; caption features 16 wide.
    base = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, num_query_groups=2,
                       kv_channels=32, caption_channels=16, caption_max_length=8, in_channels=16, out_channels=16,
                       patch_size=2, t_patch_size=1, proj_interleave_groups=2, params_dtype="float32")
    return replace(base, **over)


SAMPLE = SampleShape(chunk_tokens=(4, 4, 4), caption_tokens=6)


def mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def hand_count(ng: int = 2, ffn_fc1: int = 128) -> int:
    """One sample of small_cfg, 3 chunks of 4 tokens (12 tokens), 6 caption tokens per chunk row; every
    matmul written as [m, k] x [k, n]. ng: KV heads (x 32 wide); ffn_fc1: fc1 output width."""
    embed = (
        mm(12, 16 * 1 * 2 * 2, 64)  # x_embedder: 12 patches of 16 channels x 1 x 2 x 2 -> hidden 64
        + mm(3, 256, 16) + mm(3, 16, 16)  # t_embedder MLP, one time per chunk: 256 features -> 16 -> 16
        + mm(3 * 6, 16, 64)  # y_proj_xattn: 3 rows x 6 caption tokens, 16 -> 64
        + mm(1, 16, 16)  # y_proj_adaln: the sample's null-caption row, 16 -> 16
    )
    layer = (
        mm(3, 16, 2 * 64)  # ada_modulate_layer: one condition per chunk -> two 64-wide gates
        + mm(12, 64, 64)  # q: 2 heads x 32
        + mm(12, 64, ng * 32)  # k
        + mm(12, 64, ng * 32)  # v
        + mm(12, 64, 64)  # qx (cross-attention queries)
        + mm(3 * 6, 64, 2 * ng * 32)  # linear_kv_xattn on each chunk row's caption tokens
        # self-attention, per head: chunk 0 sees 4 keys, chunk 1 sees 8, chunk 2 sees 12; scores then values
        + 2 * (2 * (mm(4, 32, 4) + mm(4, 32, 8) + mm(4, 32, 12)))
        # cross-attention, per head and chunk: 4 queries x 6 caption keys; scores then values
        + 2 * (2 * 3 * mm(4, 32, 6))
        + mm(12, 2 * 64, 64)  # linear_proj over [self | cross] outputs
        + mm(12, 64, ffn_fc1)  # fc1
        + mm(12, 128, 64)  # fc2
    )
    head = mm(12, 64, 16 * 2 * 2)  # final_linear: hidden -> 16 channels x 2 x 2 per token
    return embed + layer + head


def test_hand_count_equals_forward_flops():
    assert forward_flops(small_cfg(), SAMPLE) == hand_count() == 1_593_344  # 161,792 embed + 1,333,248 layer + 98,304 head
    breakdown = flops_breakdown(small_cfg(), SAMPLE)
    assert sum(breakdown.values()) == forward_flops(small_cfg(), SAMPLE)
    assert breakdown["self_attention"] == 4 * 2 * 32 * (4 * 4 + 4 * 8 + 4 * 12)
    assert breakdown["cross_attention"] == 4 * 2 * 32 * (12 * 6)
    two_layers = small_cfg(num_layers=2)
    per_layer = hand_count() - (mm(12, 64, 64) + mm(3, 256, 16) + mm(3, 16, 16) + mm(18, 16, 64) + mm(1, 16, 16)
                                + mm(12, 64, 64))
    assert forward_flops(two_layers, SAMPLE) == hand_count() + per_layer


def test_gqa_and_swiglu_change_the_count_as_the_hand_count_says():
    base = forward_flops(small_cfg(), SAMPLE)
    gqa = forward_flops(small_cfg(num_query_groups=1), SAMPLE)
    assert gqa == hand_count(ng=1)
    # One KV head instead of two: k, v and the caption K/V projection halve; attention itself does not change.
    assert base - gqa == mm(12, 64, 32) * 2 + mm(18, 64, 64)
    swiglu = forward_flops(small_cfg(gated_linear_unit=True), SAMPLE)
    assert swiglu == hand_count(ffn_fc1=256)
    assert swiglu - base == mm(12, 64, 128)  # fc1 is [gate | up], twice as wide
    distilled = forward_flops(small_cfg(distill=True), SAMPLE)
    assert distilled - base == mm(3, 256, 16) + mm(3, 16, 16)  # the step-size embedding: a second timestep MLP


def test_block_causal_area_grows_as_n_n_plus_1_over_2():
    cfg = small_cfg()
    for n in (1, 2, 3, 5):
        short = flops_breakdown(cfg, SampleShape((8,) * n, 6))["self_attention"]
        long = flops_breakdown(cfg, SampleShape((8,) * (2 * n), 6))["self_attention"]
        assert short == 4 * 2 * 32 * 8 * 8 * n * (n + 1) // 2
        assert long * n * (n + 1) == short * (2 * n) * (2 * n + 1)  # not 4x (n^2)
        # The area is exactly the key set of the trainer's mask.
        mask = block_causal_ranges(1, 2 * n, 8).to_mask(16 * n, 16 * n)
        assert long == 4 * 2 * 32 * int(mask.sum())


# ---------------------------------------------------------------- measured on a real forward / backward
N, CHUNKS, PADDED = 2, 3, 8  # 2 samples of 3 chunks (4x4 latent, 1 frame -> 2x2 = 4 tokens), captions padded to 8


def _measure(group, cfg: ModelConfig, backward: bool = False):
    model = build_dit(cfg, tp_group=group, init_seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 16, CHUNKS, 4, 4, generator=g)
    t = torch.rand(N, CHUNKS, generator=g)
    caption = torch.randn(N * CHUNKS, PADDED, 16, generator=g)
    mask = torch.arange(PADDED)[None].expand(N * CHUNKS, -1) < SAMPLE.caption_tokens
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, caption, mask, block_causal_ranges(N, CHUNKS, 4), adaln_uncond=torch.tensor([False, True]))
        if backward:
            out.square().sum().backward()
    return counter.get_total_flops(), counter.get_flop_counts()


@pytest.mark.parametrize("variant", [{}, {"num_query_groups": 1, "gated_linear_unit": True, "num_layers": 2}])
def test_measured_forward_equals_the_count_plus_caption_padding(single_process_group, variant):
    cfg = small_cfg(**variant)
    measured, by_module = _measure(single_process_group, cfg)
    analytic = N * forward_flops(cfg, SAMPLE)
    # The exact torch kernel visits only the unmasked ranges; the one extra is y_proj_xattn, which the model
    # applies to every padded caption token (2 padding tokens per chunk row) before the mask drops them.
    padding = mm(N * CHUNKS * (PADDED - SAMPLE.caption_tokens), 16, 64)
    assert measured == analytic + padding
    assert sum(by_module["VideoDiT.x_embedder"].values()) == N * mm(12, 64, 64)
    assert sum(by_module["VideoDiT.final_linear"].values()) == N * mm(12, 64, 64)


def test_measured_sdpa_backend_computes_the_whole_rectangle(single_process_group):
    cfg = small_cfg(attention_backend="sdpa")
    measured, _ = _measure(single_process_group, cfg)
    b = flops_breakdown(cfg, SAMPLE)
    padding = mm(N * CHUNKS * (PADDED - SAMPLE.caption_tokens), 16, 64)
    # One masked SDPA over the flattened batch: every query of both samples against every key (the mask
    # zeroes probabilities, not work), for self-attention and for the caption keys of all rows.
    tokens = N * SAMPLE.tokens
    rectangle = 4 * 2 * 32 * (tokens * tokens + tokens * N * CHUNKS * SAMPLE.caption_tokens)
    masked = N * (b["self_attention"] + b["cross_attention"])
    assert measured == N * forward_flops(cfg, SAMPLE) + padding - masked + rectangle


def test_measured_training_step_is_three_forwards_minus_data_input_grads(single_process_group):
    cfg = small_cfg()
    forward, _ = _measure(single_process_group, cfg)
    step, _ = _measure(single_process_group, cfg, backward=True)
    # Backward = weight gradients + input gradients of every matmul (2 x forward), except the input
    # gradients of the embedders fed with data: patches, timestep features and caption features.
    skipped = N * mm(12, 64, 64) + N * mm(3, 256, 16) + mm(N * CHUNKS * PADDED, 16, 64)
    assert step == 3 * forward - skipped
    assert train_flops(cfg, [SAMPLE] * N) == 3 * N * forward_flops(cfg, SAMPLE)


def test_mfu():
    assert mfu(3e15, 2.0, 4, 1e15) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1, 1.0)


def test_released_presets_are_dominated_by_the_layers():
    # 24B, one 720p-ish chunk group: 4 chunks of 6 latent frames at 45x80 tokens, 800 caption tokens.
    cfg = ModelConfig(num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48,
                      num_query_groups=8, kv_channels=128, in_channels=32, out_channels=32, gated_linear_unit=True)
    sample = SampleShape((6 * 45 * 80,) * 4, 800)
    b = flops_breakdown(cfg, sample)
    layers = b["linear"] + b["self_attention"] + b["cross_attention"] + b["caption_kv"]
    assert layers / forward_flops(cfg, sample) > 0.99
