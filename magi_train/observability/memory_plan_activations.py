"""Activations of the training memory plan (memory_plan.py): the tensors autograd saves for backward, counted
tensor by tensor from the layer code, per micro-batch and rank, and what the attention backend derives from the
ranges. memory_plan.py's docstring says what is counted and which kernels are modelled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

from magi_train.config.schema import ModelConfig
from magi_train.observability.flops import block_causal_area
from magi_train.observability.memory_plan_layout import BYTES, F32, FLEX_BLOCK, Layout, MicroBatch


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




def lora_activations(cfg: ModelConfig, layout: Layout, mb: MicroBatch, adapters: Sequence[Tuple[str, int, int, int]],
                     dropout: float = 0.0) -> int:
    """Bytes the LoRA adapters of a group of modules (one layer's) save for one micro-batch on top of the frozen
    base, whose linears save what they save in full training (megatron's linear function saves its input and
    weight whether the weight trains or not: `layer_activations` is unchanged). Read from model/lora.py
    (`LoraLinear.forward`: h = linear(dropout(x).to(fp32), A); delta = linear(h, B) * scale, added in the wider
    dtype).

    `adapters`: (module name, rank, local in_features of A, local out_features of B). Per adapter, over its n
    input rows (tokens; caption tokens for linear_kv_xattn; chunk rows for the adaLN projection): h, which B
    saves (bf16 under autocast, else the fp32 of the adapter); A's input when it is not the tensor the base
    saved (under autocast its bf16 cast; without autocast the fp32 cast of a bf16 input, or dropout's output);
    dropout's boolean mask (lora.dropout > 0); under autocast the bf16 copies of A and B."""
    z = _sizes(cfg, layout, mb)
    autocast = layout.precision == "bf16"
    md = BYTES[cfg.params_dtype]
    total = 0
    for name, rank, fan_in, fan_out in adapters:
        n = _adapter_rows(name, z, mb.caption_length or cfg.caption_max_length)
        if autocast:
            total += n * fan_in * 2 + n * rank * 2 + (rank * fan_in + fan_out * rank) * 2
        else:
            total += n * rank * F32 + (n * fan_in * F32 if md != F32 or dropout > 0 else 0)
        if dropout > 0:
            total += n * fan_in  # torch.bool mask
    return total


def _adapter_rows(name: str, z: _Sizes, caption_length: int) -> int:
    """Rows of an adapted linear's input in one micro-batch on this rank (L = padded caption rows)."""
    if name.endswith("linear_kv_xattn"):
        return z.C
    if ".ada_modulate_layer." in name or name.startswith("t_embedder."):
        return z.R
    if name.startswith("y_embedder."):
        return z.R * caption_length
    if name.startswith("final_linear."):
        return z.Tr
    return z.T


def frozen_base_layer_activations(cfg: ModelConfig, layout: Layout, mb: MicroBatch, adapted: Sequence[str]
                                  ) -> Dict[str, int]:
    """`layer_activations` of a layer whose own parameters are all frozen (LoRA), the adapters of `adapted` (module
    names) aside. Backward still runs through the layer for its input gradient, so nearly everything stays; what
    only a parameter's gradient needed goes (read from model/dit.py, rope.py, attention.py, linear.py):
      adaln          the condition path: its input (the timestep embedding) needs no gradient either
      post_norms     `branch.float() * token_gate` keeps the branch only for the gate's gradient
      qk_norm        RoPE keeps the normed q / k only for its learnable bands' gradient
      caption keys   linear_kv_xattn's products, k_layernorm_xattn and (torch kernel) the cross-attention
                     query copies that only the keys' gradient needed: the caption tokens need no gradient
    unless the adaLN projection (the gates then train) or linear_kv_xattn (the caption keys) is adapted."""
    parts = dict(layer_activations(cfg, layout, mb))
    autocast = layout.precision == "bf16"
    md = BYTES[cfg.params_dtype]
    cd = 2 if autocast else md
    z = _sizes(cfg, layout, mb)
    H, d = cfg.hidden_size, cfg.kv_channels
    cond, gate = int(H * cfg.cond_hidden_ratio), int(H * cfg.cond_gating_ratio)
    hx = int(H * cfg.xattn_cond_hidden_ratio)
    stats = 2 * F32
    fp32_weights_cast = autocast and md != 2  # `weight_copies` holds bf16 copies of fp32 weights
    if not any(".ada_modulate_layer." in name for name in adapted):
        parts["adaln"] = 0
        parts["post_norms"] -= 2 * z.Tr * H * F32
        if fp32_weights_cast:
            parts["weight_copies"] -= cond * 2 * gate * 2
    parts["qk_norm"] -= z.T * (z.Q + z.K) * F32
    if not any(name.endswith("linear_kv_xattn") for name in adapted):
        kv_norm_input = z.C * z.K * F32 if autocast else z.C * 2 * z.K * cd
        parts["cross_norm"] -= kv_norm_input + z.C * z.hkv * stats
        if cfg.apply_layernorm_1p:
            parts["norm_gains"] -= d * md  # k_layernorm_xattn's gamma + 1
        if fp32_weights_cast:
            parts["weight_copies"] -= hx * 2 * z.K * 2 + max(1, 8 // layout.tp) * z.C * hx * 2
        if mb.attention == "torch":
            parts["cross_attention"] -= z.T * z.hq * d * (2 if autocast else F32)
    return parts


def frozen_base_boundary_savings(cfg: ModelConfig, layout: Layout, mb: MicroBatch, adapted: Sequence[str],
                                 first: bool) -> int:
    """What `boundary_activations` holds that a frozen base (LoRA) does not: on the first stage the patch
    embedding's input, the RoPE bands' coordinates and the caption projection's inputs (their parameters are
    frozen and their inputs need no gradient), and on every stage the caption tokens that each layer's
    linear_kv_xattn saved for its weight gradient (unless the caption path is adapted)."""
    z = _sizes(cfg, layout, mb)
    md = BYTES[cfg.params_dtype]
    hx = int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio)
    L = mb.caption_length or cfg.caption_max_length
    caption_trains = any(n.startswith("y_embedder.") for n in adapted)
    saved = 0
    if not caption_trains and not any(n.endswith("linear_kv_xattn") for n in adapted):
        saved += z.C * hx * md
    if first:
        rotary = 6 * (cfg.kv_channels // 8)
        saved += mb.micro_batch_size * mb.seq_length * cfg.in_channels * cfg.t_patch_size * cfg.patch_size ** 2 * F32
        saved += mb.seq_length * (3 + rotary // 2) * F32
        if not caption_trains:
            saved += z.R * L * (cfg.caption_channels + hx) * F32
    return saved
