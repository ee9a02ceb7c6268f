"""Parameters of the training memory plan (memory_plan.py): what every rank holds of the DiT's weights, which of
them train, and the AdamW state `ShardedAdamW` keeps for the trainable ones.

What a run trains (`Tuning`):
* full training / full fine-tuning: every parameter, optionally with a frozen part (`frozen`: fnmatch patterns
  over parameter names). A frozen parameter keeps its weights and nothing else: ShardedAdamW takes only
  parameters with requires_grad (parallel/zero.py), so it has no gradient bucket, no moments, no master.
* LoRA (`lora_rank` > 0, config `lora.*`): the base is frozen; every linear whose module name matches a pattern
  of `lora_targets` (fnmatch over the names of `build_dit(...).named_modules()`, as model/lora.py `apply_lora`
  matches them) gets lora_A (rank x in) and lora_B (out x rank), fp32 parameters. Under tensor parallelism they
  are split like their base (parallel/lora.py): a column-parallel base (split along out) splits B along out and
  replicates A, a row-parallel base (split along in) splits A along in and replicates B. The adapters train as
  any fp32 parameter does: fp32 gradient buckets, fp32 exp_avg / exp_avg_sq, no master (an fp32 parameter is its
  own master), in buckets owned over the data x context parallel group.
* The frozen base's dtype (`base_dtype`, config lora.base_dtype): auto keeps model.params_dtype; float32 /
  bfloat16 / float16 store every frozen parameter of the model dtype in it (the fp32 list of model/dit.py FP32_MODULES,
  embedders, head, RoPE and some norms, stays fp32: assumed, as the trainer keeps those in fp32 for its numerics);
  float8 (planner only, not a lora.base_dtype choice yet) stores the 2-D weights of the transformer layers'
  linears in 1 byte each (plus one fp32 scale per tensor), the rest as bfloat16, and assumes the fp8 linear saves
  its fp8 weight for backward (dequantising again there), not a dequantised copy.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from magi_train.config import schema as _schema
from magi_train.config.schema import ModelConfig
from magi_train.observability.memory_plan_layout import BYTES, F32, Layout
from magi_train.parallel.sharding import tp_shard_spec
from magi_train.parallel.zero import assign_owners

# lora.targets' default: the schema's (issue 18 spec), read defensively while the schema may not define it yet.
DEFAULT_LORA_TARGETS: Tuple[str, ...] = tuple(getattr(_schema, "DEFAULT_LORA_TARGETS", (
    "*.self_attention.linear_qkv.q", "*.self_attention.linear_qkv.k", "*.self_attention.linear_qkv.v",
    "*.self_attention.linear_qkv.qx", "*.self_attention.linear_proj", "*.mlp.linear_fc1", "*.mlp.linear_fc2")))
# Frozen-base dtypes the planner models (lora.base_dtype's choices, and float8, which the trainer does not have yet:
# 1 byte for the layers' linear weights).
BASE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float8")
FP8 = 1
_LAYER = "videodit_blocks.layers."


@dataclass(frozen=True)
class Tuning:
    """What the run trains (see the module docstring); the default is full training of every parameter."""

    lora_rank: int = 0
    lora_targets: Tuple[str, ...] = DEFAULT_LORA_TARGETS
    lora_dropout: float = 0.0
    base_dtype: str = "auto"  # of the frozen parameters: auto | float32 | bfloat16 | float16 | float8
    frozen: Tuple[str, ...] = ()  # full training: fnmatch patterns over parameter names that stay frozen

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora.rank={self.lora_rank} must be >= 0 (0 = full training)")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype={self.base_dtype!r} is not one of {BASE_DTYPES}")
        if self.lora_rank and self.frozen:
            raise ValueError("frozen patterns are for full training: with lora.rank > 0 the whole base is frozen")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("lora.targets is empty: LoRA needs at least one target pattern")

    @property
    def lora(self) -> bool:
        return self.lora_rank > 0

    @staticmethod
    def of_config(cfg) -> "Tuning":
        """The tuning of a TrainConfig; `lora` is read with getattr and the spec's defaults (a config without
        the section trains fully)."""
        lora = getattr(cfg, "lora", None)
        rank = int(getattr(lora, "rank", 0) or 0)
        if rank <= 0:
            return Tuning()
        return Tuning(rank, tuple(getattr(lora, "targets", DEFAULT_LORA_TARGETS)),
                      float(getattr(lora, "dropout", 0.0)), str(getattr(lora, "base_dtype", "auto")))

    def describe(self) -> str:
        if self.lora:
            base = "" if self.base_dtype == "auto" else f" base={self.base_dtype}"
            drop = f" dropout={self.lora_dropout:g}" if self.lora_dropout else ""
            return f"LoRA rank={self.lora_rank}{drop}{base}"
        return "full training" + (f" (frozen: {', '.join(self.frozen)})" if self.frozen else "")


@dataclass(frozen=True)
class ParamInfo:
    name: str
    full_shape: Tuple[int, ...]
    itemsize: int
    trainable: bool = True
    lora_of: str = ""  # an adapter's base weight (its TP split follows it)
    base_shape: Tuple[int, ...] = ()  # that weight's full (out, in) shape


def lora_modules(cfg: ModelConfig, targets: Sequence[str]) -> Dict[str, Tuple[int, int]]:
    """{module name: (in_features, out_features)} of the DiT's linears that `targets` match (fnmatch over the
    names of `build_dit(cfg).named_modules()`), in module order. A pattern that matches no linear is an error
    naming it (as apply_lora does)."""
    from magi_train.model.dit import build_dit  # torch + megatron: only when needed
    from magi_train.model.lora import linear_features  # what apply_lora can wrap

    model = build_dit(replace(cfg, num_layers=1), device="meta")
    first = _LAYER + "0."
    before: List[Tuple[str, Tuple[int, int]]] = []
    layer: List[Tuple[str, Tuple[int, int]]] = []
    after: List[Tuple[str, Tuple[int, int]]] = []
    for name, module in model.named_modules():
        features = linear_features(module)
        if features is not None:
            where = layer if name.startswith(first) else (after if layer else before)
            where.append((name, features))
    # Model order: the layers' linears layer by layer, between the embedders' and the head's.
    linears = dict(before + [(f"{_LAYER}{i}." + n[len(first):], f) for i in range(cfg.num_layers) for n, f in layer]
                   + after)
    chosen: Dict[str, Tuple[int, int]] = {}
    for pattern in targets:
        hits = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"lora.targets pattern {pattern!r} matches no linear of model {cfg.name!r} (linears are "
                             f"named like {first}self_attention.linear_qkv.q, {first}mlp.linear_fc1)")
        chosen.update((n, linears[n]) for n in hits)
    return {n: chosen[n] for n in linears if n in chosen}


def _base_itemsize(name: str, shape: Tuple[int, ...], itemsize: int, base_dtype: str) -> int:
    """Bytes per element of a frozen parameter stored in `base_dtype` (see the module docstring)."""
    from magi_train.model.dit import FP32_MODULES

    if base_dtype == "auto" or any(part in FP32_MODULES for part in name.split(".")):
        return itemsize
    if base_dtype == "float8":
        return FP8 if name.startswith(_LAYER) and name.endswith(".weight") and len(shape) == 2 else BYTES["bfloat16"]
    return BYTES[base_dtype]


@dataclass(frozen=True)
class ModelParams:
    """Every parameter of the full model (TP = 1) with its run-time dtype and whether it trains; built once per
    preset and tuning."""

    cfg: ModelConfig
    params: Tuple[ParamInfo, ...]
    tuning: Tuning = Tuning()
    # Memo of `stage` and `optimizer` by layout sizes: a layout search asks for the same ones many times.
    _memo: Dict[tuple, object] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def of(cfg: ModelConfig, tuning: Optional[Tuning] = None) -> "ModelParams":
        """Shapes from a meta-device build of a one-layer model, its layer repeated num_layers times: every layer
        of the DiT has the same parameters, and building 48 of them takes seconds. `tuning` freezes, re-types
        and adds (LoRA adapters) parameters."""
        from magi_train.model.dit import build_dit, module_dtype_plan  # torch + megatron: only when needed

        tuning = tuning or Tuning()
        model = build_dit(replace(cfg, num_layers=1), device="meta")
        plan = module_dtype_plan(model)
        first = _LAYER + "0."
        out = []
        for name, p in model.named_parameters():
            names = [f"{_LAYER}{i}." + name[len(first):] for i in range(cfg.num_layers)] \
                if name.startswith(first) else [name]
            out.extend(ParamInfo(n, tuple(p.shape), plan[name].itemsize) for n in names)
        if tuning.lora:
            out = [replace(p, trainable=False, itemsize=_base_itemsize(p.name, p.full_shape, p.itemsize, tuning.base_dtype))
                   for p in out]
            # float8 weights carry one fp32 scale each.
            out += [ParamInfo(p.name + "_scale", (1,), F32, False) for p in out if p.itemsize == FP8]
            r = tuning.lora_rank
            for module, (fan_in, fan_out) in lora_modules(cfg, tuning.lora_targets).items():
                base = module + ".weight"
                shape = (fan_out, fan_in)
                out.append(ParamInfo(module + ".lora_A.weight", (r, fan_in), F32, True, base, shape))
                out.append(ParamInfo(module + ".lora_B.weight", (fan_out, r), F32, True, base, shape))
        elif tuning.frozen:
            out = [replace(p, trainable=not any(fnmatch.fnmatchcase(p.name, f) for f in tuning.frozen)) for p in out]
            for pattern in tuning.frozen:
                if not any(fnmatch.fnmatchcase(p.name, pattern) for p in out):
                    raise ValueError(f"frozen pattern {pattern!r} matches no parameter of model {cfg.name!r}")
        return ModelParams(cfg, tuple(out), tuning)

    def stage(self, layout: Layout, stage: int) -> List[Tuple[str, int, int]]:
        """(name, local numel, itemsize) of the parameters pipeline stage `stage` holds on tensor-parallel rank 0
        (every tp rank holds the same sizes), frozen ones included."""
        key = ("stage", layout.tp, layout.pp, stage)
        if key not in self._memo:
            self._memo[key] = self._stage(layout, stage)
        return [(name, numel, item) for name, numel, item, _ in self._memo[key]]

    def trainable(self, layout: Layout, stage: int) -> List[Tuple[str, int, int]]:
        """`stage` of the parameters that train (the ones ShardedAdamW and the gradient buckets hold)."""
        self.stage(layout, stage)
        return [(name, numel, item) for name, numel, item, train in self._memo[("stage", layout.tp, layout.pp, stage)]
                if train]

    def optimizer(self, layout: Layout, stage: int) -> int:
        """`optimizer_bytes` of the stage's trainable parameters over the data x context parallel group."""
        key = ("optimizer", layout.tp, layout.pp, stage, layout.dp * layout.cp)
        if key not in self._memo:
            self._memo[key] = optimizer_bytes(self.trainable(layout, stage), layout.dp * layout.cp)
        return self._memo[key]

    def totals(self, layout: Layout, stage: int) -> Tuple[int, int, int, int, int]:
        """(bytes of every parameter held, numel and bytes of the trainable ones, the largest owner's bytes of
        trainable parameters over the data x context parallel group, the largest trainable numel) of the stage."""
        group = layout.dp * layout.cp
        key = ("totals", layout.tp, layout.pp, stage, group)
        if key not in self._memo:
            held, trained = self.stage(layout, stage), self.trainable(layout, stage)
            owned = 0
            if trained:
                owner = assign_owners([(name, _Sized(numel)) for name, numel, _ in trained], group)
                owned = max(sum(numel * item for name, numel, item in trained if owner[name] == r) for r in range(group))
            self._memo[key] = (sum(numel * item for _, numel, item in held), sum(numel for _, numel, _ in trained),
                               sum(numel * item for _, numel, item in trained), owned,
                               max((numel for _, numel, _ in trained), default=0))
        return self._memo[key]

    def adapters(self, layout: Layout, stage: int) -> Dict[int, List[Tuple[str, int, int, int]]]:
        """LoRA adapters of the stage on tensor-parallel rank 0 by layer index (-1: modules outside the layers):
        (module name, rank, local in_features of A, local out_features of B)."""
        key = ("adapters", layout.tp, layout.pp, stage)
        if key not in self._memo:
            held = {name for name, _, _ in self.stage(layout, stage)}
            out: Dict[int, List[Tuple[str, int, int, int]]] = {}
            for p in self.params:
                if p.lora_of and p.name in held and p.name.endswith(".lora_A.weight"):
                    module = p.name[: -len(".lora_A.weight")]
                    rank, fan_in = _local_shape(p, self.cfg, layout.tp)
                    fan_out = _local_shape(replace(p, name=module + ".lora_B.weight",
                                                   full_shape=(p.base_shape[0], rank)), self.cfg, layout.tp)[0]
                    layer = int(module.split(".")[2]) if module.startswith(_LAYER) else -1
                    out.setdefault(layer, []).append((module, rank, fan_in, fan_out))
            self._memo[key] = out
        return self._memo[key]

    def _stage(self, layout: Layout, stage: int) -> List[Tuple[str, int, int, bool]]:
        cfg = self.cfg
        per = cfg.num_layers // layout.pp
        layers = range(stage * per, (stage + 1) * per)
        out = []
        for p in self.params:
            if p.name.startswith(_LAYER):
                if int(p.name.split(".")[2]) not in layers:
                    continue
            elif p.name.startswith("videodit_blocks.final_layernorm") or p.name.startswith("final_linear"):
                if stage != layout.pp - 1:
                    continue
            elif stage != 0:  # embedders and RoPE live on the first stage
                continue
            local = _local_shape(p, cfg, layout.tp)
            numel = 1
            for s in local:
                numel *= s
            out.append((p.name, numel, p.itemsize, p.trainable))
        return out


