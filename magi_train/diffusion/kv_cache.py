"""The per-layer key/value cache of chunk-wise generation.

One buffer per layer holds `[K_rope | V]` for every token of the video (chunk-major, absolute token
index = chunk * tokens_per_chunk + offset), so a key range written in absolute chunk units (`StepPlan.
kv_chunks`) indexes the concatenation `[cache[:slice_point tokens], current tokens]` directly.

A call reads all cached tokens before its first chunk and, when it is the writing pass, stores its own
tokens after them. Noisy chunks are written too (as released); a slot is only read after the clean
re-forward of its chunk has overwritten it. With `offload=True` the buffers live in (pinned) CPU memory
and the slice a call needs is copied to the compute device per layer, trading bandwidth for memory.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


class KVCache:
    def __init__(self, num_layers: int, max_tokens: int, offload: bool = False):
        if num_layers < 1 or max_tokens < 1:
            raise ValueError(f"KVCache needs num_layers >= 1 and max_tokens >= 1, got {num_layers}, {max_tokens}")
        self.num_layers = num_layers
        self.max_tokens = max_tokens
        self.offload = offload
        # Allocated on the first write, when head count, head dim, dtype and device are known.
        self._buffers: List[Optional[torch.Tensor]] = [None] * num_layers
        self.filled = 0  # tokens [0, filled) have been written at least once

    def _buffer(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers[layer]
        if buf is None:
            _, heads, dim = like.shape
            pin = self.offload and like.is_cuda
            device = torch.device("cpu") if self.offload else like.device
            buf = torch.zeros(self.max_tokens, heads, 2 * dim, dtype=like.dtype, device=device, pin_memory=pin)
            self._buffers[layer] = buf
        return buf

    def hook(self, read_tokens: int, write_tokens: int = 0):
        """A DiT `kv_hook` that prepends the first `read_tokens` cached tokens to the current keys/values and,
        if `write_tokens` > 0, stores the first `write_tokens` current tokens right after them."""
        if read_tokens + write_tokens > self.max_tokens:
            raise ValueError(f"KV cache of {self.max_tokens} tokens cannot hold [{read_tokens}, {read_tokens + write_tokens})")
        if read_tokens > self.filled:
            raise RuntimeError(f"KV cache read of {read_tokens} tokens, but only {self.filled} were written")

        def merge(layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            current = torch.cat([k, v], dim=-1)  # (S, heads, 2*dim); inference runs one sample per call
            buf = self._buffer(layer, k)
            cached = buf[:read_tokens].to(k.device, non_blocking=True)
            if write_tokens:
                buf[read_tokens:read_tokens + write_tokens].copy_(current[:write_tokens], non_blocking=True)
            full = torch.cat([cached, current], dim=0)
            dim = k.shape[-1]
            return full[..., :dim], full[..., dim:]

        if write_tokens:
            self.filled = max(self.filled, read_tokens + write_tokens)
        return merge

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers if b is not None)
