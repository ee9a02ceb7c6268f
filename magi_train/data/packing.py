"""Packing variable-length samples into fixed-length sequences (MAGI-1's online Packing-and-Padding).

Every micro-batch is one sequence of exactly `capacity` tokens (data.seq_length) holding whole samples
end to end; the unused tail is padding. Two limits apply to a sequence: its tokens (<= capacity) and its
(sample, chunk) rows (<= max_rows: the trainer pads per-chunk conditions and captions to that many rows).

`first_fit_decreasing` packs one set of items. `OnlinePacker` packs a stream: it gathers a pool of
candidates, packs them with First-Fit-Decreasing, emits the sequences that are full enough and keeps the
rest as candidates for the next round, so the little room left in a sequence is filled by a later small
sample instead of padding. MAGI-1 reports 99% utilisation this way (report section 4.1).

`fit_sample` turns a decoded training sample into a packable item: it checks the sample's shapes against
the model, counts its tokens and cuts it to whole chunks that fit (data.max_chunks, data.seq_length,
data.max_rows_per_sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, List, Optional, Sequence, TypeVar

from magi_train.config.schema import DataConfig, ModelConfig
from magi_train.data.shards import Sample

T = TypeVar("T")


def first_fit_decreasing(lengths: Sequence[int], capacity: int, rows: Optional[Sequence[int]] = None,
                         max_rows: Optional[int] = None) -> List[List[int]]:
    """Bins (lists of item indices) holding every item once, each bin within `capacity` tokens and
    `max_rows` rows (rows default to 1 per item; max_rows=None means no row limit).

    Items are placed longest first (ties: more rows first, then input order, so the result is
    deterministic), each into the first bin it fits in. An item that fits no empty bin is a ValueError:
    the caller truncates samples before packing them.
    """
    n = len(lengths)
    item_rows = [1] * n if rows is None else [int(r) for r in rows]
    if len(item_rows) != n:
        raise ValueError(f"rows has {len(item_rows)} entries for {n} lengths")
    row_cap = max_rows if max_rows is not None else sum(item_rows)  # None: rows never limit
    for i in range(n):
        if not 0 < lengths[i] <= capacity or not 0 < item_rows[i] <= row_cap:
            raise ValueError(f"item {i} ({lengths[i]} tokens, {item_rows[i]} rows) does not fit a bin of "
                             f"{capacity} tokens and {row_cap} rows")
    order = sorted(range(n), key=lambda i: (-lengths[i], -item_rows[i], i))
    bins: List[List[int]] = []
    free_tokens: List[int] = []
    free_rows: List[int] = []
    for i in order:
        for b in range(len(bins)):
            if lengths[i] <= free_tokens[b] and item_rows[i] <= free_rows[b]:
                bins[b].append(i)
                free_tokens[b] -= lengths[i]
                free_rows[b] -= item_rows[i]
                break
        else:
            bins.append([i])
            free_tokens.append(capacity - lengths[i])
            free_rows.append(row_cap - item_rows[i])
    return bins


@dataclass
class _Candidate(Generic[T]):
    tokens: int
    rows: int
    payload: T
    arrival: int


class OnlinePacker(Generic[T]):
    """Packs a stream of items into sequences of `capacity` tokens and at most `max_rows` rows.

    `add` returns the sequences (lists of payloads) that became ready, `flush` the rest at the end of the
    stream. When the pool holds `pool_size` items they are packed with First-Fit-Decreasing, and a bin is
    emitted when it is
      - full enough: at least `min_fill` x capacity tokens, or all `max_rows` rows used (nothing can join), or
      - holds an item that arrived `max_age` items ago or earlier (default 4 x pool_size): an item whose
        size never completes a bin (two 720p clips of 98.9% together) would otherwise wait indefinitely,
        which skews the data order; on a realistic mix this costs about 0.1% utilisation. As packing
        happens when the pool is full, an item leaves within max_age + pool_size arrivals.
    The other bins go back into the pool. Should that still leave `pool_size` items or more, the fullest of
    the remaining bins are emitted too until it does not, so the pool never exceeds `pool_size` items.
    """

    def __init__(self, capacity: int, max_rows: int, pool_size: int, min_fill: float = 0.99,
                 max_age: Optional[int] = None):
        max_age = 4 * pool_size if max_age is None else max_age
        if min(capacity, max_rows, pool_size, max_age) < 1 or not 0.0 < min_fill <= 1.0:
            raise ValueError(f"OnlinePacker needs capacity, max_rows, pool_size, max_age >= 1 and 0 < min_fill <= 1, "
                             f"got {capacity}, {max_rows}, {pool_size}, {max_age}, {min_fill}")
        self.capacity = capacity
        self.max_rows = max_rows
        self.pool_size = pool_size
        self.min_fill = min_fill
        self.max_age = max_age
        self._arrivals = 0  # items added so far: an item's age is counted in later arrivals
        self._pool: List[_Candidate[T]] = []  # arrival order: ties in FFD favour the oldest item
        self.emitted_sequences = 0
        self.emitted_tokens = 0

    def __len__(self) -> int:
        return len(self._pool)

    @property
    def utilisation(self) -> float:
        """Real tokens / (emitted sequences x capacity) so far."""
        return self.emitted_tokens / (self.emitted_sequences * self.capacity) if self.emitted_sequences else 0.0

    def add(self, tokens: int, rows: int, payload: T) -> List[List[T]]:
        if not 0 < tokens <= self.capacity or not 0 < rows <= self.max_rows:
            raise ValueError(f"an item of {tokens} tokens and {rows} rows does not fit a sequence of "
                             f"{self.capacity} tokens and {self.max_rows} rows")
        self._pool.append(_Candidate(tokens, rows, payload, self._arrivals))
        self._arrivals += 1
        if len(self._pool) < self.pool_size:
            return []
        return self._pack(final=False)

    def flush(self) -> List[List[T]]:
        """Every item still in the pool, packed; the pool is empty afterwards."""
        return self._pack(final=True) if self._pool else []

    def _pack(self, final: bool) -> List[List[T]]:
        pool = self._pool
        bins = first_fit_decreasing([c.tokens for c in pool], self.capacity, [c.rows for c in pool], self.max_rows)
        fill = [sum(pool[i].tokens for i in b) for b in bins]
        used_rows = [sum(pool[i].rows for i in b) for b in bins]
        if final:
            ready = list(range(len(bins)))
        else:
            too_old = self._arrivals - self.max_age
            ready = [b for b in range(len(bins))
                     if fill[b] >= self.min_fill * self.capacity or used_rows[b] >= self.max_rows
                     or min(pool[i].arrival for i in bins[b]) <= too_old]
            kept = len(pool) - sum(len(bins[b]) for b in ready)
            # Fullest first, so the forced bins waste the least.
            for b in sorted(set(range(len(bins))) - set(ready), key=lambda b: (-fill[b], b)):
                if kept < self.pool_size:
                    break
                ready.append(b)
                kept -= len(bins[b])
            ready.sort()
        taken = set()
        out: List[List[T]] = []
        for b in ready:
            # Within a sequence, samples keep their arrival order (FFD's order is by size).
            members = sorted(bins[b])
            taken.update(members)
            out.append([pool[i].payload for i in members])
            self.emitted_sequences += 1
            self.emitted_tokens += fill[b]
        self._pool = [c for i, c in enumerate(pool) if i not in taken]
        return out


# --- samples as packable items ----------------------------------------------------------------------------


class SampleRejected(ValueError):
    """A decoded sample that cannot be trained on; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PackingGeometry:
    """What `fit_sample` needs from the configs."""

    seq_length: int
    max_rows: int
    max_chunks: int  # 0 = no cap
    chunk_width: int  # latent frames per chunk
    patch_size: int
    t_patch_size: int
    latent_channels: int
    caption_channels: int
    caption_max_length: int

    @classmethod
    def from_configs(cls, data: DataConfig, model: ModelConfig) -> "PackingGeometry":
        return cls(seq_length=data.seq_length, max_rows=data.max_rows_per_sequence, max_chunks=data.max_chunks,
                   chunk_width=model.chunk_width, patch_size=model.patch_size, t_patch_size=model.t_patch_size,
                   latent_channels=data.latent_channels, caption_channels=model.caption_channels,
                   caption_max_length=model.caption_max_length)


