"""The micro-batches of a training step: dense synthetic batches or packed webdataset sequences, with every
random number of a sample drawn from its own seed.

    x (N, C, T, H, W) clean latents of `n` chunks, captions per chunk
    t (N, n)  per-chunk times (the objective's draw), non-increasing along the chunk index
    x_t = (1 - t) noise + t x,  target = [v* | w] along channels, w = frame weight / the global loss count
The global batch (data.global_batch_size) is split over the data-parallel ranks and, on each, into
micro-batches. Everything random about a sample (noise, times, caption dropout) comes from seeds derived from
(trainer.seed, step, the sample's position in the global batch), and the batch of step s is a pure function
of s, so every layout trains on exactly the same numbers and a resumed run repeats the uninterrupted one.
The objective then turns the flow-matching inputs and targets into its own (objectives/base.py).

Prefetch (data.prefetch > 0, dense batches): the part of a step's batch that depends on the step alone (its
samples, rendered and collated, the noise and v*) is built for the next data.prefetch steps in one daemon
thread while the current step computes, keyed by step: a step asked for out of order (a resume, a rerun)
discards what was built ahead and is built at once. The objective's draws, which may depend on per-step
objective state (distillation's step size), and every device copy stay on the caller's thread, so the
numbers are the same as without prefetch. Packed sequences are not prefetched: the loader counts every
sequence it handed out as consumed in its checkpointed position, and a step reduces over dp (a collective).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from magi_train.config.schema import TrainConfig
from magi_train.data.loader import PackedSequence, WebDatasetLoader, merge_loader_states
from magi_train.data.packed_inputs import PackedItem, caption_rows, pack_inputs
from magi_train.data.synthetic import SyntheticBlobDataset, collate
from magi_train.diffusion.objective import ObjectiveDraw, motion_weight, noisy_input
from magi_train.observability.flops import SampleShape, train_flops
from magi_train.parallel.groups import Parallel
from magi_train.parallel.pipeline import MicroBatchShape
from magi_train.training.objectives.base import Batch, Objective, generator
from magi_train.training.objectives.flow_matching import velocity_target

# Streams derived from the run seed; distinct multipliers keep them independent.
STEP_STREAM = 1_000_003
SAMPLE_STREAM = 10_007  # a sample's seeds: stream + position * SAMPLE_STREAM (+ 0 draw, + 1 noise, + 3 grid)
EVAL_STREAM = 7_919
_NOISE_OFFSET = 1


@dataclass
class StepCounts:
    """What a step trained on, over every data-parallel rank (for throughput and MFU)."""

    tokens: int = 0  # real (unpadded) tokens
    samples: int = 0
    flops: int = 0  # model FLOPs of the forward and backward (magi_train/observability/flops.py)


@dataclass
class MicroSamples:
    """One micro-batch's data-only part (CPU): latents x (N, C, T, H, W), noise like x, v* = x - noise,
    caption rows (N * chunks, L, Cc) and their mask."""

    latent: torch.Tensor
    noise: torch.Tensor
    velocity: torch.Tensor
    caption: torch.Tensor
    caption_mask: torch.Tensor


def micro_batch_shape(cfg: TrainConfig) -> Tuple[MicroBatchShape, int]:
    """(the stage-0 shapes of one micro-batch, latent tokens per chunk (0 for packed sequences))."""
    d, m = cfg.data, cfg.model
    if d.kind == "webdataset":
        P = m.out_channels // (2 if m.half_channel_vae else 1) * m.t_patch_size * m.patch_size ** 2
        return MicroBatchShape(1, d.max_rows_per_sequence, 0, d.caption_length, (0, 0, 0), (1, P, d.seq_length),
                               seq_length=d.seq_length), 0
    patch = m.patch_size
    grid = (d.latent_frames_per_chunk * d.chunks_per_sample // m.t_patch_size, d.latent_height // patch,
            d.latent_width // patch)
    tokens_per_chunk = (d.latent_frames_per_chunk // m.t_patch_size) * grid[1] * grid[2]
    return MicroBatchShape(d.micro_batch_size, d.chunks_per_sample, tokens_per_chunk, m.caption_max_length, grid,
                           (d.micro_batch_size, d.latent_channels, d.latent_frames_per_chunk * d.chunks_per_sample,
                            d.latent_height, d.latent_width)), tokens_per_chunk


class _PrefetchState:
    """What the worker thread and its owner share. The thread holds this and a weak reference to the build
    function only, so a builder that is dropped without close() is still collected (and its thread ends)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.wanted: Deque[int] = deque()  # keys to build, in order
        self.done: Dict[int, Tuple[bool, Any]] = {}  # key -> (ok, value or the exception raised)
        self.busy: Optional[int] = None  # the key being built now
        self.closed = False

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.wanted.clear()
            self.done.clear()
            self.cond.notify_all()


