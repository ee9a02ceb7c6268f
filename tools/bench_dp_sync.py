"""Data-parallel gradient sync on gloo ranks (CPU): bytes per step against the analytic minimum, and the share
of the reduction hidden behind backward, for the bucketed ZeRO-2 sync (parallel/grad_buckets.py) with and
without overlap, and for the all-reduce-then-broadcast scheme it replaced.

    python tools/bench_dp_sync.py [--ranks 2] [--steps 4] [--layers 4] [--hidden 512]

Bytes: what crossed the loopback interface (/proc/net/dev, `lo`) during the steps' communication, all ranks
together, divided by the number of ranks; the analytic minimum of a ZeRO step is 2 (W-1)/W x the gradient and
parameter bytes (a ring reduce-scatter plus all-gather). Needs Linux and the ranks alone on `lo`.
Overlap: each bucket's reduction is timed from its launch (inside a backward hook) to its completion (the
process group's future callback); the hidden share is the part of those intervals that lies before backward
ends, over their total. The last step is also run under torch.profiler, and the same share is computed from its
timeline: the `gloo:reduce` events of gloo's worker thread against the backward's `record_function` range. The ranks share the machine's cores, so compute and communication compete for them.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SCHEMES = ("bucketed_overlap", "bucketed_after_backward", "allreduce_then_broadcast", "megatron_ddp")


def _lo_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])  # transmitted bytes
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _config(out_dir: str, scheme: str, layers: int, hidden: int):
    from magi_train.config import validate
    from magi_train.config.schema import (DataConfig, ModelConfig, OptimizerConfig, TrainConfig, TrainerConfig,
                                          WandbConfig)

    model = ModelConfig(name="tiny", num_layers=layers, hidden_size=hidden, ffn_hidden_size=2 * hidden,
                        num_attention_heads=hidden // 64, num_query_groups=hidden // 128, kv_channels=64,
                        caption_channels=64, caption_max_length=64)
    return validate(TrainConfig(
        model=model,
        data=DataConfig(num_samples=64, chunks_per_sample=2, latent_height=8, latent_width=8, caption_length=16,
                        micro_batch_size=1),
        optimizer=OptimizerConfig(lr=1e-4, warmup_steps=0, overlap_grad_reduce=scheme == "bucketed_overlap"),
        trainer=TrainerConfig(max_steps=100, output_dir=out_dir, progress_bar=False, num_threads=1,
                              check_memory=False, step_timers=False, wandb=WandbConfig(mode="disabled")),
    ))


def _hidden_share(timeline, backward_end: float) -> float:
    total = sum(done - launched for _, launched, done in timeline)
    hidden = sum(max(0.0, min(done, backward_end) - launched) for _, launched, done in timeline)
    return hidden / total if total > 0 else float("nan")


def _profiled_share(prof, comm_prefix: str = "gloo:reduce") -> float:
    """Hidden share from a torch.profiler timeline (microseconds): gloo's reduce events inside backward."""
    events = list(prof.events())
    backward = [e.time_range for e in events if e.name == "magi.backward"]
    comm = [e.time_range for e in events if e.name.startswith(comm_prefix) and e.name != "gloo:barrier"]
    if not backward or not comm:
        return float("nan")
    end = backward[0].end
    total = sum(r.end - r.start for r in comm)
    hidden = sum(max(0.0, min(r.end, end) - r.start) for r in comm)
    return hidden / total if total > 0 else float("nan")


