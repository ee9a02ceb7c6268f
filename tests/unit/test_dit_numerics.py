"""Numeric conventions of the MAGI-1 DiT, each pinned by an independent formula written from the released conventions
(magi_train/model/README.md §1.3-§1.7). Every test here fails on the wrong convention (order, sign, layout, dtype)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from magi_train.config.schema import ModelConfig
from magi_train.model import dit as layers_mod
from magi_train.model.attention import AttnRanges, block_causal_ranges, segment_ranges
from magi_train.model.dit import build_dit
from magi_train.model.embedders import CaptionEmbedder, TimestepEmbedder
from magi_train.model.dit import modulate_add
from magi_train.model.norms import LayerNorm1p
from magi_train.model.rope import LearnableRope3D, apply_rotary, split_table

EPS = 1e-6


def tiny_cfg(**over) -> ModelConfig:
    base = dict(params_dtype="float32", caption_channels=32, caption_max_length=64, num_layers=1)
    base.update(over)
    return ModelConfig(**base)


def manual_layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * scale.double() + bias.double()


# ------------------------------------------------------------------ LayerNorm flavours (§1.7)


def test_layernorm_1p_scales_by_weight_plus_one():
    g = torch.Generator().manual_seed(0)
    ln = LayerNorm1p(64, EPS, True, torch.float32)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(64, generator=g) * 0.3)
        ln.bias.copy_(torch.randn(64, generator=g) * 0.3)
    x = torch.randn(10, 64, generator=g) * 2 + 1
    torch.testing.assert_close(ln(x).double(), manual_layer_norm(x, ln.weight + 1, ln.bias), atol=1e-5, rtol=1e-5)
    # zero-centred gamma: a zero weight is the identity scale
    with torch.no_grad():
        ln.weight.zero_()
        ln.bias.zero_()
    torch.testing.assert_close(ln(x).double(), manual_layer_norm(x, torch.ones(64), torch.zeros(64)), atol=1e-5, rtol=1e-5)


def test_layernorm_1p_bf16_adds_one_in_bf16():
    g = torch.Generator().manual_seed(0)
    d = 128
    ln = LayerNorm1p(d, EPS, True, torch.bfloat16)
    with torch.no_grad():
        ln.weight.copy_((torch.rand(d, generator=g) * 0.03).bfloat16())
        ln.bias.copy_((torch.randn(d, generator=g) * 0.1).bfloat16())
    x = (torch.randn(64, d, generator=g) * 3).bfloat16()
    out = ln(x)
    assert out.dtype == torch.bfloat16
    w = ln.weight.detach()
    want = F.layer_norm(x, (d,), w.bfloat16() + 1, ln.bias.detach(), EPS)
    assert torch.equal(out, want)
    # ... which is observably not "+1 in fp32" (the released rounding point matters).
    fp32_one = F.layer_norm(x.float(), (d,), w.float() + 1, ln.bias.detach().float(), EPS).bfloat16()
    assert (out != fp32_one).any()


def test_model_pre_norms_are_plain_and_all_other_norms_are_1p(single_process_group):
    model = build_dit(tiny_cfg(num_layers=2), tp_group=single_process_group)
    plain_names = ("self_attention.linear_qkv.layer_norm", "mlp.layer_norm")
    one_p_names = ("self_attention.q_layernorm", "self_attention.k_layernorm", "self_attention.q_layernorm_xattn",
                   "self_attention.k_layernorm_xattn", "self_attn_post_norm", "mlp_post_norm")
    checked = []
    g = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if not hasattr(module, "weight") or "norm" not in name.split(".")[-1]:
            continue
        d = module.weight.shape[0]
        x = torch.randn(5, d, generator=g)
        w = torch.randn(d, generator=g) * 0.5
        b = torch.randn(d, generator=g) * 0.5
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
            out = module(x)
        if name.endswith(plain_names):
            assert isinstance(module, nn.LayerNorm), name
            want = manual_layer_norm(x, w, b)  # gamma used as stored
        else:
            assert name.endswith(one_p_names) or name == "videodit_blocks.final_layernorm", name
            want = manual_layer_norm(x, w + 1, b)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        checked.append(name)
    # 2 layers x (2 plain + 6 1p) + the final norm
    assert len(checked) == 2 * 8 + 1, checked


# ------------------------------------------------------------------ timestep embedding (§1.3)


def spec_timestep_features(t: torch.Tensor) -> torch.Tensor:
    """[cos(args), sin(args)], args = (t * exp(-ln(10000) k / 128)) * 1000, k = 0..127, fp32."""
    k = torch.arange(128, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000.0) * k / 128)
    args = (t.float()[:, None] * freqs[None]) * 1000.0
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def identity_timestep_embedder(feature_dtype: torch.dtype) -> TimestepEmbedder:
    emb = TimestepEmbedder(256, 256, 1000.0, feature_dtype=feature_dtype)
    with torch.no_grad():
        for lin in (emb.mlp[0], emb.mlp[2]):
            lin.weight.copy_(torch.eye(256))
            lin.bias.zero_()
    return emb  # output = silu(features as the MLP sees them)


def test_timestep_features_put_cos_first():
    emb = identity_timestep_embedder(torch.float32)
    out = emb(torch.zeros(1))
    # t = 0: cos = 1 for the first 128 features, sin = 0 for the last 128
    torch.testing.assert_close(out[0, :128], F.silu(torch.ones(128)))
    torch.testing.assert_close(out[0, 128:], torch.zeros(128))


def test_timestep_embedding_rounds_features_to_bf16_before_fp32_mlp():
    t = torch.tensor([0.0, 0.05, 0.3, 0.77, 0.9999])
    emb = identity_timestep_embedder(torch.bfloat16)
    assert emb.mlp[0].weight.dtype == torch.float32
    out = emb(t)
    assert out.dtype == torch.float32
    feats = spec_timestep_features(t)
    rounded = F.silu(feats.bfloat16().float())
    unrounded = F.silu(feats)
    torch.testing.assert_close(out, rounded, atol=1e-6, rtol=0)
    assert (out - unrounded).abs().max() > 1e-3
    # with fp32 features it is the unrounded formula
    torch.testing.assert_close(identity_timestep_embedder(torch.float32)(t), unrounded, atol=1e-6, rtol=0)


def test_bf16_model_rounds_timestep_features(single_process_group):
    cfg = tiny_cfg(params_dtype="bfloat16")
    model = build_dit(cfg, tp_group=single_process_group)
    emb = model.t_embedder
    t = torch.tensor([0.05, 0.3, 0.9])
    with torch.no_grad():
        got = emb(t)
        feats = spec_timestep_features(t)
        rounded = emb.mlp(feats.bfloat16().float())
        unrounded = emb.mlp(feats)
    torch.testing.assert_close(got, rounded, atol=1e-7, rtol=0)
    assert not torch.allclose(got, unrounded, atol=1e-7, rtol=0)


def test_caption_embedder_adaln_uses_null_rows_minus2_cond_minus1_uncond():
    g = torch.Generator().manual_seed(0)
    emb = CaptionEmbedder(caption_channels=16, hidden_size=8, cond_size=4, max_length=10)
    with torch.no_grad():
        emb.null_caption_embedding.copy_(torch.randn(10, 16, generator=g))
    caption = torch.randn(3, 5, 16, generator=g)
    y_xattn, y_adaln = emb(caption, torch.tensor([False, True]))
    lin = emb.y_proj_adaln[0]
    null = emb.null_caption_embedding.detach()
    torch.testing.assert_close(y_adaln[0, 0], lin(null[-2]))
    torch.testing.assert_close(y_adaln[1, 0], lin(null[-1]))
    # the caption content only reaches cross-attention: Linear + SiLU
    torch.testing.assert_close(y_xattn, F.silu(emb.y_proj_xattn[0](caption)))


# ------------------------------------------------------------------ RoPE (§1.5)


def test_default_rope_bands():
    rope = LearnableRope3D(128)
    want = torch.tensor([10000.0 ** (-k / 16) for k in range(16)])
    torch.testing.assert_close(rope.bands.detach(), want)


def test_rope_table_angles_sin_first():
    T, Hp, Wp, offset = 3, 4, 6, 2
    rope = LearnableRope3D(128)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rope.bands.copy_(torch.rand(16, generator=g) * 0.9 + 0.05)  # trained bands are arbitrary
    b = rope.bands.detach().double()
    table = rope.table(T, Hp, Wp, frame_offset=offset)
    assert table.shape == (T * Hp * Wp, 96) and table.dtype == torch.float32

    s = math.sqrt(Hp * Wp / 256)
    rows = []
    for f in range(T):
        for i in range(Hp):
            for j in range(Wp):
                tau = offset + f
                eta = (i - (Hp - 1) / 2) / (Hp - 1) * (Hp / s - 1)
                omega = (j - (Wp - 1) / 2) / (Wp - 1) * (Wp / s - 1)
                ang = torch.cat([tau * b, eta * b, omega * b])
                rows.append(torch.cat([torch.sin(ang), torch.cos(ang)]))
    want = torch.stack(rows)
    torch.testing.assert_close(table.double(), want, atol=2e-5, rtol=0)


def test_apply_rotary_is_rotate_half_on_first_96_dims():
    g = torch.Generator().manual_seed(0)
    S, Hh, D = 5, 3, 128
    x = torch.randn(2, S, Hh, D, generator=g)
    theta = torch.rand(S, 48, generator=g) * 6
    out = apply_rotary(x, theta.sin(), theta.cos())

    want = x.double().clone()
    for s in range(S):
        for i in range(48):
            c, sn = math.cos(theta[s, i].item()), math.sin(theta[s, i].item())
            rot = torch.tensor([[c, -sn], [sn, c]], dtype=torch.float64)
            pair = x[:, s, :, [i, i + 48]].double()  # (2, Hh, 2)
            want[:, s, :, [i, i + 48]] = pair @ rot.T
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
    assert torch.equal(out[..., 96:], x[..., 96:])


def test_rope_is_relative_in_time():
    T, Hp, Wp = 6, 4, 4
    rope = LearnableRope3D(128)
    sin, cos = split_table(rope.table(T, Hp, Wp))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(128, generator=g, dtype=torch.float32)
    k = torch.randn(128, generator=g, dtype=torch.float32)

    def score(tq, tk, i=1, j=2):
        sq, sk = tq * Hp * Wp + i * Wp + j, tk * Hp * Wp + i * Wp + j  # T-major, then H, then W
        qr = apply_rotary(q[None, None, None], sin[sq:sq + 1], cos[sq:sq + 1])
        kr = apply_rotary(k[None, None, None], sin[sk:sk + 1], cos[sk:sk + 1])
        return (qr.double() * kr.double()).sum().item()

    ref = score(1, 3)
    assert abs(score(2, 4) - ref) < 1e-4
    assert abs(score(3, 5) - ref) < 1e-4
    assert abs(score(1, 4) - ref) > 1e-2  # a different distance does change it
    assert abs(score(1, 3, i=0, j=0) - ref) < 1e-4  # same spatial place, other place: still relative


# ------------------------------------------------------------------ gate before the post-norm (§1.6)


def test_modulate_add_gates_before_post_norm_per_chunk():
    g = torch.Generator().manual_seed(0)
    N, dn, tpc, H = 2, 2, 3, 16
    S = dn * tpc
    branch = torch.randn(S, N, H, generator=g)
    residual = torch.randn(S, N, H, generator=g)
    gate = torch.randn(N, dn, H, generator=g)
    norm = LayerNorm1p(H, EPS, True, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H, generator=g) * 0.3)
        norm.bias.copy_(torch.randn(H, generator=g) * 0.3)
    # token s of sample b takes condition row b*dn + s // tpc
    cmap = torch.tensor([[0, 2], [0, 2], [0, 2], [1, 3], [1, 3], [1, 3]])

    out = modulate_add(branch, residual, gate, cmap, norm)
    want = torch.empty(S, N, H, dtype=torch.float64)
    wrong = torch.empty(S, N, H, dtype=torch.float64)
    for s in range(S):
        for b in range(N):
            gt = gate[b, s // tpc]
            want[s, b] = residual[s, b].double() + manual_layer_norm(branch[s, b] * gt, norm.weight + 1, norm.bias)
            wrong[s, b] = residual[s, b].double() + manual_layer_norm(branch[s, b], norm.weight + 1, norm.bias) * gt.double()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert (out.double() - wrong).abs().max() > 0.1


def test_modulate_add_computes_in_fp32_and_returns_branch_dtype():
    g = torch.Generator().manual_seed(1)
    branch = torch.randn(4, 1, 32, generator=g).bfloat16()
    residual = torch.randn(4, 1, 32, generator=g).bfloat16()
    gate = torch.randn(1, 1, 32, generator=g).bfloat16()
    norm = LayerNorm1p(32, EPS, True, torch.float32)
    out = modulate_add(branch, residual, gate, torch.zeros(4, 1, dtype=torch.long), norm)
    assert out.dtype == torch.bfloat16
    want = (manual_layer_norm(branch.float() * gate.float()[0, 0], torch.ones(32), torch.zeros(32)) + residual.double())
    # one rounding of the fp32 result (at most one bf16 ulp from the exactly rounded value)
    torch.testing.assert_close(out.float(), want.float().bfloat16().float(), atol=1e-6, rtol=2**-8)


def test_model_condition_map_picks_each_tokens_chunk(monkeypatch, single_process_group):
    cfg = tiny_cfg()
    model = build_dit(cfg, tp_group=single_process_group)
    seen = []
    real = layers_mod.modulate_add

    def spy(branch, residual, gate, condition_map, post_norm):
        seen.append(condition_map.clone())
        return real(branch, residual, gate, condition_map, post_norm)

    monkeypatch.setattr(layers_mod, "modulate_add", spy)
    N, dn, tpc = 2, 2, 4  # 1 frame per chunk, 2x2 tokens per frame
    x = torch.randn(N, 16, dn, 4, 4)
    caption = torch.randn(N * dn, 8, 32)
    mask = torch.ones(N * dn, 8)
    with torch.no_grad():
        model(x, torch.rand(N, dn), caption, mask, block_causal_ranges(N, dn, tpc))
    want = torch.tensor([[b * dn + s // tpc for b in range(N)] for s in range(dn * tpc)])
    assert len(seen) == 2 * cfg.num_layers
    for cmap in seen:
        assert torch.equal(cmap, want)


# ------------------------------------------------------------------ [self | cross] interleave before linear_proj


@pytest.mark.parametrize("heads", [2, 8])
def test_linear_proj_input_interleaves_self_and_cross_in_8_groups(monkeypatch, single_process_group, heads):
    hd = 128
    cfg = tiny_cfg(hidden_size=heads * hd, num_attention_heads=heads, num_query_groups=1, ffn_hidden_size=64)
    attn = build_dit(cfg, tp_group=single_process_group).videodit_blocks.layers[0].self_attention
    S, N, C = 3, 2, heads * hd
    a_self = torch.arange(1, C + 1, dtype=torch.float32).expand(S, N, C).clone()
    a_cross = -a_self
    monkeypatch.setattr(attn, "self_attention", lambda *a, **k: a_self)
    monkeypatch.setattr(attn, "cross_attention", lambda *a, **k: a_cross)

    group = C // 8  # channels per group (for 2 heads: a quarter head; for 8 heads: one head)
    expected = torch.cat([torch.cat([a_self[0, 0, gi * group:(gi + 1) * group], a_cross[0, 0, gi * group:(gi + 1) * group]])
                          for gi in range(8)])
    assert expected.shape == (2 * C,)

    x = torch.randn(S, N, C)
    for half in range(2):
        sel = torch.zeros(C, 2 * C)
        sel[torch.arange(C), half * C + torch.arange(C)] = 1.0  # output o reads input feature half*C + o
        with torch.no_grad():
            attn.linear_proj.weight.copy_(sel)
            out = attn(x, None, None, None, None, None)
        assert torch.equal(out, expected[half * C:(half + 1) * C].expand(S, N, C)), f"half {half}"


# ------------------------------------------------------------------ cross-attention KV layout and GQA


def _cross_attention_fixture(single_process_group):
    cfg = tiny_cfg(hidden_size=512, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64)
    attn = build_dit(cfg, tp_group=single_process_group).videodit_blocks.layers[0].self_attention
    g = torch.Generator().manual_seed(0)
    S, N, ny = 6, 1, 5
    h = torch.randn(S, N, 512, generator=g)
    y = torch.randn(ny, 512, generator=g)
    return attn, h, y, segment_ranges([S] * N, [ny] * N)


def test_cross_attention_kv_rows_are_interleaved_per_kv_head(single_process_group):
    attn, h, y, ranges = _cross_attention_fixture(single_process_group)
    W = attn.linear_kv_xattn.weight
    with torch.no_grad():
        base = attn.cross_attention(h, y, ranges)
        assert base.abs().max() > 1e-3
        original = W.detach().clone()
        # rows [256j, 256j+128) = K_j, [256j+128, 256j+256) = V_j: zero every V_j -> output 0
        for j in range(2):
            W[256 * j + 128:256 * j + 256] = 0
        out = attn.cross_attention(h, y, ranges)
        assert torch.equal(out, torch.zeros_like(out))
        # an "[all K | all V]" layout would make rows [256, 512) the V of both heads; in the released layout they
        # are K_1 | V_1, so zeroing them leaves query heads 0, 1 (KV head 0) alive
        W.copy_(original)
        W[256:512] = 0
        out = attn.cross_attention(h, y, ranges)
        assert out[..., :256].abs().max() > 1e-3


def test_cross_attention_gqa_query_head_uses_kv_head_h_div_group(single_process_group):
    attn, h, y, ranges = _cross_attention_fixture(single_process_group)
    W = attn.linear_kv_xattn.weight
    with torch.no_grad():
        W[256 + 128:512] = 0  # V of KV head 1 only
        out = attn.cross_attention(h, y, ranges)  # (S, N, 4 * 128)
    per_head = out.reshape(*out.shape[:2], 4, 128)
    # nq = 4, nkv = 2: heads 0, 1 read KV head 0, heads 2, 3 read KV head 1
    assert per_head[:, :, 0].abs().max() > 1e-3 and per_head[:, :, 1].abs().max() > 1e-3
    assert torch.equal(per_head[:, :, 2:], torch.zeros_like(per_head[:, :, 2:]))


def test_self_attention_gqa_query_head_uses_kv_head_h_div_group(single_process_group):
    cfg = tiny_cfg(hidden_size=512, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64)
    attn = build_dit(cfg, tp_group=single_process_group).videodit_blocks.layers[0].self_attention
    rope = LearnableRope3D(128)
    sin, cos = split_table(rope.table(1, 2, 3))
    h = torch.randn(6, 1, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attn.linear_qkv.v.weight[128:256] = 0  # V of KV head 1
        out = attn.self_attention(h, sin, cos, AttnRanges.from_lists([(0, 6)], [(0, 6)]), None)
    per_head = out.reshape(6, 1, 4, 128)
    assert per_head[:, :, :2].abs().max() > 1e-3
    assert torch.equal(per_head[:, :, 2:], torch.zeros_like(per_head[:, :, 2:]))


# ------------------------------------------------------------------ MLP


def test_swiglu_gates_the_first_half(single_process_group):
    cfg = tiny_cfg(gated_linear_unit=True, ffn_hidden_size=32)
    mlp = build_dit(cfg, tp_group=single_process_group).videodit_blocks.layers[0].mlp
    assert mlp.linear_fc1.weight.shape == (64, 256)
    x = torch.randn(3, 2, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ln = F.layer_norm(x, (256,), mlp.layer_norm.weight, mlp.layer_norm.bias, EPS)
        u = ln @ mlp.linear_fc1.weight.T
        want = (F.silu(u[..., :32]) * u[..., 32:]) @ mlp.linear_fc2.weight.T
        wrong = (F.silu(u[..., 32:]) * u[..., :32]) @ mlp.linear_fc2.weight.T
        got = mlp(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - wrong).abs().max() > 1e-3


def test_gelu_mlp_uses_exact_erf_gelu(single_process_group):
    cfg = tiny_cfg(ffn_hidden_size=64)
    mlp = build_dit(cfg, tp_group=single_process_group).videodit_blocks.layers[0].mlp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 256, generator=g)
    with torch.no_grad():
        mlp.linear_fc1.weight.copy_(torch.randn(64, 256, generator=g) * 0.15)  # pre-activations ~ N(0, 2.4^2)
        mlp.linear_fc2.weight.copy_(torch.eye(256, 64))  # output[:64] = activation
        ln = F.layer_norm(x, (256,), mlp.layer_norm.weight, mlp.layer_norm.bias, EPS)
        u = (ln @ mlp.linear_fc1.weight.T).double()
        erf_gelu = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        tanh_gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        got = mlp(x)[..., :64].double()
    torch.testing.assert_close(got, erf_gelu, atol=1e-5, rtol=1e-5)
    assert (got - tanh_gelu).abs().max() > 1e-4


def test_linear_proj_computes_in_fp32_from_bf16(single_process_group):
    model = build_dit(tiny_cfg(params_dtype="bfloat16"), tp_group=single_process_group)
    proj = model.videodit_blocks.layers[0].self_attention.linear_proj
    assert proj.weight.dtype == torch.bfloat16
    x = torch.randn(7, 2, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        out = proj(x)
        want = (x.double() @ proj.weight.double().T)
        in_bf16 = (x @ proj.weight.T).double()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert (out.double() - in_bf16).abs().max() > 1e-4


# ------------------------------------------------------------------ input / output conventions (§1.2)


def test_x_rescale_and_half_channel_vae(single_process_group):
    """24B: x * 0.1, 16 latent channels duplicated to 32, first 16 outputs kept, divided by 0.1."""
    big = tiny_cfg(x_rescale_factor=0.1, half_channel_vae=True, in_channels=32, out_channels=32, num_layers=1)
    plain = tiny_cfg(in_channels=32, out_channels=32, num_layers=1)
    a = build_dit(big, tp_group=single_process_group)
    with torch.no_grad():
        torch.nn.init.normal_(a.final_linear.linear.weight, 0.0, 0.02)
    b = build_dit(plain, tp_group=single_process_group)
    b.load_state_dict(a.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    t = torch.rand(1, 2, generator=g)
    caption, mask = torch.randn(2, 8, 32, generator=g), torch.ones(2, 8)
    ranges = block_causal_ranges(1, 2, 4)
    with torch.no_grad():
        got = a(x, t, caption, mask, ranges)
        want = b(torch.cat([0.1 * x, 0.1 * x], dim=1), t, caption, mask, ranges)[:, :16] / 0.1
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _spy_condition(model, monkeypatch):
    seen = []
    layer = model.videodit_blocks.layers[0]
    real = layer.ada_modulate_layer.forward
    monkeypatch.setattr(layer.ada_modulate_layer, "forward", lambda c: (seen.append(c.detach().clone()), real(c))[1])
    return seen


@pytest.mark.parametrize("distill", [False, True])
def test_condition_is_timestep_embedding_plus_adaln_null_row(single_process_group, monkeypatch, distill):
    model = build_dit(tiny_cfg(distill=distill), tp_group=single_process_group)
    seen = _spy_condition(model, monkeypatch)
    g = torch.Generator().manual_seed(0)
    N, dn = 2, 2
    x = torch.randn(N, 16, dn, 4, 4, generator=g)
    t = torch.rand(N, dn, generator=g)
    caption, mask = torch.randn(N * dn, 8, 32, generator=g), torch.ones(N * dn, 8)
    uncond = torch.tensor([True, False])
    kwargs = dict(distill_dt=4.0) if distill else {}
    with torch.no_grad():
        model(x, t, caption, mask, block_causal_ranges(N, dn, 4), adaln_uncond=uncond, **kwargs)
        null = model.y_embedder.null_caption_embedding
        adaln = model.y_embedder.y_proj_adaln(torch.stack([null[-1], null[-2]]))  # sample 0 uncond, 1 cond
        t_emb = model.t_embedder(t.flatten()).reshape(N, dn, -1)
        if distill:
            t_emb = t_emb + model.t_embedder(torch.full((N * dn,), 4.0)).reshape(N, dn, -1)
        want = t_emb + adaln[:, None, :]
    assert len(seen) == 1 and seen[0].shape == (N, dn, want.shape[-1])
    torch.testing.assert_close(seen[0], want, atol=1e-6, rtol=1e-6)
    if distill:
        with pytest.raises(ValueError):
            model(x, t, caption, mask, block_causal_ranges(N, dn, 4))


def test_drop_captions_uses_null_caption_and_its_50_row_mask(single_process_group):
    model = build_dit(tiny_cfg(), tp_group=single_process_group)
    g = torch.Generator().manual_seed(0)
    caption = torch.randn(3, 64, 32, generator=g)
    mask = torch.zeros(3, 64)
    mask[:, :7] = 1
    cap, m = model.drop_captions(caption, mask, torch.tensor([False, True, False]))
    null = model.y_embedder.null_caption_embedding.detach()
    assert torch.equal(cap[0], caption[0]) and torch.equal(cap[2], caption[2])
    assert torch.equal(cap[1], null[:64])
    assert m[1].tolist() == [1] * 50 + [0] * 14
    assert m[0].tolist() == mask[0].tolist()


# ------------------------------------------------------------------ KV cache


def test_kv_cache_with_slice_point_equals_joint_block_causal_forward(single_process_group):
    """Chunk 1 computed alone (slice_point=1, chunk 0's keys/values from a cache) equals chunk 1 of the joint
    block-causal forward: the RoPE frame offset and the KV hook line up with training."""
    torch.manual_seed(0)
    model = build_dit(tiny_cfg(num_layers=2), tp_group=single_process_group)
    with torch.no_grad():
        torch.nn.init.normal_(model.final_linear.linear.weight, 0.0, 0.02)
    g = torch.Generator().manual_seed(0)
    frames, tpc = 2, 2 * 4 * 4
    x = torch.randn(1, 16, 2 * frames, 8, 8, generator=g)
    t = torch.rand(1, 2, generator=g)
    caption, mask = torch.randn(2, 8, 32, generator=g), torch.ones(2, 8)
    cache = {}

    def store(layer, k, v):
        cache[layer] = (k, v)
        return k, v

    def read(layer, k, v):
        ck, cv = cache[layer]
        return torch.cat([ck, k]), torch.cat([cv, v])

    with torch.no_grad():
        joint = model(x, t, caption, mask, block_causal_ranges(1, 2, tpc))
        model(x[:, :, :frames], t[:, :1], caption[:1], mask[:1], AttnRanges.from_lists([(0, tpc)], [(0, tpc)]),
              kv_hook=store)
        second = model(x[:, :, frames:], t[:, 1:], caption[1:], mask[1:],
                       AttnRanges.from_lists([(0, tpc)], [(0, 2 * tpc)]), slice_point=1, kv_hook=read)
    assert len(cache) == 2
    torch.testing.assert_close(second, joint[:, :, frames:], atol=1e-5, rtol=1e-5)
