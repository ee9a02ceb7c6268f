"""The flow-matching trainer, for any tp x cp x pp x dp layout (one process is the 1 x 1 x 1 x 1 case).

Data: data.kind=synthetic draws dense batches (N samples of one shape); data.kind=webdataset streams shards
and packs samples of any size and length into one sequence of data.seq_length tokens per micro-batch
(`WebDatasetLoader`); each packed sample gets its own objective draw, and the loader's position is saved
with every checkpoint so that a resumed run reads exactly the samples it had not trained on yet.

One step:
    x (N, C, T, H, W) clean latents of `n` chunks, captions per chunk
    t (N, n)  per-chunk times, non-increasing along the chunk index; leading chunks may be clean context
    x_t = (1 - t) noise + t x,  v* = x - noise
    loss = sum over noisy chunks of the global batch of |DiT(x_t, ...) - v*|^2 / their element count
The global batch (data.global_batch_size) is split over the data-parallel ranks and, on each, into
micro-batches (gradient accumulation, or the pipeline's micro-batches). Everything random about a sample
(noise, times, caption dropout) comes from a generator seeded by (trainer.seed, step, the sample's position
in the global batch), and the batch of step s is a pure function of s, so every layout trains on exactly
the same numbers and a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from magi_train.checkpoint.distributed import is_distributed_checkpoint, load_train_state, save_train_state
from magi_train.checkpoint.manager import CheckpointManager
from magi_train.checkpoint.weights import load_into
from magi_train.config.schema import TrainConfig
from magi_train.config.validate import check_train_layout
from magi_train.data.loader import PackedSequence, WebDatasetLoader, merge_loader_states
from magi_train.data.packed_inputs import PackedItem, caption_rows, pack_inputs
from magi_train.data.synthetic import SyntheticBlobDataset, collate
from magi_train.diffusion.flow_matching import velocity_target
from magi_train.diffusion.objective import ObjectiveDraw, draw_objective, fixed_draw, noisy_input
from magi_train.observability.flops import SampleShape, train_flops
from magi_train.observability.metrics import MetricsLogger
from magi_train.model import magi_attention
from magi_train.training.optim import lr_at, set_lr
from magi_train.parallel.grads import finalize_model_grads, global_grad_norm
from magi_train.parallel.groups import Parallel
from magi_train.parallel.parallelize import build_train_stages, full_shapes
from magi_train.parallel.pipeline import DiTStage, MicroBatchShape, build_schedule
from magi_train.parallel.zero import ShardedAdamW
from magi_train.observability.step_timer import StepTimer
from magi_train.training.stop import StopRequest
from magi_train.observability.throughput import peak_flops_per_device, throughput_record

# Streams derived from the run seed; distinct multipliers keep them independent.
_STEP_STREAM = 1_000_003
_SAMPLE_STREAM = 10_007
_EVAL_STREAM = 7_919


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % (2**63))


def weighted_sq_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum(|pred - v*|^2 * w) with target = [v* | w] along channels (w already divided by the count)."""
    return ((pred.float() - target[:, :-1]).square() * target[:, -1:]).sum()


