"""The one place where the DiT meets the process groups: `parallelize_dit`, and the builds that use it.

Every build follows torchtitan's order:

    meta_dit(cfg)                 the whole single-process model, shapes only (magi_train/model/dit.py)
    parallelize_dit(model, ...)   invariants first, then TP linears, token layout, pipeline stage, recompute
    materialize(model, device)    storage on the device, then weights: drawn at full size per name and cut
                                  to this rank's shard (training), or left to a checkpoint load

`build_train_stages` (training), `build_whole` (a distillation teacher) and `build_model` (inference) are the
three callers; the trainer, the sampler and the checkpoint code drive what they return without knowing the layout.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from magi_train.config.schema import ModelConfig, TrainConfig
from magi_train.model.compile import compile_layers
from magi_train.model.dit import VideoDiT, build_dit, full_shapes, meta_dit  # noqa: F401  (re-exported)
from magi_train.model.float8 import check_float8_device, convert_dit_to_float8, resolve_fp8_backend
from magi_train.model.fp8 import is_fp8_linear
from magi_train.model.norms import select_fused_norms
from magi_train.model.spec import megatron_config
from magi_train.model.storage import allocate
from magi_train.parallel.dispatch import MagiContextParallel, MagiCoreAttention, MagiDispatchLayout
from magi_train.parallel.groups import Parallel
from magi_train.parallel.pipeline import InferencePipeline, stage_layers
from magi_train.parallel.plan import DiTParallelPlan, plan_of, record_full_state, shard_spec  # noqa: F401
from magi_train.parallel.sequence import UlyssesLayout
from magi_train.parallel.sharding import local_from_full

CP_IMPLS = ("ulysses", "magi")


def kv_heads_allocated(cfg: ModelConfig, tp: int) -> int:
    """KV heads summed over the TP ranks: with more ranks than KV heads each rank holds a copy of one."""
    return max(cfg.num_query_groups, tp)


def check_invariants(cfg: ModelConfig, tp: int, cp: int, stages: int, cp_impl: str) -> None:
    """What the parallel plan needs of the model; each error names the config fields."""
    heads, kv = cfg.num_attention_heads, cfg.num_query_groups
    problems = []
    if heads % tp:
        problems.append(f"model.num_attention_heads={heads} is not divisible by parallel.tp={tp}")
    if kv % tp and tp % kv:
        problems.append(f"model.num_query_groups={kv} and parallel.tp={tp}: one must divide the other")
    if cfg.proj_interleave_groups % tp:
        problems.append(f"model.proj_interleave_groups={cfg.proj_interleave_groups} is not divisible by parallel.tp={tp}")
    if cfg.ffn_hidden_size % tp:
        problems.append(f"model.ffn_hidden_size={cfg.ffn_hidden_size} is not divisible by parallel.tp={tp}")
    if cp_impl == "ulysses" and cp > 1:
        local_heads, local_kv = heads // max(tp, 1), kv_heads_allocated(cfg, tp) // max(tp, 1)
        if local_heads % cp:
            problems.append(f"model.num_attention_heads / parallel.tp = {local_heads} heads per rank are not divisible "
                            f"by parallel.cp={cp} (Ulysses splits the heads over the cp ranks)")
        if local_kv % cp and cp % local_kv:
            problems.append(f"{local_kv} KV heads per tensor-parallel rank (model.num_query_groups / parallel.tp) and "
                            f"parallel.cp={cp}: one must divide the other")
    if cfg.num_layers % stages:
        problems.append(f"model.num_layers={cfg.num_layers} is not divisible by parallel.pp x parallel.vpp = {stages}")
    if cp_impl not in CP_IMPLS:
        problems.append(f"parallel.cp_impl={cp_impl!r} is not one of {', '.join(CP_IMPLS)}")
    if problems:
        raise ValueError("; ".join(problems))


def _tp_linear_classes(cfg: ModelConfig):
    if cfg.layer_spec == "te":
        from magi_train.model.te_spec import te_linear_classes  # TE linears shard themselves given the group

        return te_linear_classes()
    # Imported with tensor parallelism only: the classes derive from megatron-core's, 1 s of imports that a
    # single-process model never needs.
    from magi_train.parallel.tensor import ColumnLinear, RowLinear

    return ColumnLinear, RowLinear


def apply_tp(model: VideoDiT, tp_group, sequence_parallel: bool) -> None:
    """Swap every layer's linears for tensor-parallel ones (global sizes; the classes split them), on the meta
    device. Heads split over the group: q/qx/k/v/fc1 by output features, proj/fc2 by input features; with
    fewer KV heads than ranks each rank holds a copy of one (k, v, linear_kv_xattn)."""
    from magi_train.parallel.tensor import CaptionKVColumnLinear

    cfg, tp = model.cfg, tp_group.size()
    column, row = _tp_linear_classes(cfg)
    common = dict(config=megatron_config(model.dtype, tp), init_method=lambda _: None, bias=False, tp_group=tp_group)
    kv_scale = kv_heads_allocated(cfg, tp) // cfg.num_query_groups

    def rebuild(cls, old, kv_rows: bool = False, **kwargs):
        out_features, in_features = old.weight.shape
        return cls(in_features, out_features * (kv_scale if kv_rows else 1), **common, **kwargs)

    with torch.device("meta"):
        for layer in model.videodit_blocks.layers:
            attn, qkv, mlp = layer.self_attention, layer.self_attention.linear_qkv, layer.mlp
            sp = dict(sequence_parallel=sequence_parallel)
            qkv.q, qkv.qx = rebuild(column, qkv.q, **sp), rebuild(column, qkv.qx, **sp)
            qkv.k, qkv.v = rebuild(column, qkv.k, True, **sp), rebuild(column, qkv.v, True, **sp)
            attn.linear_kv_xattn = rebuild(CaptionKVColumnLinear, attn.linear_kv_xattn, True,
                                           reduce_grad=not sequence_parallel)
            attn.linear_proj = rebuild(row, attn.linear_proj, compute_dtype=attn.linear_proj.compute_dtype, **sp)
            attn.proj_groups = cfg.proj_interleave_groups // tp
            mlp.linear_fc1, mlp.linear_fc2 = rebuild(column, mlp.linear_fc1, **sp), rebuild(row, mlp.linear_fc2, **sp)


def apply_token_layout(model: VideoDiT, parallel: Parallel, cp_impl: str, sp_group) -> None:
    """Context parallel (Ulysses windows, or MagiAttention's dispatch plugged into the self-attention slot)
    and sequence parallel (the TP ranks split the stream's tokens)."""
    cfg, tp, cp_group = model.cfg, parallel.tp, parallel.cp_group
    if cp_impl == "magi" and cp_group is not None:
        magi = MagiContextParallel(cp_group, cfg.num_attention_heads // tp, kv_heads_allocated(cfg, tp) // tp,
                                   cfg.kv_channels)
        model.token_layout = MagiDispatchLayout(magi, sp_group)
        for layer in model.videodit_blocks.layers:
            layer.self_attention.core_attention = MagiCoreAttention()
    elif cp_group is not None or sp_group is not None:
        model.token_layout = UlyssesLayout(cp_group, sp_group)


def apply_pipeline_stage(model: VideoDiT, stage: int, stages: int) -> None:
    """Keep pipeline stage `stage` of `stages` (a contiguous block of layers; the embedders on the first, the
    output layer on the last). Parameter names stay the whole model's (layers keep their global index)."""
    per = model.cfg.num_layers // stages
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    layers = model.videodit_blocks.layers
    for key in [k for k in layers._modules if k not in keep]:
        del layers._modules[key]
    if stage != 0:
        for name in ("x_embedder", "t_embedder", "y_embedder", "rope"):
            delattr(model, name)
    if stage != stages - 1:
        delattr(model, "final_linear")
        delattr(model.videodit_blocks, "final_layernorm")


def parallelize_dit(model: VideoDiT, parallel: Parallel, *, cp_impl: str = "ulysses",
                    stage: Optional[Tuple[int, int]] = None, recompute: str = "none", recompute_layers: int = 0) -> VideoDiT:
    """Apply the parallel layout to a whole DiT on the meta device, in place (returned for chaining).

    `parallel`: the groups and sizes (tp, cp, sequence_parallel); `cp_impl`: "ulysses" or "magi" (resolved,
    see `resolve_cp_impl`); `stage`: (this stage's index, number of stages) under pipeline parallel, None for
    the whole model; `recompute`: trainer.recompute ("none", "selective", "full") for the first
    `recompute_layers` layers of the stage (0 = all)."""
    cfg = model.cfg
    tp = parallel.tp
    index, stages = (0, 1) if stage is None else stage
    check_invariants(cfg, tp, parallel.cp, stages, cp_impl)
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("parallelize_dit takes the model on the meta device (build it with meta_dit, then "
                         "materialize it): swapping layers would lose materialised weights")
    if tp > 1 and any(is_fp8_linear(m) for m in model.modules()):
        raise NotImplementedError("fp8 with tensor parallel is not supported yet (sampler.fp8 with parallel.tp > 1)")
    full_state, full_parameters = record_full_state(model)  # before anything is sharded or dropped
    sequence_parallel = parallel.sequence_parallel and tp > 1
    tp_group = parallel.tp_group if tp > 1 else None

    if tp > 1:
        apply_tp(model, tp_group, sequence_parallel)
    apply_token_layout(model, parallel, cp_impl, tp_group if sequence_parallel else None)
    if stage is not None:
        apply_pipeline_stage(model, index, stages)
    model.set_recompute(recompute, recompute_layers)
    model.parallel_plan = DiTParallelPlan(full_state, full_parameters, tp_group, tp, parallel.tp_rank if tp > 1 else 0,
                                          sequence_parallel, cp_impl)
    return model


def materialize(model: VideoDiT, device, init_seed: Optional[int] = None) -> VideoDiT:
    """Storage on `device`, then weights: `init_seed` draws each at full size and cuts this rank's shard (every
    layout starts from the same model); None leaves them to a checkpoint load (norms and RoPE at defaults)."""
    allocate(model, device)  # model.to_empty, without the import of sympy that it costs (model/storage.py)
    if init_seed is None:
        model.reset_defaults()
        return model
    plan = plan_of(model)
    shapes = plan.full_shapes
    model.init_weights(init_seed, shapes, lambda name, full: local_from_full(full, shard_spec(model, name, shapes[name])))
    return model


# ---------------------------------------------------------------------------- the three builds


def build_train_stages(cfg: TrainConfig, parallel: Parallel, cp_impl: str) -> Tuple[List[int], List[VideoDiT]]:
    """(stage ids, models) of the pipeline stages this rank holds (one, or parallel.vpp of them), initialised
    from trainer.seed, in train mode with trainer.recompute applied.

    The optional accelerators go in here, in this order, with parameter names unchanged: torchao's float8
    linears (trainer.fp8_backend=torchao, on the meta device: the weights are then drawn by name as always), the
    norms' kernel (model.fused_norms), then the per-layer compile (trainer.compile) of the parallelised,
    materialised layers; the optimizer is built on what this returns."""
    m, tc, p = cfg.model, cfg.trainer, parallel
    stages = p.pp * cfg.parallel.vpp
    held = stage_layers(m.num_layers, p.pp, cfg.parallel.vpp, p.pp_rank)
    float8 = resolve_fp8_backend(tc.fp8_backend, tc.fp8_recipe, m.layer_spec) == "torchao"
    if float8:
        check_float8_device(p.device)
    models = []
    for sid, _ in held:
        model = parallelize_dit(meta_dit(m), p, cp_impl=cp_impl, stage=(sid, stages) if stages > 1 else None,
                                recompute=tc.recompute, recompute_layers=tc.recompute_layers)
        if float8:
            convert_dit_to_float8(model, tc.fp8_recipe)
        model = materialize(model, p.device, init_seed=tc.seed).train()
        select_fused_norms(model, m.fused_norms, compiled=tc.compile)
        if tc.compile:
            compile_layers(model, tc.compile_mode)
        models.append(model)
    return [sid for sid, _ in held], models


def build_whole(cfg: ModelConfig, parallel: Parallel, cp_impl: str) -> VideoDiT:
    """The whole model (no pipeline split) on this rank's tensor/context-parallel slice, weights uninitialised
    (to be loaded): e.g. a distillation teacher."""
    model = materialize(parallelize_dit(meta_dit(cfg), parallel, cp_impl=cp_impl), parallel.device)
    select_fused_norms(model, cfg.fused_norms)
    return model


def build_model(mc: ModelConfig, state: Dict[str, torch.Tensor], source: str, parallel: Optional[Parallel] = None,
                fp8: bool = False) -> nn.Module:
    """This rank's part of the DiT for inference, loaded from a full (released-layout) state dict: the whole
    model in one process; under model parallelism its TP slices of its pipeline stage's layers, with the
    context-parallel group, driven as an `InferencePipeline` when pp > 1. The sampler drives any of them the
    same way."""
    from magi_train.checkpoint.weights import load_into

    model = meta_dit(mc)
    select_fused_norms(model, mc.fused_norms)  # kept by materialize (an attribute of the modules)
    if fp8:
        from magi_train.model.fp8 import convert_dit_to_fp8

        convert_dit_to_fp8(model)  # the whole model's fp8 layout is what the checkpoint holds
    if parallel is None or parallel.world_size == 1:
        load_into(materialize(model, "cpu"), state, source)
        return model
    stage = (parallel.pp_rank, parallel.pp) if parallel.pp > 1 else None
    parallelize_dit(model, parallel, stage=stage)
    materialize(model, "cpu")
    load_into(model, state, source, full_shapes=plan_of(model).full_shapes, tp_rank=parallel.tp_rank, tp=parallel.tp)
    return InferencePipeline(model, parallel.groups.pp) if parallel.pp > 1 else model



def build_parallel_dit(cfg: ModelConfig, parallel: Parallel, *, cp_impl: str = "ulysses",
                       stage: Optional[Tuple[int, int]] = None, init_seed: Optional[int] = 0, device=None) -> VideoDiT:
    """meta -> `parallelize_dit` -> `materialize` in one call (`init_seed=None`: weights to be loaded)."""
    model = parallelize_dit(meta_dit(cfg), parallel, cp_impl=cp_impl, stage=stage)
    return materialize(model, parallel.device if device is None else device, init_seed)
