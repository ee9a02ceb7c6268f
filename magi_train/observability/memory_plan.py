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

Not counted: the CUDA caching allocator's fragmentation and the CUDA/NCCL context (a few GiB: keep a margin),
communication buffers other than the gradient all-reduce, tensors of a few bytes per chunk row, and backward
temporaries other than the score gradient (gradients of a layer's activations live one op at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from magi_train.config.choices import Precision, Recompute, choices
from magi_train.config.schema import ModelConfig, ParallelConfig
from magi_train.config.validate import check_parallel
from magi_train.observability.flops import block_causal_area
from magi_train.parallel.sharding import tp_shard_spec
from magi_train.parallel.zero import assign_owners

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
F32 = 4
# trainer.recompute / trainer.precision values (their enums are the one list); the search tries the least
# recompute first.
RECOMPUTE = (Recompute.none.value, Recompute.selective.value, Recompute.full.value)
PRECISIONS = tuple(choices(Precision))
ATTENTION = ("flash", "torch")  # kernels the estimate models (see the module docstring), not a config field
# model.attention_backend values whose range-derived memory is counted, with the kernel family each saves like.
BACKEND_FAMILY = {"torch": "torch", "sdpa": "torch", "flex": "flash", "flash": "flash", "magi": "flash"}
FLEX_BLOCK = 128  # model/flex.py BLOCK: FlexAttention's tile


@dataclass(frozen=True)
class Layout:
    """One rank's view of a parallel layout and the trainer settings that change memory."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # trainer.recompute: none | selective | full (every layer)
    precision: str = "bf16"  # trainer.precision: fp32 (no autocast) | bf16 (autocast)

    def __post_init__(self) -> None:
        if min(self.tp, self.cp, self.pp, self.dp) < 1:
            raise ValueError(f"parallel sizes must be >= 1: {self}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r} is not one of {RECOMPUTE}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {PRECISIONS}")

    @property
    def model_parallel(self) -> int:
        return self.tp * self.cp * self.pp

    @property
    def gpus(self) -> int:
        return self.model_parallel * self.dp

    def describe(self) -> str:
        sp = " sp" if self.sequence_parallel else ""
        return (f"tp={self.tp} cp={self.cp} pp={self.pp} dp={self.dp}{sp} recompute={self.recompute} "
                f"precision={self.precision}")


@dataclass(frozen=True)
class MicroBatch:
    """What one forward of one rank's pipeline stage sees."""

    seq_length: int  # video tokens of one sample (dense) or of one packed sequence
    micro_batch_size: int = 1  # samples (sequences) per micro-batch
    chunk_tokens: int = 0  # tokens per chunk (block-causal attention, one caption/condition row each); 0 = seq_length
    caption_length: int = 0  # caption rows of each chunk as padded (data.caption_length); 0 = model.caption_max_length
    caption_tokens: int = 0  # valid caption tokens of each chunk (cross-attention keys); 0 = caption_length
    attention: str = "flash"  # flash | torch (see the module docstring)
    backend: str = ""  # model.attention_backend (BACKEND_FAMILY); "" = magi for flash attention, torch for torch

    def __post_init__(self) -> None:
        if self.seq_length < 1 or self.micro_batch_size < 1:
            raise ValueError(f"seq_length and micro_batch_size must be >= 1: {self}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION}")
        if self.backend and self.backend not in BACKEND_FAMILY:
            raise ValueError(f"backend={self.backend!r} (model.attention_backend) is not one of "
                             f"{sorted(BACKEND_FAMILY)}; auto is one of them per device (model/spec.py)")
        if self.backend and BACKEND_FAMILY[self.backend] != self.attention:
            raise ValueError(f"backend={self.backend!r} saves like the {BACKEND_FAMILY[self.backend]} kernel: "
                             f"use attention={BACKEND_FAMILY[self.backend]!r} with it")

    @property
    def attention_backend(self) -> str:
        return self.backend or ("magi" if self.attention == "flash" else "torch")

    def chunk_sizes(self) -> List[int]:
        """Tokens of each chunk of one sample (the last one may be shorter)."""
        c = self.chunk_tokens or self.seq_length
        return [min(c, self.seq_length - start) for start in range(0, self.seq_length, c)]


@dataclass(frozen=True)
class ParamInfo:
    name: str
    full_shape: Tuple[int, ...]
    itemsize: int


@dataclass(frozen=True)
class ModelParams:
    """Every parameter of the full model (TP = 1) with its run-time dtype; built once per preset."""

    cfg: ModelConfig
    params: Tuple[ParamInfo, ...]
    # Memo of `stage` and `optimizer` by layout sizes: a layout search asks for the same ones many times.
    _memo: Dict[tuple, object] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def of(cfg: ModelConfig) -> "ModelParams":
        """Shapes from a meta-device build of a one-layer model, its layer repeated num_layers times: every layer
        of the DiT has the same parameters, and building 48 of them takes seconds."""
        from magi_train.model.dit import build_dit, module_dtype_plan  # torch + megatron: only when needed

        model = build_dit(replace(cfg, num_layers=1), device="meta")
        plan = module_dtype_plan(model)
        first = "videodit_blocks.layers.0."
        out = []
        for name, p in model.named_parameters():
            names = [f"videodit_blocks.layers.{i}." + name[len(first):] for i in range(cfg.num_layers)] \
                if name.startswith(first) else [name]
            out.extend(ParamInfo(n, tuple(p.shape), plan[name].itemsize) for n in names)
        return ModelParams(cfg, tuple(out))

    def stage(self, layout: Layout, stage: int) -> List[Tuple[str, int, int]]:
        """(name, local numel, itemsize) of the parameters pipeline stage `stage` holds on tensor-parallel rank 0
        (every tp rank holds the same sizes)."""
        key = ("stage", layout.tp, layout.pp, stage)
        if key not in self._memo:
            self._memo[key] = self._stage(layout, stage)
        return self._memo[key]

    def optimizer(self, layout: Layout, stage: int) -> int:
        """`optimizer_bytes` of the stage's parameters over the data x context parallel group."""
        key = ("optimizer", layout.tp, layout.pp, stage, layout.dp * layout.cp)
        if key not in self._memo:
            self._memo[key] = optimizer_bytes(self.stage(layout, stage), layout.dp * layout.cp)
        return self._memo[key]

    def _stage(self, layout: Layout, stage: int) -> List[Tuple[str, int, int]]:
        cfg = self.cfg
        per = cfg.num_layers // layout.pp
        layers = range(stage * per, (stage + 1) * per)
        out = []
        for p in self.params:
            if p.name.startswith("videodit_blocks.layers."):
                if int(p.name.split(".")[2]) not in layers:
                    continue
            elif p.name.startswith("videodit_blocks.final_layernorm") or p.name.startswith("final_linear"):
                if stage != layout.pp - 1:
                    continue
            elif stage != 0:  # embedders and RoPE live on the first stage
                continue
            local = tp_shard_spec(p.name, p.full_shape, cfg, 0, layout.tp).local_shape
            numel = 1
            for s in local:
                numel *= s
            out.append((p.name, numel, p.itemsize))
        return out


@dataclass(frozen=True)
class _Sized:
    """What `assign_owners` reads of a parameter: its numel."""

    n: int

    def numel(self) -> int:
        return self.n


def optimizer_bytes(params: Sequence[Tuple[str, int, int]], ranks: int) -> int:
    """AdamW state of the most loaded of `ranks` owner ranks, assigned exactly as `ShardedAdamW` does."""
    owner = assign_owners([(name, _Sized(numel)) for name, numel, _ in params], ranks)
    load = [0] * ranks
    for name, numel, itemsize in params:
        master = numel * F32 if itemsize != F32 else 0  # the fp32 master of a bf16 parameter
        load[owner[name]] += 2 * numel * F32 + master + F32  # exp_avg, exp_avg_sq (fp32), master, step
    return max(load)


# ---------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Sizes:
    """Per-rank sizes of one micro-batch (the notation of `layer_activations`)."""

    T: int  # tokens of this context-parallel slice (rows of the column linears)
    Tr: int  # residual-stream tokens (T / tp under sequence parallel)
    Ta: int  # tokens attention sees after the Ulysses all-to-all (every token of the micro-batch)
    R: int  # chunk rows (condition / caption rows)
    C: int  # valid caption tokens over the rows (cross-attention keys)
    C_q: int  # caption tokens of the rows this rank's queries touch (context parallel cuts rows)
    Q: int  # query width on this rank (heads / tp x head dim)
    K: int  # key (or value) width on this rank
    hq: int  # query heads on this rank
    hkv: int  # KV heads on this rank
    hq_a: int  # query heads per rank inside self-attention (hq / cp)
    hkv_a: int  # KV heads per rank inside self-attention (replicated up to cp)
    F: int  # ffn width on this rank
    self_area: int  # (query, key) pairs of self-attention, block-causal per sample
    self_keys: int  # key tokens summed over the (query range, key range) slices
    widest_slice: int  # (query, key) pairs of the largest self-attention slice


def _sizes(cfg: ModelConfig, layout: Layout, mb: MicroBatch) -> _Sizes:
    tp, cp, N = layout.tp, layout.cp, mb.micro_batch_size
    d = cfg.kv_channels
    S = mb.seq_length
    chunks = mb.chunk_sizes()
    caption = mb.caption_tokens or mb.caption_length or cfg.caption_max_length
    hq = cfg.num_attention_heads // tp
    hkv = max(cfg.num_query_groups, tp) // tp
    T = N * S // cp
    seen, keys, widest = 0, 0, 0
    for c in chunks:
        seen += c
        keys += seen
        widest = max(widest, c * seen)
    # Chunks that the busiest context-parallel window [r S/cp, (r+1) S/cp) of a sample overlaps.
    window = S // cp
    touched = max(sum(1 for start in range(0, S, chunks[0]) if start < (r + 1) * window and start + chunks[0] > r * window)
                  for r in range(cp))
    return _Sizes(
        T=T, Tr=T // tp if layout.sequence_parallel and tp > 1 else T, Ta=N * S, R=N * len(chunks),
        C=N * len(chunks) * caption, C_q=N * touched * caption, Q=hq * d, K=hkv * d, hq=hq, hkv=hkv, hq_a=hq // cp,
        hkv_a=max(hkv, cp) // cp, F=cfg.ffn_hidden_size // tp, self_area=N * block_causal_area(chunks),
        self_keys=N * keys, widest_slice=widest,
    )


def _attention_kernel(z: _Sizes, d: int, md: int, autocast: bool, flash: bool, cross: bool,
                      dense: bool = False) -> Tuple[int, int]:
    """(bytes the core attention saves itself, bytes of its q/k/v inputs) for self- or cross-attention.

    torch kernel (`range_attention`): per slice q.float(), the GQA-expanded k/v .float() (views of the inputs
    when no copy is needed: fp32 inputs, one query head per KV head, no autocast), the fp32 softmax output,
    and under autocast the bf16 copies matmul makes of each operand."""
    if cross:
        tokens_q, heads, kv_tokens, kv_heads = z.T, z.hq, z.C, z.hkv
        area, keys = z.T * (z.C // z.R), z.C_q  # each chunk's queries see its own row's keys
        # Inputs: the LN outputs (fp32 under autocast, else the model dtype) and vx (linear output).
        q_item = F32 if autocast else md
        k_item, v_item = q_item, (2 if autocast else md)
    else:
        tokens_q, heads, kv_tokens, kv_heads = z.Ta, z.hq_a, z.Ta, z.hkv_a
        area, keys = z.self_area, z.self_keys
        q_item = k_item = v_item = 2 if autocast else md
    if dense:  # sdpa: one slice of every query and every key
        area, keys = tokens_q * kv_tokens, kv_tokens
    inputs = tokens_q * heads * d * q_item + kv_tokens * kv_heads * d * (k_item + v_item)
    if flash:
        out_lse = tokens_q * heads * (d * (2 if autocast else md) + F32)
        return inputs + out_lse, inputs
    operand = 2 if autocast else F32  # what the matmuls save of each operand
    q = tokens_q * heads * d * operand  # a view of q, or its per-slice copies (the slices cover every query)
    per_slice_kv = keys * heads * d * operand  # expanded / cast copies of the keys of every slice
    if not autocast and heads == kv_heads:
        k = kv_tokens * kv_heads * d * F32 if k_item == F32 else per_slice_kv
        v = kv_tokens * kv_heads * d * F32 if v_item == F32 else per_slice_kv
    else:
        k = v = per_slice_kv
    probs = area * heads * (F32 + (2 if autocast else 0))  # fp32 softmax output (+ its bf16 copy under autocast)
    return q + k + v + probs, inputs


def layer_activations(cfg: ModelConfig, layout: Layout, mb: MicroBatch) -> Dict[str, int]:
    """Bytes autograd saves in one transformer layer for one micro-batch without recompute, by part.

    Read from model/dit.py (notation of `_Sizes`; md = model dtype, cd = linear compute dtype):
      adaln         silu(condition) into the gate linear, the fp32 tanh of the softcap
      attn_norm     the pre-norm's input (fp32 copy under autocast) and its mean / rstd
      qkv_input     the normed tokens each of q, k, v, qx saves: one shared tensor, or four copies when
                    each linear gathers (sequence parallel) or casts (autocast) its own
      qk_norm       the fp32 QK-norm inputs and outputs (RoPE saves the normed values) and their statistics
      self_attention / cross_attention   the core kernel (see `_attention_kernel`)
      cross_norm    the cross-attention query / key norm inputs and statistics
      proj_input    linear_proj runs in fp32: its fp32 input [self | cross]
      weight_copies linear_proj's fp32 copy of a bf16 weight; under autocast with fp32 weights, every other
                    linear's bf16 weight copy (one per layer per micro-batch)
      post_norms    per modulated add: the branch, the token gate and the post-norm input (fp32) + statistics
      mlp           the MLP pre-norm input, fc1's input, the activation's inputs / outputs, fc2's input
    """
    autocast = layout.precision == "bf16"
    md = BYTES[cfg.params_dtype]
    cd = 2 if autocast else md
    ln_out = F32 if autocast else md  # CUDA autocast runs layer_norm in fp32
    z = _sizes(cfg, layout, mb)
    H, d = cfg.hidden_size, cfg.kv_channels
    cond, gate = int(H * cfg.cond_hidden_ratio), int(H * cfg.cond_gating_ratio)
    hx = int(H * cfg.xattn_cond_hidden_ratio)
    sp = layout.sequence_parallel and layout.tp > 1
    flash = mb.attention == "flash"
    stats = 2 * F32  # mean and rstd per normalised row

    parts: Dict[str, int] = {}
    parts["adaln"] = z.R * (cond * cd + 2 * gate * F32)
    parts["attn_norm"] = z.Tr * H * (F32 if autocast else md) + z.Tr * stats
    copies = 1 if (not sp and ln_out == cd) else 4
    parts["qkv_input"] = copies * z.T * H * cd
    parts["qk_norm"] = 2 * z.T * (z.Q + z.K) * F32 + z.T * (z.hq + z.hkv) * stats
    dense = mb.attention_backend == "sdpa"
    self_saved, _ = _attention_kernel(z, d, md, autocast, flash, cross=False, dense=dense)
    cross_saved, _ = _attention_kernel(z, d, md, autocast, flash, cross=True, dense=dense)
    if mb.attention_backend == "flash" and len(mb.chunk_sizes()) > 1:
        # Block-causal key ranges overlap: flash-attn saves the gathered keys and values instead of k and v.
        self_saved += (z.self_keys - z.Ta) * z.hkv_a * d * 2 * (2 if autocast else md)
    parts["self_attention"] = self_saved
    parts["cross_attention"] = cross_saved
    # q_layernorm_xattn: its input (the qx linear output; fp32 copy under autocast); k_layernorm_xattn: the
    # [K | V] linear output it is a view of (an fp32 copy of K under autocast); vx is made contiguous.
    kv_norm_input = z.C * z.K * F32 if autocast else z.C * 2 * z.K * cd
    parts["cross_norm"] = (z.T * z.Q * (F32 if autocast else md) + z.T * z.hq * stats
                           + kv_norm_input + z.C * z.hkv * stats)
    parts["proj_input"] = z.T * 2 * z.Q * F32
    fc1 = (2 if cfg.gated_linear_unit else 1) * z.F
    proj_weight = 2 * z.Q * H
    copies_numel = 0
    if autocast and md != 2:
        copies_numel = H * (2 * z.Q + 2 * z.K) + fc1 * H + z.F * H + hx * 2 * z.K + cond * 2 * gate
    parts["weight_copies"] = (proj_weight * F32 if md != F32 else 0) + copies_numel * 2
    if autocast and md != 2:
        # torch.matmul of the caption tokens with each of the max(1, 8 / tp) row blocks of linear_kv_xattn
        # casts them again.
        parts["weight_copies"] += max(1, 8 // layout.tp) * z.C * hx * 2
    parts["post_norms"] = 2 * (3 * z.Tr * H * F32 + z.Tr * stats)
    mlp = z.Tr * H * (F32 if autocast else md) + z.Tr * stats + z.T * H * cd  # pre-norm input, fc1 input
    if cfg.gated_linear_unit:
        # fp32: fc1's output (both halves, viewed), silu's output, the product; else fp32 copies of both
        # halves, silu's output and the product rounded to cd.
        mlp += z.T * z.F * (4 * F32 if cd == F32 else 3 * F32 + cd)
    else:
        mlp += 2 * z.T * z.F * cd  # gelu's input and output
    parts["mlp"] = mlp
    if cfg.apply_layernorm_1p:
        # "gamma + 1" of the 1p norms: self QK-norms and post-norms in fp32, cross QK-norms in the model dtype.
        parts["norm_gains"] = 2 * d * F32 + 2 * d * md + 2 * H * F32
    return parts


def attention_inputs(cfg: ModelConfig, layout: Layout, mb: MicroBatch) -> Tuple[int, int]:
    """(self, cross) bytes of the core attention's q/k/v inputs: what selective recompute keeps instead of
    everything the kernel saves."""
    autocast = layout.precision == "bf16"
    z = _sizes(cfg, layout, mb)
    md, flash = BYTES[cfg.params_dtype], mb.attention == "flash"
    return (_attention_kernel(z, cfg.kv_channels, md, autocast, flash, cross=False)[1],
            _attention_kernel(z, cfg.kv_channels, md, autocast, flash, cross=True)[1])


def _flex_mask_bytes(total_q: int, total_k: int) -> int:
    """model/flex.py `ranges_block_mask`: kv and full-kv tile counts and indices (int32, (nq,) and (nq, nk)),
    their transposes BlockMask keeps for backward, and the per-query key bounds (two int64 per padded query)."""
    nq, nk = -(-total_q // FLEX_BLOCK), -(-total_k // FLEX_BLOCK)
    return 4 * (2 * nq + 2 * nk + 4 * nq * nk) + 2 * 8 * nq * FLEX_BLOCK


def attention_metadata(cfg: ModelConfig, layout: Layout, mb: MicroBatch) -> Tuple[int, int]:
    """(held, transient) bytes the configured backend derives from the attention ranges: `held` lives for a
    micro-batch's forward and backward (built once per forward, shared by every layer), `transient` one call at
    a time (the working set). Self-attention: every token of the micro-batch attends (after Ulysses' all-to-all)
    in one slice per chunk; cross-attention: this rank's tokens to the caption tokens, one slice per row."""
    z = _sizes(cfg, layout, mb)
    backend = mb.attention_backend
    slices = (z.R, z.R)
    # q_ranges and k_ranges, int64 (n, 2) (host memory on GPUs; counted, 32 bytes per slice).
    ranges = sum(2 * n * 2 * 8 for n in slices)
    if backend == "sdpa":
        return ranges, max(z.Ta * z.Ta, z.T * z.C)  # torch.bool: one byte per (query, key)
    if backend == "flex":
        return _flex_mask_bytes(z.Ta, z.Ta) + _flex_mask_bytes(z.T, z.C), 0
    if backend == "flash":
        cu = sum(2 * (n + 1) * 4 for n in slices)
        gathered = z.self_keys if len(mb.chunk_sizes()) > 1 else 0  # the caption keys lie back to back
        return ranges + cu + gathered * 8, 0
    return ranges, 0


def boundary_activations(cfg: ModelConfig, layout: Layout, mb: MicroBatch, first: bool, last: bool) -> int:
    """Bytes saved outside the layers for one micro-batch: the conditioning every layer reads (RoPE tables,
    token -> row map, caption tokens), the embedders (first stage) and the head and loss (last stage)."""
    md = BYTES[cfg.params_dtype]
    z = _sizes(cfg, layout, mb)
    H, N, S = cfg.hidden_size, mb.micro_batch_size, mb.seq_length
    hx = int(H * cfg.xattn_cond_hidden_ratio)
    L = mb.caption_length or cfg.caption_max_length
    rotary = 6 * (cfg.kv_channels // 8)
    # Every layer's RoPE reads sin | cos: on the first stage views of the table of all S tokens, on the
    # others the context-parallel slice received from the previous stage.
    table_rows = S if first else S // layout.cp
    total = table_rows * rotary * F32 + z.Tr * 8 + z.C * hx * md  # sin | cos, token -> row map, caption tokens
    if first:
        patch_in = cfg.in_channels * cfg.t_patch_size * cfg.patch_size ** 2
        total += N * S * patch_in * F32  # the patch embedding's fp32 input
        total += S * (3 + rotary // 2) * F32  # the learnable RoPE bands' coordinates and angles
        total += z.R * L * (cfg.caption_channels + hx) * F32  # caption projection: its input, SiLU's input
    if last:
        patch_out = cfg.out_channels * cfg.t_patch_size * cfg.patch_size ** 2
        # final_layernorm's fp32 input and statistics, final_linear's input, the loss's difference and square.
        total += 2 * z.Tr * H * F32 + z.Tr * 2 * F32 + 2 * N * S * patch_out * F32
    # The pipeline keeps what crosses a stage boundary until the micro-batch's backward: the received inputs
    # (the residual stream is the first layer's saved input, counted there) and the sent outputs; the
    # caption rows travel padded, with the mask as one more channel (parallel/pipeline.py).
    caption_rows = z.R * L * (hx + 1) * md
    if not first:
        total += caption_rows
    if not last:
        total += z.Tr * H * md + caption_rows
    return total


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


def estimate(cfg: ModelConfig, layout: Layout, mb: MicroBatch, params: Optional[ModelParams] = None) -> MemoryEstimate:
    """Memory of the most loaded rank. Only the first and the last pipeline stage can be it: the first holds
    the embedders and the most micro-batches in flight, the last the head; a middle stage holds the first
    stage's layers with fewer micro-batches in flight."""
    params = params or ModelParams.of(cfg)
    if cfg.num_layers % layout.pp:
        raise ValueError(f"num_layers ({cfg.num_layers}) is not divisible by pp ({layout.pp})")
    best = None
    for stage in sorted({0, layout.pp - 1}):
        est = _stage_estimate(cfg, layout, mb, params, stage)
        if best is None or est.total > best.total:
            best = est
    return best


def _stage_estimate(cfg: ModelConfig, layout: Layout, mb: MicroBatch, params: ModelParams, stage: int) -> MemoryEstimate:
    held = params.stage(layout, stage)
    p_bytes = sum(numel * item for _, numel, item in held)
    group = layout.dp * layout.cp
    layer = layer_activations(cfg, layout, mb)
    full_layer = sum(layer.values())
    self_in, cross_in = attention_inputs(cfg, layout, mb)
    z = _sizes(cfg, layout, mb)
    md = BYTES[cfg.params_dtype]
    if layout.recompute == "full":
        per_layer = z.Tr * cfg.hidden_size * md  # checkpoint keeps the layer's input only
        working = full_layer  # one layer's forward re-run during its backward
    elif layout.recompute == "selective":
        per_layer = full_layer - layer["self_attention"] - layer["cross_attention"] + self_in + cross_in
        working = max(layer["self_attention"] - self_in, layer["cross_attention"] - cross_in)
    else:
        per_layer, working = full_layer, 0
    if mb.attention == "torch":
        # Backward of one slice: the gradients of its scores and probabilities (fp32); sdpa's one slice is all.
        widest = z.Ta * z.Ta if mb.attention_backend == "sdpa" else z.widest_slice
        working += 2 * widest * z.hq_a * F32
    metadata, transient = attention_metadata(cfg, layout, mb)
    working += transient
    layers = cfg.num_layers // layout.pp
    in_flight = layout.pp - stage  # 1F1B: stage s holds pp - s micro-batches before its first backward
    boundary = boundary_activations(cfg, layout, mb, stage == 0, stage == layout.pp - 1)
    activations = in_flight * (layers * per_layer + boundary + metadata) + working
    owner = assign_owners([(name, _Sized(numel)) for name, numel, _ in held], group)
    broadcast_copy = max(sum(numel * item for name, numel, item in held if owner[name] == r) for r in range(group))
    broadcast_copy = broadcast_copy if group > 1 else 0
    norm_squares = 2 * 8 * max(numel for _, numel, _ in held)  # grad.double().square() of the largest gradient
    buckets = sum(numel for _, numel, _ in held) * F32
    return MemoryEstimate(
        params=p_bytes, grads=buckets, optimizer=params.optimizer(layout, stage), activations=activations,
        after_backward=max(broadcast_copy, norm_squares), stage=stage, layers=layers, in_flight=in_flight,
        per_layer=per_layer, working=working, attention_metadata=metadata + transient, terms=layer,
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
