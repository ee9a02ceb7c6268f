"""Streaming webdataset loader: shards -> samples -> packed fixed-length sequences, resumable exactly.

Data flow of one *stream* (data.num_streams of them, independent of each other):

    its shards, shuffled per epoch ── tar reader (webdataset) ── bucket filter ── shuffle buffer (raw bytes)
        ── decode_sample + fit_sample (truncate to whole chunks) ── OnlinePacker ── PackedSequence

Shard j belongs to stream j % num_streams, and stream s is read by data-parallel rank r, worker w when
s % (dp x W) == r x W + w (W = max(1, data.num_workers)). Streams, not ranks, own the data position, so a run
may resume under another dp size or worker count: each stream continues where it was.

Exact resume. Workers read ahead, so what they have read says nothing about what was trained on. The loader
therefore records, in the consuming process, what every sequence it hands out contains: per stream the
epoch, the shards fully consumed, and the consumed sample indices of partly consumed shards. Samples that
were read but not delivered (corrupt, filtered, too long) travel on the next sequence of their stream as
`skipped`, and a shard's sample count as `shard_ends`, so shards fill up and collapse to "done". On restart a
stream re-reads its epoch, passes over consumed samples without decoding them and delivers exactly the
rest (in a different order: the shuffle buffer is reseeded).

Corrupt input never stops training: an unreadable or truncated shard ends that shard, a sample with a
missing member, one that does not decode, or one of the wrong shape is skipped; each is logged with the shard
and sample key and counted by reason in `PackedSequence.counters`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import braceexpand
import numpy as np
import torch.utils.data
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from magi_train.config.schema import DataConfig, ModelConfig
from magi_train.data.packing import OnlinePacker, PackingGeometry, SampleRejected, fit_sample
from magi_train.data.shards import MEMBERS, Sample, SampleError, decode_sample

log = logging.getLogger(__name__)

STATE_FORMAT = "magi.webdataset_loader/1"

# (stream, epoch, shard path, index of the sample in its shard): unique within an epoch.
Provenance = Tuple[int, int, str, int]


@dataclass
class PackedSequence:
    """One micro-batch: whole samples packed end to end into `seq_length` tokens (the rest is padding)."""

    samples: List[Sample]  # in packing order, already cut to the chunks that fit
    provenance: List[Provenance]  # one per sample
    tokens: int  # real tokens (sum over samples); seq_length - tokens is padding
    seq_length: int
    rows: int  # (sample, chunk) rows, <= data.max_rows_per_sequence
    stream: int
    epoch: int
    # Bookkeeping for exact resume (the trainer ignores these): samples of this stream and epoch that were
    # read but not delivered since the previous sequence, as (shard, index), and shards read to their end,
    # as (shard, number of samples in it).
    skipped: List[Tuple[str, int]] = field(default_factory=list)
    shard_ends: List[Tuple[str, int]] = field(default_factory=list)
    # The stream's cumulative counts since this process started it (read ahead included): samples read,
    # delivered, capped/truncated, skipped.<reason>, shard_errors, sequences, tokens, epochs.
    counters: Dict[str, int] = field(default_factory=dict)


# --- shards ---------------------------------------------------------------------------------------------


def resolve_shards(spec: str) -> List[str]:
    """data.shards -> sorted shard paths: a directory (its *.tar), a glob, a brace pattern, or one file."""
    if not spec.strip():
        raise ValueError("data.shards is empty: give a directory of .tar shards, a glob or a brace pattern")
    if os.path.isdir(spec):
        paths = glob.glob(os.path.join(spec, "*.tar"))
    else:
        paths = []
        for pattern in braceexpand.braceexpand(spec):
            matches = glob.glob(pattern)
            if not matches and not glob.has_magic(pattern):
                raise ValueError(f"data.shards ({spec!r}) names {pattern}, which does not exist")
            paths += matches
    paths = sorted(set(paths))
    if not paths:
        raise ValueError(f"data.shards ({spec!r}) matches no shard")
    return paths


class _ShardReader:
    """Iterates (index, members) over the samples of one tar shard, read as a stream by webdataset's tar
    iterator. A read error (truncated tar, unreadable file) ends the shard quietly; afterwards `count` is
    the number of samples yielded and `error` says what went wrong, if anything."""

    def __init__(self, path: str):
        self.path = path
        self.count = 0
        self.error: Optional[str] = None

    def __iter__(self) -> Iterator[Tuple[int, Dict[str, Any]]]:
        current: Optional[Dict[str, Any]] = None
        members = self._members()
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - any read error ends this shard, never the run
                self.error = f"{type(e).__name__}: {e}"
                break
            key, suffix = base_plus_ext(member["fname"])
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield self.count, current
                self.count += 1
                current = None
            if current is None:
                current = {"__key__": key}
            suffix = suffix.lower()
            if suffix in current:
                current["__duplicate__"] = suffix
            current[suffix] = member["data"]
        # The sample being read when an error struck is passed on; if it lacks a member it is skipped as such.
        if current is not None:
            yield self.count, current
            self.count += 1

    def _members(self) -> Iterator[Dict[str, Any]]:
        with open(self.path, "rb") as f:
            yield from tar_file_iterator(f)


# --- one stream -------------------------------------------------------------------------------------------


@dataclass
class StreamPosition:
    """What the consumer has taken from one stream in its current epoch (see the module docstring)."""

    epoch: int = 0
    done: Set[str] = field(default_factory=set)
    partial: Dict[str, Set[int]] = field(default_factory=dict)
    sizes: Dict[str, int] = field(default_factory=dict)  # shard lengths seen this epoch; not saved (re-learned)

    def take(self, seq: PackedSequence) -> None:
        if seq.epoch != self.epoch:
            # A stream drains epoch e before starting e + 1, so its first sequence of e + 1 means e is through.
            self.epoch, self.done, self.partial, self.sizes = seq.epoch, set(), {}, {}
        for _, _, shard, index in seq.provenance:
            self._consume(shard, index)
        for shard, index in seq.skipped:
            self._consume(shard, index)
        for shard, count in seq.shard_ends:
            self.sizes[shard] = count
            self._settle(shard)

    def _consume(self, shard: str, index: int) -> None:
        if shard not in self.done:
            self.partial.setdefault(shard, set()).add(index)
            self._settle(shard)

    def _settle(self, shard: str) -> None:
        if shard in self.sizes and len(self.partial.get(shard, ())) >= self.sizes[shard]:
            self.partial.pop(shard, None)
            self.done.add(shard)

    def to_json(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "done": sorted(self.done),
                "partial": {shard: sorted(indices) for shard, indices in sorted(self.partial.items())}}

    @classmethod
    def from_json(cls, state: Dict[str, Any]) -> "StreamPosition":
        return cls(epoch=int(state["epoch"]), done=set(state["done"]),
                   partial={shard: set(int(i) for i in indices) for shard, indices in state["partial"].items()})


@dataclass
class _Packed:
    """A sample waiting in the packer's pool."""

    sample: Sample
    where: Provenance
    tokens: int
    chunks: int


