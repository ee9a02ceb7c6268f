"""LoRA on the DiT (magi_train/model/lora.py): a fresh adapter changes nothing bit for bit, merging equals the
unmerged sum, several adapters add with their scales, targets are checked, and only the factors learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from magi_train.model.attention import block_causal_ranges
from magi_train.model.dit import build_dit
from magi_train.model.linear import CaptionKVLinear, Linear
from magi_train.model.lora import (DEFAULT_LORA_TARGETS, LoraLinear, adapter_names, apply_lora, lora_modules,
                                   lora_parameters, lora_state_dict, merge_lora, remove_lora, set_lora_scale)
from tests.configs import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

N, DN, FRAMES, HL, WL, CAPTION_LEN = 1, 2, 2, 8, 8, 8
TPC = FRAMES * (HL // 2) * (WL // 2)


def tiny(**over):
    return tiny_model(num_layers=2, **over)


def make_model(seed: int = 0, **over) -> nn.Module:
    m = build_dit(tiny(**over), init_seed=seed)
    with torch.no_grad():  # final_linear is zero-initialised; give it weights so every layer shows in the output
        m.final_linear.linear.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    return m.eval()


def inputs(model, seed: int = 0):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    caption = torch.randn(N * DN, CAPTION_LEN, cfg.caption_channels, generator=g)
    mask = torch.ones(N * DN, CAPTION_LEN)
    mask[0, 5:] = 0
    return dict(x=torch.randn(N, cfg.in_channels, DN * FRAMES, HL, WL, generator=g), t=torch.rand(N, DN, generator=g),
                caption=caption, caption_mask=mask, self_ranges=block_causal_ranges(N, DN, TPC))


def run(model, batch):
    with torch.no_grad():
        return model(**batch)


def randomise(model, name: str, seed: int, std: float = 0.05) -> None:
    """Give adapter `name` a non-zero B (a fresh one is zero) so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            if name in m.adapters:
                m.lora_B[name].weight.normal_(0.0, std, generator=g)


def test_fresh_adapter_is_bit_identical_to_the_base():
    model = make_model()
    batch = inputs(model)
    want = run(model, batch)
    names = apply_lora(model, DEFAULT_LORA_TARGETS, rank=4, alpha=8.0)
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoraLinear) for n in names)
    # A is drawn (non-zero), B is zero: the adapter path runs and adds exact zeros.
    m = model.get_submodule(names[0])
    assert m.lora_A["default"].weight.abs().max() > 0 and not m.lora_B["default"].weight.any()
    assert torch.equal(run(model, batch), want)


def test_fresh_adapter_is_bit_identical_in_bf16():
    model = make_model(params_dtype="bfloat16")
    batch = inputs(model)
    want = run(model, batch)
    apply_lora(model, list(DEFAULT_LORA_TARGETS) + ["*.linear_kv_xattn"], rank=2, alpha=2.0)
    assert torch.equal(run(model, batch), want)


def test_merged_equals_unmerged():
    model = make_model()
    batch = inputs(model)
    base = run(model, batch)
    apply_lora(model, list(DEFAULT_LORA_TARGETS) + ["*.linear_kv_xattn"], rank=4, alpha=16.0)
    randomise(model, "default", seed=1)
    unmerged = run(model, batch)
    assert (unmerged - base).abs().max() > 1e-3  # the adapter matters ...
    merged = merge_lora(model)
    assert len(merged) == 2 * 8 and not lora_modules(model)
    assert set(model.state_dict()) == set(build_dit(tiny(), device="meta").state_dict())  # released keys again
    assert type(model.get_submodule("videodit_blocks.layers.0.self_attention.linear_kv_xattn")) is CaptionKVLinear
    torch.testing.assert_close(run(model, batch), unmerged, atol=1e-5, rtol=1e-5)  # ... and merges exactly


