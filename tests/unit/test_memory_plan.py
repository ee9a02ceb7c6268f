"""The training memory plan (magi_train/observability/memory_plan.py) against memory measured on CPU: the tensors one layer
saves for backward (saved-tensor hooks), and one training step of the tiny preset under torch's MemTracker
(live tensor storages by kind: parameters, gradients, optimizer state, activations). Then the layout search."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from magi_train.config import load_model_preset
from magi_train.config.schema import ModelConfig, OptimizerConfig
from magi_train.observability.memory_plan import (
    GIB, Layout, MicroBatch, ModelParams, estimate, layer_activations, search,
)
from magi_train.model.attention import block_causal_ranges
from magi_train.model.dit import build_dit, module_dtype_plan
from magi_train.parallel.pipeline import DiTStage, MicroBatchShape
from magi_train.parallel.zero import ShardedAdamW

pytestmark = pytest.mark.usefixtures("one_thread")

# Dense micro-batch: N samples of DN chunks, each 6 latent frames of 8x8 -> 6 x 4 x 4 = 96 tokens.
N, DN, FRAMES, HL, WL, CAPTION = 2, 2, 6, 8, 8, 32
TPC = FRAMES * (HL // 2) * (WL // 2)


def micro_batch(**over) -> MicroBatch:
    base = MicroBatch(seq_length=DN * TPC, micro_batch_size=N, chunk_tokens=TPC, caption_length=CAPTION, attention="torch")
    return replace(base, **over)


def inputs(cfg: ModelConfig, n: int = N, dn: int = DN):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cfg.in_channels, dn * FRAMES, HL, WL, generator=g)
    t = torch.rand(n, dn, generator=g)
    caption = torch.randn(n * dn, CAPTION, cfg.caption_channels, generator=g)
    mask = torch.ones(n * dn, CAPTION, dtype=torch.bool)
    return x, t, caption, mask


def saved_by_layer(model, args) -> dict:
    """Bytes of the storages autograd saves while each layer runs (parameters excluded), by layer index."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict = {}
    where = [None]

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
    return saved


@pytest.mark.parametrize("params_dtype,over", [
    ("float32", {}),
    ("float32", {"gated_linear_unit": True, "num_query_groups": 4}),
    ("float32", {"num_query_groups": 1}),
    ("bfloat16", {}),
])
def test_one_layer_saves_what_the_count_says(single_process_group, params_dtype, over):
    cfg = replace(load_model_preset("tiny"), params_dtype=params_dtype, **over)
    model = build_dit(cfg, tp_group=single_process_group)
    x, t, caption, mask = inputs(cfg)
    saved = saved_by_layer(model, (x, t, caption, mask, block_causal_ranges(N, DN, TPC)))
    # What every layer reads (condition, RoPE table, caption tokens, token -> row map) is saved once for all
    # layers: the layer's own tensors are those layer 0 did not save too.
    own = sum(b for ptr, b in saved[1].items() if ptr not in saved[0])
    parts = layer_activations(cfg, Layout(precision="fp32"), micro_batch())
    if params_dtype == "float32":
        assert own == sum(parts.values())
    else:
        # The one difference: layer_norm on CPU keeps bf16 mean / rstd for bf16 input; CUDA (the plan's
        # target) keeps fp32. Four norms save them: the two pre-norms (per token) and the cross-attention
        # QK-norms (per token and head, per caption token and KV head).
        T, C = N * DN * TPC, N * DN * CAPTION
        rows = 2 * T + T * cfg.num_attention_heads + C * cfg.num_query_groups
        assert own == sum(parts.values()) - rows * 2 * 2


def test_parameter_table_equals_the_built_model():
    cfg = load_model_preset("tiny")
    model = build_dit(cfg, device="meta")
    plan = module_dtype_plan(model)
    built = sorted((n, tuple(p.shape), plan[n].itemsize) for n, p in model.named_parameters())
    assert sorted((p.name, p.full_shape, p.itemsize) for p in ModelParams.of(cfg).params) == built


