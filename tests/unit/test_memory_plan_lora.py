"""The training memory plan for fine-tuning (magi_train/observability/memory_plan_params.py, `lora_activations`):
the LoRA parameters it counts against a real tiny model with model/lora.py's `apply_lora` and against a hand count,
what a frozen base holds in a real training step (MemTracker: no gradients, no optimizer state), and the tensors
the adapters save for backward (saved-tensor hooks)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from magi_train.config import load_model_preset
from magi_train.config.schema import OptimizerConfig
from magi_train.model.attention import block_causal_ranges
from magi_train.model.dit import build_dit
from magi_train.model.lora import DEFAULT_LORA_TARGETS, apply_lora, lora_parameters, lora_state_dict
from magi_train.observability.memory_plan import (
    Layout, MicroBatch, ModelParams, Tuning, estimate, frozen_base_layer_activations, layer_activations,
    lora_activations, lora_modules,
)
from magi_train.parallel.zero import ShardedAdamW

pytestmark = pytest.mark.usefixtures("one_thread")

N, DN, FRAMES, HL, WL, CAPTION = 2, 2, 6, 8, 8, 32  # as tests/unit/test_memory_plan.py: 96 tokens per chunk
TPC = FRAMES * (HL // 2) * (WL // 2)
MB = MicroBatch(seq_length=DN * TPC, micro_batch_size=N, chunk_tokens=TPC, caption_length=CAPTION, attention="torch")


def inputs(cfg, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, cfg.in_channels, DN * FRAMES, HL, WL, generator=g)
    t = torch.rand(N, DN, generator=g)
    caption = torch.randn(N * DN, CAPTION, cfg.caption_channels, generator=g)
    mask = torch.ones(N * DN, CAPTION, dtype=torch.bool)
    return x, t, caption, mask, block_causal_ranges(N, DN, TPC)


def test_lora_parameters_equal_apply_lora_and_a_hand_count():
    cfg = load_model_preset("tiny")
    rank = 4
    model = build_dit(cfg, init_seed=0)
    wrapped = apply_lora(model, DEFAULT_LORA_TARGETS, rank=rank, alpha=8)
    planned = ModelParams.of(cfg, Tuning(rank))
    trainable = {p.name: p.full_shape for p in planned.params if p.trainable}
    # The adapter-file names and whole shapes, exactly.
    assert trainable == {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    assert list(lora_modules(cfg, DEFAULT_LORA_TARGETS)) == wrapped
    assert sum(a * b for a, b in trainable.values()) == sum(p.numel() for _, p in lora_parameters(model))
    # Everything else is the frozen base: the same parameters as the plain model, none of them trains.
    frozen = {p.name: p.full_shape for p in planned.params if not p.trainable}
    real_frozen = {n.replace(".base_layer", ""): tuple(p.shape) for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == real_frozen
    # By hand: rank x (in + out) of q, k, v, qx, linear_proj ([self | cross] in), fc1, fc2 in every layer.
    H, Q, K, F = cfg.hidden_size, cfg.num_attention_heads * cfg.kv_channels, cfg.num_query_groups * cfg.kv_channels, \
        cfg.ffn_hidden_size
    per_layer = (H + Q) + 2 * (H + K) + (H + Q) + (2 * Q + H) + (H + F) + (F + H)
    assert sum(a * b for a, b in trainable.values()) == cfg.num_layers * rank * per_layer
    # The 4.5B preset at rank 16: the same formula (32,866,304 adapter parameters).
    big = load_model_preset("magi1_4.5b")
    big_planned = ModelParams.of(big, Tuning(16))
    H, Q, K, F = big.hidden_size, big.num_attention_heads * big.kv_channels, big.num_query_groups * big.kv_channels, \
        big.ffn_hidden_size
    per_layer = (H + Q) + 2 * (H + K) + (H + Q) + (2 * Q + H) + (H + F) + (F + H)
    count = sum(p.full_shape[0] * p.full_shape[1] for p in big_planned.params if p.trainable)
    assert count == big.num_layers * 16 * per_layer == 32_866_304


def test_lora_targets_are_matched_like_apply_lora():
    cfg = load_model_preset("tiny")
    targets = ("videodit_blocks.layers.1.mlp.*", "*.linear_kv_xattn")
    model = build_dit(cfg, device="meta")
    assert list(lora_modules(cfg, targets)) == apply_lora(model, targets, rank=2, alpha=2)
    with pytest.raises(ValueError, match=r"lora.targets pattern '\*.no_such_linear' matches no linear"):
        ModelParams.of(cfg, Tuning(4, ("*.mlp.linear_fc1", "*.no_such_linear")))


def test_tensor_parallel_adapters_split_like_their_base():
    """Column-parallel base (q, fc1): B split along out, A whole; row-parallel (linear_proj, fc2): A split along in."""
    cfg = replace(load_model_preset("tiny"), num_attention_heads=4, num_query_groups=2)
    params = ModelParams.of(cfg, Tuning(8))
    layer = {name: (r, fin, fout) for name, r, fin, fout in params.adapters(Layout(tp=2), 0)[0]}
    pre = "videodit_blocks.layers.0."
    H, F = cfg.hidden_size, cfg.ffn_hidden_size
    Q = cfg.num_attention_heads * cfg.kv_channels
    assert layer[pre + "self_attention.linear_qkv.q"] == (8, H, Q // 2)
    assert layer[pre + "mlp.linear_fc1"] == (8, H, F // 2)
    assert layer[pre + "self_attention.linear_proj"] == (8, 2 * Q // 2, H)
    assert layer[pre + "mlp.linear_fc2"] == (8, F // 2, H)
    held = dict((n, numel) for n, numel, _ in params.trainable(Layout(tp=2), 0))
    assert held[pre + "mlp.linear_fc1.lora_B.weight"] == F // 2 * 8 and held[pre + "mlp.linear_fc1.lora_A.weight"] == 8 * H


def _measured_step(group, cfg, setup):
    """Bytes of the parameters, gradients and optimizer state after two training steps of `cfg`, the model
    prepared by `setup(model)` (LoRA, freezing), ShardedAdamW over all its parameters as the trainer builds it.
    Read from the tensors themselves (MemTracker's module hooks cannot attach to frozen parameters)."""
    model = build_dit(cfg, tp_group=group, init_seed=1)
    setup(model)
    model.train()
    optimizer = ShardedAdamW(list(model.named_parameters()), OptimizerConfig(), group)
    args = inputs(cfg)
    for _ in range(2):
        optimizer.zero_grad()
        model(*args).float().square().mean().backward()
        optimizer.step()

    def nbytes(tensors) -> int:
        return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())

    state = [t for s in optimizer.inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return {"Parameter": nbytes(model.parameters()),
            "Gradient": nbytes(p.grad for p in model.parameters() if p.grad is not None),
            "Optstate": nbytes(state) + nbytes(optimizer.master.values())}


def _lora(model):
    apply_lora(model, DEFAULT_LORA_TARGETS, rank=4, alpha=4)
    for _, p in lora_parameters(model):  # a non-zero B: every factor gets a gradient
        torch.nn.init.normal_(p, std=0.02)


@pytest.mark.parametrize("tuning,setup", [
    (Tuning(4), _lora),
    (Tuning(frozen=("videodit_blocks.layers.0.*", "y_embedder.*")),
     lambda m: [p.requires_grad_(not (n.startswith("videodit_blocks.layers.0.") or n.startswith("y_embedder.")))
                for n, p in m.named_parameters()]),
])
def test_frozen_parameters_hold_weights_only(single_process_group, tuning, setup):
    cfg = load_model_preset("tiny")
    measured = _measured_step(single_process_group, cfg, setup)
    params = ModelParams.of(cfg, tuning)
    est = estimate(cfg, Layout(precision="fp32"), MB, params)
    trained = params.trainable(Layout(), 0)
    assert est.params == measured["Parameter"]
    assert est.grads == measured["Gradient"] == sum(numel for _, numel, _ in trained) * 4
    # AdamW's two fp32 moments and step scalar of the trainable parameters; the frozen ones have none.
    assert est.optimizer == measured["Optstate"] == 2 * est.grads + 4 * len(trained)
    full = estimate(cfg, Layout(precision="fp32"), MB, ModelParams.of(cfg))
    assert est.frozen > 0 and est.optimizer < full.optimizer and est.grads < full.grads


def _saved_per_layer(model, args):
    """Bytes of the distinct storages autograd saves inside each transformer layer (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, where = {}, [None]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if where[0] is not None and ptr not in params and ptr != 0:
            saved.setdefault(where[0], {})[ptr] = t.untyped_storage().nbytes()
        return t

    hooks = []
    for i, layer in enumerate(model.videodit_blocks.layers):
        hooks.append(layer.register_forward_pre_hook(lambda mod, a, i=i: where.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda mod, a, out: where.__setitem__(0, None)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*args)
    for h in hooks:
        h.remove()
    # What every layer reads is saved once: layer 1's own tensors are those layer 0 did not save.
    return sum(b for ptr, b in saved[1].items() if ptr not in saved[0])


@pytest.mark.parametrize("params_dtype,dropout,autocast", [
    ("float32", 0.0, False),
    ("float32", 0.1, False),
    ("bfloat16", 0.0, False),
    ("float32", 0.0, True),
])
def test_a_lora_layer_saves_what_the_count_says(single_process_group, params_dtype, dropout, autocast):
    """The frozen base saves less than full training (what only its parameters' gradients needed), the adapters
    add their own tensors: measured as the LoRA model's saved tensors against the plain model's."""
    cfg = replace(load_model_preset("tiny"), params_dtype=params_dtype)
    args = inputs(cfg)

    def run(lora: bool) -> int:
        model = build_dit(cfg, tp_group=single_process_group, init_seed=0)
        if lora:
            apply_lora(model, DEFAULT_LORA_TARGETS, rank=4, alpha=4, dropout=dropout)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _saved_per_layer(model, args)

    layout = Layout(precision="bf16" if autocast else "fp32")
    params = ModelParams.of(cfg, Tuning(4, lora_dropout=dropout))
    adapters = params.adapters(layout, 0)[1]
    names = [name for name, *_ in adapters]
    added = lora_activations(cfg, layout, MB, adapters, dropout)
    dropped = sum(layer_activations(cfg, layout, MB).values()) - sum(
        frozen_base_layer_activations(cfg, layout, MB, names).values())
    assert added > 0 and dropped > 0
    md = 2 if params_dtype == "bfloat16" else 4
    if dropout:
        # CPU's dropout keeps its mask in the input's dtype (`_dropout_impl`), CUDA's fused kernel (the plan's
        # target) a bool: md - 1 more bytes per element of each adapter's input.
        added += sum((md - 1) * N * DN * TPC * fan_in for _, _, fan_in, _ in adapters)
    if md == 2:
        # layer_norm on CPU keeps bf16 mean / rstd for bf16 input, CUDA fp32 (as in test_memory_plan.py): the
        # dropped k_layernorm_xattn statistics of the caption keys are 2 x 2 bytes smaller per row and KV head.
        dropped -= N * DN * CAPTION * cfg.num_query_groups * 2 * 2
    lora, plain = run(True), run(False)
    assert lora - plain == added - dropped
    if params_dtype == "float32" and not autocast:  # where the plain layer's count is exact (test_memory_plan.py)
        assert lora == sum(frozen_base_layer_activations(cfg, layout, MB, names).values()) + added
    est = estimate(cfg, layout, MB, params)
    assert est.lora_activations == cfg.num_layers * lora_activations(cfg, layout, MB, adapters, dropout)


def test_tuning_reads_the_lora_config():
    from magi_train.config.schema import TrainConfig

    cfg = TrainConfig()
    assert Tuning.of_config(cfg) == Tuning()
    cfg.lora.rank, cfg.lora.dropout, cfg.lora.targets = 8, 0.1, ["*.mlp.linear_fc1"]
    cfg.lora.base_dtype = "bfloat16"
    assert Tuning.of_config(cfg) == Tuning(8, ("*.mlp.linear_fc1",), 0.1, "bfloat16")
    with pytest.raises(ValueError, match=r"lora.base_dtype='int4' is not one of"):
        Tuning(8, base_dtype="int4")