def test_two_adapters_with_scales_add_up():
    batch = None
    outs = {}
    # The same two adapters (same seeds) on three copies: only a, only b, both with scales 0.7 and -0.4.
    for case in ("a", "b", "ab"):
        model = make_model()
        batch = batch or inputs(model)
        outs["base"] = run(model, batch)
        for name, seed, scale in (("a", 1, 0.7), ("b", 2, -0.4)):
            apply_lora(model, ["*.mlp.linear_fc1", "*.linear_proj"], rank=3, alpha=6.0, name=name, scale=scale,
                       seed=seed)
            randomise(model, name, seed=10 + seed)
        for name in ("a", "b"):
            if name not in case:
                set_lora_scale(model, name, 0.0)
        outs[case] = run(model, batch)
    # The effect of both adapters on one linear is the sum of their effects; through the whole non-linear model it
    # is the sum to first order: compare one linear exactly and the model within the second-order remainder.
    lin = LoraLinear(Linear(16, 8, config=type("C", (), {"params_dtype": torch.float32})()), 16, 8)
    torch.nn.init.normal_(lin.base_layer.weight)
    for name, seed, scale in (("a", 1, 0.7), ("b", 2, -0.4)):
        lin.add_adapter(name, 3, 6.0, scale=scale, generator=torch.Generator().manual_seed(seed))
        torch.nn.init.normal_(lin.lora_B[name].weight)
    x = torch.randn(5, 16)
    with torch.no_grad():
        base = lin.base_layer(x)
        want = base + sum(lin.scaling(n) * x @ lin.lora_A[n].weight.t() @ lin.lora_B[n].weight.t() for n in "ab")
        torch.testing.assert_close(lin(x), want, atol=1e-5, rtol=1e-5)
        assert lin.scaling("a") == pytest.approx(0.7 * 6.0 / 3)
    first_order = outs["a"] + outs["b"] - outs["base"]
    gap = (outs["ab"] - first_order).abs().max()
    assert gap < 0.1 * (outs["ab"] - outs["base"]).abs().max(), gap


def test_adapter_names_scales_and_removal_restore_the_base():
    model = make_model()
    batch = inputs(model)
    want = run(model, batch)
    apply_lora(model, ["*.mlp.linear_fc2"], rank=2, alpha=2.0, name="style")
    apply_lora(model, ["*.mlp.linear_fc2", "*.linear_qkv.q"], rank=2, alpha=2.0, name="other")
    assert sorted(adapter_names(model)) == ["other", "style"]
    randomise(model, "style", 3)
    randomise(model, "other", 4)
    assert not torch.equal(run(model, batch), want)
    set_lora_scale(model, "style", 0.0)
    set_lora_scale(model, "other", 0.0)
    assert torch.equal(run(model, batch), want)  # scale 0 skips the adapter
    remove_lora(model, "style")
    remove_lora(model, "other")
    assert not lora_modules(model) and torch.equal(run(model, batch), want)
    with pytest.raises(KeyError, match="other"):
        set_lora_scale(model, "other", 1.0)


def test_a_pattern_that_matches_nothing_is_an_error_naming_it():
    model = make_model()
    with pytest.raises(ValueError, match=r"'\*\.mlp\.linear_fc3'"):
        apply_lora(model, ["*.mlp.linear_fc1", "*.mlp.linear_fc3"], rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="only non-linear modules"):
        apply_lora(model, ["*.self_attention.linear_qkv"], rank=2, alpha=2.0)  # the container, not a linear
    assert not lora_modules(model)  # nothing was wrapped by the failed calls


