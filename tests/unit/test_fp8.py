"""fp8 linears (released `inference_weight.fp8.distill` layout, model/README.md §8): state-dict layout of a converted
DiT, bit-exact CPU forward against the formula written out here, clamping and double rounding of the activation,
the SmoothQuant recipe, and a whole tiny model in fp8 against its bf16 self."""

from __future__ import annotations

import pytest
import torch

from magi_train.model.fp8 import (
    Fp8PerChannelLinear,
    Fp8PerTensorLinear,
    calibrate_input_absmax,
    convert_dit_to_fp8,
    quantize_activation,
    quantize_dit_state_dict,
    quantize_per_channel,
    quantize_per_tensor,
    scaled_mm_applicable,
)
from magi_train.config.schema import ModelConfig
from tests.configs import tiny_model
from magi_train.model.attention import block_causal_ranges
from magi_train.model.dit import build_dit

pytestmark = pytest.mark.usefixtures("one_thread")

F8 = torch.float8_e4m3fn
N, DN, FRAMES, HL, WL = 1, 2, 2, 8, 8
TPC = FRAMES * (HL // 2) * (WL // 2)
CAPTION_LEN = 16


def tiny_cfg(num_layers: int = 4) -> ModelConfig:
    return tiny_model(params_dtype="bfloat16", num_attention_heads=2, num_query_groups=1, kv_channels=128, caption_channels=32, num_layers=num_layers)


def make_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(N * DN, CAPTION_LEN)
    mask[0, :7] = 1
    mask[1, :12] = 1
    return dict(x=torch.randn(N, 16, DN * FRAMES, HL, WL, generator=g), t=torch.rand(N, DN, generator=g),
                caption=torch.randn(N * DN, CAPTION_LEN, 32, generator=g), caption_mask=mask,
                self_ranges=block_causal_ranges(N, DN, TPC))


@pytest.fixture(scope="module")
def bf16_model(single_process_group):
    torch.manual_seed(0)
    model = build_dit(tiny_cfg(), tp_group=single_process_group)
    with torch.no_grad():
        # final_linear is zero-initialised; give it weights so the output depends on the layers.
        torch.nn.init.normal_(model.final_linear.linear.weight, 0.0, 0.02)
    return model


def expected_linears(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Spec §8, by hand: name -> (class, out, in) for the seven fp8 linears of a layer."""
    H, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels
    fc1 = (2 if cfg.gated_linear_unit else 1) * cfg.ffn_hidden_size
    return {
        "self_attention.linear_qkv.q": ("tensor", q, H),
        "self_attention.linear_qkv.qx": ("tensor", q, H),
        "self_attention.linear_qkv.k": ("tensor", kv, H),
        "self_attention.linear_qkv.v": ("tensor", kv, H),
        "mlp.linear_fc1": ("tensor", fc1, H),
        "mlp.linear_fc2": ("channel", H, cfg.ffn_hidden_size),
        "self_attention.linear_proj": ("channel", H, 2 * q),
    }


def clone_model(model, group):
    # deepcopy cannot copy the process group the linears hold; build a twin and copy the weights.
    twin = build_dit(model.cfg, tp_group=group, init_weights=False)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


def layout(sd: dict) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


# ------------------------------------------------------------------ the formula, written independently
def reference_linear(x, divisor, a_scale, weight, weight_scale):
    """y = bf16((fp8(bf16(clamp(x / s, ±448))) @ W^T in fp32) * a_scale[0] * w_scale[0])."""
    a = torch.clamp(x.float() / divisor.float(), -448.0, 448.0).to(torch.bfloat16).to(F8)
    acc = torch.matmul(a.float().reshape(-1, x.shape[-1]), weight[0].float().t())
    y = acc * (a_scale[0] * weight_scale[0])
    return y.to(torch.bfloat16).reshape(*x.shape[:-1], weight.shape[1])


def random_fp8(*shape, gen):
    return (torch.randn(*shape, generator=gen) * 60).clamp(-448, 448).to(F8)


def random_per_tensor(in_f, out_f, seed=0) -> Fp8PerTensorLinear:
    g = torch.Generator().manual_seed(seed)
    m = Fp8PerTensorLinear(in_f, out_f)
    with torch.no_grad():
        m.weight.copy_(random_fp8(1, out_f, in_f, gen=g))
        m.weight_scale.fill_(3.7e-4)
        # Deliberately non-uniform: the vector divides, element 0 dequantises.
        m.input_scale.copy_(0.01 + 0.02 * torch.rand(in_f, generator=g))
    return m


def random_per_channel(in_f, out_f, seed=1) -> Fp8PerChannelLinear:
    g = torch.Generator().manual_seed(seed)
    m = Fp8PerChannelLinear(in_f, out_f)
    with torch.no_grad():
        m.weight.copy_(random_fp8(1, out_f, in_f, gen=g))
        m.weight_scale.fill_(2.9e-4)
        m.input_scale.fill_(0.013)
        m.smooth_scale.copy_(0.005 + 0.03 * torch.rand(1, in_f, generator=g))
    return m


# ------------------------------------------------------------------ layout
def test_converted_state_dict_has_released_fp8_layout(bf16_model, single_process_group):
    cfg = bf16_model.cfg
    bf16_sd = bf16_model.state_dict()
    model = convert_dit_to_fp8(clone_model(bf16_model, single_process_group))
    got = layout(model.state_dict())

    expected = layout(bf16_sd)
    for i in (1, 2):  # L = 4: layers 1 .. L-2
        for name, (kind, out_f, in_f) in expected_linears(cfg).items():
            p = f"videodit_blocks.layers.{i}.{name}"
            del expected[f"{p}.weight"]
            expected[f"{p}.weight"] = ((1, out_f, in_f), F8)
            expected[f"{p}.weight_scale"] = ((1,), torch.float32)
            if kind == "tensor":
                expected[f"{p}.input_scale"] = ((in_f,), torch.float32)
            else:
                expected[f"{p}.input_scale"] = ((1,), torch.float32)
                expected[f"{p}.smooth_scale"] = ((1, in_f), torch.float32)
    for i in (0, 3):  # first and last layers keep their bf16 weights
        for name, (_, out_f, in_f) in expected_linears(cfg).items():
            assert got[f"videodit_blocks.layers.{i}.{name}.weight"] == ((out_f, in_f), torch.bfloat16)
    assert got == expected

    # The quantised state dict has the same layout and loads strictly; converting twice changes nothing.
    assert layout(quantize_dit_state_dict(bf16_sd, cfg.num_layers)) == expected
    convert_dit_to_fp8(model).load_state_dict(quantize_dit_state_dict(bf16_sd, cfg.num_layers), strict=True)


def test_two_layer_model_has_nothing_to_quantise(single_process_group):
    model = build_dit(tiny_cfg(num_layers=2), tp_group=single_process_group, device="meta")
    before = layout(model.state_dict())
    assert layout(convert_dit_to_fp8(model).state_dict()) == before
    assert layout(quantize_dit_state_dict(model.state_dict(), 2)) == before


def test_tensor_parallel_conversion_raises(single_process_group):
    from magi_train.mcore import ProcessGroupCollection

    from magi_train.model.dit import meta_dit
    from magi_train.parallel.groups import Parallel
    from magi_train.parallel.parallelize import parallelize_dit

    class TwoRankGroup:  # shapes only: a meta-device build never communicates
        def size(self):
            return 2

        def rank(self):
            return 0

    g = TwoRankGroup()
    groups = ProcessGroupCollection(tp=g, cp=g, pp=g, dp=g, dp_cp=g, tp_cp=g, mp=g, tp_dp_cp=g)
    model = parallelize_dit(meta_dit(tiny_cfg()), Parallel(groups, rank=0, world_size=2, device=torch.device("cpu"), tp=2))
    with pytest.raises(NotImplementedError, match="fp8 with tensor parallel is not supported yet"):
        convert_dit_to_fp8(model)
    assert not any(p.dtype == F8 for p in model.parameters()), "a refused conversion must leave the model as it was"


def test_non_bf16_model_is_refused(single_process_group):
    model = build_dit(tiny_model(num_attention_heads=2, num_query_groups=1, kv_channels=128, caption_channels=32, num_layers=3), device="meta")
    with pytest.raises(ValueError, match="bfloat16"):
        convert_dit_to_fp8(model)


# ------------------------------------------------------------------ forward = formula, bit for bit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_per_tensor_forward_matches_formula(dtype):
    m = random_per_tensor(96, 48)
    x = torch.randn(5, 3, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[0, 0, :4] = torch.tensor([1e4, -1e4, 30.0, -30.0], dtype=dtype)  # beyond ±448 after the division
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 3, 48)
    assert torch.equal(y, reference_linear(x, m.input_scale, m.input_scale, m.weight, m.weight_scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_channel_forward_matches_formula(dtype):
    m = random_per_channel(80, 64)
    x = torch.randn(7, 80, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[1, :2] = torch.tensor([1e3, -1e3], dtype=dtype)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (7, 64)
    assert torch.equal(y, reference_linear(x, m.smooth_scale, m.input_scale, m.weight, m.weight_scale))


def test_activation_clamps_at_448_and_rounds_through_bf16():
    s = torch.tensor([2.0])
    x = torch.tensor([1e6, -1e6, 896.0, -898.0, 832.0, float("inf"), -float("inf")])
    expected = torch.tensor([448.0, -448.0, 448.0, -448.0, 416.0, 448.0, -448.0])  # 416: largest fp8 below 448
    assert torch.equal(quantize_activation(x, s).float(), expected)
    # 1.0625 is the midpoint of fp8 neighbours 1.0 and 1.125. Just above it, a direct cast gives 1.125, but the
    # released bf16 step first lands exactly on the midpoint, which then ties to even: 1.0.
    v = torch.tensor([1.0625 + 2**-12])
    assert v.to(F8).float().item() == 1.125
    assert quantize_activation(v, torch.ones(1)).float().item() == 1.0

    # Through a module: an identity weight shows the saturated activation times the scales.
    m = Fp8PerTensorLinear(16, 16)
    with torch.no_grad():
        m.weight.copy_(torch.eye(16).to(F8)[None])
        m.input_scale.fill_(0.5)
        m.weight_scale.fill_(1.0)
    x = torch.zeros(1, 16)
    x[0, :3] = torch.tensor([1000.0, -1000.0, 96.0])
    assert m(x)[0, :3].tolist() == [224.0, -224.0, 96.0]  # ±448 * 0.5 saturated; 96 / 0.5 = 192 is exact in fp8


# ------------------------------------------------------------------ quantisation recipe
def test_per_tensor_quantisation_uses_one_scale_from_the_channel_absmax():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=g)
    absmax = torch.rand(64, generator=g) * 5
    q = quantize_per_tensor(w, absmax)
    torch.testing.assert_close(q["weight_scale"], w.abs().max().reshape(1) / 448)
    assert torch.equal(q["input_scale"], torch.full((64,), absmax.max().item() / 448))
    assert torch.equal(quantize_per_tensor(w)["input_scale"], torch.ones(64))
    # Dequantised weight reproduces w to fp8 precision (3 mantissa bits: relative step <= 2^-4).
    deq = q["weight"][0].float() * q["weight_scale"]
    assert ((deq - w).abs() <= w.abs() * 2**-4 + 448 * 2**-9 * q["weight_scale"]).all()


def test_per_channel_quantisation_follows_smoothquant():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 64, generator=g) * 0.05
    absmax = torch.rand(64, generator=g) + 0.1
    absmax[7] = 60.0  # an outlier channel
    q = quantize_per_channel(w, absmax)
    s = torch.sqrt(absmax / w.abs().amax(0))  # alpha = 0.5
    a = (absmax / s).max() / 448
    torch.testing.assert_close(q["input_scale"], a.reshape(1))
    torch.testing.assert_close(q["smooth_scale"], (s * a).reshape(1, 64))
    torch.testing.assert_close(q["weight_scale"], (w * s).abs().max().reshape(1) / 448)

    # The layer approximates x @ w^T to fp8 precision, outlier channel included.
    m = Fp8PerChannelLinear(64, 48)
    m.load_state_dict(q)
    x = (torch.rand(20, 64, generator=g) * 2 - 1) * absmax
    ref = x @ w.t()
    assert ((m(x).float() - ref).norm() / ref.norm()).item() < 0.05


# ------------------------------------------------------------------ whole model
def test_fp8_model_is_close_to_bf16_model(bf16_model, single_process_group):
    cfg = bf16_model.cfg
    inputs = make_inputs()
    with torch.no_grad():
        ref = bf16_model(**inputs)

    absmax = calibrate_input_absmax(bf16_model, lambda: bf16_model(**inputs))
    assert sorted(absmax) == sorted(f"videodit_blocks.layers.{i}.{n}" for i in (1, 2) for n in expected_linears(cfg))
    for name, (_, _, in_f) in expected_linears(cfg).items():
        v = absmax[f"videodit_blocks.layers.1.{name}"]
        assert v.shape == (in_f,) and (v > 0).all()
    assert not bf16_model.videodit_blocks.layers[1].mlp.linear_fc1._forward_pre_hooks, "hooks must be removed"

    fp8_model = convert_dit_to_fp8(clone_model(bf16_model, single_process_group))
    fp8_model.load_state_dict(quantize_dit_state_dict(bf16_model.state_dict(), cfg.num_layers, absmax), strict=True)
    with torch.no_grad():
        out = fp8_model(**inputs)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"fp8 vs bf16 relative error (calibrated): {rel:.3e}")  # measured 6.7e-3
    assert out.dtype == ref.dtype and torch.isfinite(out).all()
    assert 0 < rel < 0.02

    # Yardstick: how much the quantised layers' branches contribute at all (measured 9.7e-2). The fp8 error must
    # be a small part of it, or a broken fp8 layer could hide behind the bf16 first and last layers.
    silenced = clone_model(bf16_model, single_process_group)
    with torch.no_grad():
        for i in (1, 2):
            silenced.videodit_blocks.layers[i].self_attention.linear_proj.weight.zero_()
            silenced.videodit_blocks.layers[i].mlp.linear_fc2.weight.zero_()
        contribution = ((silenced(**inputs) - ref).norm() / ref.norm()).item()
    assert rel < 0.15 * contribution

    # In fp8 mode linear_proj is an fp8 GEMM with bf16 output; the bf16 model's (layer 0) computes in fp32.
    layers = fp8_model.videodit_blocks.layers
    h = torch.randn(4, 1, layers[1].self_attention.linear_proj.in_features, dtype=torch.bfloat16)
    assert isinstance(layers[1].self_attention.linear_proj, Fp8PerChannelLinear)
    assert layers[1].self_attention.linear_proj(h).dtype == torch.bfloat16
    assert layers[0].self_attention.linear_proj(h).dtype == torch.float32


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scaled_mm_path_matches_exact_path():
    torch.cuda.manual_seed(0)
    for m in (random_per_tensor(256, 128), random_per_channel(512, 256)):
        m = m.cuda()
        x = torch.randn(3, 37, m.in_features, device="cuda", dtype=torch.bfloat16)
        a = quantize_activation(x.reshape(-1, m.in_features), m.activation_divisor())
        if not scaled_mm_applicable(a, m.weight[0]):
            pytest.skip("GPU without fp8 GEMM (compute capability < 8.9)")
        fast = m(x)
        m.use_scaled_mm = False
        exact = m(x)
        assert fast.dtype == exact.dtype == torch.bfloat16
        # Both accumulate in fp32; only summation order and the epilogue differ: about one bf16 ulp.
        torch.testing.assert_close(fast.float(), exact.float(), rtol=1.6e-2, atol=1e-3 * exact.float().abs().max().item())
