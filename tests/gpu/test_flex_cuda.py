"""model.attention_backend=flex on a GPU: the compiled FlexAttention kernel over the tile BlockMask against the
exact `torch` backend, forward and backward (torch has no flex backward on the CPU), on MAGI-1's block-causal
mask at head dim 128, and a 64k-token sample that a dense mask could not hold."""

from __future__ import annotations

import pytest
import torch

from magi_train.model.attention import block_causal_ranges, range_attention
from magi_train.model.flex import flex_range_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _qkv(tokens: int, hq: int, hkv: int, dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    def make(heads: int) -> torch.Tensor:
        return (torch.randn(tokens, heads, 128, generator=g, device="cuda") * 0.5).to(dtype).requires_grad_()

    return make(hq), make(hkv), make(hkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_equal_the_torch_backend(dtype):
    ranges = block_causal_ranges(2, 3, 1440)  # 2 samples x 3 chunks x 1,440 tokens: tile edges inside chunks
    q, k, v = _qkv(8640, 8, 2, dtype)
    grad = torch.randn(8640, 8, 128, device="cuda").to(dtype)
    outs, grads = [], []
    for kernel in (range_attention, flex_range_attention):
        out = kernel(q, k, v, ranges)
        (out.float() * grad.float()).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, **tol)


def test_a_64k_token_sample_runs_in_bounded_memory():
    ranges = block_causal_ranges(1, 16, 4096)
    q, k, v = _qkv(65536, 8, 8, torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = flex_range_attention(q, k, v, ranges)
    out.float().square().mean().backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(out.float()).all()
    # q, k, v, out and their grads in bf16 plus fp32 copies are a few hundred MiB; a dense mask alone is 4 GiB.
    assert peak < 3 * 2**30, f"peak {peak / 2**30:.2f} GiB"