def _prefetch_worker(state: _PrefetchState, build_ref: Callable[[], Optional[Callable[[int], Any]]]) -> None:
    while True:
        with state.cond:
            while not state.wanted and not state.closed:
                state.cond.wait()
            if state.closed:
                return
            key = state.busy = state.wanted.popleft()
        build = build_ref()
        if build is None:  # the owner is gone
            state.close()
            return
        try:
            result = (True, build(key))
        except BaseException as exc:  # handed to the caller of get(key), which raises it
            result = (False, exc)
        del build
        with state.cond:
            state.busy = None
            if not state.closed:
                state.done[key] = result
            state.cond.notify_all()


class Prefetcher:
    """`build(key)` for the `depth` keys after the last one asked for, in one daemon thread.

    get(key) returns what was built ahead for key (waiting for it if it is under way) or, if key was not
    expected, builds it on the caller's thread; schedule_after(key) then has key + 1 .. key + depth built and
    drops anything else. An exception raised by the build is raised by get(key). `build` must be a bound
    method (the thread keeps only a weak reference to its object). close() stops the thread; a later get
    starts a new one."""

    def __init__(self, build: Callable[[int], Any], depth: int, name: str = "prefetch"):
        if depth < 1:
            raise ValueError(f"Prefetcher depth must be >= 1, got {depth}")
        self._build_ref = weakref.WeakMethod(build)
        self.depth, self.name = depth, name
        self._state: Optional[_PrefetchState] = None
        self._thread: Optional[threading.Thread] = None

    def _start(self) -> _PrefetchState:
        state = self._state = _PrefetchState()
        self._thread = threading.Thread(target=_prefetch_worker, args=(state, self._build_ref), name=self.name,
                                        daemon=True)
        self._thread.start()
        # A builder collected without close(): end its thread too.
        weakref.finalize(self, state.close)
        return state

    def get(self, key: int) -> Any:
        """What was built ahead for `key` (waiting while it is under way), else build(key) on this thread."""
        state = self._state if self._state is not None and not self._state.closed else self._start()
        with state.cond:
            ahead = key in state.done or key == state.busy or key in state.wanted
            if ahead:
                if key in state.wanted:  # not started yet: it is next
                    state.wanted.remove(key)
                    state.wanted.appendleft(key)
                    state.cond.notify_all()
                while key not in state.done:
                    state.cond.wait()
                ok, value = state.done.pop(key)
        if not ahead:
            return self._build_ref()(key)
        if not ok:
            raise value
        return value

    def schedule_after(self, key: int) -> None:
        """Build key + 1 .. key + depth next; drop anything else. Called once the caller is done with `key`'s
        own work: the thread then runs while the step computes rather than against the caller's Python
        (both need the GIL, and most of a synthetic sample's cost holds it)."""
        state = self._state if self._state is not None and not self._state.closed else self._start()
        with state.cond:
            window = range(key + 1, key + self.depth + 1)
            state.done = {k: v for k, v in state.done.items() if k in window}
            state.wanted = deque(k for k in state.wanted if k in window)
            state.wanted.extend(k for k in window if k not in state.done and k != state.busy and k not in state.wanted)
            state.cond.notify_all()

    def close(self) -> None:
        """Stop the thread (after the build under way, if any) and drop what was built ahead."""
        if self._state is not None:
            self._state.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._state = self._thread = None


