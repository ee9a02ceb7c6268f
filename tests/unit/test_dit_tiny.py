"""A tiny fp32 DiT trains on CPU: forward/backward shapes, gradients reach every parameter, runs are
bit-reproducible, and information flows only the way MAGI-1's block-causal chunking allows."""

from __future__ import annotations

import pytest
import torch

from magi_train.config.schema import ModelConfig
from tests.configs import tiny_model
from magi_train.model.attention import block_causal_ranges
from magi_train.model.dit import build_dit

N, DN, FRAMES, HL, WL = 2, 2, 2, 8, 8  # 2 samples x 2 chunks of 2 latent frames, 8x8 latent -> 4x4 tokens
TPC = FRAMES * (HL // 2) * (WL // 2)  # tokens per chunk
CAPTION_LEN = 16
VALID = [5, 9, 16, 3]  # valid caption tokens of the rows (sample 0 chunk 0, s0 c1, s1 c0, s1 c1)

# Softmax is invariant to adding the same value to every score of a query row. Cross-attention has no RoPE,
# so the cross-attention key-norm bias adds q·b to all keys alike: its gradient is 0 by construction
# (released architecture; only fp32 noise remains).
SHIFT_INVARIANT = ("k_layernorm_xattn.bias",)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg() -> ModelConfig:
    return tiny_model(num_attention_heads=2, num_query_groups=1, kv_channels=128, caption_channels=32)  # 2 heads of the released head dim 128


@pytest.fixture(scope="module")
def model(single_process_group):
    torch.manual_seed(0)
    m = build_dit(tiny_cfg(), tp_group=single_process_group)
    with torch.no_grad():
        # final_linear is zero-initialised (zero velocity at start); give it weights so gradients flow back.
        torch.nn.init.normal_(m.final_linear.linear.weight, 0.0, 0.02)
    return m


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 16, DN * FRAMES, HL, WL, generator=g)
    t = torch.rand(N, DN, generator=g)
    caption = torch.randn(N * DN, CAPTION_LEN, 32, generator=g)
    mask = torch.zeros(N * DN, CAPTION_LEN)
    for row, n in enumerate(VALID):
        mask[row, :n] = 1
    return dict(x=x, t=t, caption=caption, caption_mask=mask, self_ranges=block_causal_ranges(N, DN, TPC),
                adaln_uncond=torch.tensor([False, True]))


def forward(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


def chunk(out: torch.Tensor, sample: int, c: int) -> torch.Tensor:
    return out[sample, :, c * FRAMES:(c + 1) * FRAMES]


def test_forward_backward_reaches_every_parameter(model):
    inputs = make_inputs()
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    assert out.shape == inputs["x"].shape and out.dtype == torch.float32
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * w).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        if name.endswith(SHIFT_INVARIANT):
            assert p.grad.abs().max() < 1e-6, name
        else:
            assert p.grad.abs().max() > 1e-6, f"{name} has a zero gradient"
    # adaLN: sample 0 is conditional (null row -2), sample 1 unconditional (row -1); no other row is used
    null_grad = model.y_embedder.null_caption_embedding.grad
    assert null_grad[-2].abs().max() > 0 and null_grad[-1].abs().max() > 0
    assert torch.equal(null_grad[:-2], torch.zeros_like(null_grad[:-2]))
    model.zero_grad(set_to_none=True)


def test_runs_are_bit_identical(model):
    results = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = model(**make_inputs())
        out.square().mean().backward()
        results.append((out.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name
    model.zero_grad(set_to_none=True)


def test_block_causal_latents(model):
    inputs = make_inputs()
    base = forward(model, **inputs)

    later = dict(inputs, x=inputs["x"].clone())
    later["x"][0, :, FRAMES:] += 1.0  # sample 0, chunk 1
    out = forward(model, **later)
    assert torch.equal(chunk(out, 0, 0), chunk(base, 0, 0)), "chunk 0 must not see chunk 1"
    assert not torch.allclose(chunk(out, 0, 1), chunk(base, 0, 1))
    assert torch.equal(out[1], base[1]), "samples must not see each other"

    earlier = dict(inputs, x=inputs["x"].clone())
    earlier["x"][0, :, :FRAMES] += 1.0  # sample 0, chunk 0
    out = forward(model, **earlier)
    assert not torch.allclose(chunk(out, 0, 1), chunk(base, 0, 1)), "chunk 1 must see chunk 0"
    assert torch.equal(out[1], base[1])


def test_block_causal_timesteps(model):
    inputs = make_inputs()
    base = forward(model, **inputs)
    t = inputs["t"].clone()
    t[0, 1] = 1.0 - t[0, 1]
    out = forward(model, **dict(inputs, t=t))
    assert torch.equal(chunk(out, 0, 0), chunk(base, 0, 0))
    assert not torch.allclose(chunk(out, 0, 1), chunk(base, 0, 1))


def test_each_chunk_reads_only_its_own_caption_row(model):
    inputs = make_inputs()
    base = forward(model, **inputs)
    caption = inputs["caption"].clone()
    caption[1, : VALID[1]] += 1.0  # row of sample 0, chunk 1
    out = forward(model, **dict(inputs, caption=caption))
    assert torch.equal(chunk(out, 0, 0), chunk(base, 0, 0)), "chunk 0 must not read chunk 1's caption"
    assert not torch.allclose(chunk(out, 0, 1), chunk(base, 0, 1))
    assert torch.equal(out[1], base[1])


def test_masked_caption_tokens_are_ignored(model):
    inputs = make_inputs()
    base = forward(model, **inputs)
    caption = inputs["caption"].clone()
    for row, n in enumerate(VALID):
        caption[row, n:] = 100.0
    assert torch.equal(forward(model, **dict(inputs, caption=caption)), base)


def test_sdpa_backend_matches_torch_backend(model, single_process_group):
    cfg = tiny_cfg()
    cfg.attention_backend = "sdpa"
    other = build_dit(cfg, tp_group=single_process_group)
    other.load_state_dict(model.state_dict(), strict=True)
    inputs = make_inputs()
    torch.testing.assert_close(forward(other, **inputs), forward(model, **inputs), atol=1e-5, rtol=1e-4)


def test_model_built_without_tp_group_runs_in_one_process():
    model = build_dit(tiny_cfg())
    out = forward(model, **make_inputs())
    assert out.shape == (N, 16, DN * FRAMES, HL, WL)
