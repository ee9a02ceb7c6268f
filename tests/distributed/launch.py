"""Run a function on N gloo ranks (spawned processes) and collect each rank's return value.

Used by the distributed tests: each test function runs on every rank, builds the groups from a
ParallelConfig, and returns plain Python data (floats, lists) for the parent to check.

The ranks are forked from a forkserver that has imported torch, megatron-core and our packages once: a spawned
rank re-imports all of them (about 8 s of CPU each on the 2-core CI machine, 30-odd ranks in the suite). The
forkserver itself is a fresh process that only imported modules (no threads, no process group, no tensors), so a
rank forked from it starts as clean as a spawned one."""

from __future__ import annotations

import socket
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


# Imported once by the forkserver (the first run_ranks in a pytest process starts it); a module that fails to
# import is skipped by multiprocessing and then imported by each rank as before.
PRELOAD = ["torch", "torch.distributed", "magi_train.mcore", "magi_train.training.trainer", "magi_infer.engine",
           "tests.distributed.common"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        results[rank] = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn: Callable, *args: Any) -> List[Any]:
    ctx = _context()
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise RuntimeError(f"rank process {p.pid} did not finish in 600 s")
        failures = []
        for r in range(world):
            if r not in results:
                failures.append(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            elif results[r][0] != "ok":
                failures.append(f"rank {r} failed:\n{results[r][1]}")
        if failures:
            # Every rank's story: the first to fail is usually the cause, the others its echo.
            raise RuntimeError("\n\n".join(failures))
        return [results[r][1] for r in range(world)]