class BatchBuilder:
    """This rank's micro-batches of every step (and of the validation batches), for one objective."""

    def __init__(self, cfg: TrainConfig, parallel: Parallel, objective: Objective, global_batch: int, num_micro: int):
        self.cfg, self.parallel, self.objective = cfg, parallel, objective
        self.global_batch, self.num_micro = global_batch, num_micro
        d, m = cfg.data, cfg.model
        self.packed = d.kind == "webdataset"
        self.shape, self.tokens_per_chunk = micro_batch_shape(cfg)
        self.counts = StepCounts()  # of the last batch built
        if self.packed:
            # Every tensor/context/pipeline peer of a data-parallel rank reads the same streams, so they
            # hold identical sequences without any broadcast.
            self.loader = WebDatasetLoader(d, m, parallel.dp_rank, parallel.dp)
            self._sequences = None  # the loader's iterator, started at the first step (after a resume)
        else:
            self.dataset = SyntheticBlobDataset(d, m.caption_channels, m.caption_max_length)
            # Another data seed gives held-out samples that the training stream never shows.
            self.held_out = SyntheticBlobDataset(replace(d, seed=d.seed + 1_000_000), m.caption_channels,
                                                 m.caption_max_length)
        self._perms: Dict[int, torch.Tensor] = {}  # epoch -> its sample permutation (see _permutation)
        # The next steps' samples and noise, built while this one computes (dense batches only, see above).
        self._prefetch = Prefetcher(self._step_samples, d.prefetch, "magi-batch-prefetch") \
            if d.prefetch > 0 and not self.packed else None

    def close(self) -> None:
        """Stop the prefetch thread (a later step starts it again)."""
        if self._prefetch is not None:
            self._prefetch.close()

    # ------------------------------------------------------------------ steps
    def step_stream(self, step: int) -> int:
        return self.cfg.trainer.seed * STEP_STREAM + step * 1_000_000_007

    def step(self, step: int) -> List[Batch]:
        stream = self.step_stream(step)
        if self.packed:
            if self._sequences is None:
                self._sequences = iter(self.loader)
            return self.packed_micro_batches([next(self._sequences) for _ in range(self.num_micro)], stream)
        d, m = self.cfg.data, self.cfg.model
        sample = SampleShape((self.tokens_per_chunk,) * d.chunks_per_sample, min(d.caption_length, m.caption_max_length))
        self.counts = StepCounts(self.global_batch * d.chunks_per_sample * self.tokens_per_chunk, self.global_batch,
                                 train_flops(m, [sample]) * self.global_batch)
        samples = self._prefetch.get(step) if self._prefetch is not None else self._step_samples(step)
        out = self.micro_batches(self.dataset, self.batch_indices(step, self.global_batch), stream, samples=samples)
        if self._prefetch is not None:
            self._prefetch.schedule_after(step)
        return out

    def _step_samples(self, step: int) -> List["MicroSamples"]:
        return self.micro_samples(self.dataset, self.batch_indices(step, self.global_batch), self.step_stream(step))

    def batch_indices(self, step: int, batch_size: int) -> List[int]:
        """Sample indices of a step: consecutive slices of per-epoch permutations (seeded by data.seed)."""
        n = len(self.dataset)
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(pos, n)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        # The last two epochs' permutations are kept (a batch spans at most two): drawing one costs more than
        # the rest of the indices. Both threads may ask; a permutation is a pure function of the epoch.
        perms = self._perms
        perm = perms.get(epoch)
        if perm is None:
            perm = torch.randperm(len(self.dataset), generator=generator(self.cfg.data.seed * 7_777 + epoch))
            self._perms = {e: v for e, v in perms.items() if e == epoch - 1 or e == epoch + 1}
            self._perms[epoch] = perm
        return perm

    # ------------------------------------------------------------------ one sample
    def noise(self, stream: int, position: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=generator(stream + position * SAMPLE_STREAM + _NOISE_OFFSET))

    def sample_draw(self, latent_frames: int, stream: int, position: int, fixed_t: Optional[float]) -> ObjectiveDraw:
        """The objective's draw for the sample at `position` of a batch or step (`fixed_t`: validation)."""
        chunk_frames = latent_frames if latent_frames == 1 else self.cfg.model.chunk_width  # an image: one frame
        return self.objective.draw(latent_frames, chunk_frames, stream + position * SAMPLE_STREAM, fixed_t)

    # ------------------------------------------------------------------ dense batches (data=synthetic)
    def _micro_positions(self, batch_size: int) -> List[List[int]]:
        """Positions in the global batch of this rank's micro-batches."""
        d, p = self.cfg.data, self.parallel
        per_rank = batch_size // p.dp
        lo = p.dp_rank * per_rank
        return [list(range(lo + k * d.micro_batch_size, lo + (k + 1) * d.micro_batch_size))
                for k in range(per_rank // d.micro_batch_size)]

    def micro_samples(self, dataset, indices: List[int], stream: int) -> List["MicroSamples"]:
        """What this rank's micro-batches take from the data alone, on the CPU: the collated samples, their
        noise and the velocity target v* = x - noise. No objective state is read (the prefetch thread runs it)."""
        out = []
        for pos in self._micro_positions(len(indices)):
            batch = collate([dataset[indices[i]] for i in pos])
            x = batch["latent"]
            noise = torch.stack([self.noise(stream, i, x.shape[1:]) for i in pos])
            out.append(MicroSamples(x, noise, velocity_target(x, noise), batch["caption"].flatten(0, 1),
                                    batch["caption_mask"].flatten(0, 1)))
        return out

    def micro_batches(self, dataset, indices: List[int], stream: int, fixed_t: Optional[float] = None,
                      samples: Optional[List["MicroSamples"]] = None) -> List[Batch]:
        """This rank's micro-batches of a global batch: stage-0 inputs and [target | loss weight].
        `fixed_t`: every chunk at that t, text-to-video, no caption dropout (validation). `samples`:
        micro_samples(dataset, indices, stream) if already built (the prefetch)."""
        d, p = self.cfg.data, self.parallel
        n = d.chunks_per_sample
        elements = d.latent_channels * d.latent_height * d.latent_width  # per latent frame
        draws = [self.sample_draw(n * d.latent_frames_per_chunk, stream, pos, fixed_t) for pos in range(len(indices))]
        count = sum(int(draw.frame_weight.sum()) for draw in draws) * elements
        if count == 0:
            raise ValueError("no noisy frame in the global batch (all are clean context)")
        if samples is None:
            samples = self.micro_samples(dataset, indices, stream)
        out = []
        for pos, s in zip(self._micro_positions(len(indices)), samples):
            x = s.latent
            t = torch.stack([draws[i].t for i in pos])
            clean = torch.stack([draws[i].clean_chunks for i in pos])
            dropped = torch.tensor([draws[i].dropped for i in pos])
            x_t = noisy_input(x, s.noise, torch.stack([draws[i].frame_t for i in pos]))
            # Dropped samples (for CFG) and clean context chunks see the learned null caption, as at inference.
            null_rows = dropped.repeat_interleave(n) | clean.flatten()
            frame_weight = torch.stack([draws[i].frame_weight for i in pos])  # (N, T): 0 on clean frames
            weight = frame_weight[:, None, :, None, None].expand(x.shape[0], 1, *x.shape[2:]) / count
            if self.cfg.diffusion.motion_weight > 0:
                weight = weight * motion_weight(x, self.cfg.diffusion)[:, None]
            inputs = (x_t, t, s.caption, s.caption_mask, null_rows, dropped)
            target = torch.cat([s.velocity, weight], dim=1)
            dev = p.device
            out.append(self.objective.dense_targets([draws[i] for i in pos], tuple(v.to(dev) for v in inputs),
                                                    target.to(dev)))
        return out

    # ------------------------------------------------------------------ packed sequences (data=webdataset)
    def packed_micro_batches(self, sequences: List[PackedSequence], stream: int,
                             fixed_t: Optional[float] = None) -> List[Batch]:
        """This rank's packed sequences as micro-batches. Sample j of a sequence draws its objective from
        (stream, its position: the sequence's shard stream, how many sequences of that stream came before it
        in this step, j), so a step's draws do not depend on how the streams are dealt to data-parallel ranks;
        the loss is normalised by the count of loss elements over every data-parallel rank (one scalar
        all-reduce), as in the dense path."""
        p, m, d = self.parallel, self.cfg.model, self.cfg.data
        staged, local_count, tokens, shapes = [], 0, 0, []
        for k, seq in enumerate(sequences):
            occurrence = sum(other.stream == seq.stream for other in sequences[:k])
            items, draws = [], []
            for j, sample in enumerate(seq.samples):
                C, T, H, W = sample.latent.shape
                position = (occurrence * d.num_streams + seq.stream) * d.max_rows_per_sequence + j
                draw = self.sample_draw(T, stream, position, fixed_t)
                items.append(self._packed_item(sample, draw, self.noise(stream, position, sample.latent.shape)))
                draws.append(draw)
                local_count += int(draw.frame_weight.sum()) * C * H * W
                shapes.append(self._sample_shape(sample))
            staged.append((items, draws))
            tokens += seq.tokens
        totals = torch.tensor([local_count, tokens, len(shapes), train_flops(m, shapes)], dtype=torch.float64)
        if p.dp > 1:
            dist.all_reduce(totals, group=p.groups.dp)
        count, tokens, samples, flops = (int(v) for v in totals)
        self.counts = StepCounts(tokens, samples, flops)
        if count == 0:
            raise ValueError("no noisy frame in the global batch (all are clean context)")
        out = []
        for items, draws in staged:
            inputs, target = pack_inputs(items, m, d.seq_length, d.max_rows_per_sequence, 1.0 / count)
            out.append(self.objective.packed_targets(items, draws, tuple(v.to(p.device) for v in inputs),
                                                     target.to(p.device)))
        return out

    def _sample_shape(self, sample) -> SampleShape:
        """A shard sample as the model sees it (for the FLOP count): tokens of each chunk, and its valid
        caption tokens per chunk row (the mean over rows, cut to data.caption_length as packing does)."""
        m = self.cfg.model
        _, T, H, W = sample.latent.shape
        per_frame = (H // m.patch_size) * (W // m.patch_size)
        frames = [min(m.chunk_width, T - lo) for lo in range(0, T, m.chunk_width)]
        caption = round(float(sample.caption_lengths.clamp(max=self.cfg.data.caption_length).float().mean()))
        return SampleShape(tuple(f // m.t_patch_size * per_frame for f in frames), caption)

    def _packed_item(self, sample, draw: ObjectiveDraw, noise: torch.Tensor) -> PackedItem:
        x = sample.latent.float()
        chunks = draw.t.shape[0]
        caption, mask = caption_rows(sample.caption, sample.caption_lengths, chunks, self.cfg.data.caption_length)
        # Dropped samples (for CFG) and clean context chunks see the learned null caption, as at inference.
        null_rows = draw.clean_chunks | draw.dropped
        diffusion = self.cfg.diffusion
        return PackedItem(x_t=noisy_input(x, noise, draw.frame_t), target=velocity_target(x, noise),
                          frame_weight=draw.frame_weight, t=draw.t, caption=caption, caption_mask=mask,
                          null_rows=null_rows, adaln_uncond=torch.full((chunks,), draw.dropped),
                          position_weight=motion_weight(x, diffusion) if diffusion.motion_weight > 0 else None)

    # ------------------------------------------------------------------ the loader's state
    def data_counters(self) -> Dict[str, float]:
        """The loaders' counters (samples read, skipped by reason, corrupt shards, ...) over every
        data-parallel rank, as data/<name> (collective over dp)."""
        if not self.packed:
            return {}
        total: Dict[str, float] = {}
        for counts in self._gather_dp(self.loader.counters()):
            for name, value in counts.items():
                total[f"data/{name}"] = total.get(f"data/{name}", 0) + value
        return total

    def loader_state(self) -> Optional[Dict]:
        """The merged position of every data-parallel rank's loader (collective over dp)."""
        if not self.packed:
            return None
        return merge_loader_states(self._gather_dp(self.loader.state_dict()))

    def _gather_dp(self, obj) -> List:
        """`obj` of every data-parallel rank, in rank order (collective over dp)."""
        if self.parallel.dp == 1:
            return [obj]
        everyone = [None] * self.parallel.dp
        dist.all_gather_object(everyone, obj, group=self.parallel.groups.dp)
        return everyone