@dataclass
class FittedSample:
    sample: Sample  # cut to `chunks` chunks (latent frames, and caption rows when there is one per chunk)
    tokens: int
    chunks: int  # rows it takes in a packed sequence: one per chunk
    capped: bool  # cut by data.max_chunks
    truncated: bool  # cut to fit data.seq_length or data.max_rows_per_sequence


def fit_sample(sample: Sample, geo: PackingGeometry) -> FittedSample:
    """Check `sample` against the model and cut it to the leading chunks that fit; `SampleRejected` if it
    is malformed (reason "bad_shape") or not even its first chunk fits (reason "too_long").

    A video's latent frames T form T / chunk_width chunks; an image (T = 1) is one chunk of one frame.
    Tokens per chunk: (frames / t_patch) x (H / patch) x (W / patch). Caption rows R are 1 (one caption
    for all chunks) or one per chunk; the latter are cut with the chunks.
    """
    key = sample.key
    C, T, H, W = (int(x) for x in sample.latent.shape)
    R, L, D = (int(x) for x in sample.caption.shape)

    def bad(what: str) -> SampleRejected:
        return SampleRejected("bad_shape", f"sample {key!r}: {what}")

    if C != geo.latent_channels:
        raise bad(f"latent has {C} channels, data.latent_channels is {geo.latent_channels}")
    if H % geo.patch_size or W % geo.patch_size:
        raise bad(f"latent height x width {H} x {W} is not divisible by model.patch_size ({geo.patch_size})")
    frames = 1 if T == 1 else geo.chunk_width
    if T > 1 and T % geo.chunk_width:
        raise bad(f"latent has {T} frames, not a multiple of model.chunk_width ({geo.chunk_width})")
    if frames % geo.t_patch_size:
        raise bad(f"chunks of {frames} frame(s) are not divisible by model.t_patch_size ({geo.t_patch_size})")
    if D != geo.caption_channels:
        raise bad(f"caption features have {D} channels, model.caption_channels is {geo.caption_channels}")
    if L > geo.caption_max_length:
        raise bad(f"caption has {L} tokens, more than model.caption_max_length ({geo.caption_max_length})")
    chunks = T // frames
    if R not in (1, chunks):
        raise bad(f"{R} caption rows for {chunks} chunks (must be 1 or one per chunk)")

    chunk_tokens = (frames // geo.t_patch_size) * (H // geo.patch_size) * (W // geo.patch_size)
    keep = min(chunks, geo.max_chunks) if geo.max_chunks > 0 else chunks
    capped = keep < chunks
    fitting = min(keep, geo.max_rows, geo.seq_length // chunk_tokens)
    if fitting == 0:
        raise SampleRejected("too_long", f"sample {key!r}: one chunk is {chunk_tokens} tokens, more than "
                                         f"data.seq_length ({geo.seq_length})")
    truncated = fitting < keep
    if fitting < chunks:
        sample = _leading_chunks(sample, fitting, frames, per_chunk_rows=R == chunks)
    return FittedSample(sample, fitting * chunk_tokens, fitting, capped, truncated)


def _leading_chunks(sample: Sample, keep: int, frames: int, per_chunk_rows: bool) -> Sample:
    # clone(): a view would keep the dropped frames' memory alive while the sample waits in the pool.
    latent = sample.latent[:, :keep * frames].clone()
    caption, lengths, meta = sample.caption, sample.caption_lengths, sample.meta
    if per_chunk_rows:
        lengths = lengths[:keep].clone()
        caption = caption[:keep, :int(lengths.max())].clone()  # trimmed to the longest row left, as stored
        meta = dict(meta, captions=list(meta.get("captions", []))[:keep])
    return Sample(sample.key, latent, caption, lengths, meta)
