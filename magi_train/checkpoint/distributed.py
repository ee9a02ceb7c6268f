"""Training checkpoints that reshard: saved under one parallel layout, resumed under any other.

Every tensor is stored in full (TP=1, released-layout) coordinates with torch.distributed.checkpoint
(DCP). Saving, each rank writes the rectangular pieces of full tensors it is responsible for; loading,
each rank asks for the pieces its CURRENT layout needs, and DCP's resharding
(`create_read_items_for_chunk_list`) intersects the requested boxes with the stored ones and copies the
overlaps straight into the parameters and optimizer moments.

What scales: a rank writes only its share and reads into its own tensors, never a full model; the
sha256 hashing of the files is split over the ranks. What does not: DCP's FileSystemReader deserialises
each stored piece whole before cutting the overlap out, so loading under a finer layout than the save
reads more than the rank's share, and a rank's transient memory is the largest stored piece it overlaps
(a full tensor if the checkpoint was saved under TP=1). Every rank reads the whole `.metadata` (one entry
per stored piece). `read_full_model_state` holds the whole model in one process, by design.

    model.<parameter name>             full shape; the TP writers of dp x cp rank 0 of each pipeline stage
    optim.<parameter name>.exp_avg     full shape; the parameter's ZeRO owner (in dp x cp), TP writers
    optim.<parameter name>.exp_avg_sq  full shape; likewise
    optim.<parameter name>.step        (1,); the owner on TP rank 0
    <prefix>.<parameter name>          full shape, the given tensors' own dtype; written like model.* (the
                                       caller's `extra_weights`, e.g. prefix "ema": a distillation EMA)
    trainer.json                       rank 0: the caller's `extra` plus the saving "layout"

`extra_weights` are further sets of per-parameter tensors (one dict per held model chunk, same names and
local shapes as its parameters) stored and resharded exactly like the model weights; a checkpoint may hold
sets a loader does not ask for (they are skipped), and `checkpoint_has` tells whether it holds a set.

"TP writers": a TP rank holding a slice no other rank writes (`ShardSpec.writer`: replicated tensors
and replicated KV heads are written once). A rank's pieces follow `parallel.plan.shard_spec`, so a SwiGLU
`linear_fc1` shard is two boxes ([gate_r] and [up_r]) of the full [gate | up] tensor.

Why custom planners rather than ShardedTensor or DTensor: ShardedTensor's constructors insist on a global
layout of non-overlapping shards, which a load target with replicas (every data-parallel rank reads the
same slice) is not; DTensor cannot express the two-piece SwiGLU shard. DCP's planner interface takes
boxes directly, and the default save planner still deduplicates, builds the metadata and checks that
the saved boxes neither overlap nor leave holes.

The directory is installed through `CheckpointManager` (begin_save / finish_save): a temporary directory,
a `complete.json` marker written last, one rename. Only rank 0 touches the manager's state; the other
ranks should open theirs read-only (a writable manager tidies up `.tmp_*` directories when created).
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, ReadItem, SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from magi_train.checkpoint.magi1 import check_state_dict
from magi_train.checkpoint.manager import CheckpointManager, file_digest, read_marker, verify_checkpoint
from magi_train.model.dit import VideoDiT
from magi_train.parallel.groups import Parallel
from magi_train.parallel.plan import plan_of, shard_spec
from magi_train.parallel.sharding import ShardSpec
from magi_train.parallel.zero import ShardedAdamW

TRAINER_FILE = "trainer.json"
DCP_METADATA = ".metadata"  # the file DCP's FileSystemWriter writes last, listing every key and box
_MOMENTS = ("exp_avg", "exp_avg_sq")
RESERVED_PREFIXES = ("model", "optim", "trainer")  # not available as `extra_weights` prefixes

# Prefix -> one {parameter name: local tensor} per held model chunk (parallel to `models`).
ExtraWeights = Mapping[str, Sequence[Mapping[str, torch.Tensor]]]

# A box: its offsets in the full tensor, and the local tensor (a view) holding it.
Box = Tuple[Tuple[int, ...], torch.Tensor]


# ---------------------------------------------------------------------------- boxes and planners


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


class _SaveBoxes(DefaultSavePlanner):
    """Writes a state dict of {key: (full shape, [boxes])}: each rank only the boxes it is responsible for.

    Planning across ranks (deduplication, metadata, the check that the saved boxes tile every tensor) is
    DefaultSavePlanner's."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = state_dict
        self.is_coordinator = is_coordinator
        self.data = {(key, offsets): tensor.detach()
                     for key, (_, boxes) in state_dict.items() for offsets, tensor in boxes}

    def create_local_plan(self) -> SavePlan:
        items = []
        for key, (full_shape, boxes) in self.state_dict.items():
            for offsets, tensor in boxes:
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.size())
                items.append(WriteItem(
                    index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(tensor.detach()),
                                                size=torch.Size(full_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        return self.data[(index.fqn, tuple(index.offset))]


class _LoadBoxes(LoadPlanner):
    """Reads a state dict of {key: [boxes]} in place: every box gets the overlapping parts of whatever
    boxes the checkpoint stored (DCP's resharding), whichever layout wrote them."""

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        self.targets = state_dict
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: List[ReadItem] = []
        for key, boxes in self.targets.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.size()) for offsets, t in boxes]
            # dest_index.index of each read item is the position of its box in `boxes`.
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: List[LoadPlan]) -> List[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise ValueError(f"{read_item.dest_index.fqn} is stored as bytes; this checkpoint format holds only tensors")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        _, target = self.targets[read_item.dest_index.fqn][read_item.dest_index.index]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the target: the data is already in place


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

    @contextmanager
    def dcp(self, what: str):
        """Around a DCP call with `no_dist=not self.collective`."""
        with warnings.catch_warnings():
            # A single process is meant here; DCP warns that it assumes so.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                yield
            except CheckpointException as e:
                # DCP raises a failure on any rank on every rank as CheckpointException, a BaseException
                # that `except Exception` in a caller would miss: re-raised as an ordinary error.
                raise RuntimeError(f"{what} failed on rank(s) {sorted(e.failures)}: {e}") from e


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------------------- what a rank holds


def _full_model(models: Sequence[VideoDiT]) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Key -> (full shape, dtype) of the whole model (every pipeline stage), as parallelize_dit recorded it."""
    return dict(plan_of(models[0]).full_state)


def _full_parameter_names(models: Sequence[VideoDiT]) -> List[str]:
    """The parameter names of the whole model (the keys an extra weight set has; buffers have none)."""
    return list(plan_of(models[0]).full_parameters)


def _held(models: Sequence[VideoDiT]) -> Dict[str, Tuple[VideoDiT, torch.Tensor]]:
    """Parameter name -> (the model chunk holding it, its local tensor), over this rank's chunks."""
    held = {}
    for model in models:
        for name, tensor in model.state_dict(keep_vars=True).items():
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


def _extra_held(models: Sequence[VideoDiT], extra_weights: ExtraWeights | None
                ) -> Dict[str, Dict[str, Tuple[VideoDiT, torch.Tensor]]]:
    """Prefix -> parameter name -> (the model chunk, the extra tensor), after checking that every set
    matches the models' parameters: one dict per model, same names, same local shapes."""
    out: Dict[str, Dict[str, Tuple[VideoDiT, torch.Tensor]]] = {}
    for prefix, dicts in (extra_weights or {}).items():
        _check_prefix(prefix)
        if isinstance(dicts, Mapping) or len(dicts) != len(models):
            raise ValueError(f"extra_weights[{prefix!r}] must be a sequence of one dict per model "
                             f"({len(models)}), got {type(dicts).__name__}"
                             + ("" if isinstance(dicts, Mapping) else f" of length {len(dicts)}"))
        held: Dict[str, Tuple[VideoDiT, torch.Tensor]] = {}
        for i, (model, tensors) in enumerate(zip(models, dicts)):
            params = dict(model.named_parameters())
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
                extra: Dict[str, Dict[str, Tuple[VideoDiT, torch.Tensor]]]) -> Dict[str, Any]:
    """{key: (full shape, boxes this rank writes)}; keys another rank writes are left out."""
    full = _full_model(models)
    held = _held(models)
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
        model, _ = held[name]
        spec = shard_spec(model, name, full[name][0])
        if spec.writer:
            for moment in _MOMENTS:
                state[f"optim.{name}.{moment}"] = (spec.full_shape, _boxes(spec, moments[moment]))
        if parallel.tp_rank == 0:
            state[f"optim.{name}.step"] = ((1,), [((0,), moments["step"].reshape(1))])
    return state