def test_every_linear_of_the_dit_can_be_a_target():
    """`lora.targets=["*"]`: the embedders' and the final layer's linears too (the embedders read their first
    linear's weight dtype, which a wrapped linear answers), fresh = base bit for bit, merged = unmerged."""
    from magi_train.model.lora import linear_features

    model = make_model()
    batch = inputs(model)
    base = run(model, batch)
    linears = [n for n, m in model.named_modules() if linear_features(m) is not None]
    names = apply_lora(model, ["*"], rank=2, alpha=2.0)
    assert sorted(names) == sorted(linears) and any(n.startswith("y_embedder.") for n in names)
    assert torch.equal(run(model, batch), base)
    randomise(model, "default", seed=3)
    unmerged = run(model, batch)
    assert (unmerged - base).abs().max() > 1e-3
    merge_lora(model)
    torch.testing.assert_close(run(model, batch), unmerged, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_factors():
    model = make_model().train()
    apply_lora(model, DEFAULT_LORA_TARGETS, rank=4, alpha=4.0, dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora_parameters(model)} and len(trainable) == 2 * 14
    out = model(**inputs(model))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    # B starts at zero, so only B gets a gradient at step 0 (A's gradient is B-weighted).
    grads_b = [p.grad.abs().max() for n, p in lora_parameters(model) if ".lora_B." in n]
    grads_a = [p.grad.abs().max() for n, p in lora_parameters(model) if ".lora_A." in n]
    assert min(grads_b) > 0 and max(grads_a) == 0


def test_state_dict_layout_and_seeded_init():
    a, b = make_model(), make_model()
    apply_lora(a, ["*.mlp.linear_fc1"], rank=4, alpha=4.0, seed=7)
    apply_lora(b, ["*.mlp.linear_fc1"], rank=4, alpha=4.0, seed=7)
    sd = lora_state_dict(a)
    cfg = a.cfg
    fc1_out = (2 if cfg.gated_linear_unit else 1) * cfg.ffn_hidden_size
    assert sorted(sd) == sorted(f"videodit_blocks.layers.{i}.mlp.linear_fc1.lora_{x}.weight"
                                for i in range(2) for x in "AB")
    assert sd["videodit_blocks.layers.0.mlp.linear_fc1.lora_A.weight"].shape == (4, cfg.hidden_size)
    assert sd["videodit_blocks.layers.0.mlp.linear_fc1.lora_B.weight"].shape == (fc1_out, 4)
    for k, v in lora_state_dict(b).items():
        assert torch.equal(v, sd[k]), k  # the same seed gives the same adapter
    a0, a1 = (sd[f"videodit_blocks.layers.{i}.mlp.linear_fc1.lora_A.weight"] for i in range(2))
    assert not torch.equal(a0, a1)  # ... and each module its own draw
    assert a0.abs().max() <= 1 / cfg.hidden_size ** 0.5  # kaiming-uniform(a=sqrt 5) bound


def test_wraps_torch_linear_and_refuses_to_merge_into_fp8():
    from magi_train.model.fp8 import Fp8PerTensorLinear

    seq = nn.Sequential(nn.Linear(6, 4, bias=True))
    x = torch.randn(3, 6)
    with torch.no_grad():
        want = seq(x)
    apply_lora(seq, ["0"], rank=2, alpha=2.0)
    randomise(seq, "default", 1)
    with torch.no_grad():
        unmerged = seq(x)
        merge_lora(seq)
        torch.testing.assert_close(seq(x), unmerged, atol=1e-6, rtol=1e-6)
    assert isinstance(seq[0], nn.Linear) and not torch.equal(unmerged, want)

    fp8 = nn.Sequential(Fp8PerTensorLinear(8, 8))
    with torch.no_grad():
        fp8[0].weight.copy_(torch.randn(1, 8, 8).to(fp8[0].weight.dtype))
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = fp8(x)
        apply_lora(fp8, ["0"], rank=2, alpha=2.0)
        assert torch.equal(fp8(x), want)  # unmerged on an fp8 base: a fresh adapter changes nothing
        randomise(fp8, "default", 1)
        assert fp8(x).dtype == want.dtype and not torch.equal(fp8(x), want)
    with pytest.raises(ValueError, match="fp8"):
        merge_lora(fp8)


def test_dropout_follows_the_model_mode():
    """Adapters added to an eval model (inference) drop nothing; train() switches their dropout on."""
    model = make_model()  # eval
    batch = inputs(model)
    apply_lora(model, ["*.mlp.linear_fc1"], rank=4, alpha=4.0, dropout=0.5)
    randomise(model, "default", 1)
    first = run(model, batch)
    assert torch.equal(run(model, batch), first)
    no_drop = make_model()
    apply_lora(no_drop, ["*.mlp.linear_fc1"], rank=4, alpha=4.0, dropout=0.0)
    for (_, p), (_, q) in zip(lora_parameters(model), lora_parameters(no_drop)):
        with torch.no_grad():
            q.copy_(p)
    assert torch.equal(run(no_drop, batch), first)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(run(model, batch), first)  # half of the adapter's inputs dropped (and rescaled)
