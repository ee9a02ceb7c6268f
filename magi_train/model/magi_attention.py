"""MagiAttention (SandAI) as the DiT's core attention (`model.attention_backend: magi`).

MagiAttention takes attention as a list of (query range, key range, mask type) slices, the same description
as `AttnRanges` with every slice FULL, so nothing is translated beyond dtypes and devices:

- `flex_attention_backend`: the single-GPU Flex-Flash-Attention kernel (`flex_flash_attn_func`). It computes
  what `range_attention` computes (fp32 softmax of q kᵀ * d**-0.5 per slice, GQA with query head h reading KV
  head h // (Hq / Hkv)) in one launch for all slices instead of a Python loop.
- `to_magi_ranges`: the pure-Python conversion of `AttnRanges` into the kernel's int32 inputs (tested on CPU).
- The distributed API (dispatch / calc_attn / undispatch over a context-parallel group) is wrapped by
  `MagiContextParallel` in magi_train/parallel/dispatch.py; `resolve_cp_impl` says whether it can run.

`magi_attention` is GPU-only (Hopper kernels built against CUDA); it is imported inside the functions that need
it, never at module import. Written against MagiAttention v1.1.1 (SandAI-org/MagiAttention, commit 2c641357);
the single-GPU call also accepts the v1.0.x signature, which MAGI-1's own inference code uses.
"""

from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch

from magi_train.model.attention import AttnRanges, softmax_scale

# MagiAttention's attn_type_map code for a slice without a mask inside it (1-3 are the causal variants).
FULL = 0
# The kernels compute in fp16/bf16 only (their own check: "only supports fp16 and bf16 data type").
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def to_magi_ranges(ranges: AttnRanges) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(q_ranges, k_ranges, attn_type_map, max_seqlen_q, max_seqlen_k) for MagiAttention, on the CPU.

    Ranges are int32 (n, 2), as the kernel requires; the type map is int32 (n,) of FULL. Slices with an empty
    query or key range are dropped: they contribute nothing (`range_attention` skips them too; queries no slice
    covers stay zero) and the kernel has no use for zero-length tiles. The max seqlens are the longest kept
    query / key range (0 when none is left).
    """
    q, k = ranges.q_ranges, ranges.k_ranges
    if q.numel() and int(torch.cat([q, k]).max()) > torch.iinfo(torch.int32).max:
        raise ValueError("AttnRanges: token coordinates exceed int32, the range type of MagiAttention's kernels")
    keep = (q[:, 1] > q[:, 0]) & (k[:, 1] > k[:, 0])
    q = q[keep].to(torch.int32).contiguous()
    k = k[keep].to(torch.int32).contiguous()
    attn_type_map = torch.full((q.shape[0],), FULL, dtype=torch.int32)
    max_q = int((q[:, 1] - q[:, 0]).max()) if q.shape[0] else 0
    max_k = int((k[:, 1] - k[:, 0]).max()) if k.shape[0] else 0
    return q, k, attn_type_map, max_q, max_k


def magi_unavailable_reason() -> Optional[str]:
    """Why the magi backend cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    # Flex-Flash-Attention is a Hopper (sm90) kernel; newer releases reach other GPUs only through an
    # optional FlashAttention-4 path, which this backend does not select.
    if major != 9:
        return f"the GPU has compute capability {major}.{minor}, not 9.x (Hopper)"
    try:
        import magi_attention.api  # noqa: F401
    except Exception as e:  # a broken CUDA build fails with more than ImportError (OSError, RuntimeError)
        return f"magi_attention is not importable ({type(e).__name__}: {e})"
    return None


def magi_attention_available() -> bool:
    return magi_unavailable_reason() is None


def resolve_cp_impl(cp_impl: str, cp_group) -> str:
    """"ulysses" or "magi" for `parallel.cp_impl` (auto: magi where MagiAttention's cp can run)."""
    if cp_group is None or cp_group.size() == 1 or cp_impl == "ulysses":
        return "ulysses"
    reason = magi_cp_unavailable_reason(torch.distributed.get_backend(cp_group))
    if cp_impl == "magi" and reason is not None:
        raise ValueError(f"parallel.cp_impl=magi needs MagiAttention's distributed attention (the magi_attention "
                         f"package, Hopper GPUs, nccl); here: {reason}. Use parallel.cp_impl=ulysses or auto.")
    return "magi" if reason is None else "ulysses"


def magi_cp_unavailable_reason(backend: str) -> Optional[str]:
    """Why MagiAttention's context parallelism cannot run over a `backend` ("gloo" / "nccl") group here."""
    reason = magi_unavailable_reason()
    if reason is None and backend != "nccl":
        # Its runtime key accepts NCCL process groups only.
        reason = f"the process groups use {backend}, and MagiAttention's distributed attention needs nccl"
    return reason


def magi_backend():
    """The core-attention function registered as `model.attention_backend: magi`."""
    reason = magi_unavailable_reason()
    if reason is not None:
        raise ValueError(
            f"model.attention_backend='magi' needs MagiAttention (the magi_attention package) on a Hopper GPU "
            f"(compute capability 9.x); here: {reason}. Use model.attention_backend=auto (what runs here), flex, "
            f"sdpa or torch instead."
        )
    return flex_attention_backend


def flex_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: AttnRanges) -> torch.Tensor:
    """Core attention with MagiAttention's Flex-Flash-Attention kernel; same contract as `range_attention`.

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D), bf16 or fp16, on a Hopper GPU. Returns (Tq, Hq, D) in q's dtype.
    """
    from magi_attention.api import flex_flash_attn_func

    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"model.attention_backend='magi' computes in bf16/fp16 only; got q/k/v of dtypes "
            f"{q.dtype}/{k.dtype}/{v.dtype} (use model.params_dtype=bfloat16, or attention_backend=torch)"
        )
    q_ranges, k_ranges, attn_type_map, max_q, max_k = to_magi_ranges(ranges)
    if q_ranges.shape[0] == 0:
        return q.new_zeros(q.shape)
    # One host-to-device copy for the three small tensors.
    packed = torch.cat([q_ranges, k_ranges, attn_type_map[:, None]], dim=1).to(q.device, non_blocking=True)
    kwargs = dict(
        q_ranges=packed[:, 0:2].contiguous(),
        k_ranges=packed[:, 2:4].contiguous(),
        attn_type_map=packed[:, 4].contiguous(),
        softmax_scale=softmax_scale(q.shape[-1]),
    )
    if "max_seqlen_k" in inspect.signature(flex_flash_attn_func).parameters:
        # v1.0.0-v1.0.3 require the longest range lengths; v1.0.4 dropped them (v1.1 keeps an unrelated
        # sparse-attention max_seqlen_q, left at its default).
        kwargs.update(max_seqlen_q=max_q, max_seqlen_k=max_k)
    # Returns (out, lse) in v1.0.x and (out, AttnForwardMeta) in v1.1; only `out` is needed.
    out = flex_flash_attn_func(q, k, v, **kwargs)[0].to(q.dtype)

    lengths = q_ranges[:, 1] - q_ranges[:, 0]
    if int(lengths.sum()) < q.shape[0]:
        # Queries no slice covers must be zero (the AttnRanges contract). v1.1's kernel zero-fills them;
        # enforcing it here keeps the contract whatever the release (query ranges never overlap).
        covered = torch.zeros(q.shape[0], dtype=torch.bool)
        for start, end in q_ranges.tolist():
            covered[start:end] = True
        out = out * covered.to(out.device)[:, None, None]
    return out