class Trainer:
    def __init__(self, cfg: TrainConfig, parallel: Parallel):
        self.cfg = cfg
        self.parallel = p = parallel
        tc, d, m = cfg.trainer, cfg.data, cfg.model
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        torch.use_deterministic_algorithms(tc.deterministic)
        self.cp_impl = cp_impl = magi_attention.resolve_cp_impl(cfg.parallel.cp_impl, p.cp_group)
        self.global_batch = check_train_layout(cfg, p.dp, cp_impl)
        self.num_micro = self.global_batch // (d.micro_batch_size * p.dp)
        self.stage_ids, self.models = build_train_stages(cfg, p, cp_impl)
        self.full_shapes = full_shapes(m)
        self.optimizer = ShardedAdamW(self.named_parameters(), cfg.optimizer, p.groups.dp_cp)

        self.out_dir = Path(tc.output_dir)
        # One writer: a writable manager tidies interrupted saves when it opens, which must not race a save.
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", tc.keep_last, read_only=not p.is_main)
        self.packed = d.kind == "webdataset"
        if self.packed:
            # Every tensor/context/pipeline peer of a data-parallel rank reads the same streams, so they
            # hold identical sequences without any broadcast.
            self.loader = WebDatasetLoader(d, m, p.dp_rank, p.dp)
            self._sequences = None  # the loader's iterator, started at the first step (after a resume)
            self._val_sequences: Optional[List[PackedSequence]] = None
            self.tokens_per_chunk = 0
            P = m.out_channels // (2 if m.half_channel_vae else 1) * m.t_patch_size * m.patch_size ** 2
            self.shape = MicroBatchShape(1, d.max_rows_per_sequence, 0, d.caption_length, (0, 0, 0), (1, P, d.seq_length),
                                         seq_length=d.seq_length)
        else:
            self.dataset = SyntheticBlobDataset(d, m.caption_channels, m.caption_max_length)
            # Another data seed gives held-out samples that the training stream never shows.
            self.held_out = SyntheticBlobDataset(replace(d, seed=d.seed + 1_000_000), m.caption_channels,
                                                 m.caption_max_length)
            patch = m.patch_size
            grid = (d.latent_frames_per_chunk * d.chunks_per_sample // m.t_patch_size, d.latent_height // patch,
                    d.latent_width // patch)
            self.tokens_per_chunk = (d.latent_frames_per_chunk // m.t_patch_size) * grid[1] * grid[2]
            self.shape = MicroBatchShape(
                d.micro_batch_size, d.chunks_per_sample, self.tokens_per_chunk, m.caption_max_length, grid,
                (d.micro_batch_size, d.latent_channels, d.latent_frames_per_chunk * d.chunks_per_sample,
                 d.latent_height, d.latent_width))
        self.last_tokens = 0  # real (unpadded) tokens of the last step, over every data-parallel rank
        self.last_samples = 0  # samples of the last step, over every data-parallel rank
        self.last_flops = 0  # model FLOPs of the last step's forward and backward (magi_train/observability/flops.py), all ranks
        self.timer = StepTimer(p.device, tc.step_timers)
        self.peak_flops = peak_flops_per_device(tc.peak_tflops, p.device)
        stop_file = self.out_dir / tc.stop_file if tc.stop_file else None
        self.stop = StopRequest(stop_file, tc.stop_signals, p.device, p.is_main)
        self.skipped_steps = self.bad_steps_in_row = 0  # non-finite steps: in all, and in a row
        self._video_decoder = None  # built at the first validation video
        self.schedule = None
        # Without a pipeline one stage holds the whole model (built once: it keeps the attention placement).
        self.stage = DiTStage(self.models[0], self.shape) if p.pp == 1 else None
        if p.pp > 1:
            self.schedule = build_schedule(self.models, self.stage_ids, cfg.parallel, p.groups.pp, self.shape,
                                           self.num_micro, weighted_sq_error, p.device)
        self.step = 0
        self.saved_step: Optional[int] = None  # step of the last checkpoint this run wrote or resumed from
        resume_from = self._agree_resume(tc.resume)
        if resume_from is not None:
            self.load(resume_from)

    def _agree_resume(self, spec: str) -> Optional[Path]:
        """The checkpoint to resume from, chosen by rank 0 (whose manager has just tidied interrupted saves)
        and broadcast, so that every rank loads the same step; rank 0's error is raised on every rank."""
        choice: List[object] = [None]
        if self.parallel.is_main:
            try:
                choice[0] = self.checkpoints.resolve_resume(spec)
            except (OSError, ValueError) as e:
                choice[0] = e
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], BaseException):
            raise choice[0]
        return choice[0]

    @property
    def model(self):
        """The whole model (single-stage runs)."""
        if len(self.models) != 1 or not (self.models[0].pre_process and self.models[0].post_process):
            raise AttributeError("Trainer.model is the whole model; with pipeline stages use Trainer.models")
        return self.models[0]

    def named_parameters(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return [kv for model in self.models for kv in model.named_parameters()]

    # ------------------------------------------------------------------ data
    def batch_indices(self, step: int, batch_size: int) -> List[int]:
        """Sample indices of a step: consecutive slices of per-epoch permutations (seeded by data.seed)."""
        n = len(self.dataset)
        perms: Dict[int, torch.Tensor] = {}  # a batch spans at most two epochs
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(pos, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=_generator(self.cfg.data.seed * 7_777 + epoch))
            out.append(int(perms[epoch][offset]))
        return out

    def _noise(self, stream: int, position: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=_generator(stream + position * _SAMPLE_STREAM + 1))

    def micro_batches(self, dataset, indices: List[int], stream: int, fixed_t: Optional[float] = None):
        """This rank's micro-batches of a global batch: stage-0 inputs and [v* | loss weight] targets.
        `fixed_t`: every chunk at that t, text-to-video, no caption dropout (validation)."""
        cfg, p = self.cfg, self.parallel
        d = cfg.data
        n = d.chunks_per_sample
        elements = d.latent_channels * d.latent_height * d.latent_width  # per latent frame
        draws = [self._sample_draw(n * d.latent_frames_per_chunk, stream, pos, fixed_t) for pos in range(len(indices))]
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
            noise = torch.stack([self._noise(stream, i, x.shape[1:]) for i in pos])
            x_t = noisy_input(x, noise, torch.stack([draws[i].frame_t for i in pos]))
            # Dropped samples (for CFG) and clean context chunks see the learned null caption, as at inference.
            null_rows = dropped.repeat_interleave(n) | clean.flatten()
            frame_weight = torch.stack([draws[i].frame_weight for i in pos])  # (N, T): 0 on clean frames
            weight = frame_weight[:, None, :, None, None].expand(x.shape[0], 1, *x.shape[2:]) / count
            inputs = (x_t, t, batch["caption"].flatten(0, 1), batch["caption_mask"].flatten(0, 1), null_rows, dropped)
            target = torch.cat([velocity_target(x, noise), weight], dim=1)
            dev = p.device
            out.append(self._dense_targets([draws[i] for i in pos], tuple(v.to(dev) for v in inputs), target.to(dev)))
        return out

    def _dense_targets(self, draws: List[ObjectiveDraw], inputs, target):
        """(stage-0 inputs, [target | weight]) of one dense micro-batch: flow matching's (DistillTrainer replaces
        the target and adds the step-size input)."""
        return inputs, target

    def step_micro_batches(self, step: int):
        stream = self.cfg.trainer.seed * _STEP_STREAM + step * 1_000_000_007
        if self.packed:
            if self._sequences is None:
                self._sequences = iter(self.loader)
            return self.packed_micro_batches([next(self._sequences) for _ in range(self.num_micro)], stream)
        d, m = self.cfg.data, self.cfg.model
        self.last_tokens = self.global_batch * d.chunks_per_sample * self.tokens_per_chunk
        self.last_samples = self.global_batch
        sample = SampleShape((self.tokens_per_chunk,) * d.chunks_per_sample, min(d.caption_length, m.caption_max_length))
        self.last_flops = train_flops(m, [sample]) * self.global_batch
        return self.micro_batches(self.dataset, self.batch_indices(step, self.global_batch), stream)

    def packed_micro_batches(self, sequences: List[PackedSequence], stream: int, fixed_t: Optional[float] = None):
        """This rank's packed sequences as micro-batches. Sample j of a sequence draws its objective from
        (stream, its position: the sequence's shard stream, how many sequences of that stream came before it
        in this step, j), so a step's draws do not depend on how the streams are dealt to data-parallel ranks;
        the loss is normalised by the count of loss elements over every data-parallel rank (one scalar
        all-reduce), as in the dense path."""
        cfg, p = self.cfg, self.parallel
        m, d = cfg.model, cfg.data
        staged, local_count, tokens, shapes = [], 0, 0, []
        for k, seq in enumerate(sequences):
            occurrence = sum(other.stream == seq.stream for other in sequences[:k])
            items = []
            draws = []
            for j, sample in enumerate(seq.samples):
                C, T, H, W = sample.latent.shape
                position = (occurrence * d.num_streams + seq.stream) * d.max_rows_per_sequence + j
                draw = self._sample_draw(T, stream, position, fixed_t)
                items.append(self._packed_item(sample, draw, self._noise(stream, position, sample.latent.shape)))
                draws.append(draw)
                local_count += int(draw.frame_weight.sum()) * C * H * W
                shapes.append(self._sample_shape(sample))
            staged.append((items, draws))
            tokens += seq.tokens
        totals = torch.tensor([local_count, tokens, len(shapes), train_flops(m, shapes)], dtype=torch.float64)
        if p.dp > 1:
            dist.all_reduce(totals, group=p.groups.dp)
        count, self.last_tokens, self.last_samples, self.last_flops = (int(v) for v in totals)
        if count == 0:
            raise ValueError("no noisy frame in the global batch (all are clean context)")
        out = []
        for items, draws in staged:
            inputs, target = pack_inputs(items, m, d.seq_length, d.max_rows_per_sequence, 1.0 / count)
            out.append(self._packed_targets(items, draws, tuple(v.to(p.device) for v in inputs), target.to(p.device)))
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

    def _sample_draw(self, latent_frames: int, stream: int, position: int, fixed_t: Optional[float]) -> ObjectiveDraw:
        """Task, times, clean frames and caption dropout of the sample at `position` of a batch or step
        (`fixed_t`: validation, every chunk at that t)."""
        T = latent_frames
        chunk_frames = T if T == 1 else self.cfg.model.chunk_width  # an image is one chunk of one frame
        if fixed_t is not None:
            return fixed_draw(T, chunk_frames, fixed_t)
        return draw_objective(T, chunk_frames, T == 1, self.cfg.diffusion, _generator(stream + position * _SAMPLE_STREAM))

    def _packed_targets(self, items: List[PackedItem], draws: List[ObjectiveDraw], inputs, target):
        """(stage-0 inputs, [target | weight]) of one packed sequence: flow matching's as packed (DistillTrainer
        replaces the target and adds the step-size input)."""
        return inputs, target

    def _packed_item(self, sample, draw: ObjectiveDraw, noise: torch.Tensor) -> PackedItem:
        x = sample.latent.float()
        chunks = draw.t.shape[0]
        caption, mask = caption_rows(sample.caption, sample.caption_lengths, chunks, self.cfg.data.caption_length)
        # Dropped samples (for CFG) and clean context chunks see the learned null caption, as at inference.
        null_rows = draw.clean_chunks | draw.dropped
        return PackedItem(x_t=noisy_input(x, noise, draw.frame_t), target=velocity_target(x, noise),
                          frame_weight=draw.frame_weight, t=draw.t, caption=caption, caption_mask=mask,
                          null_rows=null_rows, adaln_uncond=torch.full((chunks,), draw.dropped))

    # ------------------------------------------------------------------ forward/backward
    @contextlib.contextmanager
    def _autocast(self):
        """bf16 autocast (trainer.precision) and, with Transformer Engine layers, its fp8 autocast."""
        p = self.parallel
        with torch.autocast(p.device.type, dtype=torch.bfloat16, enabled=self.cfg.trainer.precision == "bf16"):
            if self.cfg.trainer.fp8_recipe == "none":
                yield
                return
            from magi_train.model.te_spec import fp8_autocast

            # Scaling factors (amaxes) are agreed over every rank of the pipeline stage (as megatron does).
            with fp8_autocast(self.cfg.trainer.fp8_recipe, p.groups.tp_dp_cp):
                yield

    def forward_backward(self, micro, backward: bool = True) -> torch.Tensor:
        """Sum of the micro-batch losses seen by this rank (0 on pipeline ranks without the last stage)."""
        total = torch.zeros((), dtype=torch.float64)
        if self.schedule is None:
            for inputs, target in micro:
                with self.timer.phase("forward"), self._autocast():
                    loss = weighted_sq_error(self.stage(*inputs), target)
                if backward:
                    with self.timer.phase("backward"):
                        loss.backward()
                total += loss.detach().double().cpu()
            return total
        # Pipeline: one call runs every micro-batch through the stages (forward and backward interleaved).
        inputs = tuple(torch.cat([m[0][i] for m in micro]) for i in range(len(micro[0][0])))
        target = torch.cat([m[1] for m in micro])
        has_first = any(m.pre_process for m in self.models)
        has_last = any(m.post_process for m in self.models)
        losses: List[torch.Tensor] = []
        with self.timer.phase("forward_backward"), self._autocast():
            self.schedule.step(*(inputs if has_first else ()), target=target if has_last else None,
                               losses=losses if has_last else None)
        for loss in losses:
            total += loss.detach().double().cpu()
        return total

    def _sum_loss(self, local: torch.Tensor) -> float:
        """Global loss: sum over pipeline ranks (only the last stage has it) and data-parallel ranks."""
        p = self.parallel
        for group, size in ((p.groups.pp, p.pp), (p.groups.dp, p.dp)):
            if size > 1:
                dist.all_reduce(local, group=group)
        return float(local)

    def grad_norm(self) -> float:
        return global_grad_norm(self.models, self.full_shapes, self.parallel)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> Dict[str, float]:
        step = self.step
        started = time.perf_counter()
        self.timer.reset()
        lr = lr_at(step, self.cfg.optimizer, self.cfg.trainer.max_steps)
        set_lr(self.optimizer, lr)
        with self.timer.phase("data"):
            micro = self.step_micro_batches(step)
        self.optimizer.zero_grad()
        local_loss = self.forward_backward(micro)
        with self.timer.phase("comm"):
            loss = self._sum_loss(local_loss)
            finalize_model_grads(self.models, self.parallel.groups.dp_cp)
            norm = self.grad_norm()
        # Loss and norm are reduced over every rank, so all ranks take the same decision.
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return self._skip_step(step, lr, loss, norm)
        self.bad_steps_in_row = 0
        with self.timer.phase("optimizer"):
            clip = self.cfg.optimizer.clip_grad
            if clip > 0:
                # torch.nn.utils.clip_grad_norm_'s formula, applied with the global norm.
                coef = min(1.0, clip / (norm + 1e-6))
                for _, param in self.named_parameters():
                    if param.grad is not None:
                        param.grad.mul_(coef)
            self.optimizer.step()
            self._after_optimizer_step()
        self.step += 1
        elapsed = time.perf_counter() - started
        rec = {"step": self.step, "loss": loss, "grad_norm": norm, "lr": lr, **self.timer.record(),
               **throughput_record(elapsed, self.last_tokens, self.last_samples, self.last_flops,
                                   self.parallel.world_size, self.peak_flops)}
        if self.packed:
            # Real tokens over padded ones this step (MAGI-1 reports >= 99% with First-Fit-Decreasing).
            rec["packing_util"] = self.last_tokens / (self.global_batch * self.cfg.data.seq_length)
        if self.skipped_steps:
            rec["skipped_steps"] = self.skipped_steps
        return rec

    def _skip_step(self, step: int, lr: float, loss: float, norm: float) -> Dict[str, float]:
        """A step with a NaN/inf loss or gradient: no update (its batch is spent, the schedule moves on)."""
        limit = self.cfg.trainer.max_bad_steps
        self.optimizer.zero_grad()
        self.skipped_steps += 1
        self.bad_steps_in_row += 1
        if self.bad_steps_in_row > limit:
            raise FloatingPointError(f"loss {loss} / gradient norm {norm} at step {step}: {self.bad_steps_in_row} "
                                     f"non-finite steps in a row, more than trainer.max_bad_steps={limit}")
        if self.parallel.is_main:
            print(f"warning: step {step} skipped (loss {loss}, gradient norm {norm}); {self.bad_steps_in_row} in a row, "
                  f"trainer.max_bad_steps={limit}", flush=True)
        self.step += 1
        return {"step": self.step, "loss": loss, "grad_norm": norm, "lr": lr, "skipped_steps": self.skipped_steps}

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Validation loss at each trainer.eval_t: held-out samples (synthetic: another data seed; webdataset:
        the first sequences of data.val_shards), fixed noise, every chunk at that t. Returns eval_loss/t=<t>
        per t and their mean as eval_loss."""
        tc = self.cfg.trainer
        for model in self.models:
            model.eval()
        out: Dict[str, float] = {}
        try:
            for t in tc.eval_t:
                total = 0.0
                for i in range(tc.eval_batches):
                    stream = tc.seed * _EVAL_STREAM + i  # the same noise at every t and every evaluation
                    if self.packed:
                        micro = self.packed_micro_batches(self._validation_sequences()[i:i + 1], stream, fixed_t=t)
                    else:
                        B = self.global_batch
                        micro = self.micro_batches(self.held_out, list(range(i * B, (i + 1) * B)), stream, fixed_t=t)
                    total += self._sum_loss(self.forward_backward(micro, backward=False))
                out[f"eval_loss/t={t:g}"] = total / tc.eval_batches
        finally:
            for model in self.models:
                model.train()
        out["eval_loss"] = sum(out.values()) / len(out)
        return out

    def _validation_sequences(self) -> List[PackedSequence]:
        """The held-out packed sequences of this data-parallel rank, read once (unshuffled, one stream per rank)."""
        if self._val_sequences is None:
            d, p = self.cfg.data, self.parallel
            if not d.val_shards:
                raise ValueError("trainer.eval_every / trainer.sample_every > 0 with data.kind=webdataset need "
                                 "data.val_shards (held-out shards)")
            val = replace(d, shards=d.val_shards, num_streams=p.dp, num_workers=0, shuffle_buffer=0)
            need = self.cfg.trainer.eval_batches
            sequences = []
            for seq in WebDatasetLoader(val, self.cfg.model, p.dp_rank, p.dp):
                if seq.epoch > 0:
                    break
                sequences.append(seq)
                if len(sequences) == need:
                    break
            if len(sequences) < need:
                raise ValueError(f"data.val_shards ({d.val_shards!r}) gives data-parallel rank {p.dp_rank} only "
                                 f"{len(sequences)} packed sequence(s); trainer.eval_batches asks for {need}")
            self._val_sequences = sequences
        return self._val_sequences

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

    def validation_videos(self) -> Dict[str, Path]:
        """trainer.sample_count videos from held-out captions with the inference sampler (collective over the
        model-parallel ranks; every data-parallel replica runs it too, rank 0 writes). {name: mp4 path}."""
        from magi_train.config.schema import SamplerConfig
        from magi_train.training.eval_videos import latent_channels, make_decoder, sample_validation_videos

        tc, p, model = self.cfg.trainer, self.parallel, self.model
        prompts, latent_hw = self._video_prompts()
        if self._video_decoder is None:
            self._video_decoder = make_decoder(tc.sample_vae, tc.sample_vae_dir, p.device,
                                               latent_channels=latent_channels(model))
        # Distilled models sample with one pass per step; base models with MAGI-1's three-pass guidance.
        sampler = SamplerConfig(num_steps=tc.sample_steps, cfg_number=1 if model.cfg.distill else 3)
        paths = sample_validation_videos(
            model, prompts, model.y_embedder.null_caption_embedding.detach(), latent_hw=latent_hw,
            num_chunks=tc.sample_chunks, sampler_cfg=sampler, seed=tc.seed, decode=self._video_decoder,
            out_dir=self.out_dir / "videos", step=self.step, fps=24, write=p.is_main)
        return {f"video/{i}": path for i, path in enumerate(paths)}

    def _video_prompts(self):
        """([(caption (sample_chunks, L, Cc), mask)], latent (H, W) or one per prompt) of the first held-out
        samples, each sampled at its own size. A sample with fewer chunks than trainer.sample_chunks repeats
        its last caption row."""
        tc, d = self.cfg.trainer, self.cfg.data
        n = tc.sample_chunks
        prompts = []

        def rows(caption, mask):
            idx = torch.arange(n).clamp(max=caption.shape[0] - 1)
            return caption[idx], mask[idx]

        if not self.packed:
            for i in range(tc.sample_count):
                item = self.held_out[i]
                prompts.append(rows(item["caption"], item["caption_mask"]))
            return prompts, (d.latent_height, d.latent_width)
        sizes = []
        for s in [s for seq in self._validation_sequences() for s in seq.samples][:tc.sample_count]:
            caption, mask = caption_rows(s.caption, s.caption_lengths, s.caption.shape[0], d.caption_length)
            prompts.append(rows(caption, mask))
            sizes.append(tuple(s.latent.shape[2:]))
        return prompts, sizes

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """A checkpoint of every rank's shard (collective), resumable under any other layout."""
        extra = {"step": self.step, "config": asdict(self.cfg), "skipped_steps": self.skipped_steps}
        if self.packed:
            extra["data_loader"] = self.loader_state()
        path = save_train_state(self.checkpoints, self.step, self.models, self.optimizer, extra, self.parallel,
                                extra_weights=self._extra_weights())
        self.saved_step = self.step
        return path

    # Hooks of trainers that keep more than the model and its optimizer (DistillTrainer: the EMA).
    def _after_optimizer_step(self) -> None:
        pass

    def _extra_weights(self) -> Optional[Dict[str, List[Dict[str, torch.Tensor]]]]:
        """Per-parameter tensors saved with the weights ({prefix: [one dict per held model]})."""
        return None

    def _extra_weights_to_load(self) -> Optional[Dict[str, List[Dict[str, torch.Tensor]]]]:
        return None

    def load(self, path: Path) -> None:
        if is_distributed_checkpoint(path):
            extra = load_train_state(path, self.models, self.optimizer, self.parallel,
                                     extra_weights=self._extra_weights_to_load())
            self.step = self.saved_step = int(extra["step"])
            self.skipped_steps = int(extra.get("skipped_steps", 0))
            if self.packed:
                if extra.get("data_loader"):
                    self.loader.load_state_dict(extra["data_loader"])
                elif self.parallel.is_main:
                    print(f"warning: {path} holds no data loader position (not a data.kind=webdataset run): "
                          f"reading the shards from the start", flush=True)
        else:
            self._load_model_only(path)
        if self.parallel.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _load_model_only(self, path: Path) -> None:
        """A full released-layout state dict (tools/convert_checkpoint.py to-ours): weights and step, no
        optimizer state; each rank takes its tensor-parallel slice of the layers it holds."""
        state = CheckpointManager(path.parent, keep_last=0, read_only=True).load(path)
        p = self.parallel
        for model in self.models:
            # A checkpoint of another model preset fails here, naming the keys and shapes that differ.
            load_into(model, state["model"], path / "model.pt", self.full_shapes, p.tp_rank, p.tp)
        self.step = int(state["trainer"]["step"])

    # ------------------------------------------------------------------ loop
    def fit(self, until: Optional[int] = None) -> List[Dict[str, float]]:
        """Train to `trainer.max_steps`, or stop early after step `until` (the schedule still spans
        max_steps, so a run stopped and resumed is the same run)."""
        tc = self.cfg.trainer
        last = tc.max_steps if until is None else min(until, tc.max_steps)
        logger = MetricsLogger(tc, self.out_dir, asdict(self.cfg), self.step, enabled=self.parallel.is_main)
        history: List[Dict[str, float]] = []
        self.stop.install()
        try:
            if tc.eval_every and self.step == 0:
                history.append({"step": 0, **self.evaluate()})
                logger.log(history[-1])
            while self.step < last:
                rec = self.train_step()
                history.append(rec)
                logger.advance(1, rec["loss"])
                if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.max_steps):
                    rec.update(self.evaluate())
                if self.step % tc.log_every == 0 or self.step == tc.max_steps or "eval_loss" in rec:
                    rec.update(self.data_counters())
                    logger.log(rec)
                if tc.sample_every and (self.step % tc.sample_every == 0 or self.step == tc.max_steps):
                    logger.log_videos(self.step, self.validation_videos(), fps=24)
                if tc.save_every and self.step % tc.save_every == 0:
                    self.save()
                if self.stop.poll():
                    if self.parallel.is_main:
                        print(f"stop requested ({self.stop.reason}): saving at step {self.step}", flush=True)
                    break
            if self.saved_step != self.step:
                self.save()  # the final state is always kept
        finally:
            self.stop.close()
            logger.close()
        return history


def summarize(history: List[Dict[str, float]], window: Optional[int] = None) -> Dict[str, float]:
    """First/last-window means of the training loss and of the held-out loss, and the relative drop."""
    losses = [h["loss"] for h in history if "loss" in h and math.isfinite(h["loss"])]
    w = window or max(1, math.ceil(len(losses) / 10))
    out = {"first_loss": sum(losses[:w]) / w, "last_loss": sum(losses[-w:]) / w}
    out["loss_drop"] = 1 - out["last_loss"] / out["first_loss"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if len(evals) >= 2:
        out["first_eval_loss"], out["last_eval_loss"] = evals[0], evals[-1]
        out["eval_loss_drop"] = 1 - evals[-1] / evals[0]
    return out
