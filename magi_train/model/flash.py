"""flash-attn's varlen kernel as the DiT's core attention (`model.attention_backend: flash`), on CUDA GPUs.

`flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)` attends, for every segment i, the packed
queries `q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]` to the packed keys `k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]`,
without a causal mask (causal=False), with GQA (query head h reads KV head h // (Hq / Hkv), as every backend
here). An `AttnRanges` slice is one such segment: its query range attends to ONE contiguous key range. Query
ranges never overlap (AttnRanges refuses it), so each query token lies in at most one slice and sees one key
range; nothing needs merging (no second call, no log-sum-exp combine). What needs care is that the segments
must lie back to back in the packed tensors:

* queries: the slices, sorted by query start, are back to back in `q` when their query ranges leave no gap
  (block-causal training, the KV-window step of inference, cross-attention when every chunk row has caption
  tokens); then `q` is passed as a view. Otherwise the covered query tokens are gathered (`q[q_index]`, O(Tq))
  and the output is scattered back, the uncovered tokens left zero (the AttnRanges contract).
* keys: in that order the key ranges are back to back in `k` when each starts where the previous ended
  (cross-attention: each chunk row's own caption tokens; one query range over all keys); then `k` and `v` are
  views. Otherwise (block-causal: chunk i of a sample sees chunks 0..i, so key ranges overlap) the keys of
  every slice are gathered into new packed tensors, `k[k_index]` and `v[k_index]`. That copy costs
  `gathered_keys(ranges) x Hkv x D x 2 (k and v) x itemsize` bytes per call, and flash-attn saves it for
  backward (per layer). For MAGI-1 block-causal training, C equal chunks per sample, the gathered keys are
  (C + 1) / 2 times the tokens: 8.5 x for 16 chunks, about 2.1 GiB per layer at 65,536 tokens, 8 KV heads of
  128 in bf16. `auto` therefore picks flash only while the copy is no larger than the keys themselves
  (`gather_fits`); flex (no copy) or MagiAttention (one kernel over the ranges) take the block-causal case.

Slices with an empty query or key range are dropped (they contribute nothing), so the kernel never sees a
zero-length segment. The varlen indices are built once per ranges object and device (`AttnRanges.memo`):
every layer of a forward shares them.

flash-attn computes in bf16/fp16 only (fp32 accumulation, one rounding of the output): fp32 inputs are refused.
`flash_attn` is GPU-only; it is imported inside the functions that call it, never at module import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from magi_train.model.attention import AttnRanges, softmax_scale

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class VarlenPlan:
    """The varlen call for one AttnRanges over `total_q` queries and `total_k` keys (tensors on one device)."""

    cu_seqlens_q: torch.Tensor  # int32 (n + 1,)
    cu_seqlens_k: torch.Tensor  # int32 (n + 1,)
    max_seqlen_q: int
    max_seqlen_k: int
    q_span: Optional[tuple]  # (start, end): the packed queries are q[start:end]; None: gathered by q_index
    q_index: Optional[torch.Tensor]  # int64 (covered queries,)
    k_span: Optional[tuple]  # (start, end): the packed keys are k[start:end]; None: gathered by k_index
    k_index: Optional[torch.Tensor]  # int64 (gathered keys,)

    @property
    def segments(self) -> int:
        return int(self.cu_seqlens_q.shape[0]) - 1

    def to(self, device) -> "VarlenPlan":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return VarlenPlan(move(self.cu_seqlens_q), move(self.cu_seqlens_k), self.max_seqlen_q, self.max_seqlen_k,
                          self.q_span, move(self.q_index), self.k_span, move(self.k_index))


def _span_or_index(starts: torch.Tensor, ends: torch.Tensor):
    """((first start, last end), None) when the ranges lie back to back in this order, else (None, the int64
    index of their tokens in order)."""
    if bool((starts[1:] == ends[:-1]).all()):
        return (int(starts[0]), int(ends[-1])), None
    lengths = ends - starts
    total = int(lengths.sum())
    # Token j of range i sits at starts[i] + j: the start of its range plus its offset inside the range.
    offsets = torch.cumsum(lengths, 0) - lengths
    index = torch.arange(total, dtype=torch.int64) + torch.repeat_interleave(starts - offsets, lengths)
    return None, index


def varlen_plan(ranges: AttnRanges) -> Optional[VarlenPlan]:
    """The varlen call of `ranges` (CPU tensors), or None when no slice has both queries and keys."""
    q, k = ranges.q_ranges, ranges.k_ranges
    keep = (q[:, 1] > q[:, 0]) & (k[:, 1] > k[:, 0])
    if not bool(keep.any()):
        return None
    q, k = q[keep], k[keep]
    order = torch.argsort(q[:, 0])
    q, k = q[order], k[order]
    q_len, k_len = q[:, 1] - q[:, 0], k[:, 1] - k[:, 0]
    if int(k_len.sum()) > torch.iinfo(torch.int32).max:
        raise ValueError(f"model.attention_backend=flash: the slices' key ranges sum to {int(k_len.sum())} tokens, "
                         f"more than flash-attn's int32 cu_seqlens hold")
    zero = torch.zeros(1, dtype=torch.int64)
    q_span, q_index = _span_or_index(q[:, 0], q[:, 1])
    k_span, k_index = _span_or_index(k[:, 0], k[:, 1])
    return VarlenPlan(torch.cat([zero, q_len.cumsum(0)]).to(torch.int32),
                      torch.cat([zero, k_len.cumsum(0)]).to(torch.int32),
                      int(q_len.max()), int(k_len.max()), q_span, q_index, k_span, k_index)


def _plan(ranges: AttnRanges, device: torch.device) -> Optional[VarlenPlan]:
    """`varlen_plan(ranges)` on `device`, built once per ranges object (and once more per device)."""
    plan = ranges.memo(("flash-plan", "cpu"), lambda: varlen_plan(ranges))
    if plan is None or device.type == "cpu":
        return plan
    return ranges.memo(("flash-plan", str(device)), lambda: plan.to(device))


def gathered_keys(ranges: AttnRanges) -> int:
    """Key tokens this backend copies for `ranges`: 0 when the key ranges lie back to back in `k`."""
    plan = _plan(ranges, torch.device("cpu"))
    return 0 if plan is None or plan.k_index is None else int(plan.k_index.shape[0])


def gather_fits(ranges: AttnRanges, total_k: int) -> bool:
    """Whether the gathered keys are at most the keys themselves (what `auto` asks before choosing flash)."""
    return gathered_keys(ranges) <= total_k


def flash_unavailable_reason() -> Optional[str]:
    """Why the flash backend cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:  # flash-attn 2 runs on Ampere and newer
        return f"the GPU has compute capability {major}.{minor}; flash-attn 2 needs 8.0 or newer"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # a wheel built for another CUDA/torch fails with more than ImportError
        return f"flash_attn is not importable ({type(e).__name__}: {e})"
    return None