def _measure_step(group, recompute: str, buckets: bool = False):
    """One training step of the tiny preset as the trainer runs it (the pipeline stage module, ShardedAdamW,
    the weighted squared error), after a first step has created the optimizer state. Returns the peak and the
    after-step snapshots of MemTracker, by kind.

    `buckets`: the gradients go through the trainer's fp32 buckets (parallel/grad_buckets.py); MemTracker files
    those under Temp (a hook allocates them), so the activation figures are measured without them, with the
    gradients in `.grad` (the same bytes for this fp32 model, under Gradient)."""
    cfg = load_model_preset("tiny")  # fp32 parameters, precision fp32
    model = build_dit(cfg, tp_group=group, init_seed=1)
    model.train()
    model.set_recompute(recompute)
    optimizer = ShardedAdamW(list(model.named_parameters()), OptimizerConfig(), group)
    if buckets:
        optimizer.attach_grad_hooks()
    shape = MicroBatchShape(N, DN, TPC, CAPTION, (DN * FRAMES, HL // 2, WL // 2), (N, 16, DN * FRAMES, HL, WL))
    stage = DiTStage(model, shape)
    x, t, caption, mask = inputs(cfg)
    batch = (x, t, caption, mask, torch.tensor([False, True, False, False]), torch.tensor([False, True]))
    target = torch.randn(N, 17, DN * FRAMES, HL, WL, generator=torch.Generator().manual_seed(1))

    def step():
        optimizer.zero_grad()
        pred = stage(*batch)
        # trainer.weighted_sq_error: [v* | weight] along channels
        loss = ((pred.float() - target[:, :-1]).square() * target[:, -1:]).sum()
        loss.backward()
        if buckets:
            optimizer.reduce_grads()
        optimizer.step()

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer.inner, *batch, target)
    with tracker:
        step()
    cpu = torch.device("cpu")

    def by_kind(kind):
        return {str(k.value) if hasattr(k, "value") else str(k): v for k, v in tracker.get_tracker_snapshot(kind)[cpu].items()}

    return cfg, by_kind("peak"), by_kind("current")


# Measured on this test's step with torch 2.13 (MemTracker, bytes), for the record:
#   recompute   activations+temp at peak   peak         plan activations   plan total
#   none        24,632,200                 42,402,438   24,754,432         48,133,768
#   selective   20,634,632                 38,404,870   22,427,904         45,807,240
#   full        13,266,952                 33,871,622   14,178,560         37,557,896


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_training_step_matches_measured_memory(single_process_group, recompute):
    cfg, peak, after = _measure_step(single_process_group, recompute)
    est = estimate(cfg, Layout(recompute=recompute, precision="fp32"), micro_batch())
    # Exact: every parameter, its gradient, AdamW's two moments and step scalar (one process owns them all).
    assert est.params == after["Parameter"] == 5_844_768
    assert est.grads == after["Gradient"]
    if recompute == "none":  # the trainer's way: the same bytes, in the buckets
        _, _, with_buckets = _measure_step(single_process_group, recompute, buckets=True)
        assert with_buckets["Gradient"] == 0 and est.grads == with_buckets["Temp"]
    assert est.optimizer == after["Optstate"] == 2 * 5_844_768 + 4 * len(list(build_dit(cfg, device="meta").parameters()))
    # Activations: the plan's saved tensors + backward working set vs what was live at the peak (activations
    # and backward temporaries): +0.5% (none), +8.7% (selective), +6.9% (full). The plan adds the working set
    # (one attention recomputed, the largest score gradient) to everything saved; by the time backward
    # reaches a layer, the layers after it have already freed theirs.
    measured_act = peak["Activation"] + peak["Temp"]
    assert est.activations == pytest.approx(measured_act, rel=0.10)
    # The total is conservative: it adds the gradients to the activations, but the measured peak is at the
    # start of backward, before most gradients exist (none, selective: none at all at the peak). It leaves
    # out the batch itself (inputs and targets, "Other", 0.2 MB) and backward temporaries other than the
    # attention score gradients. Total vs measured peak: +13.5% (none), +19.3% (selective), +10.9% (full).
    assert peak["Total"] <= est.total <= 1.25 * peak["Total"]


def test_layout_search_grows_the_layout_as_memory_shrinks():
    cfg = load_model_preset("magi1_4.5b")
    params = ModelParams.of(cfg)
    mb = MicroBatch(seq_length=32768, chunk_tokens=21600)
    sizes = []
    for gib in (120, 60, 30, 15):
        found = search(cfg, 32, gib * GIB, mb, params=params)
        assert found is not None, gib
        layout, est = found
        assert est.total <= gib * GIB and layout.gpus == 32
        sizes.append(layout.model_parallel)
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0], sizes
    assert search(cfg, 32, 1 * GIB, mb, params=params) is None


