"""Training checkpoints that reshard: saved under one parallel layout, resumed under any other.

Every tensor is stored in full (TP=1, released-layout) coordinates, in the format of checkpoint/sharded.py
(safetensors pieces and a JSON index: nothing is unpickled, so a checkpoint from someone else cannot run
code). Saving, each rank writes the rectangular pieces of full tensors it is responsible for into its own
file; loading, each rank asks for the boxes its CURRENT layout needs, and every stored piece's overlap with
each box is read (only those bytes) straight into the parameters and optimizer moments.

What scales: a rank writes only its share and reads only the parts of stored pieces that overlap its own
tensors, never a full model; a rank's transient memory is the largest such overlap; the sha256 hashing of
the files is split over the ranks. What does not: every rank reads and checks the whole `index.json` (one
entry per stored piece), and the save's plan is one all_gather of every rank's box list.
`read_full_model_state` holds the whole model in one process, by design.

    model.<parameter name>             full shape; the TP writers of dp x cp rank 0 of each pipeline stage
    optim.<parameter name>.exp_avg     full shape; the parameter's ZeRO owner (in dp x cp), TP writers
    optim.<parameter name>.exp_avg_sq  full shape; likewise
    optim.<parameter name>.step        (1,); the owner on TP rank 0
    optim.<parameter name>.master      full shape, fp32; like exp_avg, for parameters kept in another dtype
                                       (bf16 training's master weights; without it a load takes the weights)
    <prefix>.<parameter name>          full shape, the given tensors' own dtype; written like model.* (the
                                       caller's `extra_weights`, e.g. prefix "ema": a distillation EMA)
    trainer.json                       rank 0: the caller's `extra` plus the saving "layout"

`model_keys` (LoRA: the adapters) limits what a checkpoint holds to those model keys, their optimizer state and
their extra weights (a frozen base is rebuilt from where it came from, not stored); a load then fills only them.

`extra_weights` are further sets of per-parameter tensors (one dict per held model chunk, same names and
local shapes as its parameters) stored and resharded exactly like the model weights; a checkpoint may hold
sets a loader does not ask for (they are skipped), and `checkpoint_has` tells whether it holds a set.

"TP writers": a TP rank holding a slice no other rank writes (`ShardSpec.writer`: replicated tensors
and replicated KV heads are written once). A rank's pieces follow `parallel.plan.shard_spec`, so a SwiGLU
`linear_fc1` shard is two boxes ([gate_r] and [up_r]) of the full [gate | up] tensor.

Why boxes rather than ShardedTensor or DTensor: ShardedTensor's constructors insist on a global layout of
non-overlapping shards, which a load target with replicas (every data-parallel rank reads the same slice)
is not; DTensor cannot express the two-piece SwiGLU shard. The save's plan deduplicates boxes several ranks
hold and checks that the saved boxes neither overlap nor leave holes (sharded.plan).

A checkpoint in the older DCP layout (a pickled `.metadata`) is refused with an error that says so; it is
never read.

The directory is installed through `CheckpointManager` (begin_save / finish_save): a temporary directory,
a `complete.json` marker written last, one rename. Rank 0 checks the free space against the bytes all ranks
will write before anything is written; a write that fails (a full disk: "no space left on device", with
the free space left) fails the save on every rank and the temporary directory is removed. Only rank 0
touches the manager's state; the other ranks should open theirs read-only (a writable manager tidies up
`.tmp_*` directories when created).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.distributed as dist

from magi_train.checkpoint import sharded
from magi_train.checkpoint.atomic import check_free_space, write_error, write_file
from magi_train.checkpoint.magi1 import check_state_dict
from magi_train.checkpoint.manager import (DCP_METADATA, CheckpointManager, CorruptCheckpointError, file_digest,
                                           read_marker, refuse_pickles, step_dir_name, verify_checkpoint)
from magi_train.model.dit import VideoDiT
from magi_train.parallel.groups import Parallel
from magi_train.parallel.plan import plan_of, shard_spec
from magi_train.parallel.sharding import ShardSpec
from magi_train.parallel.zero import ShardedAdamW

TRAINER_FILE = "trainer.json"
INDEX_FILE = sharded.INDEX_FILE
_MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "master"
RESERVED_PREFIXES = ("model", "optim", "trainer")  # not available as `extra_weights` prefixes

# Prefix -> one {parameter name: local tensor} per held model chunk (parallel to `models`).
ExtraWeights = Mapping[str, Sequence[Mapping[str, torch.Tensor]]]

# A box: its offsets in the full tensor, and the local tensor (a view) holding it.
Box = Tuple[Tuple[int, ...], torch.Tensor]


# ---------------------------------------------------------------------------- boxes


def _boxes(spec: ShardSpec, local: torch.Tensor) -> List[Box]:
    """The boxes of the full tensor that `local` holds, as views of `local` (reads land in place)."""
    if spec.dim is None:
        return [((0,) * local.ndim, local)]
    boxes = []
    for piece in spec.pieces:
        offsets = [0] * local.ndim
        offsets[spec.dim] = piece.global_start
        boxes.append((tuple(offsets), local.narrow(spec.dim, piece.local_start, piece.length)))
    return boxes


# ---------------------------------------------------------------------------- collectives


class _Ranks:
    """The processes taking part in one save or load: every rank of the job, or this process alone when
    `parallel` is None or has world_size 1, even inside a larger job (e.g. one single-process oracle per
    rank)."""

    def __init__(self, parallel: Parallel | None) -> None:
        self.rank, self.size = (0, 1) if parallel is None else (parallel.rank, parallel.world_size)
        self.collective = self.size > 1
        if self.collective and dist.get_world_size() != self.size:
            raise ValueError(f"parallel.world_size={self.size} but the job has {dist.get_world_size()} ranks")

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on every rank; if it failed on any rank, raise on every rank.

        Used around each local step between two collectives: a rank that raised alone would leave the
        others waiting in the next collective until the timeout."""
        try:
            result, error = fn(), None
        except Exception as e:  # noqa: BLE001 - re-raised below, on this rank and (as text) on the others
            result, error = None, e
        errors = self.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed:
            raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return result

    def all_gather(self, obj: Any) -> List[Any]:
        if not self.collective:
            return [obj]
        out: List[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------------------- what a rank holds


def _full_model(models: Sequence[VideoDiT]) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Key -> (full shape, dtype) of the whole model (every pipeline stage), as parallelize_dit recorded it."""
    return dict(plan_of(models[0]).full_state)


def _full_parameter_names(models: Sequence[VideoDiT]) -> List[str]:
    """The parameter names of the whole model (the keys an extra weight set has; buffers have none)."""
    return list(plan_of(models[0]).full_parameters)


def _held(models: Sequence[VideoDiT], keys: Sequence[str] | None = None) -> Dict[str, Tuple[VideoDiT, torch.Tensor]]:
    """Parameter name -> (the model chunk holding it, its local tensor), over this rank's chunks (only `keys`,
    when given)."""
    wanted = None if keys is None else set(keys)
    held = {}
    for model in models:
        for name, tensor in model.state_dict(keep_vars=True).items():
            if wanted is None or name in wanted:
                held[name] = (model, tensor)
    return held


def _optimizer_names(optimizer: ShardedAdamW, models: Sequence[VideoDiT]) -> Dict[str, str]:
    """Optimizer name -> model parameter name, matched by identity (the caller may have prefixed names)."""
    by_id = {id(p): name for model in models for name, p in model.named_parameters()}
    names = {}
    for opt_name, p in optimizer.params.items():
        if id(p) not in by_id:
            raise ValueError(f"optimizer parameter {opt_name!r} is not a parameter of the given models")
        names[opt_name] = by_id[id(p)]
    return names


def _check_prefix(prefix: Any) -> None:
    if not isinstance(prefix, str) or not prefix.isidentifier() or prefix in RESERVED_PREFIXES:
        raise ValueError(f"extra_weights prefix {prefix!r} is not allowed: it must be a Python identifier other "
                         f"than {', '.join(map(repr, RESERVED_PREFIXES))}")


def _extra_held(models: Sequence[VideoDiT], extra_weights: ExtraWeights | None, keys: Sequence[str] | None = None
                ) -> Dict[str, Dict[str, Tuple[VideoDiT, torch.Tensor]]]:
    """Prefix -> parameter name -> (the model chunk, the extra tensor), after checking that every set
    matches the models' parameters (those among `keys`, when given): one dict per model, same names, same
    local shapes."""
    wanted = None if keys is None else set(keys)
    out: Dict[str, Dict[str, Tuple[VideoDiT, torch.Tensor]]] = {}
    for prefix, dicts in (extra_weights or {}).items():
        _check_prefix(prefix)
        if isinstance(dicts, Mapping) or len(dicts) != len(models):
            raise ValueError(f"extra_weights[{prefix!r}] must be a sequence of one dict per model "
                             f"({len(models)}), got {type(dicts).__name__}"
                             + ("" if isinstance(dicts, Mapping) else f" of length {len(dicts)}"))
        held: Dict[str, Tuple[VideoDiT, torch.Tensor]] = {}
        for i, (model, tensors) in enumerate(zip(models, dicts)):
            params = {n: p for n, p in model.named_parameters() if wanted is None or n in wanted}
            missing = [name for name in params if name not in tensors]
            unexpected = [name for name in tensors if name not in params]
            if missing or unexpected:
                what = (f"lacks parameter {missing[0]!r}" if missing else f"has parameter {unexpected[0]!r}, "
                        "which the model does not")
                raise ValueError(f"extra_weights[{prefix!r}][{i}] {what} ({len(missing)} missing, "
                                 f"{len(unexpected)} unexpected names)")
            for name, p in params.items():
                t = tensors[name]
                if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"extra_weights[{prefix!r}][{i}] parameter {name!r}: expected local shape "
                                     f"{tuple(p.shape)}, got {got}")
                held[name] = (model, t)
        out[prefix] = held
    return out


def _save_state(models: Sequence[VideoDiT], optimizer: ShardedAdamW, parallel: Parallel,
                extra: Dict[str, Dict[str, Tuple[VideoDiT, torch.Tensor]]],
                model_keys: Sequence[str] | None = None) -> Dict[str, Any]:
    """{key: (full shape, boxes this rank writes)}; keys another rank writes are left out."""
    full = _full_model(models)
    held = _held(models, model_keys)
    state: Dict[str, Any] = {}
    # Parameters are identical over the dp x cp ranks: the first of them writes.
    if _group_rank(parallel.groups.dp_cp) == 0:
        for name, (model, tensor) in held.items():
            spec = shard_spec(model, name, full[name][0])
            if spec.writer:
                state[f"model.{name}"] = (spec.full_shape, _boxes(spec, tensor))
        # Extra weight sets: the same boxes and writers as the parameters they shadow.
        for prefix, tensors in extra.items():
            for name, (model, tensor) in tensors.items():
                spec = shard_spec(model, name, full[name][0])
                if spec.writer:
                    state[f"{prefix}.{name}"] = (spec.full_shape, _boxes(spec, tensor))
    names = _optimizer_names(optimizer, models)
    for opt_name, moments in optimizer.owned_state().items():
        name = names[opt_name]
        if name not in held:
            raise ValueError(f"the optimizer trains {name!r}, which model_keys leaves out of the checkpoint")
        model, _ = held[name]
        spec = shard_spec(model, name, full[name][0])
        if spec.writer:
            for moment in (*_MOMENTS, MASTER):
                if moment in moments:
                    state[f"optim.{name}.{moment}"] = (spec.full_shape, _boxes(spec, moments[moment]))
        if parallel.tp_rank == 0:
            state[f"optim.{name}.step"] = ((1,), [((0,), moments["step"].reshape(1))])
    return state


# ---------------------------------------------------------------------------- saving


def save_train_state(manager: CheckpointManager, step: int, models: Sequence[VideoDiT], optimizer: ShardedAdamW,
                     extra: Dict[str, Any], parallel: Parallel,
                     extra_weights: Dict[str, Sequence[Dict[str, torch.Tensor]]] | None = None,
                     model_keys: Sequence[str] | None = None) -> Path:
    """Write checkpoint `step` from every rank (collective); returns its final path on every rank.

    `model_keys`: the whole model's keys to store (None: every state-dict key); LoRA passes its adapters', and
    the optimizer must then train nothing else; `extra_weights` then have those parameters' names.

    `extra` is the JSON-able trainer state (rank 0's is written); the saving layout is added to it as
    "layout". `extra_weights` (e.g. {"ema": [one dict per model]}) are further per-parameter tensors, each
    dict with the names and local shapes of its model's parameters, saved as `<prefix>.<name>` in full
    coordinates like the parameters (in their own dtype); a bad prefix or set raises ValueError.

    A failure on any rank fails the save on every rank and leaves the previous checkpoints as they were;
    a crash leaves at most a `.tmp_*` directory without marker, which is never taken for a checkpoint and
    is removed by the next writable manager."""
    if "layout" in extra:
        raise ValueError('extra["layout"] is reserved: save_train_state records the saving layout there')
    layout = {"tp": parallel.tp, "cp": parallel.cp, "pp": parallel.pp, "dp": parallel.dp, "vpp": len(models),
              "world_size": parallel.world_size}
    ranks = _Ranks(parallel)
    rank, world = ranks.rank, ranks.size

    def prepare() -> Tuple[str, Dict[str, Any]]:
        held_extra = _extra_held(models, extra_weights, model_keys)
        return (json.dumps({**extra, "layout": layout}, indent=2),
                _save_state(models, optimizer, parallel, held_extra, model_keys))

    trainer, state = ranks.agree(prepare)  # on every rank, so that a bad `extra` fails everywhere
    # Every rank's boxes (plain data, between our own ranks), then the same plan on every rank.
    boxes = ranks.all_gather(ranks.agree(lambda: sharded.describe(state)))
    index, writes, sizes = ranks.agree(lambda: sharded.plan(boxes))
    what = f"saving checkpoint {manager.root / step_dir_name(step)}"

    def begin() -> str | None:
        if rank != 0:
            return None
        head = [trainer.encode("utf-8"), sharded.index_json(index)]
        check_free_space(manager.root, sum(sizes) + sum(map(len, head)), what)  # before anything is written
        tmp = manager.begin_save(step)
        try:
            for name, data in zip((TRAINER_FILE, INDEX_FILE), head):
                write_file(tmp / name, [data])
        except OSError as e:
            manager.abort_save(tmp)
            raise write_error(e, what, manager.root) from e
        except BaseException:
            manager.abort_save(tmp)
            raise
        return str(tmp)

    tmp = Path(ranks.all_gather(ranks.agree(begin))[0])  # every rank writes into rank 0's temporary directory
    try:
        def write() -> None:
            try:
                sharded.write_pieces(tmp, rank, state, writes[rank])
            except OSError as e:
                raise write_error(e, what, manager.root) from e

        ranks.agree(write)  # on every rank if any rank's writes failed
        # The hashing of the files is split over the ranks; rank 0 writes the marker and renames.
        digests = ranks.agree(lambda: {name: file_digest(tmp / name)
                                  for i, name in enumerate(sorted(os.listdir(tmp))) if i % world == rank})
        shared = {name: info for part in ranks.all_gather(digests) for name, info in part.items()}
        final = ranks.agree(lambda: str(manager.finish_save(tmp, step, shared)) if rank == 0 else None)
        return Path(ranks.all_gather(final)[0])
    except BaseException:
        if rank == 0:
            manager.abort_save(tmp)  # every rank is past its writes: the collectives above failed together
        raise


# ---------------------------------------------------------------------------- loading


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether checkpoint `path` (with a marker) was written by `save_train_state`: in this format (an
    `index.json`), or in the older pickle-based one (a DCP `.metadata`), which every reader here refuses."""
    files = read_marker(path)["files"]
    return INDEX_FILE in files or DCP_METADATA in files


def _format_checked(path: Path) -> Dict[str, Any]:
    """The marker of checkpoint `path`, after refusing the older DCP format and any other pickle-based file
    it lists (before any file is hashed or read)."""
    marker = read_marker(path)
    refuse_pickles(path, marker["files"])
    if INDEX_FILE not in marker["files"]:
        raise ValueError(f"checkpoint {path} was not written by save_train_state (it has no {INDEX_FILE})")
    return marker


def _read_index(path: Path, marker: Dict[str, Any] | None = None) -> sharded.Index:
    """The checked index of checkpoint `path`; the older DCP format is refused without being read."""
    return sharded.read_index(path, (marker or _format_checked(path))["files"])


def _prefix(key: str) -> str:
    return key.split(".", 1)[0]


def _stored_prefixes(index: sharded.Index) -> List[str]:
    return sorted({_prefix(k) for k in index})


def _check_keys(path: Path, index: sharded.Index, full: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
                held: Dict[str, Tuple[VideoDiT, torch.Tensor]],
                extra: Mapping[str, Dict[str, Tuple[VideoDiT, torch.Tensor]]] | None = None,
                parameter_names: Sequence[str] = ()) -> None:
    """Raise naming every key that is missing, unexpected or of the wrong shape, and the dtype mismatches
    of the parameters (and requested extra weights) this rank holds (loading must be bitwise). An extra set
    has one key per name of `parameter_names` (the whole model's parameters).

    Extra weight sets the checkpoint holds but the caller did not ask for (`extra`'s prefixes) are
    ignored; a requested set the checkpoint lacks entirely raises naming the checkpoint and the prefix."""
    extra = extra or {}
    for prefix in extra:
        if prefix not in _stored_prefixes(index):
            raise ValueError(f"checkpoint {path} holds no {prefix!r} weights (it holds "
                             f"{', '.join(map(repr, _stored_prefixes(index)))}); use checkpoint_has(path, "
                             f"{prefix!r}) to check before loading")

    def ignored(key: str) -> bool:  # an extra weight set nobody asked for
        p = _prefix(key)
        return p.isidentifier() and p not in RESERVED_PREFIXES and p not in extra

    got: Dict[str, Any] = {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in index.items()
                           if not ignored(k)}
    expected: Dict[str, Tuple[Tuple[int, ...], torch.dtype | None]] = {
        f"model.{name}": (shape, held[name][1].dtype if name in held else None) for name, (shape, _) in full.items()}
    for prefix, tensors in extra.items():
        expected.update({f"{prefix}.{name}": (full[name][0], tensors[name][1].dtype if name in tensors else None)
                         for name in parameter_names})
    # Optimizer state exists for the parameters that had been stepped; for each, all three parts.
    stepped = {k[len("optim."):-len(f".{m}")] for k in got for m in (*_MOMENTS, "step")
               if k.startswith("optim.") and k.endswith(f".{m}")}
    for name in stepped & full.keys():
        for moment in _MOMENTS:
            expected[f"optim.{name}.{moment}"] = (full[name][0], None)
        expected[f"optim.{name}.step"] = ((1,), None)
        if f"optim.{name}.{MASTER}" in got:  # optional: only parameters trained in another dtype have one
            expected[f"optim.{name}.{MASTER}"] = (full[name][0], None)
    check_state_dict(expected, got, path / INDEX_FILE)


def _read_boxes(path: Path, index: sharded.Index, targets: Mapping[str, Sequence[Box]]) -> None:
    with sharded.PieceReader(path, index) as reader:
        for key, boxes in targets.items():
            for offsets, tensor in boxes:
                reader.read_into(key, offsets, tensor)


def load_train_state(path: str | Path, models: Sequence[VideoDiT], optimizer: ShardedAdamW,
                     parallel: Parallel,
                     extra_weights: Dict[str, Sequence[Dict[str, torch.Tensor]]] | None = None,
                     model_keys: Sequence[str] | None = None) -> Dict[str, Any]:
    """Fill the models' local parameters and the optimizer's owned state for the CURRENT layout from a
    checkpoint saved under any layout (collective). Returns the saved trainer state (with "layout").

    `extra_weights` (as for `save_train_state`: per prefix, one dict per model with its parameters' names
    and local shapes) are filled in place from the checkpoint's `<prefix>.*` tensors, which must have the
    dicts' dtypes; a prefix the checkpoint lacks raises ValueError (see `checkpoint_has`). Extra sets the
    checkpoint holds but that are not asked for are skipped.

    Parameters the optimizer owns now but that had no optimizer state when saved keep a fresh state.

    `model_keys` (as saved: LoRA's adapters): only those keys are expected and filled; the rest of the model
    is left as it is (a frozen base the caller rebuilt)."""
    path = Path(path)
    ranks = _Ranks(parallel)
    rank, world = ranks.rank, ranks.size

    def plan() -> Tuple[sharded.Index, Dict[str, List[Box]], Dict[str, Dict[str, torch.Tensor]], Dict[str, Any]]:
        marker = _format_checked(path)
        verify_checkpoint(path, share=(rank, world))  # sizes of all files; this rank's share of the sha256s
        index = _read_index(path, marker)
        trainer = read_trainer_state(path)
        full = _full_model(models)
        if model_keys is not None:
            full = {k: full[k] for k in model_keys}
        held = _held(models, model_keys)
        held_extra = _extra_held(models, extra_weights, model_keys)
        names = _full_parameter_names(models) if model_keys is None else [n for n in _full_parameter_names(models)
                                                                          if n in full]
        _check_keys(path, index, full, held, held_extra, names if held_extra else ())
        targets: Dict[str, List[Box]] = {}
        for name, (model, tensor) in held.items():
            targets[f"model.{name}"] = _boxes(shard_spec(model, name, full[name][0]), tensor.detach())
        for prefix, tensors in held_extra.items():
            for name, (model, tensor) in tensors.items():
                targets[f"{prefix}.{name}"] = _boxes(shard_spec(model, name, full[name][0]), tensor.detach())
        # The optimizer state of the parameters this rank owns NOW, in its current TP layout.
        names = _optimizer_names(optimizer, models)
        moments: Dict[str, Dict[str, torch.Tensor]] = {}
        for opt_name, p in optimizer.params.items():
            name, key = names[opt_name], f"optim.{names[opt_name]}"
            if optimizer.owner[opt_name] != optimizer.rank or f"{key}.step" not in index:
                continue
            spec = shard_spec(held[name][0], name, full[name][0])
            parts = (*_MOMENTS, MASTER) if f"{key}.{MASTER}" in index and opt_name in optimizer.master else _MOMENTS
            state = {m: torch.empty(p.shape, dtype=index[f"{key}.{m}"].dtype, device=p.device) for m in parts}
            state["step"] = torch.empty(1, dtype=index[f"{key}.step"].dtype)
            for m in parts:
                targets[f"{key}.{m}"] = _boxes(spec, state[m])
            targets[f"{key}.step"] = [((0,), state["step"])]
            moments[opt_name] = state
        return index, targets, moments, trainer

    index, targets, moments, trainer = ranks.agree(plan)
    ranks.agree(lambda: _read_boxes(path, index, targets))  # a rank that fails to read fails the load everywhere
    optimizer.load_owned_state(moments)
    return trainer


def read_trainer_state(path: str | Path) -> Dict[str, Any]:
    """The trainer's JSON state of checkpoint `path` (step, config, saving layout)."""
    path = Path(path)
    _format_checked(path)  # an old checkpoint's trainer.json is readable, but nothing else of it is: fail first
    try:
        state = json.loads((path / TRAINER_FILE).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path / TRAINER_FILE} is not valid JSON: {e}") from e
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path / TRAINER_FILE} holds a {type(state).__name__}, not the trainer's state")
    return state