class _Stream:
    """One stream's pipeline, from `start` on; iterating it yields PackedSequences forever (epoch after epoch)."""

    def __init__(self, stream_id: int, shards: List[str], data: DataConfig, geo: PackingGeometry,
                 start: StreamPosition):
        self.id = stream_id
        self.shards = shards
        self.data = data
        self.geo = geo
        self.start = start
        self.buckets = set(data.buckets)
        self.counters: Dict[str, int] = {"read": 0, "delivered": 0, "capped": 0, "truncated": 0, "shard_errors": 0,
                                         "sequences": 0, "tokens": 0, "epochs": 0}
        self._skipped: List[Tuple[str, int]] = []
        self._shard_ends: List[Tuple[str, int]] = []

    def shard_order(self, epoch: int) -> List[str]:
        rng = np.random.default_rng([self.data.seed, self.id, epoch])
        return [self.shards[i] for i in rng.permutation(len(self.shards))]

    def __iter__(self) -> Iterator[PackedSequence]:
        epoch, done, consumed = self.start.epoch, self.start.done, self.start.partial
        while True:
            resumed = bool(done or consumed)
            emitted = 0
            for seq in self._epoch(epoch, done, consumed):
                emitted += 1
                yield seq
            if emitted == 0 and not resumed:
                raise RuntimeError(f"data stream {self.id} read a whole epoch of its {len(self.shards)} shard(s) "
                                   f"(first {self.shards[0]}) and found no usable sample; see the warnings above, "
                                   f"data.shards and data.buckets ({self.data.buckets})")
            # Bookkeeping of a finished epoch is void: the next epoch's first sequence completes it anyway.
            self._skipped, self._shard_ends = [], []
            self.counters["epochs"] += 1
            epoch, done, consumed = epoch + 1, set(), {}

    def _epoch(self, epoch: int, done: Set[str], consumed: Dict[str, Set[int]]) -> Iterator[PackedSequence]:
        # Reseeded by how much was already consumed: a resumed epoch mixes differently but deterministically
        # (ranks that must see the same data, e.g. tensor-parallel peers, still do).
        already = sum(len(v) for v in consumed.values()) + len(done)
        rng = np.random.default_rng([self.data.seed, self.id, epoch, already, 1])
        buffer: List[Tuple[Provenance, Dict[str, Any]]] = []
        packer: OnlinePacker[_Packed] = OnlinePacker(
            self.geo.seq_length, self.geo.max_rows, self.data.pack_pool)
        for shard in self.shard_order(epoch):
            if shard in done:
                continue
            skip = consumed.get(shard, set())
            reader = _ShardReader(shard)
            for index, raw in reader:
                if index in skip:
                    continue  # consumed before the restart: not even decoded
                self.counters["read"] += 1
                where = (self.id, epoch, shard, index)
                if not self._admit(raw, where):
                    continue
                buffer.append((where, raw))
                if len(buffer) > self.data.shuffle_buffer:
                    yield from self._pack(packer, *self._pop(buffer, rng), epoch)
            if reader.error is not None:
                self.counters["shard_errors"] += 1
                log.warning("data stream %d: shard %s is unreadable after %d sample(s) (%s); skipping the rest of it",
                            self.id, shard, reader.count, reader.error)
            self._shard_ends.append((shard, reader.count))
        while buffer:
            yield from self._pack(packer, *self._pop(buffer, rng), epoch)
        for members in packer.flush():
            yield self._sequence(members, epoch)

    @staticmethod
    def _pop(buffer: List[Any], rng: np.random.Generator) -> Any:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        return buffer.pop()

    def _skip(self, where: Provenance, key: str, reason: str, message: str, warn: bool = True) -> None:
        self.counters[f"skipped.{reason}"] = self.counters.get(f"skipped.{reason}", 0) + 1
        self._skipped.append((where[2], where[3]))
        if warn:
            log.warning("data stream %d: skipping sample %r (index %d) of shard %s: %s: %s",
                        self.id, key, where[3], where[2], reason, message)

    def _admit(self, raw: Dict[str, Any], where: Provenance) -> bool:
        """Cheap checks before a sample takes buffer space: all members there, the wanted bucket."""
        key = raw["__key__"]
        if "__duplicate__" in raw:
            self._skip(where, key, "bad_sample", f"member {raw['__duplicate__']} appears twice")
            return False
        missing = [m for m in MEMBERS if m not in raw]
        if missing:
            self._skip(where, key, "missing_member", f"missing {', '.join(missing)}")
            return False
        if self.buckets:
            try:
                bucket = json.loads(raw["json"]).get("bucket")
            except Exception:  # noqa: BLE001 - decode_sample reports a bad json with the full story
                return True
            if bucket not in self.buckets:
                self._skip(where, key, "bucket", f"bucket {bucket!r} not in data.buckets", warn=False)
                return False
        return True

    def _pack(self, packer: OnlinePacker, where: Provenance, raw: Dict[str, Any],
              epoch: int) -> Iterator[PackedSequence]:
        key = raw["__key__"]
        try:
            fitted = fit_sample(decode_sample(raw), self.geo)
        except SampleRejected as e:
            self._skip(where, key, e.reason, str(e))
            return
        except SampleError as e:
            self._skip(where, key, "bad_sample", str(e))
            return
        self.counters["capped"] += fitted.capped
        self.counters["truncated"] += fitted.truncated
        item = _Packed(fitted.sample, where, fitted.tokens, fitted.chunks)
        for members in packer.add(fitted.tokens, fitted.chunks, item):
            yield self._sequence(members, epoch)

    def _sequence(self, members: List[_Packed], epoch: int) -> PackedSequence:
        samples = [m.sample for m in members]
        tokens = sum(m.tokens for m in members)
        seq = PackedSequence(samples=samples, provenance=[m.where for m in members], tokens=tokens,
                             seq_length=self.geo.seq_length, rows=sum(m.chunks for m in members),
                             stream=self.id, epoch=epoch, skipped=self._skipped, shard_ends=self._shard_ends)
        self._skipped, self._shard_ends = [], []
        self.counters["delivered"] += len(samples)
        self.counters["sequences"] += 1
        self.counters["tokens"] += tokens
        seq.counters = dict(self.counters)
        return seq


