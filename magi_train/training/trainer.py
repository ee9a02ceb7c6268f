"""The trainer: one loop for any tp x cp x pp x dp layout (one process is the 1 x 1 x 1 x 1 case), extended
through an objective and optimizer-step callbacks rather than by subclassing.

    objective   what the model learns (training/objectives/: flow matching, shortcut + CFG distillation)
    batches     this rank's micro-batches of a step, every draw seeded per sample (training/batches.py)
    callbacks   state kept beside the weights and saved with them (training/ema.py: the EMA)
    held_out    validation losses and videos (training/evaluation/)
    lora        lora.rank > 0: adapters on a frozen base, the only parameters trained and checkpointed
                (training/lora.py; parallel/lora.py under tensor parallelism)

One step: lr, micro-batches, forward/backward (or the pipeline schedule), loss and gradients reduced over every
rank, a skipped step if either is non-finite, else clip, optimizer step, callbacks. The loss is the sum over the
global batch's noisy frames of |DiT(x_t, ...) - target|^2 / their element count. Checkpoints hold the loader's
position (data.kind=webdataset), so a resumed run reads exactly the unseen samples.

Before anything is built (training/startup.py): rank 0 locks trainer.output_dir (training/run_dir.py) and a new
run refuses one that holds another run; a resume takes the newest checkpoint that verifies on every rank and
keeps the model, data order and seed it was trained with (training/resume_config.py); the memory estimate must
fit the device.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from magi_train.checkpoint.distributed import is_distributed_checkpoint, load_train_state, save_train_state
from magi_train.checkpoint.manager import CheckpointManager
from magi_train.checkpoint.weights import load_model_only
from magi_train.config.schema import TrainConfig
from magi_train.config.validate import check_train_layout
from magi_train.model import magi_attention
from magi_train.observability.metrics import MetricsLogger
from magi_train.observability.step_timer import StepTimer
from magi_train.observability.throughput import peak_flops_per_device, throughput_record
from magi_train.parallel.grads import finalize_model_grads, global_grad_norm
from magi_train.parallel.groups import Parallel
from magi_train.parallel.parallelize import build_train_stages
from magi_train.parallel.plan import plan_of
from magi_train.parallel.pipeline import DiTStage, build_schedule
from magi_train.parallel.zero import ShardedAdamW
from magi_train.training.batches import BatchBuilder
from magi_train.training.ema import StepCallback
from magi_train.training.evaluation.held_out import VIDEO_FPS, HeldOut
from magi_train.training.lora import (RECORD_KEY as LORA_RECORD, LoraRun, check_base_identity, check_checkpoint_kind,
                                     start_lora)
from magi_train.training.objectives import Objective, build_callbacks, build_objective, ema_callback
from magi_train.training.optim import lr_at, set_lr
from magi_train.training.precision import autocast
from magi_train.training.run_dir import CHECKPOINTS_DIR
from magi_train.training.startup import RunDirectory, check_memory, choose_init, choose_resume, load_init_weights
from magi_train.training.stop import StopRequest


def weighted_sq_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum(|pred - target|^2 * w) with target = [target | w] along channels (w already divided by the count)."""
    return ((pred.float() - target[:, :-1]).square() * target[:, -1:]).sum()


