"""LoRA under every parallel layout: the adapters of model/lora.py on the tensor-parallel linears, and the entry
point the trainer calls (`apply_train_lora`).

Why not peft's `LoraParallelLinear` (issue 18 asks for peft where it fits; peft 0.21.2 with megatron-core 0.16.1,
../shared/reference/wave2-facts.md): it needs a full megatron `TransformerConfig` dict, then fails in
`get_peft_model` with `KeyError: 'fan_in_fan_out'` (tp_layer.py: the megatron dispatcher reads a kwarg its
caller no longer passes); past that it would still not fit: it knows megatron's own sequence parallelism (which
cannot run on CPU: it allocates with torch.cuda.current_device()), not our gather / reduce-scatter of
parallel/tensor.py, nor the caption linear's KV-head replicas, and it wraps the model in a PeftModel whose
`base_model.model.` names the pipeline stages, the checkpoints and the gradient code would all have to see
through. model/lora.py gives the reasons for the single-process layers. So this is ours: a subclass of
model/lora.py's `LoraLinear` per tensor-parallel linear, with its names (`<module>.lora_A.<adapter>.weight`) and
its arithmetic, so a TP=2 run equals the TP=1 run (tests/distributed/test_lora_parallel.py) and their checkpoints
reshard into each other.

The math (x: the linear's input as the base layer receives it; r: the rank; s: scale * alpha / r):

    column (q, qx, k, v, fc1, kv_xattn)   h = A x (A whole)             y_local = s B_local h
    row    (proj, fc2)                    h = sum_tp A_local x_local   y       = s B h

B_local are the rows of B this rank's base weight has (`tp_shard_spec` of the base weight with B's shape: the
SwiGLU [gate | up] pieces, replicated KV heads), A_local the columns of A its base weight has; the rank-r
intermediate of a row linear is all-reduced over the tp group. Under sequence parallelism the adapter follows
the base: a column layer gathers its input over the tp ranks' tokens, so its adapter gathers h (r wide instead
of the hidden size); a row layer reduce-scatters its output, so its adapter reduce-scatters h.

Storage: A and B are held WHOLE on every tensor-parallel rank (the slices are views taken in forward). They are
small (r x in, out x r: 0.2% of a 4.5B layer's weights at r = 16) and the checkpoints, the gradient norm and the
ZeRO buckets then treat them as the replicated parameters they know already (parallel/sharding.py: a name it does
not know is replicated). Gradients follow the replicated-parameter convention of parallel/grads.py: without
sequence parallelism each rank's gradient is complete (the slices' gradients, zero elsewhere, are all-reduced in
backward: megatron's copy-to-tensor-parallel-region; so is the column intermediate's, as megatron does for a
column layer's input); with it they are partial per rank, and `finalize_model_grads` sums them like every other
replicated parameter (`tp_partial_grad`).

Dropout draws its own mask on every rank, which is right where a rank's adapter input is its own (row layers'
feature slices, sequence-parallel tokens) and wrong where it is replicated (a column layer without sequence
parallelism, the caption KV linear): those refuse lora.dropout > 0 under tp > 1. A run with dropout is not the
same run under another layout (with 0, the default, it is).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from magi_train.config.schema import LoraConfig, ModelConfig
from magi_train.model.lora import DEFAULT_ADAPTER, LoraLinear, apply_lora, fnmatch_escape, match_targets
from magi_train.parallel.plan import plan_of
from magi_train.parallel.sharding import ShardSpec, local_from_full, tp_shard_spec

ADAPTER_DTYPE = torch.float32  # the adapters train in fp32 whatever the base's dtype (they are small)


class ParallelLoraLinear(LoraLinear):
    """LoRA on one of parallel/tensor.py's linears on a tensor-parallel rank (see the module docstring).

    `kind`: "column" or "row"; `weight_key`: the base weight's name in the whole model (its tensor-parallel
    layout is that of B's rows / A's columns); `sequence_parallel`: the base gathers / reduce-scatters tokens;
    `partial_grads`: leave the adapter gradients partial per rank (the run's sequence parallelism: they are
    then summed with the other replicated parameters' after backward)."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, *, kind: str, weight_key: str,
                 cfg: ModelConfig, tp_group, tp_rank: int, tp: int, sequence_parallel: bool, partial_grads: bool):
        super().__init__(base, in_features, out_features)
        if kind not in ("column", "row"):
            raise ValueError(f"kind={kind!r} is not 'column' or 'row'")
        self.kind, self.weight_key, self.model_cfg = kind, weight_key, cfg
        self.tp_group, self.tp_rank, self.tp = tp_group, tp_rank, tp
        self.sp, self.partial_grads = sequence_parallel, partial_grads

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, **kwargs) -> None:
        if dropout > 0 and self.kind == "column" and not self.sp:
            raise NotImplementedError(
                f"lora.dropout={dropout} on {self.weight_key[:-len('.weight')]} under parallel.tp={self.tp}: its input "
                f"is replicated over the tensor-parallel ranks, which would drop different elements of it; use "
                f"parallel.sequence_parallel=true (not for linear_kv_xattn) or lora.dropout=0")
        super().add_adapter(name, rank, alpha, dropout, **kwargs)

    def _spec(self, rank: int) -> ShardSpec:
        """How this rank's slice is cut from B (column) or A (row) of rank `rank`."""
        shape = (self.out_features, rank) if self.kind == "column" else (rank, self.in_features)
        return tp_shard_spec(self.weight_key, shape, self.model_cfg, self.tp_rank, self.tp)

    def _slice(self, w: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's slice of `w` (B of a column, A of a row). Its gradient is zero outside the slice; without
        partial gradients the ranks' slices are summed in backward into the whole gradient (megatron's
        copy-to-tensor-parallel-region). The factors used whole (A of a column, B of a row) need no such step:
        their gradients are complete already (column: h's gradient is all-reduced; row: h and the output's
        gradient are the same on every rank)."""
        if not self.partial_grads:
            from magi_train.mcore import copy_to_tensor_model_parallel_region

            w = copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        return local_from_full(w, self._spec(rank))

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """LoraLinear.forward sums these (one rounding); here with this rank's slice and the tp communication."""
        from magi_train.mcore import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region
        from magi_train.parallel.tensor import sp_gather, sp_reduce_scatter

        a, b, rank = self.lora_A[name].weight, self.lora_B[name].weight, self.ranks[name]
        x = self.lora_dropout[name](x).to(a.dtype)
        if self.kind == "column":
            h = F.linear(x, a)
            if self.sp:
                h = sp_gather(h, self.tp_group)  # the tokens of every tp rank, as the base layer gathers them
            elif not self.partial_grads:
                # The input gradient of h is summed over the ranks' output slices (megatron's column-layer rule).
                h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            return F.linear(h, self._slice(b, rank))
        h = F.linear(x, self._slice(a, rank))
        if self.sp:
            h = sp_reduce_scatter(h, self.tp_group)  # summed, this rank's tokens (as the base's output)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        return F.linear(h, b)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * alpha / rank * B A for this rank's base weight shard (fp32)."""
        a, b, rank = self.lora_A[name].weight.detach().float(), self.lora_B[name].weight.detach().float(), self.ranks[name]
        spec = self._spec(rank)
        if self.kind == "column":
            b = local_from_full(b, spec)
        else:
            a = local_from_full(a, spec)
        return (b @ a) * self.scaling(name)


