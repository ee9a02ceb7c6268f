"""The GPU plug-ins on a GPU: Transformer Engine's linears against the local megatron linears (same weights,
same outputs, same state-dict keys) and MagiAttention's kernel against `range_attention`.

Skipped without CUDA, and each part without its package (TE; magi_attention on a Hopper GPU)."""

from __future__ import annotations

import pytest
import torch

from magi_train.config.schema import ModelConfig
from magi_train.model.attention import block_causal_ranges, range_attention, segment_ranges
from magi_train.model.spec import get_attention_backend
from magi_train.model.dit import build_dit
from magi_train.parallel.tensor import ColumnLinear, RowLinear
from magi_train.model.spec import megatron_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16 = torch.bfloat16
# One bf16 rounding of results accumulated in fp32 in different orders: about one ulp apart.
BF16_TOL = dict(rtol=1.6e-2, atol=1e-2)


@pytest.fixture
def te_classes():
    pytest.importorskip("transformer_engine.pytorch")
    from magi_train.model.te_spec import te_linear_classes

    return te_linear_classes()


def twin_linears(kind: str, te_cls, in_f: int, out_f: int, group, compute_dtype=None):
    """A local megatron linear and a TE linear holding the same random bf16 weight, on the GPU."""
    config = megatron_config(BF16, tp_size=1, init=False)
    local_cls = ColumnLinear if kind == "column" else RowLinear
    kwargs = dict(config=config, init_method=lambda w: None, bias=False, tp_group=group, compute_dtype=compute_dtype)
    local = local_cls(in_f, out_f, **kwargs)
    with torch.no_grad():
        local.weight.copy_(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) * 0.05)
    local = local.cuda()
    te = te_cls(in_f, out_f, **kwargs)
    te.load_state_dict(local.state_dict(), strict=True)
    return local, te


@pytest.mark.parametrize("kind,compute_dtype", [("column", None), ("row", None), ("row", torch.float32)])
def test_te_linears_equal_local_linears_at_tp1(te_classes, single_process_group, kind, compute_dtype):
    te_cls = te_classes[0] if kind == "column" else te_classes[1]
    local, te = twin_linears(kind, te_cls, 128, 192, single_process_group, compute_dtype)
    assert set(te.state_dict()) == set(local.state_dict()) == {"weight"}, "no _extra_state, same keys"
    assert te.weight.dtype == BF16 and te.weight.is_cuda

    x = torch.randn(16, 2, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).to(BF16)
    x_local, x_te = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_local, y_te = local(x_local), te(x_te)
    assert isinstance(y_te, torch.Tensor) and y_te.dtype == y_local.dtype == (compute_dtype or BF16)
    torch.testing.assert_close(y_te.float(), y_local.float(), **BF16_TOL)

    grad = torch.randn_like(y_local)
    y_local.backward(grad)
    y_te.backward(grad)
    torch.testing.assert_close(x_te.grad.float(), x_local.grad.float(), **BF16_TOL)
    rel = (te.weight.grad.float() - local.weight.grad.float()).norm() / local.weight.grad.float().norm()
    assert rel < 1e-2


def test_fixed_compute_dtype_ignores_fp8_autocast(te_classes, single_process_group):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    from magi_train.model.te_spec import fp8_autocast

    _, proj = twin_linears("row", te_classes[1], 128, 128, single_process_group, compute_dtype=torch.float32)
    _, fc = twin_linears("column", te_classes[0], 128, 128, single_process_group)
    x = torch.randn(32, 2, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(3)).to(BF16)
    with torch.no_grad():
        proj_ref, fc_ref = proj(x), fc(x)
        with fp8_autocast("delayed", None):
            proj_fp8, fc_fp8 = proj(x), fc(x)
    assert torch.equal(proj_fp8, proj_ref), "linear_proj is computed in fp32 even under fp8 autocast"
    rel = ((fc_fp8.float() - fc_ref.float()).norm() / fc_ref.float().norm()).item()
    assert 0 < rel < 0.2, f"an fp8 GEMM differs from bf16 by fp8 rounding only, got relative error {rel}"


def test_te_dit_has_the_local_dit_state_dict(te_classes, single_process_group):
    cfg = dict(params_dtype="bfloat16", caption_channels=32, caption_max_length=64, num_layers=2)
    local = build_dit(ModelConfig(**cfg), tp_group=single_process_group, device="cuda")
    te = build_dit(ModelConfig(layer_spec="te", **cfg), tp_group=single_process_group, device="cuda")
    assert any(isinstance(m, te_classes[0]) for m in te.modules())
    local_sd, te_sd = local.state_dict(), te.state_dict()
    assert list(te_sd) == list(local_sd)
    # The DiT draws its weights itself, by parameter name: both specs start from the same model.
    for name, value in local_sd.items():
        assert te_sd[name].dtype == value.dtype and torch.equal(te_sd[name], value), name
    te.load_state_dict(local_sd, strict=True)


# ------------------------------------------------------------------ MagiAttention
@pytest.fixture
def magi_backend():
    pytest.importorskip("magi_attention.api")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("MagiAttention's flex_flash_attn kernel needs a Hopper GPU (compute capability 9.x)")
    from magi_train.model.magi_attention import flex_attention_backend

    assert get_attention_backend("magi") is flex_attention_backend
    return flex_attention_backend


CASES = {
    "block_causal": (block_causal_ranges(2, 3, 200), 1200, 1200),
    "block_causal_window": (block_causal_ranges(1, 5, 160, window_chunks=2), 800, 800),
    # Per-chunk captions, one of them empty: its queries must come out zero.
    "captions": (segment_ranges([300, 300, 300], [77, 0, 120]), 900, 197),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_magi_backend_equals_range_attention(magi_backend, case):
    ranges, tq, tk = CASES[case]
    g = torch.Generator("cuda").manual_seed(4)
    q = torch.randn(tq, 8, 128, device="cuda", generator=g).to(BF16).requires_grad_()
    k = torch.randn(tk, 2, 128, device="cuda", generator=g).to(BF16).requires_grad_()  # GQA 8:2
    v = torch.randn(tk, 2, 128, device="cuda", generator=g).to(BF16).requires_grad_()

    out = magi_backend(q, k, v, ranges)
    ref = range_attention(q, k, v, ranges)
    assert out.dtype == BF16 and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), **BF16_TOL)
    if case == "captions":
        assert (out[300:600] == 0).all()

    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", grads, ref_grads):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 2e-2, f"d{name}: relative error {rel}"
