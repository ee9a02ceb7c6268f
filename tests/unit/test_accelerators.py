"""The optional accelerators behind their seams, on the CPU: apex's fused LayerNorm (model.fused_norms,
magi_train/model/norms.py) and torchao's float8 linears (trainer.fp8_backend=torchao, magi_train/model/float8.py).

Neither package is installed here: a fake module in sys.modules stands in for each, so the tests see what is
selected, with which operands, and what the conversion does to the model (names, keys, which slots). The real
kernels run in tests/gpu/test_accelerators_cuda.py."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from magi_train.model import float8, norms
from magi_train.model.dit import meta_dit
from magi_train.model.float8 import (FLOAT8_SLOTS, check_float8_device, convert_dit_to_float8, float8_linears,
                                     fp8_config_problems, resolve_fp8_backend)
from magi_train.model.linear import CaptionKVLinear, Linear
from magi_train.model.norms import LayerNorm1p, PlainLayerNorm, select_fused_norms
from magi_train.parallel.parallelize import materialize, parallelize_dit
from tests.distributed.common import inputs, tiny
from tests.unit.test_parallelize import fake_parallel

pytestmark = pytest.mark.usefixtures("single_process_group")
EPS = 1e-6


# ---------------------------------------------------------------------------- apex's fused LayerNorm
@pytest.fixture
def fake_apex(monkeypatch):
    """NVIDIA apex's `fused_layer_norm_affine`: computes torch's result + 1000 (so its output is recognisable)
    and records its operands and whether autocast was on inside it."""
    calls = []

    def fused_layer_norm_affine(x, weight, bias, normalized_shape, eps):
        calls.append(dict(x=x, weight=weight, bias=bias, shape=tuple(normalized_shape), eps=eps,
                          autocast=torch.is_autocast_enabled(x.device.type)))
        return F.layer_norm(x, normalized_shape, weight, bias, eps) + 1000

    module = types.ModuleType("apex.normalization.fused_layer_norm")
    module.fused_layer_norm_affine = fused_layer_norm_affine
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.normalization", types.ModuleType("apex.normalization"))
    monkeypatch.setitem(sys.modules, "apex.normalization.fused_layer_norm", module)
    return calls


@pytest.fixture
def no_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex... raises ImportError
    monkeypatch.setitem(sys.modules, "apex.normalization", None)
    monkeypatch.setitem(sys.modules, "apex.normalization.fused_layer_norm", None)


def _filled(norm: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.5)
    return norm


def test_on_the_cpu_the_norms_stay_on_torch_bit_for_bit_even_with_apex(fake_apex):
    model = meta_dit(tiny())
    assert select_fused_norms(model, "auto") == 17  # 2 layers x (2 plain + 6 1p) + the final norm
    one_p, plain = _filled(LayerNorm1p(64, EPS)), _filled(PlainLayerNorm(64, eps=EPS))
    for norm in (one_p, plain):
        select_fused_norms(norm, "auto")
        assert norm.fused is sys.modules["apex.normalization.fused_layer_norm"].fused_layer_norm_affine
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(one_p(x), F.layer_norm(x, (64,), one_p.weight + 1, one_p.bias, EPS))
    assert torch.equal(plain(x), F.layer_norm(x, (64,), plain.weight, plain.bias, EPS))
    assert fake_apex == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_apex_gets_the_released_operands(fake_apex, monkeypatch, dtype):
    monkeypatch.setattr(norms, "_on_cuda", lambda x: True)
    norm = _filled(LayerNorm1p(64, EPS, True, dtype))
    select_fused_norms(norm, "auto")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = norm(x)
    (call,) = fake_apex
    # gamma + 1 rounded in the parameter's dtype first (released numerics), then handed to the kernel
    assert call["weight"].dtype == dtype and torch.equal(call["weight"], norm.weight + 1)
    assert call["bias"] is norm.bias and call["x"] is x and call["shape"] == (64,) and call["eps"] == EPS
    assert torch.equal(out, F.layer_norm(x, (64,), norm.weight + 1, norm.bias, EPS) + 1000)


def test_under_autocast_apex_gets_fp32_operands_as_torch_would(fake_apex, monkeypatch):
    monkeypatch.setattr(norms, "_on_cuda", lambda x: True)
    plain = _filled(PlainLayerNorm(64, eps=EPS))  # fp32 parameters
    select_fused_norms(plain, "auto")
    x = torch.randn(5, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stands in for CUDA's autocast (x is "on CUDA" here)
        out = plain(x)
    # CUDA autocast runs layer_norm in fp32 (its fp32 op list): fp32 operands, fp32 result.
    want = F.layer_norm(x.float(), (64,), plain.weight, plain.bias, EPS)
    (call,) = fake_apex
    assert call["x"].dtype == call["weight"].dtype == torch.float32 and not call["autocast"]
    assert out.dtype == torch.float32 and torch.equal(out, want + 1000)


def test_mixed_dtypes_without_autocast_stay_on_torch(fake_apex, monkeypatch):
    monkeypatch.setattr(norms, "_on_cuda", lambda x: True)
    norm = _filled(LayerNorm1p(64, EPS, True, torch.float32))
    select_fused_norms(norm, "auto")
    x = torch.randn(5, 64).bfloat16()  # apex's affine kernel takes one dtype
    assert torch.equal(norm(x), F.layer_norm(x, (64,), norm.weight + 1, norm.bias, EPS))
    assert fake_apex == []


def test_selection_modes(fake_apex):
    model = meta_dit(tiny())
    assert select_fused_norms(model, "torch") == 0
    assert select_fused_norms(model, "auto", compiled=True) == 0  # inductor fuses torch's norm itself
    assert all(m.fused is None for m in model.modules() if isinstance(m, (LayerNorm1p, PlainLayerNorm)))
    assert select_fused_norms(model, "apex", compiled=True) == 17  # asked for explicitly
    with pytest.raises(ValueError, match=r"model\.fused_norms='fast' is not one of \['auto', 'torch', 'apex'\]"):
        select_fused_norms(model, "fast")


def test_without_apex_auto_falls_back_and_apex_is_an_error(no_apex):
    model = meta_dit(tiny())
    assert select_fused_norms(model, "auto") == 0
    with pytest.raises(RuntimeError, match=r"model\.fused_norms=apex needs NVIDIA apex.*not PyPI"):
        select_fused_norms(model, "apex")


def test_pypi_apex_is_not_nvidia_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))  # the unrelated web toolkit
    monkeypatch.delitem(sys.modules, "apex.normalization", raising=False)
    monkeypatch.delitem(sys.modules, "apex.normalization.fused_layer_norm", raising=False)
    assert norms.apex_layer_norm() is None


def test_the_pre_norms_are_still_layer_norms():
    # The model's pre-norms are the same nn.LayerNorm parameters and keys as before the kernel seam.
    model = meta_dit(tiny(num_layers=1))
    norm = model.videodit_blocks.layers[0].mlp.layer_norm
    assert isinstance(norm, nn.LayerNorm) and isinstance(norm, PlainLayerNorm)
    assert set(norm.state_dict()) == {"weight", "bias"}


# ---------------------------------------------------------------------------- torchao's float8 linears
class FakeFloat8Linear(nn.Linear):
    """torchao's Float8Linear: an nn.Linear holding the converted module's parameters (computes in fp32 here)."""

    @classmethod
    def from_float(cls, mod, config):
        with torch.device("meta"):
            new = cls(mod.in_features, mod.out_features, bias=False)
        new.weight, new.bias, new.config = mod.weight, mod.bias, config
        return new


FakeFloat8Linear.__name__ = "Float8Linear"


@pytest.fixture
def fake_torchao(monkeypatch):
    """torchao.float8's public API: recipe configs by name and `convert_to_float8_training` (its traversal: every
    nn.Linear the filter accepts, with its FQN). Records the recipes and the FQNs the filter was asked about."""
    seen = dict(recipes=[], asked=[])

    class Float8LinearConfig:
        @staticmethod
        def from_recipe_name(name):
            seen["recipes"].append(name)
            return ("config", name)

    def convert_to_float8_training(module, *, module_filter_fn=None, config=None):
        for fqn, child in list(module.named_modules()):
            if type(child) is nn.Linear:
                seen["asked"].append(fqn)
                if module_filter_fn is None or module_filter_fn(child, fqn):
                    parent, _, name = fqn.rpartition(".")
                    setattr(module.get_submodule(parent), name, FakeFloat8Linear.from_float(child, config))
        return module

    package = types.ModuleType("torchao")
    sub = types.ModuleType("torchao.float8")
    sub.Float8LinearConfig, sub.convert_to_float8_training = Float8LinearConfig, convert_to_float8_training
    package.float8 = sub
    monkeypatch.setitem(sys.modules, "torchao", package)
    monkeypatch.setitem(sys.modules, "torchao.float8", sub)
    return seen


def test_float8_converts_the_layers_column_and_row_linears_only(fake_torchao):
    cfg = tiny()
    model = meta_dit(cfg)
    keys = list(model.state_dict())
    converted = convert_dit_to_float8(model, "rowwise")
    want = [f"videodit_blocks.layers.{i}.{slot}" for i in range(cfg.num_layers) for slot in FLOAT8_SLOTS]
    assert converted == want == float8_linears(model)
    assert fake_torchao["recipes"] == ["rowwise"]
    assert all(model.get_submodule(n).config == ("config", "rowwise") for n in converted)
    # The released fp32-compute projection, the blocked caption KV product and the embedders stay ours.
    layer = model.videodit_blocks.layers[0]
    assert type(layer.self_attention.linear_proj) is Linear and layer.self_attention.linear_proj.compute_dtype
    assert type(layer.self_attention.linear_kv_xattn) is CaptionKVLinear
    assert "t_embedder.mlp.0" in fake_torchao["asked"] and type(model.t_embedder.mlp[0]) is nn.Linear
    assert list(model.state_dict()) == keys


def test_float8_model_draws_the_same_weights_and_computes_the_same_products(fake_torchao, one_thread):
    cfg = tiny(num_layers=1)
    parallel = fake_parallel()
    plain = materialize(parallelize_dit(meta_dit(cfg), parallel), "cpu", init_seed=5)
    model = parallelize_dit(meta_dit(cfg), parallel)
    convert_dit_to_float8(model, "tensorwise")  # on meta, as build_train_stages does
    materialize(model, "cpu", init_seed=5)
    state, want = model.state_dict(), plain.state_dict()
    assert list(state) == list(want) and all(torch.equal(state[k], want[k]) for k in want)
    with torch.no_grad():  # a non-zero head, so the output depends on the layers
        for m in (plain, model):
            m.final_linear.linear.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x, t, caption, mask, ranges, _ = inputs(cfg, N=1, chunks=2, size=4)
    torch.testing.assert_close(model(x, t, caption, mask, ranges), plain(x, t, caption, mask, ranges),
                               rtol=1e-5, atol=1e-6)


def test_float8_refuses_tensor_parallel_and_a_torchao_that_adds_state(fake_torchao, monkeypatch):
    model = parallelize_dit(meta_dit(tiny()), fake_parallel(tp=2, tp_rank=0))
    with pytest.raises(NotImplementedError, match=r"trainer\.fp8_backend=torchao.*parallel\.tp must be 1"):
        convert_dit_to_float8(model, "tensorwise")

    from_float = FakeFloat8Linear.from_float.__func__

    def with_buffer(cls, mod, config):
        new = from_float(cls, mod, config)
        new.register_buffer("amax_history", torch.zeros(16, device="meta"))
        return new

    monkeypatch.setattr(FakeFloat8Linear, "from_float", classmethod(with_buffer))
    with pytest.raises(RuntimeError, match="changed the model's state-dict keys"):
        convert_dit_to_float8(meta_dit(tiny()), "tensorwise")


def test_float8_without_torchao_or_with_an_old_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(RuntimeError, match=r"trainer\.fp8_backend=torchao needs torchao \(`pip install torchao`"):
        convert_dit_to_float8(meta_dit(tiny()), "tensorwise")
    old = types.ModuleType("torchao.float8")
    old.Float8LinearConfig, old.convert_to_float8_training = type("Float8LinearConfig", (), {}), None
    package = types.ModuleType("torchao")
    package.__version__ = "0.7.0"
    monkeypatch.setitem(sys.modules, "torchao", package)
    monkeypatch.setitem(sys.modules, "torchao.float8", old)
    with pytest.raises(RuntimeError, match=r"needs torchao >= 0\.9.*found 0\.7\.0"):
        convert_dit_to_float8(meta_dit(tiny()), "tensorwise")
    with pytest.raises(ValueError, match=r"trainer\.fp8_recipe='delayed' is not a torchao recipe"):
        float8.float8_config("delayed")


def test_float8_device_check(monkeypatch):
    with pytest.raises(RuntimeError, match=r"trainer\.fp8_backend=torchao .*needs a CUDA GPU; this run is on cpu"):
        check_float8_device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(RuntimeError, match=r"compute capability >= 8\.9.*NVIDIA A100 has 8\.0"):
        check_float8_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_device("cuda:0")


@pytest.mark.parametrize("backend,recipe,spec,want", [
    ("auto", "none", "te", "none"), ("te", "none", "local", "none"),
    ("auto", "delayed", "te", "te"), ("auto", "tensorwise", "local", "torchao"),
    ("torchao", "rowwise", "local", "torchao"), ("te", "tensorwise", "te", "te"),
])
def test_fp8_backend_resolution(backend, recipe, spec, want):
    assert resolve_fp8_backend(backend, recipe, spec) == want


@pytest.mark.parametrize("backend,recipe,spec,tp,message", [
    ("auto", "tensorwise", "local", 1, None),
    ("auto", "rowwise_with_gw_hp", "local", 1, None),
    ("auto", "mxfp8", "te", 8, None),
    ("auto", "delayed", "local", 1, "trainer.fp8_recipe ('delayed') needs model.layer_spec=te (Transformer Engine, GPU): "
                                    "torchao's float8"),
    ("te", "tensorwise", "local", 1, "trainer.fp8_recipe ('tensorwise') needs model.layer_spec=te"),
    ("torchao", "tensorwise", "te", 1, "model.layer_spec=te must be local"),
    ("auto", "tensorwise", "local", 2, "parallel.tp=2 must be 1"),
])
def test_fp8_config_problems_name_the_fields(backend, recipe, spec, tp, message):
    problems = fp8_config_problems(backend, recipe, spec, tp)
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 1 and message in problems[0], problems


def test_validate_reports_fp8_backend_and_fused_norms(tmp_path):
    from magi_train.config.validate import ConfigError
    from tests.configs import tiny_train_config

    assert tiny_train_config(tmp_path, fp8_recipe="rowwise").trainer.fp8_recipe == "rowwise"  # local -> torchao
    with pytest.raises(ConfigError) as info:
        tiny_train_config(tmp_path, fp8_recipe="rowwise", fp8_backend="tpu")
    assert "trainer.fp8_backend ('tpu') must be one of 'auto', 'te', 'torchao'" in str(info.value)
    with pytest.raises(ConfigError, match=r"trainer\.fp8_recipe \('rowwise'\) needs model\.layer_spec=te"):
        tiny_train_config(tmp_path, fp8_recipe="rowwise", fp8_backend="te")


def test_build_train_stages_converts_before_drawing_and_sets_the_norms(fake_torchao, fake_apex, monkeypatch, tmp_path):
    from magi_train.parallel import parallelize
    from tests.configs import tiny_train_config

    cfg = tiny_train_config(tmp_path, fp8_recipe="tensorwise")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU; this run is on cpu"):
        parallelize.build_train_stages(cfg, fake_parallel(), "ulysses")
    monkeypatch.setattr(parallelize, "check_float8_device", lambda device: None)  # as on a Hopper GPU
    (_,), (model,) = parallelize.build_train_stages(cfg, fake_parallel(), "ulysses")
    assert len(float8_linears(model)) == cfg.model.num_layers * len(FLOAT8_SLOTS)
    assert all(p.device.type == "cpu" for p in model.parameters())
    fused = sys.modules["apex.normalization.fused_layer_norm"].fused_layer_norm_affine
    assert model.videodit_blocks.final_layernorm.fused is fused


def test_the_step_enters_te_fp8_autocast_only_for_the_te_backend(monkeypatch):
    """trainer.fp8_backend=torchao: float8 linears scale their own operands, so the step must not open
    Transformer Engine's fp8 context (which would fail without TE)."""
    from dataclasses import replace

    from magi_train.config.schema import TrainerConfig
    from magi_train.model import te_spec
    from magi_train.parallel.groups import Parallel
    from magi_train.training import precision

    opened = []
    monkeypatch.setattr(te_spec, "fp8_autocast", lambda recipe, group: opened.append(recipe) or contextlib.nullcontext())
    par = Parallel(groups=types.SimpleNamespace(tp_dp_cp=None), rank=0, world_size=1, device=torch.device("cpu"))
    tc = TrainerConfig(fp8_recipe="tensorwise")
    with precision.autocast(replace(tc, fp8_backend="torchao"), par, "local"):
        pass
    assert opened == []
    with precision.autocast(replace(tc, fp8_backend="auto"), par, "te"):
        pass
    assert opened == ["tensorwise"]
