"""Training memory per GPU for a model preset and a parallel layout (tools/estimate_memory.py prints it).

What one rank holds, read from the training code:

* Parameters: every parameter of the rank's pipeline stage, tensor-parallel local shape (`tp_shard_spec`), in
  its run-time dtype: `params_dtype`, except the fp32 list `FP32_MODULES` (embedders, final linear, RoPE,
  self-attention QK-norms, post-norms).
* Gradients: the fp32 buckets of parallel/grad_buckets.py, 4 bytes per parameter whatever its dtype (the
  default `optimizer.grad_reduce_dtype=float32`), all of them held while backward fills them (a non-owner
  drops a bucket once it is sent, the owner keeps its share). A parameter's own `.grad`, before the hook moves
  it into its bucket, is a backward temporary (not counted, see below).
* Optimizer: `ShardedAdamW` (parallel/zero.py) gives every bucket of parameters to one owner rank of the data x
  context parallel group (greedy by size); the owner keeps fp32 exp_avg and exp_avg_sq, an fp32 master copy of
  each parameter that is not fp32, and a 4-byte step scalar (host memory on GPUs; counted here, a few KiB).
  The worst rank is reported.
* After backward (the activations are gone by then): `global_grad_norm` (parallel/grads.py) squares each
  gradient in float64 (two copies of the largest one), and the owners' broadcast of updated parameters
  flattens one owner's parameters at a time (at most the largest owner's share).
* Activations: the tensors autograd saves for backward, counted tensor by tensor from the layer code
  (`layer_activations`), per micro-batch, times the layers of the stage, times the micro-batches a 1F1B
  pipeline keeps in flight (the first stage: pp of them), plus the embedder/head tensors, plus the
  working set of backward (one layer recomputed under full recompute, one attention under selective, the
  largest score gradient of the torch kernel).

Dtypes follow the code: precision "fp32" runs the model in its params dtype; "bf16" is CUDA autocast
(linears in bf16, layer_norm and softmax in fp32). Two attention kernels: "flash" (MagiAttention /
flash-attn: saves q, k, v, the output and the fp32 log-sum-exp) and "torch" (`range_attention`, the exact CPU
kernel: it keeps fp32 scores of every (query range, key range) slice and GQA-expanded keys/values).
The configured `model.attention_backend` (`MicroBatch.backend`) adds what it derives from the attention ranges
(`attention_metadata`): sdpa a dense boolean Tq x Tk mask per call (a transient of the working set: 4 GiB at
65,536 tokens), flex one BlockMask per forward and micro-batch (int32 tile lists, O((T / 128)^2), and two int64
per-token bounds), flash its varlen indices (int32 cu_seqlens, an int64 index of the keys it gathers) and, per
layer, the gathered key / value copies it saves instead of the keys (model/flash.py), torch and magi the ranges
themselves (O(slices)). sdpa saves like the torch kernel over one slice of every query and every key.
Context parallelism is modelled as Ulysses (cp_impl=ulysses; MagiAttention's dispatch holds the same bytes).

Fine-tuning (`Tuning`, memory_plan_params.py): full fine-tuning is training as above, optionally with a frozen
part; LoRA freezes the base (in lora.base_dtype) and trains fp32 adapters. A frozen parameter holds its weights
only: no gradient bucket, no AdamW moments, no master (ShardedAdamW takes the parameters with requires_grad).
Under LoRA backward still runs through every layer for the input gradients, so a frozen layer saves nearly what
a trained one does (the base linears save their inputs as in full training); `frozen_base_layer_activations`
drops what only the base's parameter gradients needed (the adaLN path, the gate branches, RoPE's inputs, the
caption-key path) and `lora_activations` adds the adapters' tensors. A frozen part of a full fine-tune is counted
with full training's activations (a little more than it saves). trainer.recompute_layers (the first N layers of
a stage recompute, the others not) is modelled. Activation offload and CPU offload of optimizer state are not
in the trainer, so not modelled; memory_plan_fit.py searches the settings that fit one budget.

Not counted: the CUDA caching allocator's fragmentation and the CUDA/NCCL context (a few GiB: keep a margin),
communication buffers other than the gradient all-reduce, tensors of a few bytes per chunk row, and backward
temporaries other than the score gradient (gradients of a layer's activations live one op at a time).
"""