# ---------------------------------------------------------------------------- saving


def save_train_state(manager: CheckpointManager, step: int, models: Sequence[VideoDiT], optimizer: ShardedAdamW,
                     extra: Dict[str, Any], parallel: Parallel,
                     extra_weights: Dict[str, Sequence[Dict[str, torch.Tensor]]] | None = None) -> Path:
    """Write checkpoint `step` from every rank (collective); returns its final path on every rank.

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
        held_extra = _extra_held(models, extra_weights)
        return json.dumps({**extra, "layout": layout}, indent=2), _save_state(models, optimizer, parallel, held_extra)

    trainer, state = ranks.agree(prepare)  # on every rank, so that a bad `extra` fails everywhere

    def begin() -> str | None:
        if rank != 0:
            return None
        tmp = manager.begin_save(step)
        try:
            with open(tmp / TRAINER_FILE, "w", encoding="utf-8") as f:
                f.write(trainer)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            manager.abort_save(tmp)
            raise
        return str(tmp)

    tmp = Path(ranks.all_gather(ranks.agree(begin))[0])  # every rank writes into rank 0's temporary directory
    try:
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, overwrite=False)
        with ranks.dcp(f"saving checkpoint step {step} into {tmp}"):  # on every rank if any rank's writes failed
            dcp.save(state, storage_writer=writer, planner=_SaveBoxes(), no_dist=not ranks.collective)
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
    """Whether checkpoint `path` (with a marker) was written by `save_train_state`."""
    return DCP_METADATA in read_marker(path)["files"]


def _tensor_metadata(metadata: Metadata) -> Dict[str, TensorStorageMetadata]:
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _prefix(key: str) -> str:
    return key.split(".", 1)[0]


def _stored_prefixes(metadata: Metadata) -> List[str]:
    return sorted({_prefix(k) for k in metadata.state_dict_metadata})


def _check_keys(path: Path, metadata: Metadata, full: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
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
        if prefix not in _stored_prefixes(metadata):
            raise ValueError(f"checkpoint {path} holds no {prefix!r} weights (it holds "
                             f"{', '.join(map(repr, _stored_prefixes(metadata)))}); use checkpoint_has(path, "
                             f"{prefix!r}) to check before loading")

    def ignored(key: str) -> bool:  # an extra weight set nobody asked for
        p = _prefix(key)
        return p.isidentifier() and p not in RESERVED_PREFIXES and p not in extra

    stored = {k: v for k, v in _tensor_metadata(metadata).items() if not ignored(k)}
    got: Dict[str, Any] = {k: torch.empty(v.size, dtype=v.properties.dtype, device="meta") for k, v in stored.items()}
    got.update({k: torch.empty(0, device="meta") for k in metadata.state_dict_metadata
                if k not in stored and not ignored(k)})
    expected: Dict[str, Tuple[Tuple[int, ...], torch.dtype | None]] = {
        f"model.{name}": (shape, held[name][1].dtype if name in held else None) for name, (shape, _) in full.items()}
    for prefix, tensors in extra.items():
        expected.update({f"{prefix}.{name}": (full[name][0], tensors[name][1].dtype if name in tensors else None)
                         for name in parameter_names})
    # Optimizer state exists for the parameters that had been stepped; for each, all three parts.
    stepped = {k[len("optim."):-len(f".{m}")] for k in stored for m in (*_MOMENTS, "step")
               if k.startswith("optim.") and k.endswith(f".{m}")}
    for name in stepped & full.keys():
        for moment in _MOMENTS:
            expected[f"optim.{name}.{moment}"] = (full[name][0], None)
        expected[f"optim.{name}.step"] = ((1,), None)
    check_state_dict(expected, got, path / DCP_METADATA)


def load_train_state(path: str | Path, models: Sequence[VideoDiT], optimizer: ShardedAdamW,
                     parallel: Parallel,
                     extra_weights: Dict[str, Sequence[Dict[str, torch.Tensor]]] | None = None) -> Dict[str, Any]:
    """Fill the models' local parameters and the optimizer's owned state for the CURRENT layout from a
    checkpoint saved under any layout (collective). Returns the saved trainer state (with "layout").

    `extra_weights` (as for `save_train_state`: per prefix, one dict per model with its parameters' names
    and local shapes) are filled in place from the checkpoint's `<prefix>.*` tensors, which must have the
    dicts' dtypes; a prefix the checkpoint lacks raises ValueError (see `checkpoint_has`). Extra sets the
    checkpoint holds but that are not asked for are skipped.

    Parameters the optimizer owns now but that had no optimizer state when saved keep a fresh state."""
    path = Path(path)
    ranks = _Ranks(parallel)
    rank, world = ranks.rank, ranks.size

    def plan() -> Tuple[Dict[str, List[Box]], Dict[str, Dict[str, torch.Tensor]]]:
        verify_checkpoint(path, share=(rank, world))  # sizes of all files; this rank's share of the sha256s
        if not is_distributed_checkpoint(path):
            raise ValueError(f"checkpoint {path} was not written by save_train_state (it has no {DCP_METADATA})")
        metadata = dcp.FileSystemReader(path).read_metadata()
        full = _full_model(models)
        held = _held(models)
        held_extra = _extra_held(models, extra_weights)
        _check_keys(path, metadata, full, held, held_extra, _full_parameter_names(models) if held_extra else ())
        stored = _tensor_metadata(metadata)
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
            if optimizer.owner[opt_name] != optimizer.rank or f"{key}.step" not in stored:
                continue
            spec = shard_spec(held[name][0], name, full[name][0])
            state = {m: torch.empty(p.shape, dtype=stored[f"{key}.{m}"].properties.dtype, device=p.device) for m in _MOMENTS}
            state["step"] = torch.empty(1, dtype=stored[f"{key}.step"].properties.dtype)
            for m in _MOMENTS:
                targets[f"{key}.{m}"] = _boxes(spec, state[m])
            targets[f"{key}.step"] = [((0,), state["step"])]
            moments[opt_name] = state
        return targets, moments

    targets, moments = ranks.agree(plan)
    with ranks.dcp(f"loading checkpoint {path}"):
        dcp.load(targets, storage_reader=dcp.FileSystemReader(path), planner=_LoadBoxes(), no_dist=not ranks.collective)
    optimizer.load_owned_state(moments)
    return json.loads((path / TRAINER_FILE).read_text(encoding="utf-8"))


def read_trainer_state(path: str | Path) -> Dict[str, Any]:
    """The trainer's JSON state of checkpoint `path` (step, config, saving layout)."""
    with open(Path(path) / TRAINER_FILE) as f:
        return json.load(f)