def _round_robin(streams: List[Iterable[PackedSequence]]) -> Iterator[PackedSequence]:
    iterators = [iter(s) for s in streams]
    while True:
        for it in iterators:
            yield next(it)


# --- a rank's loader --------------------------------------------------------------------------------------


class _WorkerStreams(torch.utils.data.IterableDataset):
    """The rank's streams, split over DataLoader workers (worker w: streams with s % W == w). Holds plain,
    picklable data only, so it works with any multiprocessing start method."""

    def __init__(self, streams: Dict[int, List[str]], starts: Dict[int, Dict[str, Any]], data: DataConfig,
                 geo: PackingGeometry, workers: int):
        super().__init__()
        self.streams, self.starts, self.data, self.geo, self.workers = streams, starts, data, geo, workers

    def __iter__(self) -> Iterator[PackedSequence]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        mine = [s for s in sorted(self.streams) if s % self.workers == worker]
        return _round_robin([_Stream(s, self.streams[s], self.data, self.geo, StreamPosition.from_json(self.starts[s]))
                             for s in mine])


def _as_is(item: PackedSequence) -> PackedSequence:
    return item


class WebDatasetLoader:
    """The packed sequences of one data-parallel rank (see the module docstring).

        loader = WebDatasetLoader(cfg.data, cfg.model, dp_rank, dp_size)
        loader.load_state_dict(merge_loader_states(saved))   # on resume, before iterating
        for seq in loader: ...                                # forever; one PackedSequence per micro-batch
        loader.state_dict()                                   # with the checkpoint: what was consumed so far

    Every sequence that `__iter__` has returned counts as consumed. Ranks that must see the same data
    (tensor/context/pipeline peers of one dp rank) get identical sequences from identical loaders.
    """

    def __init__(self, data: DataConfig, model: ModelConfig, dp_rank: int, dp_size: int,
                 multiprocessing_context: Optional[str] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size {dp_size})")
        self.data = data
        self.geo = PackingGeometry.from_configs(data, model)
        self.workers = max(1, data.num_workers)
        self.multiprocessing_context = multiprocessing_context
        n = data.num_streams
        readers = dp_size * self.workers
        if n < 1 or n % readers:
            raise ValueError(f"data.num_streams ({n}) must be a multiple of dp x max(1, data.num_workers) "
                             f"({dp_size} x {self.workers} = {readers}): every reader owns whole streams")
        self.all_shards = resolve_shards(data.shards)
        if len(self.all_shards) < n:
            raise ValueError(f"data.shards ({data.shards!r}) has {len(self.all_shards)} shard(s), fewer than "
                             f"data.num_streams ({n}): every stream needs at least one")
        first = dp_rank * self.workers
        self.streams: Dict[int, List[str]] = {
            s: self.all_shards[s::n] for s in range(n) if first <= s % readers < first + self.workers}
        self._positions = {s: StreamPosition() for s in self.streams}
        self._counters: Dict[int, Dict[str, int]] = {}

    def __iter__(self) -> Iterator[PackedSequence]:
        # Streams start from what was consumed, so a new iteration (or a new process) resumes exactly.
        starts = {s: p.to_json() for s, p in self._positions.items()}
        source: Iterable[PackedSequence]
        if self.data.num_workers == 0:
            source = _round_robin([_Stream(s, shards, self.data, self.geo, StreamPosition.from_json(starts[s]))
                                   for s, shards in sorted(self.streams.items())])
        else:
            source = torch.utils.data.DataLoader(
                _WorkerStreams(self.streams, starts, self.data, self.geo, self.workers), batch_size=None,
                num_workers=self.data.num_workers, collate_fn=_as_is,
                multiprocessing_context=self.multiprocessing_context)
        for seq in source:
            self._positions[seq.stream].take(seq)
            self._counters[seq.stream] = seq.counters
            yield seq

    def counters(self) -> Dict[str, int]:
        """This rank's streams' counters (latest delivered sequence of each), summed: see PackedSequence."""
        total: Dict[str, int] = {}
        for counts in self._counters.values():
            for name, value in counts.items():
                total[name] = total.get(name, 0) + value
        return total

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable position of this rank's streams; merge all ranks' with `merge_loader_states`."""
        return {"format": STATE_FORMAT, "num_streams": self.data.num_streams, "num_shards": len(self.all_shards),
                "streams": {str(s): p.to_json() for s, p in sorted(self._positions.items())}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from the merged state of all ranks of the previous run (any dp size / worker count).
        Takes effect at the next `iter(loader)`."""
        _check_state(state, self.data.num_streams, len(self.all_shards))
        positions = {}
        for s, shards in self.streams.items():
            if str(s) not in state["streams"]:
                raise ValueError(f"the data loader state has no entry for stream {s}: load the merged state of "
                                 f"all data-parallel ranks (merge_loader_states)")
            position = StreamPosition.from_json(state["streams"][str(s)])
            unknown = (position.done | set(position.partial)) - set(shards)
            if unknown:
                raise ValueError(f"the data loader state of stream {s} names shard(s) that data.shards "
                                 f"({self.data.shards!r}) does not give that stream, e.g. {sorted(unknown)[0]}: "
                                 f"were the shards moved or changed?")
            positions[s] = position
        self._positions = positions


def _check_state(state: Dict[str, Any], num_streams: int, num_shards: int) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a data loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
    if state["num_streams"] != num_streams or state["num_shards"] != num_shards:
        raise ValueError(f"the data loader state is for data.num_streams={state['num_streams']} over "
                         f"{state['num_shards']} shard(s); this run has data.num_streams={num_streams} over "
                         f"{num_shards} (a stream's position only means something for the same split)")


def merge_loader_states(states: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """One state from the `state_dict()`s of all data-parallel ranks (each owns distinct streams)."""
    states = list(states)
    if not states:
        raise ValueError("merge_loader_states needs at least one state")
    first = states[0]
    merged: Dict[str, Any] = {"format": STATE_FORMAT, "num_streams": first.get("num_streams"),
                              "num_shards": first.get("num_shards"), "streams": {}}
    for state in states:
        _check_state(state, merged["num_streams"], merged["num_shards"])
        for s, position in state["streams"].items():
            if s in merged["streams"] and merged["streams"][s] != position:
                raise ValueError(f"two data loader states disagree about stream {s}")
            merged["streams"][s] = position
    return merged
