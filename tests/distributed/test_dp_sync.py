"""The bucketed data-parallel gradient sync on two gloo ranks (parallel/grad_buckets.py): with overlap every
bucket's reduction is launched while backward is still running, without it all after; both give the same
gradients bit for bit, and each rank hands every gradient byte to the collectives once per step.
(That every layout equals one process is tests/distributed/test_train_parallel.py; the measured bytes and
hidden share are tools/bench_dp_sync.py's.)"""

from __future__ import annotations

from tests.distributed.common import train_config
from tests.distributed.launch import run_ranks


def _sync(out_dir: str):
    import time
    from dataclasses import replace

    import torch
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    par = init_parallel(ParallelConfig())
    out = {}
    for overlap in (True, False):
        cfg = train_config(f"{out_dir}/{overlap}", {}, global_batch=8, micro_batch=2)
        cfg = replace(cfg, optimizer=replace(cfg.optimizer, overlap_grad_reduce=overlap, bucket_numel=20_000))
        trainer = Trainer(cfg, par)
        sync = trainer.optimizer.sync
        sync.record = True
        sent = sync.bytes_sent
        trainer.forward_backward(trainer.step_micro_batches(0))  # 2 micro-batches per rank
        backward_end = time.perf_counter()
        trainer.reduce_grads()
        launches = [sync.works[b.index][1] for b in sync.buckets]
        grads = {n: g.clone() for n, g in trainer.optimizer.grads().items()}
        out[overlap] = {
            "buckets": len(sync.buckets),
            "launched_before_backward_end": sum(t < backward_end for t in launches),
            "completions_recorded": len(sync.timeline),
            "bytes": sync.bytes_sent - sent,
            "bucket_bytes": sum(b.numel * 4 for b in sync.buckets),
            "owned": sorted(grads),
            "params": len(trainer.optimizer.params),
            "grads": grads,
        }
        trainer.close()
    same = (out[True]["owned"] == out[False]["owned"]
            and all(torch.equal(out[True]["grads"][n], out[False]["grads"][n]) for n in out[True]["owned"]))
    for r in out.values():
        del r["grads"]
    return {"overlap": out[True], "after": out[False], "same_grads": same}


def test_buckets_reduce_during_backward_and_match_the_reduction_after_it(tmp_path):
    per_rank = run_ranks(2, _sync, str(tmp_path))
    owned = [set(r["overlap"]["owned"]) for r in per_rank]
    # Every parameter has exactly one owner, and only the owner holds its gradient.
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert len(owned[0] | owned[1]) == per_rank[0]["overlap"]["params"]
    for rank, r in enumerate(per_rank):
        on, off = r["overlap"], r["after"]
        assert on["buckets"] >= 4, r
        assert on["launched_before_backward_end"] == on["buckets"], (rank, on)
        assert off["launched_before_backward_end"] == 0, (rank, off)
        assert on["completions_recorded"] == on["buckets"], (rank, on)
        assert on["bytes"] == on["bucket_bytes"] == off["bytes"], (rank, on, off)
        assert r["same_grads"], rank