def flash_attention_available() -> bool:
    return flash_unavailable_reason() is None


def flash_backend():
    """The core-attention function registered as `model.attention_backend: flash`."""
    reason = flash_unavailable_reason()
    if reason is not None:
        raise ValueError(f"model.attention_backend='flash' needs flash-attn 2 (the flash_attn package, "
                         f"`pip install .[gpu]`) on a CUDA GPU of compute capability 8.0 or newer; here: {reason}. "
                         f"Use model.attention_backend=auto (what runs here), flex, sdpa or torch instead.")
    return flash_range_attention


def flash_range_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: AttnRanges) -> torch.Tensor:
    """Core attention with flash-attn's varlen kernel; same contract as `range_attention`. q: (Tq, Hq, D);
    k, v: (Tk, Hkv, D), bf16 or fp16 on a CUDA GPU. Returns (Tq, Hq, D) in q's dtype."""
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"model.attention_backend='flash' computes in bf16/fp16 only; got q/k/v of dtypes "
                         f"{q.dtype}/{k.dtype}/{v.dtype} (use model.params_dtype=bfloat16 or trainer.precision=bf16, "
                         f"or attention_backend=flex / torch for fp32)")
    return varlen_attention(q, k, v, ranges)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: AttnRanges) -> torch.Tensor:
    """The varlen call and its packing, for any dtype the kernel takes (CPU tests run it in fp32 against an
    exact stand-in kernel; `flash_range_attention` is the dtype-checked entry point)."""
    from flash_attn import flash_attn_varlen_func

    plan = _plan(ranges, q.device)
    if plan is None:
        return q.new_zeros(q.shape)
    if plan.q_index is None:
        packed_q = q[plan.q_span[0]:plan.q_span[1]]
    else:
        packed_q = q.index_select(0, plan.q_index)
    if plan.k_index is None:
        packed_k, packed_v = k[plan.k_span[0]:plan.k_span[1]], v[plan.k_span[0]:plan.k_span[1]]
    else:
        packed_k, packed_v = k.index_select(0, plan.k_index), v.index_select(0, plan.k_index)
    out = flash_attn_varlen_func(packed_q, packed_k, packed_v, plan.cu_seqlens_q, plan.cu_seqlens_k,
                                 plan.max_seqlen_q, plan.max_seqlen_k, dropout_p=0.0,
                                 softmax_scale=softmax_scale(q.shape[-1]), causal=False)
    if plan.q_index is not None:
        # Uncovered queries stay zero; index_copy is out of place, so autograd routes the gradient back.
        return q.new_zeros(q.shape).index_copy(0, plan.q_index, out)
    start, end = plan.q_span
    if (start, end) == (0, q.shape[0]):
        return out
    tail = q.shape[0] - end
    return torch.cat([q.new_zeros((start, *q.shape[1:])), out, q.new_zeros((tail, *q.shape[1:]))])