def _local_shape(p: ParamInfo, cfg: ModelConfig, tp: int) -> Tuple[int, ...]:
    if not p.lora_of:
        return tp_shard_spec(p.name, p.full_shape, cfg, 0, tp).local_shape
    out_local, in_local = tp_shard_spec(p.lora_of, p.base_shape, cfg, 0, tp).local_shape
    if p.name.endswith(".lora_A.weight"):
        return (p.full_shape[0], in_local)  # split along in under a row-parallel base, else whole
    return (out_local, p.full_shape[1])  # split along out under a column-parallel base, else whole


@dataclass(frozen=True)
class _Sized:
    """What `assign_owners` reads of a parameter: its numel."""

    n: int

    def numel(self) -> int:
        return self.n


def optimizer_bytes(params: Sequence[Tuple[str, int, int]], ranks: int) -> int:
    """AdamW state of the most loaded of `ranks` owner ranks, assigned exactly as `ShardedAdamW` does (pass the
    trainable parameters only: it builds its buckets of those)."""
    if not params:
        return 0
    owner = assign_owners([(name, _Sized(numel)) for name, numel, _ in params], ranks)
    load = [0] * ranks
    for name, numel, itemsize in params:
        master = numel * F32 if itemsize != F32 else 0  # the fp32 master of a bf16 parameter
        load[owner[name]] += 2 * numel * F32 + master + F32  # exp_avg, exp_avg_sq (fp32), master, step
    return max(load)
