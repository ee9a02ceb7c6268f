"""Tensor files in the safetensors format: written here one tensor at a time, read by safetensors' own parser.

A safetensors file is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, optionally "__metadata__": {str: str}) and the raw bytes of the tensors, back to back. Reading
one runs no code from it (unlike a pickle), which is why every checkpoint file of ours is either this or JSON.

Why our own writer rather than `safetensors.torch.save_file`: that refuses tensors sharing memory (the two
boxes of a SwiGLU shard are views of one local tensor) and wants all of them contiguous at once; streaming
tensor by tensor needs at most one tensor's contiguous CPU copy, and every byte goes through
`atomic.write_file`, which fsyncs and reports a full disk at the write that hit it. What it writes is checked
by reading it back through `safe_open` in the tests.
"""

from __future__ import annotations

import json
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Mapping, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

from magi_train.checkpoint.atomic import write_file

# torch dtype -> safetensors' dtype code (the ones a checkpoint of ours can hold).
DTYPE_CODES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
# How JSON files of ours (the sharded index) spell a dtype: torch's own name without "torch.".
DTYPE_NAMES: Dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in DTYPE_CODES}

# (name, dtype, shape) of one tensor of a file: enough to lay out its header before any data exists.
TensorSpec = Tuple[str, torch.dtype, Tuple[int, ...]]

_METADATA_KEY = "__metadata__"


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count * torch.empty((), dtype=dtype).element_size()


def header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The header of a file holding `specs` in this order (their data follows in the same order)."""
    entries: Dict[str, object] = {}
    if metadata:
        entries[_METADATA_KEY] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        if name == _METADATA_KEY or name in entries:
            raise ValueError(f"tensor name {name!r} is reserved or given twice")
        if dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in a checkpoint "
                             f"(stored dtypes: {', '.join(DTYPE_NAMES)})")
        size = nbytes(dtype, shape)
        entries[name] = {"dtype": DTYPE_CODES[dtype], "shape": [int(n) for n in shape],
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    return struct.pack("<Q", len(text)) + text


def file_size(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> int:
    return len(header(specs, metadata)) + sum(nbytes(dtype, shape) for _, dtype, shape in specs)


def _data(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, in C order: a contiguous CPU copy only where it is not one already."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_tensor_file(path: Path, tensors: Sequence[Tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Create the safetensors file `path` (it must not exist) holding `tensors` in this order, fsynced; the
    tensors may be views of each other. Returns the bytes written. OSErrors come from the write that failed."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")  # the raw bytes are copied
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors]
    head = header(specs, metadata)

    def chunks() -> Iterator[bytes | memoryview]:
        yield head
        for _, tensor in tensors:
            yield _data(tensor)  # made when the writer gets to it: one tensor's copy alive at a time

    return write_file(path, chunks())


@contextmanager
def open_tensor_file(path: Path) -> Iterator:
    """`safe_open(path)`, with a file that is not a safetensors file (or unreadable) reported as a ValueError
    naming it."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    with handle as f:
        yield f


def read_tensor_file(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of safetensors file `path`, in the order of their data (the order they were written in)."""
    with open_tensor_file(path) as f:
        try:
            return {name: f.get_tensor(name) for name in f.offset_keys()}
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