from __future__ import annotations

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from magi_train.config.schema import ModelConfig, ParallelConfig
from magi_train.config.validate import check_parallel
from magi_train.observability.memory_plan_activations import (  # noqa: F401  (the planner's API, re-exported)
    _attention_kernel, _flex_mask_bytes, _Sizes, _sizes, attention_inputs, attention_metadata, boundary_activations,
    frozen_base_boundary_savings, frozen_base_layer_activations, layer_activations, lora_activations,
)
from magi_train.observability.memory_plan_layout import (  # noqa: F401
    ATTENTION, BACKEND_FAMILY, BYTES, F32, FLEX_BLOCK, GIB, PRECISIONS, RECOMPUTE, Layout, MicroBatch,
)
from magi_train.observability.memory_plan_params import (  # noqa: F401
    BASE_DTYPES, DEFAULT_LORA_TARGETS, ModelParams, ParamInfo, Tuning, _Sized, lora_modules, optimizer_bytes,
)



@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded GPU (the pipeline stage with the largest total)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    # After backward, when the activations are gone: the flat copy of one owner's parameters that it
    # broadcasts, or the float64 square of the largest gradient in the gradient norm, whichever is larger.
    after_backward: int
    stage: int = 0
    layers: int = 0  # layers of the stage
    in_flight: int = 1  # micro-batches whose activations the stage holds at once
    per_layer: int = 0  # saved bytes of one layer and one micro-batch (after recompute)
    working: int = 0  # backward's working set inside one layer (recomputed forward, score gradients)
    attention_metadata: int = 0  # what the backend derives from the ranges: held per micro-batch + one call's
    lora_activations: int = 0  # what the stage's adapters save per micro-batch (in `activations`)
    frozen: int = 0  # bytes of the frozen parameters (in `params`)
    terms: Dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + max(self.activations, self.after_backward)

    def rows(self) -> List[Tuple[str, int]]:
        return [
            ("parameters", self.params),
            ("gradients", self.grads),
            ("optimizer state", self.optimizer),
            (f"activations ({self.in_flight} micro-batch(es) x {self.layers} layers + working set)", self.activations),
            ("after backward: parameter broadcast copy / norm temporaries", self.after_backward),
            ("total", self.total),
        ]


def estimate(cfg: ModelConfig, layout: Layout, mb: MicroBatch, params: Optional[ModelParams] = None,
             tuning: Optional[Tuning] = None) -> MemoryEstimate:
    """Memory of the most loaded rank. Only the first and the last pipeline stage can be it: the first holds
    the embedders and the most micro-batches in flight, the last the head; a middle stage holds the first
    stage's layers with fewer micro-batches in flight. `tuning` (or that of `params`): what trains."""
    if params is not None and tuning is not None and params.tuning != tuning:
        raise ValueError(f"params were built for {params.tuning.describe()}, not {tuning.describe()}")
    params = params or ModelParams.of(cfg, tuning)
    if cfg.num_layers % layout.pp:
        raise ValueError(f"num_layers ({cfg.num_layers}) is not divisible by pp ({layout.pp})")
    best = None
    for stage in sorted({0, layout.pp - 1}):
        est = _stage_estimate(cfg, layout, mb, params, stage)
        if best is None or est.total > best.total:
            best = est
    return best


