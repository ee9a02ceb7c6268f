"""Time one training step of the tiny preset under several parallel layouts, relative to one process.

    python tools/time_layouts.py [--steps 6] [--layouts tp2,cp2,...]

Each layout runs in its own set of spawned gloo ranks (CPU), trains `steps` steps with the same global
batch, and reports the median step time after the first (warm-up) step. On a machine with fewer cores
than ranks the ranks share cores, so the figures measure overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYOUTS = {
    "single": (1, {}),
    "tp2": (2, {"tp": 2}),
    "tp2_sp": (2, {"tp": 2, "sequence_parallel": True}),
    "cp2": (2, {"cp": 2}),
    "pp2": (2, {"pp": 2}),
    "dp2": (2, {}),
    "tp2_cp2": (4, {"tp": 2, "cp": 2}),
    "pp2_dp2": (4, {"pp": 2}),
}


def _config(out_dir: str, layout: dict, steps: int):
    from magi_train.config import validate
    from magi_train.config.schema import (DataConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig,
                                          TrainerConfig, WandbConfig)

    model = ModelConfig(name="tiny", num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                        num_query_groups=2, kv_channels=64, caption_channels=64, caption_max_length=64)
    return validate(TrainConfig(
        model=model, parallel=ParallelConfig(**layout),
        data=DataConfig(num_samples=256, chunks_per_sample=2, latent_height=8, latent_width=8, caption_length=32,
                        micro_batch_size=2, global_batch_size=8),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2),
        trainer=TrainerConfig(max_steps=steps, output_dir=out_dir, progress_bar=False, num_threads=1,
                              wandb=WandbConfig(mode="disabled")),
    ))


def _rank(rank: int, world: int, port: int, layout: dict, steps: int, out_dir: str, results) -> None:
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    trainer = Trainer(_config(out_dir, layout, steps), init_parallel(ParallelConfig(**layout)))
    times, losses = [], []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        losses.append(trainer.train_step()["loss"])
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        results["times"], results["losses"] = times, losses
    dist.destroy_process_group()


def time_layout(name: str, steps: int) -> dict:
    world, layout = LAYOUTS[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, tempfile.TemporaryDirectory() as tmp:
        results = manager.dict()
        procs = [ctx.Process(target=_rank, args=(r, world, port, layout, steps, tmp, results)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"layout {name} failed (exit codes {[p.exitcode for p in procs]})")
        return {"world": world, "step_s": statistics.median(results["times"][1:]), "losses": list(results["losses"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    rows = {name: time_layout(name, args.steps) for name in args.layouts.split(",")}
    base = rows.get("single") or time_layout("single", args.steps)
    print(f"{'layout':10} {'ranks':>5} {'step (s)':>9} {'vs 1 proc':>9}  last loss (same for every layout)")
    for name, r in rows.items():
        print(f"{name:10} {r['world']:>5} {r['step_s']:>9.3f} {r['step_s'] / base['step_s']:>8.2f}x  {r['losses'][-1]:.6f}")


if __name__ == "__main__":
    main()
