"""The storage format of the trainer's resharding checkpoints (checkpoint/distributed.py): safetensors files of
rectangular pieces and a JSON index. Nothing in it is unpickled.

    rank_00003.safetensors   the boxes rank 3 wrote, one tensor each, named "<key>@<offsets>", e.g.
                             "model.videodit_blocks.layers.0.mlp.linear_fc1.weight@512,0"
    index.json               rank 0: per key its full shape, dtype and pieces (file, tensor name, offsets,
                             sizes); the pieces of a key tile its full shape exactly

Why not torch.distributed.checkpoint (DCP), used before: its reader unpickles the `.metadata` file and
deserialises the pieces with torch's pickle-based loader, so a checkpoint directory someone else supplies
(inference's ckpt.dir, trainer.resume, distill.teacher, the converter's --src) could run code. The sha256s in
complete.json do not help: whoever writes the directory writes the marker too. Here the index is JSON,
validated strictly before anything is read (file names plain, listed in the marker and big enough for what
they are said to hold; shapes and offsets integers in range; each key's pieces tiling its shape, no overlap,
no hole), and the pieces are read by safetensors' parser (a JSON header and raw bytes), each stored tensor's
header checked against the index.

Saving, every rank describes its boxes, every rank computes the same plan from all of them (a box several
ranks hold, e.g. a buffer each pipeline stage has, is written once, by the first), and each rank writes its
own file. Loading, each target box gets the overlap of every stored piece it meets, read with
`safe_open(...).get_slice(name)[slices]`: only those bytes, from a memory map.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from safetensors import SafetensorError

from magi_train.checkpoint.manager import DISTRIBUTED_INDEX, CorruptCheckpointError
from magi_train.checkpoint.tensorfile import (DTYPE_CODES, DTYPE_NAMES, file_size, nbytes, open_tensor_file,
                                              write_tensor_file)

INDEX_FILE = DISTRIBUTED_INDEX
INDEX_FORMAT = "magi-train-sharded"
INDEX_VERSION = 1
# A piece file is a plain name in the checkpoint directory: no path separators, no hidden files.
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors$")

Shape = Tuple[int, ...]
# What a rank holds for one key: (key, full shape, dtype name, offsets, sizes) of one box.
BoxInfo = Tuple[str, Shape, str, Shape, Shape]


@dataclass(frozen=True)
class Piece:
    file: str
    name: str
    offsets: Shape
    sizes: Shape


@dataclass(frozen=True)
class Entry:
    shape: Shape
    dtype: torch.dtype
    pieces: Tuple[Piece, ...]


Index = Dict[str, Entry]


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def piece_name(key: str, offsets: Sequence[int]) -> str:
    return f"{key}@{','.join(str(o) for o in offsets)}"


# ---------------------------------------------------------------------------- saving


def describe(state: Mapping[str, Tuple[Shape, Sequence[Tuple[Shape, torch.Tensor]]]]) -> List[BoxInfo]:
    """The boxes of a state {key: (full shape, [(offsets, tensor)])}, as plain data for an all_gather."""
    out = []
    for key, (shape, boxes) in state.items():
        for offsets, tensor in boxes:
            if tensor.dtype not in DTYPE_CODES:
                raise ValueError(f"{key}: dtype {tensor.dtype} cannot be stored in a checkpoint")
            out.append((key, tuple(int(n) for n in shape), str(tensor.dtype).removeprefix("torch."),
                        tuple(int(o) for o in offsets), tuple(int(n) for n in tensor.shape)))
    return out


def plan(per_rank: Sequence[Sequence[BoxInfo]]) -> Tuple[Index, List[List[Tuple[str, Shape]]], List[int]]:
    """(the index, per rank the (key, offsets) it writes, per rank the size of its file or 0 for none) of a
    save whose ranks hold `per_rank`; the same on every rank. Raises ValueError when ranks disagree on a key's
    shape or dtype, or when the boxes do not tile a key's shape exactly."""
    shapes: Dict[str, Tuple[Shape, str]] = {}
    pieces: Dict[str, List[Piece]] = {}
    writes: List[List[Tuple[str, Shape]]] = [[] for _ in per_rank]
    specs: List[list] = [[] for _ in per_rank]
    seen = set()
    for rank, boxes in enumerate(per_rank):
        for key, shape, dtype, offsets, sizes in boxes:
            if shapes.setdefault(key, (shape, dtype)) != (shape, dtype):
                raise ValueError(f"{key}: rank {rank} holds it as {shape} {dtype}, an earlier rank as "
                                 f"{shapes[key][0]} {shapes[key][1]}")
            if (key, offsets, sizes) in seen:
                continue  # the same box on several ranks (replicas): written once
            seen.add((key, offsets, sizes))
            pieces.setdefault(key, []).append(Piece(rank_file(rank), piece_name(key, offsets), offsets, sizes))
            writes[rank].append((key, offsets))
            specs[rank].append((piece_name(key, offsets), DTYPE_NAMES[dtype], sizes))
    index = {key: Entry(shape, DTYPE_NAMES[dtype], tuple(pieces[key])) for key, (shape, dtype) in shapes.items()}
    for key, entry in index.items():
        problem = _tiling_problem(entry)
        if problem:
            raise ValueError(f"the boxes the ranks would save for {key} {problem}")
    return index, writes, [file_size(s) if s else 0 for s in specs]