def parallel_lora_factory(model: nn.Module):
    """The `apply_lora` / `load_adapter` factory of a model `parallelize_dit` split over tp > 1 ranks (training
    or inference): a ParallelLoraLinear per tensor-parallel linear; None for a single-rank model (model/lora.py's
    LoraLinear is then the adapter)."""
    if plan_of(model).tp == 1:
        return None
    from magi_train.parallel.tensor import ColumnLinear, RowLinear

    plan = plan_of(model)

    def make(module_name: str, linear: nn.Module, _in: int, _out: int) -> LoraLinear:
        key = f"{module_name}.weight"
        out_features, in_features = plan.full_state[key][0]  # whole-model sizes (not the replicated-KV ones)
        if isinstance(linear, ColumnLinear):
            kind = "column"
        elif isinstance(linear, RowLinear):
            kind = "row"
        else:
            raise NotImplementedError(f"LoRA on {module_name} ({type(linear).__name__}) under parallel.tp="
                                      f"{plan.tp}: only the local layer spec's tensor-parallel linears "
                                      f"(model.layer_spec=local) have a tensor-parallel adapter")
        return ParallelLoraLinear(linear, in_features, out_features, kind=kind, weight_key=key, cfg=model.cfg,
                                  tp_group=plan.tp_group, tp_rank=plan.tp_rank, tp=plan.tp,
                                  sequence_parallel=bool(getattr(linear, "sp", False)),
                                  partial_grads=plan.sequence_parallel)

    return make


