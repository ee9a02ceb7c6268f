"""The optional accelerators on a GPU: per-layer inductor compile (trainer.compile), apex's fused LayerNorm
(model.fused_norms) and torchao's float8 linears (trainer.fp8_backend=torchao), each against the eager torch
model. Skipped without CUDA, and each part without its package (apex; torchao on compute capability 8.9+).
Not yet run on a GPU when written."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from magi_train.model.compile import compile_layers
from magi_train.model.dit import meta_dit
from magi_train.model.float8 import FLOAT8_SLOTS, convert_dit_to_float8, float8_linears
from magi_train.model.norms import LayerNorm1p, PlainLayerNorm, select_fused_norms
from magi_train.parallel.parallelize import materialize, parallelize_dit
from tests.distributed.common import inputs, tiny
from tests.unit.test_parallelize import fake_parallel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("single_process_group")]
EPS = 1e-6


def _model(cfg, seed: int = 5, float8_recipe=None):
    model = parallelize_dit(meta_dit(cfg), fake_parallel())
    if float8_recipe is not None:
        convert_dit_to_float8(model, float8_recipe)
    model = materialize(model, "cuda", init_seed=seed).train()
    with torch.no_grad():  # a non-zero head: every layer then gets gradients
        model.final_linear.linear.weight.copy_(
            torch.randn(model.final_linear.linear.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    return model


def _step(model, seed: int, bf16: bool = False):
    x, t, caption, mask, ranges, weight = inputs(model.cfg, N=1, chunks=2, size=8, seed=seed)
    x, t, caption, mask, weight = (v.cuda() for v in (x, t, caption, mask, weight))  # ranges stay on the CPU
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(x, t, caption, mask, ranges)
    loss = (out.float() * weight).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_inductor_compiled_layers_match_eager_and_do_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = tiny(num_layers=2)
    eager, compiled = _model(cfg), _model(cfg)
    keys = list(compiled.state_dict())
    counter = CompileCounterWithBackend("inductor")
    compile_layers(compiled, backend=counter)
    assert list(compiled.state_dict()) == keys
    for seed in (0, 1):  # other caption lengths on the second step
        want_loss, want = _step(eager, seed)
        loss, grads = _step(compiled, seed)
        if seed == 0:
            frames = counter.frame_count
        torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=0)
        scale = max(float(g.abs().max()) for g in want.values())
        for name, g in want.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-4 * scale, msg=name)
    assert frames >= 1 and counter.frame_count == frames


@pytest.fixture
def apex_fused():
    pytest.importorskip("apex.normalization.fused_layer_norm")
    from magi_train.model.norms import apex_layer_norm

    fused = apex_layer_norm()
    assert fused is not None
    return fused


@pytest.mark.parametrize("kind,dtype,autocast", [("1p", torch.float32, False), ("1p", torch.bfloat16, False),
                                                  ("plain", torch.float32, True)])
def test_apex_norms_match_torch(apex_fused, kind, dtype, autocast):
    g = torch.Generator().manual_seed(0)
    make = (lambda: LayerNorm1p(256, EPS, True, dtype)) if kind == "1p" else (lambda: PlainLayerNorm(256, eps=EPS, dtype=dtype))
    ours, ref = make().cuda(), make().cuda()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.5).to(dtype))
    ref.load_state_dict(ours.state_dict())
    assert select_fused_norms(ours, "apex") == 1 and ours.fused is apex_fused
    x = (torch.randn(64, 256, generator=g) * 3 + 1).cuda().to(torch.bfloat16 if autocast else dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        ya, yb = ours(xa), ref(xb)
    assert ya.dtype == yb.dtype  # fp32 under autocast, as torch's layer_norm
    tol = dict(rtol=1.6e-2, atol=1e-2) if ya.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ya, yb, **tol)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (name, pa), pb in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pa.grad.float(), pb.grad.float(), rtol=2e-2, atol=2e-2, msg=name)


@pytest.fixture
def torchao_float8():
    pytest.importorskip("torchao.float8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torchao's fp8 GEMMs need compute capability 8.9+")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_float8_step_tracks_bf16(torchao_float8, recipe):
    if recipe == "rowwise" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("rowwise-scaled fp8 GEMMs need Hopper")
    cfg = tiny(num_layers=2)
    plain, fp8 = _model(cfg), _model(cfg, float8_recipe=recipe)
    assert len(float8_linears(fp8)) == cfg.num_layers * len(FLOAT8_SLOTS)
    assert list(fp8.state_dict()) == list(plain.state_dict())
    want_loss, want = _step(plain, 0, bf16=True)
    loss, grads = _step(fp8, 0, bf16=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    # fp8 (e4m3: 3 mantissa bits) against bf16: the loss within a few percent, the gradients aligned.
    assert abs(float(loss) - float(want_loss)) <= 0.05 * float(want_loss)
    for name in ("videodit_blocks.layers.0.mlp.linear_fc1.weight", "videodit_blocks.layers.1.self_attention.linear_qkv.q.weight"):
        cosine = F.cosine_similarity(grads[name].flatten().float(), want[name].flatten().float(), dim=0)
        assert cosine > 0.95, (name, float(cosine))


def test_torchao_float8_compiles(torchao_float8):
    cfg = tiny(num_layers=1)
    model = _model(cfg, float8_recipe="tensorwise")
    compile_layers(model)
    loss, grads = _step(model, 0, bf16=True)
    assert torch.isfinite(loss) and grads