def index_json(index: Index) -> bytes:
    tensors = {key: {"shape": list(e.shape), "dtype": str(e.dtype).removeprefix("torch."),
                     "pieces": [{"file": p.file, "name": p.name, "offsets": list(p.offsets), "sizes": list(p.sizes)}
                                for p in e.pieces]}
               for key, e in index.items()}
    return json.dumps({"format": INDEX_FORMAT, "version": INDEX_VERSION, "tensors": tensors}, indent=1).encode()


def write_pieces(directory: Path, rank: int, state: Mapping[str, Tuple[Shape, Sequence[Tuple[Shape, torch.Tensor]]]],
                 writes: Sequence[Tuple[str, Shape]]) -> None:
    """Write this rank's file: the boxes of `state` the plan gave it (none: no file)."""
    if not writes:
        return
    boxes = {(key, tuple(int(o) for o in offsets)): t for key, (_, held) in state.items() for offsets, t in held}
    write_tensor_file(directory / rank_file(rank), [(piece_name(key, offsets), boxes[(key, offsets)])
                                                    for key, offsets in writes])


# ---------------------------------------------------------------------------- the index, checked


def _volume(sizes: Sequence[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _tiling_problem(entry: Entry) -> str | None:
    """Why `entry`'s pieces do not tile its shape exactly (None when they do): each inside the shape, no two
    overlapping, together as many elements as the shape."""
    ndim = len(entry.shape)
    for p in entry.pieces:
        if len(p.offsets) != ndim or len(p.sizes) != ndim:
            return f"has piece {p.name!r} of {len(p.sizes)} dimensions, the tensor {ndim}"
        if any(o < 0 or n < 0 or o + n > d for o, n, d in zip(p.offsets, p.sizes, entry.shape)):
            return f"has piece {p.name!r} (offsets {list(p.offsets)}, sizes {list(p.sizes)}) outside its shape " \
                   f"{list(entry.shape)}"
    # Sweep along dimension 0: only pieces whose first-dimension ranges meet can overlap.
    order = sorted((p for p in entry.pieces if _volume(p.sizes)), key=lambda p: p.offsets[:1])
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            if ndim and b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            if all(bo < ao + an and ao < bo + bn for ao, an, bo, bn in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                return f"has overlapping pieces {a.name!r} and {b.name!r}"
    covered = sum(_volume(p.sizes) for p in entry.pieces)
    if covered != _volume(entry.shape):
        return f"has pieces covering {covered} of its {_volume(entry.shape)} elements (a hole)"
    return None


def _ints(value: Any, where: str, length: int | None = None) -> Shape:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"{where} must be a list of non-negative integers, got {value!r:.80}")
    if length is not None and len(value) != length:
        raise ValueError(f"{where} has {len(value)} entries, the tensor {length} dimensions")
    return tuple(value)


def _fields(value: Any, where: str, names: Sequence[str]) -> Dict[str, Any]:
    if not isinstance(value, dict) or sorted(value) != sorted(names):
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{where} must be an object with exactly {', '.join(names)}; got {got}")
    return value


def read_index(path: Path, files: Mapping[str, Mapping[str, Any]]) -> Index:
    """The index of checkpoint `path`, whose marker lists `files` ({name: {"size", ...}}); raises
    CorruptCheckpointError naming the index and the entry at the first thing that is not as it must be."""
    file = path / INDEX_FILE
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{file} is not valid JSON: {e}") from e
    try:
        return _parse_index(raw, files)
    except ValueError as e:
        raise CorruptCheckpointError(f"{file}: {e}") from e


def _parse_index(raw: Any, files: Mapping[str, Mapping[str, Any]]) -> Index:
    top = _fields(raw, "the index", ("format", "version", "tensors"))
    if top["format"] != INDEX_FORMAT or top["version"] != INDEX_VERSION:
        raise ValueError(f"format {top['format']!r} version {top['version']!r} is not {INDEX_FORMAT!r} "
                         f"version {INDEX_VERSION}")
    if not isinstance(top["tensors"], dict):
        raise ValueError("tensors must be an object")
    index: Index = {}
    claimed: Dict[str, int] = {}  # bytes each piece file is said to hold
    names = set()
    for key, value in top["tensors"].items():
        where = f"tensors[{key!r}]"
        entry = _fields(value, where, ("shape", "dtype", "pieces"))
        shape = _ints(entry["shape"], f"{where}.shape")
        dtype = DTYPE_NAMES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise ValueError(f"{where}.dtype {entry['dtype']!r:.40} is not one of {', '.join(DTYPE_NAMES)}")
        if not isinstance(entry["pieces"], list) or not entry["pieces"]:
            raise ValueError(f"{where}.pieces must be a non-empty list")
        pieces = []
        for i, p in enumerate(entry["pieces"]):
            at = f"{where}.pieces[{i}]"
            p = _fields(p, at, ("file", "name", "offsets", "sizes"))
            if not isinstance(p["file"], str) or not _FILE_RE.match(p["file"]) or p["file"] not in files:
                raise ValueError(f"{at}.file {p['file']!r:.80} is not a .safetensors file of this checkpoint "
                                 f"(a plain name listed in complete.json)")
            if not isinstance(p["name"], str) or not p["name"] or (p["file"], p["name"]) in names:
                raise ValueError(f"{at}.name {p['name']!r:.80} is empty, not a string or used twice")
            names.add((p["file"], p["name"]))
            piece = Piece(p["file"], p["name"], _ints(p["offsets"], f"{at}.offsets", len(shape)),
                          _ints(p["sizes"], f"{at}.sizes", len(shape)))
            claimed[piece.file] = claimed.get(piece.file, 0) + nbytes(dtype, piece.sizes)
            if claimed[piece.file] > files[piece.file]["size"]:
                raise ValueError(f"{at}: {piece.file} has {files[piece.file]['size']} bytes, fewer than the "
                                 f"pieces the index places in it")
            pieces.append(piece)
        index[key] = Entry(shape, dtype, tuple(pieces))
        problem = _tiling_problem(index[key])
        if problem:
            raise ValueError(f"{where} {problem}")
    return index


# ---------------------------------------------------------------------------- loading


class PieceReader:
    """Reads boxes of the tensors of checkpoint `path` (described by `index`) into place. A context manager:
    the files it opened are closed on exit."""

    def __init__(self, path: Path, index: Index) -> None:
        self.path, self.index = path, index
        self._stack = ExitStack()
        self._files: Dict[str, Any] = {}
        self._checked: set = set()

    def __enter__(self) -> "PieceReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _open(self, entry: Entry, piece: Piece):
        """The open file holding `piece`, after checking its stored tensor against the index (once)."""
        handle = self._files.get(piece.file)
        if handle is None:
            handle = self._files[piece.file] = self._stack.enter_context(open_tensor_file(self.path / piece.file))
        if (piece.file, piece.name) not in self._checked:
            where = f"{self.path / piece.file}"
            try:
                stored = handle.get_slice(piece.name)
                shape, code = tuple(stored.get_shape()), stored.get_dtype()
            except SafetensorError as e:
                raise CorruptCheckpointError(f"{where} holds no tensor {piece.name!r}, which {INDEX_FILE} lists "
                                             f"({e})") from e
            if shape != piece.sizes or code != DTYPE_CODES[entry.dtype]:
                raise CorruptCheckpointError(f"{where}: tensor {piece.name!r} is {code} {list(shape)}, {INDEX_FILE} "
                                             f"says {DTYPE_CODES[entry.dtype]} {list(piece.sizes)}")
            self._checked.add((piece.file, piece.name))
        return handle

    def read_into(self, key: str, offsets: Sequence[int], target: torch.Tensor) -> None:
        """Fill `target`, the box of `key` at `offsets`, from every stored piece it overlaps."""
        entry = self.index.get(key)
        if entry is None:
            raise ValueError(f"checkpoint {self.path} holds no {key!r} ({INDEX_FILE})")
        if len(offsets) != len(entry.shape) or target.ndim != len(entry.shape) or any(
                o < 0 or o + n > d for o, n, d in zip(offsets, target.shape, entry.shape)):
            raise ValueError(f"{key}: the box at {list(offsets)} of size {list(target.shape)} is outside the "
                             f"stored shape {list(entry.shape)}")
        for piece in entry.pieces:
            lo = [max(o, po) for o, po in zip(offsets, piece.offsets)]
            hi = [min(o + n, po + pn) for o, n, po, pn in zip(offsets, target.shape, piece.offsets, piece.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            handle = self._open(entry, piece)
            if not entry.shape:
                data = handle.get_tensor(piece.name)
            else:
                data = handle.get_slice(piece.name)[tuple(slice(a - po, b - po)
                                                           for a, b, po in zip(lo, hi, piece.offsets))]
            dest = target
            for dim, (a, b, o) in enumerate(zip(lo, hi, offsets)):
                dest = dest.narrow(dim, a - o, b - a)
            dest.copy_(data)