def test_24b_needs_model_parallelism_on_80gib():
    cfg = load_model_preset("magi1_24b")
    params = ModelParams.of(cfg)
    mb = MicroBatch(seq_length=32768, chunk_tokens=21600)
    # Data parallel alone: bf16 weights + gradients of 24B parameters are already 90 GiB.
    for recompute in ("none", "selective", "full"):
        alone = estimate(cfg, Layout(dp=64, recompute=recompute), mb, params)
        assert alone.params + alone.grads > 80 * GIB
        assert alone.total > 80 * GIB
    layout, est = search(cfg, 64, 80 * GIB, mb, params=params)
    assert layout.model_parallel > 1 and est.total <= 80 * GIB


def test_the_attention_backend_counts_what_it_derives_from_the_ranges():
    """sdpa's dense boolean mask is 4 GiB at 65,536 tokens (one call's transient); flex's BlockMask of the same
    block-causal sample is a few MiB; magi keeps only the ranges."""
    cfg = load_model_preset("tiny")
    params = ModelParams.of(cfg)
    big = dict(seq_length=65536, chunk_tokens=4096)
    est = {b: estimate(cfg, Layout(), MicroBatch(**big, attention=a, backend=b), params)
           for b, a in (("torch", "torch"), ("sdpa", "torch"), ("flex", "flash"), ("magi", "flash"))}
    assert est["sdpa"].attention_metadata >= 4 * GIB
    # The mask is in the working set: sdpa = torch's + the mask + its dense score gradients instead of the
    # widest slice's.
    z_area = 65536 * 65536 - 65536 * 4096
    heads = cfg.num_attention_heads
    assert est["sdpa"].working - est["torch"].working == 2**32 + 2 * z_area * heads * 4
    assert est["flex"].attention_metadata <= 64 * 2**20
    assert est["flex"].activations - est["magi"].activations == (est["flex"].attention_metadata
                                                                 - est["magi"].attention_metadata)
    with pytest.raises(ValueError, match=r"backend='sdpa' saves like the torch kernel"):
        MicroBatch(**big, attention="flash", backend="sdpa")
    with pytest.raises(ValueError, match=r"backend='auto' \(model.attention_backend\) is not one of"):
        MicroBatch(**big, backend="auto")


def test_flex_and_flash_metadata_equal_what_the_backends_build():
    from magi_train.model import flash
    from magi_train.model.attention import caption_ranges
    from magi_train.model.flex import ranges_block_mask
    from magi_train.observability.memory_plan import _flex_mask_bytes, _sizes

    cfg = load_model_preset("tiny")
    mb = micro_batch(attention="flash", backend="flex")
    T = N * DN * TPC
    self_ranges = block_causal_ranges(N, DN, TPC)
    cross = caption_ranges(torch.arange(N * DN).repeat_interleave(TPC), [CAPTION] * (N * DN))

    def mask_bytes(mask) -> int:
        tensors = [getattr(mask, name) for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                                                    "full_kv_indices", "q_num_blocks", "q_indices",
                                                    "full_q_num_blocks", "full_q_indices")]
        tensors += [c.cell_contents for c in mask.mask_mod.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    assert _flex_mask_bytes(T, T) == mask_bytes(ranges_block_mask(self_ranges, T, T))
    assert _flex_mask_bytes(T, N * DN * CAPTION) == mask_bytes(ranges_block_mask(cross, T, N * DN * CAPTION))
    # flash gathers the keys of every block-causal slice, none of the captions' (back to back).
    assert _sizes(cfg, Layout(), mb).self_keys == flash.gathered_keys(self_ranges) and flash.gathered_keys(cross) == 0
