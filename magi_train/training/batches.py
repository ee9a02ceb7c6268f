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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from magi_train.config.schema import TrainConfig
from magi_train.data.loader import PackedSequence, WebDatasetLoader, merge_loader_states
from magi_train.data.packed_inputs import PackedItem, caption_rows, pack_inputs
from magi_train.data.synthetic import SyntheticBlobDataset, collate
from magi_train.diffusion.objective import ObjectiveDraw, noisy_input
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

    # ------------------------------------------------------------------ steps
    def step(self, step: int) -> List[Batch]:
        stream = self.cfg.trainer.seed * STEP_STREAM + step * 1_000_000_007
        if self.packed:
            if self._sequences is None:
                self._sequences = iter(self.loader)
            return self.packed_micro_batches([next(self._sequences) for _ in range(self.num_micro)], stream)
        d, m = self.cfg.data, self.cfg.model
        sample = SampleShape((self.tokens_per_chunk,) * d.chunks_per_sample, min(d.caption_length, m.caption_max_length))
        self.counts = StepCounts(self.global_batch * d.chunks_per_sample * self.tokens_per_chunk, self.global_batch,
                                 train_flops(m, [sample]) * self.global_batch)
        return self.micro_batches(self.dataset, self.batch_indices(step, self.global_batch), stream)

    def batch_indices(self, step: int, batch_size: int) -> List[int]:
        """Sample indices of a step: consecutive slices of per-epoch permutations (seeded by data.seed)."""
        n = len(self.dataset)
        perms: Dict[int, torch.Tensor] = {}  # a batch spans at most two epochs
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(pos, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=generator(self.cfg.data.seed * 7_777 + epoch))
            out.append(int(perms[epoch][offset]))
        return out

    # ------------------------------------------------------------------ one sample
    def noise(self, stream: int, position: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=generator(stream + position * SAMPLE_STREAM + _NOISE_OFFSET))

    def sample_draw(self, latent_frames: int, stream: int, position: int, fixed_t: Optional[float]) -> ObjectiveDraw:
        """The objective's draw for the sample at `position` of a batch or step (`fixed_t`: validation)."""
        chunk_frames = latent_frames if latent_frames == 1 else self.cfg.model.chunk_width  # an image: one frame
        return self.objective.draw(latent_frames, chunk_frames, stream + position * SAMPLE_STREAM, fixed_t)

    # ------------------------------------------------------------------ dense batches (data=synthetic)
    def micro_batches(self, dataset, indices: List[int], stream: int, fixed_t: Optional[float] = None) -> List[Batch]:
        """This rank's micro-batches of a global batch: stage-0 inputs and [target | loss weight].
        `fixed_t`: every chunk at that t, text-to-video, no caption dropout (validation)."""
        d, p = self.cfg.data, self.parallel
        n = d.chunks_per_sample
        elements = d.latent_channels * d.latent_height * d.latent_width  # per latent frame
        draws = [self.sample_draw(n * d.latent_frames_per_chunk, stream, pos, fixed_t) for pos in range(len(indices))]
        count = sum(int(draw.frame_weight.sum()) for draw in draws) * elements
        if count == 0:
            raise ValueError("no noisy frame in the global batch (all are clean context)")
        per_rank = len(indices) // p.dp
        out = []
        for k in range(per_rank // d.micro_batch_size):
            lo = p.dp_rank * per_rank + k * d.micro_batch_size
            pos = list(range(lo, lo + d.micro_batch_size))
            batch = collate([dataset[indices[i]] for i in pos])
            x = batch["latent"]
            t = torch.stack([draws[i].t for i in pos])
            clean = torch.stack([draws[i].clean_chunks for i in pos])
            dropped = torch.tensor([draws[i].dropped for i in pos])
            noise = torch.stack([self.noise(stream, i, x.shape[1:]) for i in pos])
            x_t = noisy_input(x, noise, torch.stack([draws[i].frame_t for i in pos]))
            # Dropped samples (for CFG) and clean context chunks see the learned null caption, as at inference.
            null_rows = dropped.repeat_interleave(n) | clean.flatten()
            frame_weight = torch.stack([draws[i].frame_weight for i in pos])  # (N, T): 0 on clean frames
            weight = frame_weight[:, None, :, None, None].expand(x.shape[0], 1, *x.shape[2:]) / count
            inputs = (x_t, t, batch["caption"].flatten(0, 1), batch["caption_mask"].flatten(0, 1), null_rows, dropped)
            target = torch.cat([velocity_target(x, noise), weight], dim=1)
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
        return PackedItem(x_t=noisy_input(x, noise, draw.frame_t), target=velocity_target(x, noise),
                          frame_weight=draw.frame_weight, t=draw.t, caption=caption, caption_mask=mask,
                          null_rows=null_rows, adaln_uncond=torch.full((chunks,), draw.dropped))

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