def checkpoint_has(path: str | Path, prefix: str) -> bool:
    """Whether checkpoint `path` (written by `save_train_state`) holds weights under `prefix` ("model", or
    an `extra_weights` prefix such as "ema"). Reads only the marker and the index."""
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ValueError(f"prefix {prefix!r} is not an identifier")
    return prefix in _stored_prefixes(_read_index(Path(path)))


def read_full_weights(path: str | Path, prefix: str = "model") -> Dict[str, torch.Tensor]:
    """The full (TP=1, released-layout) state dict of the weights stored under `prefix` ("model", or an
    `extra_weights` prefix such as "ema") in checkpoint `path`, keyed by parameter name, read in this process
    alone (no process group needed, none used if there is one), dtypes as stored. Memory: the whole model.
    A prefix the checkpoint lacks raises ValueError."""
    if prefix != "model":
        _check_prefix(prefix)
    path = Path(path)
    marker = _format_checked(path)
    verify_checkpoint(path)
    index = _read_index(path, marker)
    if prefix not in _stored_prefixes(index):
        raise ValueError(f"checkpoint {path} holds no {prefix!r} weights (it holds "
                         f"{', '.join(map(repr, _stored_prefixes(index)))})")
    out = {k[len(prefix) + 1:]: torch.empty(e.shape, dtype=e.dtype) for k, e in index.items()
           if k.startswith(f"{prefix}.")}
    _read_boxes(path, index, {f"{prefix}.{name}": [((0,) * t.ndim, t)] for name, t in out.items()})
    return out


def read_full_model_state(path: str | Path) -> Dict[str, torch.Tensor]:
    """The full (TP=1, released-layout) model state dict of checkpoint `path`, read in this process alone
    (no process group needed, none used if there is one), dtypes as stored. Memory: the whole model.
    Only the model weights: `read_full_weights(path, prefix)` reads an extra set such as "ema"."""
    return read_full_weights(path, "model")