class Trainer:
    def __init__(self, cfg: TrainConfig, parallel: Parallel, callbacks: Optional[Sequence[StepCallback]] = None,
                 objective: Optional[Objective] = None):
        """`callbacks`, `objective`: default to what the config asks for (training/objectives/__init__.py).

        trainer.output_dir is this trainer's from here until `fit` returns or `close()` (training/run_dir.py):
        a second trainer on it fails at once, on every rank, naming this one."""
        self.cfg = cfg
        self.parallel = p = parallel
        tc, d = cfg.trainer, cfg.data
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        torch.use_deterministic_algorithms(tc.deterministic)
        self.cp_impl = magi_attention.resolve_cp_impl(cfg.parallel.cp_impl, p.cp_group)
        self.global_batch = check_train_layout(cfg, p.dp, self.cp_impl)
        self.num_micro = self.global_batch // (d.micro_batch_size * p.dp)
        self.out_dir = Path(tc.output_dir)
        self.run_dir = RunDirectory(cfg, p)
        self.run_dir.open(new_run=True)
        try:
            self._build(callbacks, objective)
        except BaseException:
            self.close()
            raise

    def _build(self, callbacks: Optional[Sequence[StepCallback]], objective: Optional[Objective]) -> None:
        cfg, p, tc, cp_impl = self.cfg, self.parallel, self.cfg.trainer, self.cp_impl
        # One writer: a writable manager tidies interrupted saves when it opens, which must not race a save.
        self.checkpoints = CheckpointManager(self.out_dir / CHECKPOINTS_DIR, tc.keep_last, read_only=not p.is_main)
        # Chosen (and its config checked) before the model is built: a resume that cannot work fails at once.
        self.resumed_from = resume_from = choose_resume(cfg, p, self.checkpoints, self.global_batch)
        # trainer.init_from (training/init_from.py): the record every checkpoint of this run keeps.
        self.init_from = choose_init(cfg, p, resume_from)
        if tc.check_memory:
            check_memory(cfg, p)
        self.stage_ids, self.models = build_train_stages(cfg, p, cp_impl)
        self.full_shapes = plan_of(self.models[0]).full_shapes  # the whole model's, recorded by parallelize_dit
        lora = cfg.lora.rank > 0
        # A LoRA run's checkpoints hold the adapters alone: its frozen base is rebuilt on resume too.
        if self.init_from is not None and (resume_from is None or lora):
            if resume_from is not None:
                check_base_identity(self.init_from, cfg.model)
            load_init_weights(cfg, p, self.init_from, self.models, self.full_shapes, resuming=resume_from is not None)
        # LoRA (training/lora.py): adapters on the final base weights, the base frozen; only they train.
        self.lora: Optional[LoraRun] = start_lora(cfg, p, self.models, self.init_from) if lora else None
        if self.lora is not None:
            self.full_shapes = plan_of(self.models[0]).full_shapes  # with the adapters'
        self.optimizer = ShardedAdamW(self.named_parameters(), cfg.optimizer, p.groups.dp_cp)
        self.optimizer.attach_grad_hooks()  # gradients reduced in buckets while backward runs (parallel/zero.py)
        self.callbacks = list(build_callbacks(cfg) if callbacks is None else callbacks)
        self.packed = cfg.data.kind == "webdataset"
        self.last_tokens = self.last_samples = self.last_flops = 0  # of the last step, over every rank
        self.timer = StepTimer(p.device, tc.step_timers)
        self.peak_flops = peak_flops_per_device(tc.peak_tflops, p.device)
        stop_file = self.out_dir / tc.stop_file if tc.stop_file else None
        self.stop = StopRequest(stop_file, tc.stop_signals, p.device, p.is_main)
        self.skipped_steps = self.bad_steps_in_row = 0  # non-finite steps: in all, and in a row
        self.step = 0
        self.saved_step: Optional[int] = None  # step of the last checkpoint this run wrote or resumed from
        # A fresh distillation run starts its student as the teacher (unless trainer.init_from gave it weights);
        # a resumed one keeps its own weights.
        self.objective = objective or build_objective(cfg, p, cp_impl, self.full_shapes, self.models, self.callbacks,
                                                      fresh=resume_from is None and self.init_from is None)
        self.batches = BatchBuilder(cfg, p, self.objective, self.global_batch, self.num_micro)
        self.shape = self.batches.shape
        # Without a pipeline one stage holds the whole model (built once: it keeps the attention placement).
        self.stage = DiTStage(self.models[0], self.shape) if p.pp == 1 else None
        self.schedule = build_schedule(self.models, self.stage_ids, cfg.parallel, p.groups.pp, self.shape,
                                       self.num_micro, weighted_sq_error, p.device) if p.pp > 1 else None
        self.held_out = HeldOut(cfg, p, self.batches, self.objective)
        if resume_from is not None:
            self.load(resume_from)
        for callback in self.callbacks:
            callback.start(self.models)  # e.g. the EMA: from the weights unless the checkpoint held it

    def close(self) -> None:
        """Release trainer.output_dir (and stop watching the launcher); `fit` does this when it returns.
        A later `fit` or `save` takes the directory again; the data prefetch thread ends too (a later step
        starts it again)."""
        self.run_dir.close()
        if getattr(self, "batches", None) is not None:  # (absent when building failed before it)
            self.batches.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model(self):
        """The whole model (single-stage runs)."""
        if len(self.models) != 1 or not (self.models[0].pre_process and self.models[0].post_process):
            raise AttributeError("Trainer.model is the whole model; with pipeline stages use Trainer.models")
        return self.models[0]

    @property
    def loader(self):
        """This data-parallel rank's webdataset loader (data.kind=webdataset)."""
        return self.batches.loader

    def named_parameters(self) -> List[Tuple[str, torch.nn.Parameter]]:
        return [kv for model in self.models for kv in model.named_parameters()]

    def step_micro_batches(self, step: int):
        """This rank's micro-batches of step `step` (and the step's token, sample and FLOP counts)."""
        self.objective.begin_step(step)
        micro = self.batches.step(step)
        counts = self.batches.counts
        self.last_tokens, self.last_samples = counts.tokens, counts.samples
        self.last_flops = self.objective.scale_flops(counts.flops)
        return micro

    # ------------------------------------------------------------------ forward/backward
    def forward_backward(self, micro, backward: bool = True) -> torch.Tensor:
        """Sum of the micro-batch losses seen by this rank (0 on pipeline ranks without the last stage).
        With `backward`, the gradients of these micro-batches replace any earlier ones (see `reduce_grads`)."""
        # On the device: no host sync per micro-batch, and the sum is reduced by the device's backend.
        total = torch.zeros((), dtype=torch.float64, device=self.parallel.device)
        tc = self.cfg.trainer
        if backward:
            self.optimizer.zero_grad(backwards=len(micro))
        if self.schedule is None:
            for inputs, target in micro:
                with self.timer.phase("forward"), autocast(tc, self.parallel, self.cfg.model.layer_spec):
                    loss = weighted_sq_error(self.stage(*inputs), target)
                if backward:
                    with self.timer.phase("backward"):
                        loss.backward()
                total += loss.detach().double()
            return total
        # Pipeline: one call runs every micro-batch through the stages (forward and backward interleaved).
        inputs = tuple(torch.cat([m[0][i] for m in micro]) for i in range(len(micro[0][0])))
        target = torch.cat([m[1] for m in micro])
        has_first = any(m.pre_process for m in self.models)
        has_last = any(m.post_process for m in self.models)
        losses: List[torch.Tensor] = []
        with self.timer.phase("forward_backward"), autocast(tc, self.parallel, self.cfg.model.layer_spec):
            self.schedule.step(*(inputs if has_first else ()), target=target if has_last else None,
                               losses=losses if has_last else None)
        for loss in losses:
            total += loss.detach().double()
        return total

    def _sum_loss(self, local: torch.Tensor) -> float:
        return float(self._reduce_loss(local))

    def _reduce_loss(self, local: torch.Tensor) -> torch.Tensor:
        """Global loss: sum over pipeline ranks (only the last stage has it) and data-parallel ranks."""
        p = self.parallel
        for group, size in ((p.groups.pp, p.pp), (p.groups.dp, p.dp)):
            if size > 1:
                dist.all_reduce(local, group=group)
        return local

    def reduce_grads(self) -> None:
        """After `forward_backward`: this rank's owned gradients summed over every rank (collective)."""
        grads = self.optimizer.reduce_grads()
        finalize_model_grads(self.models, self.parallel.groups.dp_cp, grads=grads)

    def grad_norm(self, as_tensor: bool = False):
        return global_grad_norm(self.models, self.full_shapes, self.parallel, grads=self.optimizer.grads(),
                                as_tensor=as_tensor)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> Dict[str, float]:
        step = self.step
        started = time.perf_counter()
        self.timer.reset()
        lr = lr_at(step, self.cfg.optimizer, self.cfg.trainer.max_steps)
        set_lr(self.optimizer, lr)
        with self.timer.phase("data"):
            micro = self.step_micro_batches(step)
        local_loss = self.forward_backward(micro)
        with self.timer.phase("comm"):
            loss_t = self._reduce_loss(local_loss)
            self.reduce_grads()
            # The step's one host sync: loss and gradient norm read together.
            loss, norm = torch.stack([loss_t, self.grad_norm(as_tensor=True)]).tolist()
        # Loss and norm are reduced over every rank, so all ranks take the same decision.
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return self._skip_step(step, lr, loss, norm)
        self.bad_steps_in_row = 0
        with self.timer.phase("optimizer"):
            clip = self.cfg.optimizer.clip_grad
            if clip > 0:
                # torch.nn.utils.clip_grad_norm_'s formula, applied with the global norm.
                self.optimizer.scale_grads(min(1.0, clip / (norm + 1e-6)))
            self.optimizer.step()
            for callback in self.callbacks:
                callback.after_optimizer_step(self.models)
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
        rec.update(self.objective.metrics())
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

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Dict[str, float]:
        """Validation loss at each trainer.eval_t on held-out samples (training/evaluation/held_out.py)."""
        loss = lambda micro: self._sum_loss(self.forward_backward(micro, backward=False))  # noqa: E731
        return self.held_out.losses(self.models, loss)

    def validation_videos(self) -> Dict[str, Path]:
        """The held-out prompts' videos (with the EMA weights when the run keeps an EMA and trainer.sample_ema)."""
        ema = ema_callback(self.callbacks) if self.cfg.trainer.sample_ema else None
        with ema.swapped(self.model) if ema is not None else contextlib.nullcontext():
            videos = self.held_out.videos(self.model, self.out_dir, self.step)
        if not videos:  # the ranks that write none
            return videos
        # All prompts in one captioned grid (training/evaluation/grid.py): what wandb shows of this evaluation.
        from magi_train.training.evaluation.grid import GRID_NAME, prompt_captions, write_grid

        grid = write_grid(list(videos.values()), prompt_captions(self.held_out), self.out_dir / "videos", self.step,
                          VIDEO_FPS)
        return {**videos, GRID_NAME: grid["mp4"]}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """A checkpoint of every rank's shard (collective), resumable under any other layout."""
        if not self.run_dir.locked:
            self.run_dir.open()  # after `fit` returned: the directory is taken again before writing to it
        # The global batch is kept as a number: with data.global_batch_size=0 it depends on the run's dp size.
        extra = {"step": self.step, "config": asdict(self.cfg), "skipped_steps": self.skipped_steps,
                 "global_batch": self.global_batch}
        if self.packed:
            extra["data_loader"] = self.batches.loader_state()
        if self.objective.state_dict():
            extra["objective"] = self.objective.state_dict()
        if self.init_from is not None:
            extra["init_from"] = self.init_from  # the weights the run started from (training/init_from.py)
        extra_weights = {k: v for callback in self.callbacks for k, v in callback.extra_weights().items()}
        if self.lora is not None:
            extra[LORA_RECORD] = self.lora.record()
        path = save_train_state(self.checkpoints, self.step, self.models, self.optimizer, extra, self.parallel,
                                extra_weights=extra_weights or None,
                                model_keys=self.lora.model_keys if self.lora is not None else None)
        if self.lora is not None:
            self.lora.export(path, self.out_dir, self.step)  # <output_dir>/adapter/, rank 0
        self.saved_step = self.step
        return path

    def load(self, path: Path) -> None:
        if is_distributed_checkpoint(path):
            wanted = {k: v for callback in self.callbacks
                      for k, v in callback.extra_weights_to_load(path, self.models).items()}
            check_checkpoint_kind(self.lora, path)  # LoRA checkpoints hold adapters alone: both kinds must agree
            extra = load_train_state(path, self.models, self.optimizer, self.parallel, extra_weights=wanted or None,
                                     model_keys=self.lora.model_keys if self.lora is not None else None)
            self.step = self.saved_step = int(extra["step"])
            self.skipped_steps = int(extra.get("skipped_steps", 0))
            self.objective.load_state_dict(extra.get("objective", {}))
            if self.packed:
                if extra.get("data_loader"):
                    self.batches.loader.load_state_dict(extra["data_loader"])
                elif self.parallel.is_main:
                    print(f"warning: {path} holds no data loader position (not a data.kind=webdataset run): "
                          f"reading the shards from the start", flush=True)
        elif self.lora is not None:
            raise ValueError(f"{path} is a model-only checkpoint: a LoRA run (lora.rank > 0) resumes from its own "
                             f"checkpoints; start from these weights with trainer.init_from={path}")
        else:  # a model-only checkpoint (tools/convert_checkpoint.py to-ours): weights and step
            p = self.parallel
            self.step = load_model_only(path, self.models, self.full_shapes, p.tp_rank, p.tp)
        if self.parallel.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------------ loop
    def fit(self, until: Optional[int] = None) -> List[Dict[str, float]]:
        """Train to `trainer.max_steps`, or stop early after step `until` (the schedule still spans
        max_steps, so a run stopped and resumed is the same run)."""
        tc = self.cfg.trainer
        last = tc.max_steps if until is None else min(until, tc.max_steps)
        if not self.run_dir.locked:
            self.run_dir.open()
        try:
            logger = MetricsLogger(tc, self.out_dir, asdict(self.cfg), self.step, enabled=self.parallel.is_main)
        except BaseException:
            self.close()
            raise
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
                    rec.update(self.batches.data_counters())
                    logger.log(rec)
                if tc.sample_every and (self.step % tc.sample_every == 0 or self.step == tc.max_steps):
                    logger.log_videos(self.step, self.validation_videos(), fps=VIDEO_FPS)
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
            self.close()  # the run is over: the directory is free for the next one
        return history