def _rank(rank: int, world: int, port: int, scheme: str, steps: int, layers: int, hidden: int, out_dir: str, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.grads import finalize_model_grads
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer, weighted_sq_error

    par = init_parallel(ParallelConfig())
    trainer = Trainer(_config(f"{out_dir}/{scheme}", scheme, layers, hidden), par)
    opt = trainer.optimizer
    legacy = scheme == "allreduce_then_broadcast"
    if legacy:
        opt.detach_grad_hooks()
    else:
        opt.sync.record = True
    numel = sum(p.numel() for p in opt.params.values())
    shares, wire, times = [], [], []
    for step in range(steps + 1):  # step 0 warms up
        (inputs, target), = trainer.step_micro_batches(step)
        opt.zero_grad(backwards=1)
        if not legacy:
            opt.sync.timeline.clear()
        loss = weighted_sq_error(trainer.stage(*inputs), target)
        dist.barrier()
        profiled = step == steps and not legacy
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled else None
        if prof is not None:
            prof.__enter__()
        lo0, t0 = _lo_bytes(), time.perf_counter()
        with torch.profiler.record_function("magi.backward"):
            loss.backward()
        backward_end = time.perf_counter()
        if legacy:
            finalize_model_grads(trainer.models, par.groups.dp_cp)  # one all-reduce of every gradient
        else:
            trainer.reduce_grads()
        if prof is not None:
            prof.__exit__(None, None, None)
            profiler_share = _profiled_share(prof)
        dist.barrier()
        lo_mid = _lo_bytes()
        opt.step()
        done = time.perf_counter()
        dist.barrier()
        lo1 = _lo_bytes()
        if step:
            times.append(done - t0)
            wire.append((lo_mid - lo0, lo1 - lo0))
            if not legacy:
                shares.append(_hidden_share(opt.sync.timeline, backward_end))
    results[rank] = {"numel": numel, "wire": wire, "shares": shares, "times": times,
                     "buckets": len(opt.buckets), "profiler_share": None if legacy else profiler_share}
    dist.destroy_process_group()


def _megatron_rank(rank: int, world: int, port: int, steps: int, layers: int, hidden: int, out_dir: str, results):
    """megatron-core's DistributedDataParallel (distributed-optimizer gradient path, overlap) around the same
    VideoDiT. Only its gradient sync is measured: its parameter all-gather lives in megatron's optimizer, which
    needs a CUDA-to-CPU TorchFunctionMode on this machine (../shared/reference/megatron-core-on-cpu.md §5)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # The reference's one-line patch: DDP allocates its buffers on torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    from magi_train.config.schema import ParallelConfig
    from magi_train.mcore import megatron_ddp
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer, weighted_sq_error

    parallel_state, DistributedDataParallel, DistributedDataParallelConfig, TransformerConfig = megatron_ddp()
    par = init_parallel(ParallelConfig())
    parallel_state.initialize_model_parallel()  # megatron's DDP takes its data-parallel group from here
    trainer = Trainer(_config(f"{out_dir}/megatron", "bucketed_after_backward", layers, hidden), par)
    trainer.optimizer.detach_grad_hooks()
    model = trainer.models[0]
    numel = sum(p.numel() for p in model.parameters())
    # Per-token loss: the gradients are summed, not averaged over ranks, as ours are. The bucket size is ours.
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=1, calculate_per_token_loss=True)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=True, grad_reduce_in_fp32=True,
        bucket_size=max(1, numel // (4 * world))), model)
    shares, wire, times = [], [], []
    for step in range(steps + 1):
        (inputs, target), = trainer.step_micro_batches(step)
        ddp.zero_grad_buffer()
        loss = weighted_sq_error(trainer.stage(*inputs), target)
        dist.barrier()
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
        lo0, t0 = _lo_bytes(), time.perf_counter()
        with torch.profiler.record_function("magi.backward"):
            loss.backward()
        ddp.finish_grad_sync()
        done = time.perf_counter()
        prof.__exit__(None, None, None)
        dist.barrier()
        lo1 = _lo_bytes()
        if step:
            times.append(done - t0)
            wire.append((lo1 - lo0, None))
            shares.append(_profiled_share(prof, comm_prefix="gloo:"))
    results[rank] = {"numel": numel, "wire": wire, "shares": [], "times": times, "buckets": len(ddp.buffers[0].buckets),
                     "profiler_share": statistics.median(shares)}
    dist.destroy_process_group()


def run(scheme: str, world: int, steps: int, layers: int, hidden: int) -> dict:
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir, ctx.Manager() as manager:
        results = manager.dict()
        if scheme == "megatron_ddp":
            procs = [ctx.Process(target=_megatron_rank, args=(r, world, port, steps, layers, hidden, out_dir, results))
                     for r in range(world)]
        else:
            procs = [ctx.Process(target=_rank, args=(r, world, port, scheme, steps, layers, hidden, out_dir, results))
                     for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if len(results) != world:
            raise RuntimeError(f"{scheme}: a rank failed (exit codes {[p.exitcode for p in procs]})")
        per_rank = [results[r] for r in range(world)]
    numel = per_rank[0]["numel"]
    minimum = 2 * (world - 1) / world * numel * 4  # fp32 gradients reduce-scattered + fp32 parameters gathered
    # Every rank's traffic crosses lo once: the gradient sync's bytes, and the whole step's (None: not measured).
    grad_wire = statistics.median(w[0] for w in per_rank[0]["wire"]) / world
    totals = [w[1] for w in per_rank[0]["wire"] if w[1] is not None]
    wire = statistics.median(totals) / world if totals else None
    out = {"scheme": scheme, "ranks": world, "parameters": numel, "buckets": per_rank[0]["buckets"],
           "grad_bytes_per_rank": grad_wire, "grad_ratio_to_minimum": grad_wire / (minimum / 2),
           "bytes_per_rank": wire, "analytic_minimum": minimum,
           "ratio_to_minimum": wire / minimum if wire is not None else None,
           "sync_step_s": statistics.median(t for r in per_rank for t in r["times"])}
    if per_rank[0]["shares"]:
        out["hidden_share"] = statistics.median(s for r in per_rank for s in r["shares"])
    if per_rank[0]["profiler_share"] is not None:
        out["hidden_share_profiler"] = statistics.mean(r["profiler_share"] for r in per_rank)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = [run(s, args.ranks, args.steps, args.layers, args.hidden) for s in SCHEMES]
    print("| scheme | ranks | params | buckets | gradient sync bytes/rank vs reduce-scatter minimum | step bytes/rank vs "
          "minimum | hidden behind backward (callbacks / profiler) | backward+sync(+step) s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cb = f"{r['hidden_share']:.0%}" if "hidden_share" in r else "-"
        pr = f"{r['hidden_share_profiler']:.0%}" if "hidden_share_profiler" in r else "-"
        step = (f"{r['bytes_per_rank'] / 2**20:.1f} MiB, {r['ratio_to_minimum']:.2f}x" if r["bytes_per_rank"] is not None
                else "not measured")
        print(f"| {r['scheme']} | {r['ranks']} | {r['parameters']:,} | {r['buckets']} | "
              f"{r['grad_bytes_per_rank'] / 2**20:.1f} MiB, {r['grad_ratio_to_minimum']:.2f}x | {step} | {cb} / {pr} "
              f"| {r['sync_step_s']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
