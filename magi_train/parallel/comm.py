"""Point-to-point and broadcast of tensors whose shape and dtype the receivers do not know in advance.

Each message is preceded by a small int64 header (dtype code, ndim, shape), so a pipeline stage or a VAE
tile can be passed on without every rank re-deriving its shape from model internals. Headers cost one tiny
message each, negligible next to a DiT forward or a tile decode. Works on gloo (CPU tensors) and NCCL (CUDA
tensors): the header lives on the same device as the data.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.bool)
_MAX_DIMS = 8


def _header(t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in _DTYPES or t.ndim > _MAX_DIMS:
        raise ValueError(f"cannot send a {t.dtype} tensor of {t.ndim} dims (supported: {_DTYPES}, <= {_MAX_DIMS} dims)")
    fields = [_DTYPES.index(t.dtype), t.ndim, *t.shape] + [0] * (_MAX_DIMS - t.ndim)
    return torch.tensor(fields, dtype=torch.int64, device=t.device)


def _empty_like_header(header: torch.Tensor, device: torch.device) -> torch.Tensor:
    code, ndim, *shape = header.tolist()
    return torch.empty(shape[:ndim], dtype=_DTYPES[code], device=device)


def send_tensor(t: torch.Tensor, group: dist.ProcessGroup, dst: int) -> None:
    """Send `t` to group rank `dst` (blocking)."""
    dist.send(_header(t), group=group, group_dst=dst)
    dist.send(t.contiguous(), group=group, group_dst=dst)


def recv_tensor(group: dist.ProcessGroup, src: int, device: torch.device) -> torch.Tensor:
    """Receive one tensor sent by `send_tensor` from group rank `src`."""
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, group=group, group_src=src)
    out = _empty_like_header(header, device)
    dist.recv(out, group=group, group_src=src)
    return out


def broadcast_tensor(t: Optional[torch.Tensor], group: dist.ProcessGroup, src: int, device: torch.device) -> torch.Tensor:
    """Group rank `src` passes `t`; every rank returns it (the source its own tensor, unchanged)."""
    if group.rank() == src:
        if t is None:
            raise ValueError("the broadcast source must pass a tensor")
        dist.broadcast(_header(t), group=group, group_src=src)
        t = t.contiguous()
        dist.broadcast(t, group=group, group_src=src)
        return t
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    dist.broadcast(header, group=group, group_src=src)
    out = _empty_like_header(header, device)
    dist.broadcast(out, group=group, group_src=src)
    return out