def _read_metadata(path: Path) -> Metadata:
    if not is_distributed_checkpoint(path):
        raise ValueError(f"checkpoint {path} was not written by save_train_state (it has no {DCP_METADATA})")
    return dcp.FileSystemReader(path).read_metadata()


def checkpoint_has(path: str | Path, prefix: str) -> bool:
    """Whether checkpoint `path` (written by `save_train_state`) holds weights under `prefix` ("model", or
    an `extra_weights` prefix such as "ema"). Reads only the marker and DCP's metadata."""
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ValueError(f"prefix {prefix!r} is not an identifier")
    return prefix in _stored_prefixes(_read_metadata(Path(path)))


def read_full_weights(path: str | Path, prefix: str = "model") -> Dict[str, torch.Tensor]:
    """The full (TP=1, released-layout) state dict of the weights stored under `prefix` ("model", or an
    `extra_weights` prefix such as "ema") in checkpoint `path`, keyed by parameter name, read in this process
    alone (no process group needed, none used if there is one), dtypes as stored. Memory: the whole model.
    A prefix the checkpoint lacks raises ValueError."""
    if prefix != "model":
        _check_prefix(prefix)
    path = Path(path)
    verify_checkpoint(path)
    metadata = _read_metadata(path)
    if prefix not in _stored_prefixes(metadata):
        raise ValueError(f"checkpoint {path} holds no {prefix!r} weights (it holds "
                         f"{', '.join(map(repr, _stored_prefixes(metadata)))})")
    stored = _tensor_metadata(metadata)
    out = {k[len(prefix) + 1:]: torch.empty(v.size, dtype=v.properties.dtype) for k, v in stored.items()
           if k.startswith(f"{prefix}.")}
    targets = {f"{prefix}.{name}": [((0,) * t.ndim, t)] for name, t in out.items()}
    with _Ranks(None).dcp(f"reading checkpoint {path}"):
        dcp.load(targets, storage_reader=dcp.FileSystemReader(path), planner=_LoadBoxes(), no_dist=True)
    return out


def read_full_model_state(path: str | Path) -> Dict[str, torch.Tensor]:
    """The full (TP=1, released-layout) model state dict of checkpoint `path`, read in this process alone
    (no process group needed, none used if there is one), dtypes as stored. Memory: the whole model.
    Only the model weights: `read_full_weights(path, prefix)` reads an extra set such as "ema"."""
    return read_full_weights(path, "model")
