"""Activation recompute (full / selective, all or the first N layers) gives the same gradients."""

import pytest
import torch

from magi_train.config.schema import ModelConfig
from magi_train.model.attention import block_causal_ranges
from magi_train.model.dit import build_dit


def _grads(group, recompute: str, layers: int):
    cfg = ModelConfig(num_layers=3, hidden_size=128, ffn_hidden_size=256, num_attention_heads=2, num_query_groups=1,
                      kv_channels=64, caption_channels=32, caption_max_length=16, gated_linear_unit=True)
    model = build_dit(cfg, tp_group=group, init_seed=5)
    model.set_recompute(recompute, layers)
    g = torch.Generator().manual_seed(0)
    # The output layer starts at zero, which would zero every gradient upstream of it.
    model.final_linear.linear.weight.data.normal_(0.0, 0.05, generator=g)
    x = torch.randn(2, 16, 12, 8, 8, generator=g)
    t = torch.rand(2, 2, generator=g)
    caption = torch.randn(4, 16, 32, generator=g)
    mask = torch.arange(16)[None] < torch.tensor([[5], [16], [9], [1]])
    out = model(x, t, caption, mask, block_causal_ranges(2, 2, 96))
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute,layers", [("full", 0), ("full", 2), ("selective", 0), ("selective", 1)])
def test_recompute_gives_the_same_gradients(single_process_group, recompute, layers):
    ref = _grads(single_process_group, "none", 0)
    got = _grads(single_process_group, recompute, layers)
    assert ref.keys() == got.keys() and len(ref) > 20
    assert ref["videodit_blocks.layers.0.self_attention.linear_qkv.q.weight"].abs().max() > 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-9, msg=name)


def test_recompute_really_reruns_the_forward(single_process_group, monkeypatch):
    # Count core-attention calls: full recompute of every layer runs each layer's two attentions twice.
    calls = {"n": 0}
    from magi_train.model import dit as layers_module

    original = layers_module.SelfCrossAttention._attend

    def counting(self, *args):
        calls["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(layers_module.SelfCrossAttention, "_attend", counting)
    _grads(single_process_group, "none", 0)
    plain = calls["n"]
    calls["n"] = 0
    _grads(single_process_group, "full", 0)
    assert plain == 6 and calls["n"] == 12
