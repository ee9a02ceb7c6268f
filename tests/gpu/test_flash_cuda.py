"""model.attention_backend=flash on a GPU: flash-attn 2's varlen kernel over AttnRanges against the exact `torch`
backend, forward and backward in bf16, on MAGI-1's block-causal mask (keys gathered), a KV-cache window and
caption cross-attention with rows that have no caption tokens (queries scattered back), at head dim 128 with
GQA. Skipped without CUDA or flash_attn."""

from __future__ import annotations

import pytest
import torch

from magi_train.model.attention import AttnRanges, block_causal_ranges, range_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def flash():
    from magi_train.model import flash

    reason = flash.flash_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return flash


CASES = {
    "block-causal": (block_causal_ranges(2, 3, 1440), 8640, 8640),
    "kv window": (AttnRanges.from_lists([(0, 1440), (1440, 2880)], [(2880, 7200), (4320, 8640)]), 2880, 8640),
    "captions": (AttnRanges.from_lists([(0, 1440), (2880, 4320), (4320, 5760)], [(0, 37), (37, 137), (137, 937)]),
                 5760, 937),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_equal_the_torch_backend(flash, name):
    ranges, tq, tk = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(0)

    def make(tokens: int, heads: int) -> torch.Tensor:
        return (torch.randn(tokens, heads, 128, generator=g, device="cuda") * 0.5).bfloat16().requires_grad_()

    q, k, v = make(tq, 8), make(tk, 2), make(tk, 2)
    grad = torch.randn(tq, 8, 128, generator=g, device="cuda").bfloat16()
    results = []
    for kernel in (range_attention, flash.flash_range_attention):
        out = kernel(q, k, v, ranges)
        (out.float() * grad.float()).sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    covered = ranges.to_mask(tq, tk).any(-1).cuda()
    assert bool((results[1][0][~covered] == 0).all())


def test_auto_picks_flash_where_it_copies_nothing_and_flex_for_block_causal(flash):
    from magi_train.model import spec

    device = torch.device("cuda")
    if "magi" in spec.available_backends(device):
        pytest.skip("MagiAttention runs here: auto picks it first")
    assert spec.available_backends(device)[0] == "flash"
    assert spec.auto_backend_name(device, 5760, 937, torch.bfloat16, CASES["captions"][0]) == "flash"
    assert spec.auto_backend_name(device, 8640, 8640, torch.bfloat16, CASES["block-causal"][0]) == "flex"
    assert spec.auto_backend_name(device, 5760, 937, torch.float32, CASES["captions"][0]) == "flex"