def whole_model_targets(cfg: ModelConfig, targets: Sequence[str]) -> List[str]:
    """The module names `targets` match in the whole model (every pipeline stage; a pattern matching nothing is
    an error naming it), from its shapes on the meta device."""
    from magi_train.model.dit import meta_dit

    return match_targets(meta_dit(cfg), list(targets))


def lora_full_state(plan_full_state: Dict[str, Tuple[Tuple[int, ...], torch.dtype]], modules: Sequence[str],
                    rank: int, name: str = DEFAULT_ADAPTER) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Whole (TP=1) shapes of the adapter parameters of `modules` (A: rank x in, B: out x rank)."""
    out = {}
    for module in modules:
        out_features, in_features = plan_full_state[f"{module}.weight"][0]
        out[f"{module}.lora_A.{name}.weight"] = ((rank, in_features), ADAPTER_DTYPE)
        out[f"{module}.lora_B.{name}.weight"] = ((out_features, rank), ADAPTER_DTYPE)
    return out


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def apply_train_lora(models: Sequence[nn.Module], lora: LoraConfig, seed: int,
                     name: str = DEFAULT_ADAPTER) -> List[str]:
    """Add a fresh adapter to the targets of every model chunk this rank holds (after the base weights are
    final: initialised or loaded), freeze the rest, cast the frozen base to lora.base_dtype, and record the
    adapters' whole shapes in each chunk's parallel plan (for checkpoints and the gradient norm). Returns the
    adapted module names of the WHOLE model (every pipeline stage): the same list on every rank.

    Adapters are drawn at whole size from (seed, module, adapter): every layout starts from the same ones."""
    if not models:
        return []
    cfg = models[0].cfg
    modules = whole_model_targets(cfg, lora.targets)
    for model in models:
        plan = plan_of(model)
        held = [m for m in modules if _has_module(model, m)]
        factory = parallel_lora_factory(model)
        if held:
            apply_lora(model, [fnmatch_escape(m) for m in held], lora.rank, lora.alpha, lora.dropout, name,
                       dtype=ADAPTER_DTYPE, seed=seed, freeze_base=True, factory=factory)
        else:  # a pipeline stage without a target (e.g. only embedders): everything frozen
            for p in model.parameters():
                p.requires_grad_(False)
        _cast_frozen(model, lora.base_dtype)
        extra = lora_full_state(plan.full_state, modules, lora.rank, name)
        model.parallel_plan = dataclasses.replace(plan, full_state={**plan.full_state, **extra},
                                                  full_parameters=tuple(plan.full_parameters) + tuple(extra))
    return modules


def _cast_frozen(model: nn.Module, base_dtype: str) -> None:
    """The frozen linears' weights (the base's bulk) in `base_dtype` ("auto": left as they are). Norm gains,
    biases and embeddings keep their dtype: the norms run in fp32 under autocast and refuse mixed parameters."""
    if str(base_dtype) == "auto":
        return
    from magi_train.model.lora import linear_features

    dtype = getattr(torch, str(base_dtype))
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (linear_features(module) is not None and isinstance(w, nn.Parameter) and not w.requires_grad
                    and w.is_floating_point() and w.dtype != dtype):
                w.data = w.data.to(dtype)


def adapter_parameter_names(models: Sequence[nn.Module]) -> List[str]:
    """The adapter parameter names of the whole model, from the plan `apply_train_lora` recorded."""
    from magi_train.model.lora import is_lora_parameter

    return [n for n in plan_of(models[0]).full_parameters if is_lora_parameter(n)] if models else []


def frozen_fingerprint(models: Sequence[nn.Module], parallel) -> Optional[List[float]]:
    """[sum, sum of squares] in float64 of every base parameter of the whole model, each element counted once
    (tensor-parallel replicas once; summed over tp and pp): tells on resume that the base rebuilt from
    trainer.init_from (or trainer.seed) is the one the adapters were trained on. Collective over tp and pp.
    Call before `apply_train_lora` (the names must still be the plain model's)."""
    import torch.distributed as dist

    from magi_train.parallel.plan import shard_spec

    acc = torch.zeros(2, dtype=torch.float64)
    for model in models:
        full = plan_of(model).full_shapes
        for name, p in model.named_parameters():
            if shard_spec(model, name, full[name]).writer:
                v = p.detach().double().cpu()
                acc += torch.stack([v.sum(), v.square().sum()])
    acc = acc.to(parallel.device)
    for group, size in ((parallel.groups.tp, parallel.tp), (parallel.groups.pp, parallel.pp)):
        if size > 1:
            dist.all_reduce(acc, group=group)
    return acc.cpu().tolist()
