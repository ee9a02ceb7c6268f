"""The trainer's step time against a bare PyTorch loop on the same model and batch: the trainer's overhead.

    python tools/bench_step.py [--steps 30] [--layers 2] [--prefetch 1] [--threads 1]

Both loops train the same VideoDiT (the trainer's, a small but not trivial width: the tiny preset's 256 wide,
4 heads; the bare loop a second copy, same initial weights) on one process in fp32 with the same AdamW (torch's, per-tensor as the trainer runs it on a CPU):

    trainer   Trainer.train_step(): the step's batch (data.prefetch builds it ahead), lr schedule, micro-batch
              forward/backward, loss and gradient-norm reductions, non-finite check, clipping, AdamW, timers
    bare      the same micro-batch tensors (one batch taken from the trainer, reused every step), forward,
              weighted squared error, backward, torch.nn.utils.clip_grad_norm_, AdamW.step, zero_grad

The two take turns step by step (after warm-up) so that load drifting on a shared machine hits both alike; it
prints both medians, overhead = trainer / bare - 1 of the medians and the median of the step-by-step ratios
(target: within 5%), and the trainer's phase timers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def _config(out_dir: str, layers: int, prefetch: int, threads: int, micro_batch: int, global_batch: int):
    from magi_train.config import validate
    from magi_train.config.compose import load_model_preset
    from magi_train.config.schema import DataConfig, OptimizerConfig, TrainConfig, TrainerConfig, WandbConfig
    from dataclasses import replace

    model = replace(load_model_preset("tiny"), num_layers=layers)
    return validate(TrainConfig(
        model=model,
        data=DataConfig(num_samples=512, chunks_per_sample=2, latent_height=8, latent_width=8, caption_length=32,
                        micro_batch_size=micro_batch, global_batch_size=global_batch, prefetch=prefetch),
        optimizer=OptimizerConfig(lr=1e-4, warmup_steps=2, clip_grad=1.0),
        trainer=TrainerConfig(max_steps=10_000, output_dir=out_dir, progress_bar=False, num_threads=threads,
                              wandb=WandbConfig(mode="disabled"), check_memory=False),
    ))


def _bare_loop(trainer):
    """One bare step, on a second copy of the trainer's model (the trainer's parameters carry its gradient
    bucket hooks) and a batch of the trainer's data."""
    import torch

    from magi_train.parallel.parallelize import build_train_stages
    from magi_train.parallel.pipeline import DiTStage
    from magi_train.training.trainer import weighted_sq_error

    (model,) = build_train_stages(trainer.cfg, trainer.parallel, trainer.cp_impl)[1]
    placement = DiTStage(model, trainer.shape).placement  # built once, as the trainer's stage does
    micro = trainer.step_micro_batches(0)  # the same tensors every step: the bare loop pays no data cost
    oc = trainer.cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, weight_decay=oc.weight_decay,
                            foreach=False)

    def forward(x, t, caption, caption_mask, null_rows, adaln):
        caption, caption_mask = model.drop_captions(caption, caption_mask.bool(), null_rows.bool())
        stream, _ = model.embed(x, t, caption, caption_mask, adaln.bool(), placement=placement)
        return model.head(model.run_layers(stream, placement).h, trainer.shape.grid, placement)

    def step() -> float:
        total = 0.0
        for inputs, target in micro:
            loss = weighted_sq_error(forward(*inputs), target)
            loss.backward()
            total += float(loss.detach())  # what a bare loop logs
        torch.nn.utils.clip_grad_norm_(params, oc.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    return step


def _timed(fn, n: int, records=None):
    out = []
    for _ in range(n):
        start = time.perf_counter()
        rec = fn()
        out.append(time.perf_counter() - start)
        if records is not None:
            records.append(rec)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each loop (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=8, help="samples per step (micro-batches: / --micro-batch)")
    ap.add_argument("--prefetch", type=int, default=1, help="data.prefetch of the trainer")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (trainer.num_threads)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    from magi_train.config.schema import TrainConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as out_dir:
        cfg = _config(out_dir, args.layers, args.prefetch, args.threads, args.micro_batch, args.global_batch)
        trainer = Trainer(cfg, init_parallel(TrainConfig().parallel))
        try:
            bare = _bare_loop(trainer)
            _timed(trainer.train_step, args.warmup)
            _timed(bare, args.warmup)
            t_trainer, t_bare, records = [], [], []
            for _ in range(args.steps):  # step by step in turn: load drifting on a shared machine hits both alike
                t_trainer += _timed(trainer.train_step, 1, records)
                t_bare += _timed(bare, 1)
        finally:
            trainer.batches.close()
            trainer.close()
    a, b = statistics.median(t_trainer), statistics.median(t_bare)
    paired = statistics.median(x / y for x, y in zip(t_trainer, t_bare))
    result = {"trainer_ms": a * 1e3, "bare_ms": b * 1e3, "overhead_pct": (a / b - 1) * 100,
              "paired_overhead_pct": (paired - 1) * 100, "steps": len(t_trainer), "prefetch": args.prefetch,
              "threads": args.threads}
    print(f"trainer step: median {a * 1e3:.1f} ms over {len(t_trainer)} steps (data.prefetch={args.prefetch})")
    print(f"bare loop:    median {b * 1e3:.1f} ms over {len(t_bare)} steps")
    print(f"overhead:     {result['overhead_pct']:+.1f}% of the medians, {result['paired_overhead_pct']:+.1f}% the median "
          f"of step-by-step ratios (target: within 5%)")
    # Where the trainer's step goes (its own phase timers, medians): what the overhead is made of.
    phases = sorted({k for rec in records for k in rec if k.startswith("time/")})
    result["phases_ms"] = {k[5:]: statistics.median(rec.get(k, 0.0) for rec in records) * 1e3 for k in phases}
    print("trainer phases (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in result["phases_ms"].items()))
    return result


if __name__ == "__main__":
    main()