def _stage_estimate(cfg: ModelConfig, layout: Layout, mb: MicroBatch, params: ModelParams, stage: int) -> MemoryEstimate:
    p_bytes, trained_numel, trained_bytes, owned_bytes, largest = params.totals(layout, stage)
    self_in, cross_in = attention_inputs(cfg, layout, mb)
    z = _sizes(cfg, layout, mb)
    md = BYTES[cfg.params_dtype]
    lora = params.tuning.lora
    adapters = params.adapters(layout, stage) if lora else {}
    dropout = params.tuning.lora_dropout
    cache: Dict[tuple, tuple] = {}

    def layer_bytes(here) -> tuple:
        """(parts, the adapters' bytes, saved without recompute, saved when recomputed, recompute's working set)
        of one layer with the adapters `here`; memoised by their shapes (every layer is usually the same)."""
        key = tuple((name.split(".", 3)[-1], *rest) for name, *rest in here)  # the name within a layer
        if key not in cache:
            names = [name for name, *_ in here]
            parts = frozen_base_layer_activations(cfg, layout, mb, names) if lora else layer_activations(cfg, layout, mb)
            extra = lora_activations(cfg, layout, mb, here, dropout)
            full = sum(parts.values()) + extra
            if layout.recompute == "full":
                # checkpoint keeps the layer's input only; one layer's forward re-runs during its backward.
                recomputed, rc_working = z.Tr * cfg.hidden_size * md, full
            elif layout.recompute == "selective":
                recomputed = full - parts["self_attention"] - parts["cross_attention"] + self_in + cross_in
                rc_working = max(parts["self_attention"] - self_in, parts["cross_attention"] - cross_in)
            else:
                recomputed, rc_working = full, 0
            cache[key] = (parts, extra, full, recomputed, rc_working)
        return cache[key]

    layers = cfg.num_layers // layout.pp
    k = layout.recomputed_layers(layers)  # the first k layers of the stage recompute (set_recompute)
    per = [layer_bytes(adapters.get(stage * layers + i, [])) for i in range(layers)]
    saved = sum(rec if i < k else full for i, (_, _, full, rec, _) in enumerate(per))
    working = max((w for _, _, _, _, w in per[:k]), default=0)
    layer = per[0][0]
    per_layer = per[0][3] if k else per[0][2]
    if mb.attention == "torch":
        # Backward of one slice: the gradients of its scores and probabilities (fp32); sdpa's one slice is all.
        widest = z.Ta * z.Ta if mb.attention_backend == "sdpa" else z.widest_slice
        working += 2 * widest * z.hq_a * F32
    metadata, transient = attention_metadata(cfg, layout, mb)
    working += transient
    in_flight = layout.pp - stage  # 1F1B: stage s holds pp - s micro-batches before its first backward
    boundary = boundary_activations(cfg, layout, mb, stage == 0, stage == layout.pp - 1)
    if lora:
        outside = adapters.get(-1, [])
        boundary += lora_activations(cfg, layout, mb, outside, dropout)  # adapters outside the layers
        adapted = [name for group in adapters.values() for name, *_ in group]
        boundary -= frozen_base_boundary_savings(cfg, layout, mb, adapted, stage == 0)
    activations = in_flight * (saved + boundary + metadata) + working
    broadcast_copy = owned_bytes if layout.dp * layout.cp > 1 else 0  # one owner's flat parameters
    norm_squares = 2 * 8 * largest  # grad.double().square() of the largest gradient
    buckets = trained_numel * F32
    return MemoryEstimate(
        params=p_bytes, grads=buckets, optimizer=params.optimizer(layout, stage), activations=activations,
        after_backward=max(broadcast_copy, norm_squares), stage=stage, layers=layers, in_flight=in_flight,
        per_layer=per_layer, working=working, attention_metadata=metadata + transient, terms=layer,
        lora_activations=sum(extra for _, extra, _, _, _ in per),
        frozen=p_bytes - trained_bytes,
    )


# ---------------------------------------------------------------------------------------------- layout search
def candidate_layouts(cfg: ModelConfig, gpus: int, mb: MicroBatch, precision: str,
                      recompute: Sequence[str] = RECOMPUTE) -> Iterator[Layout]:
    """Every layout of `gpus` GPUs the trainer accepts: tp in 1, 2, 4, 8, cp and pp dividing what is left,
    the token sequence divisible by tp x cp, each with and without sequence parallel (tp > 1)."""
    for tp in (1, 2, 4, 8):
        for cp in range(1, gpus // tp + 1):
            for pp in range(1, gpus // (tp * cp) + 1):
                if gpus % (tp * cp * pp) or mb.seq_length % (tp * cp):
                    continue
                parallel = ParallelConfig(tp=tp, cp=cp, pp=pp, cp_impl="ulysses")
                if list(check_parallel(parallel, cfg)):
                    continue
                for sp in ((False, True) if tp > 1 else (False,)):
                    for rc in recompute:
                        yield Layout(tp, cp, pp, gpus // (tp * cp * pp), sp, rc, precision)


def estimates(cfg: ModelConfig, gpus: int, mb: MicroBatch, precision: str = "bf16",
              recompute: Sequence[str] = RECOMPUTE, params: Optional[ModelParams] = None
              ) -> Iterator[Tuple[Layout, MemoryEstimate]]:
    """(layout, estimate) of every candidate layout of `gpus` GPUs."""
    params = params or ModelParams.of(cfg)
    for layout in candidate_layouts(cfg, gpus, mb, precision, recompute):
        yield layout, estimate(cfg, layout, mb, params)


def search(cfg: ModelConfig, gpus: int, gpu_bytes: int, mb: MicroBatch, precision: str = "bf16",
           recompute: Sequence[str] = RECOMPUTE, params: Optional[ModelParams] = None
           ) -> Optional[Tuple[Layout, MemoryEstimate]]:
    """The smallest model-parallel layout (fewest tp x cp x pp GPUs, then least memory) whose total fits
    `gpu_bytes`; None when none does."""
    fitting = [(layout.model_parallel, est.total, layout, est)
               for layout, est in estimates(cfg, gpus, mb, precision, recompute, params) if est.total <= gpu_bytes]
    if not fitting:
        return None
    best = min(fitting, key=lambda row: row[:2])
    return best[2], best[3]


def with_defaults(mb: MicroBatch, cfg: ModelConfig) -> MicroBatch:
    """`mb` with its 0 fields resolved from the model (for printing)."""
    L = mb.caption_length or cfg.caption_max_length
    return replace(mb, chunk_tokens=mb.chunk_tokens or mb.seq_length, caption_length=L, caption_tokens=mb.caption_tokens or L)
