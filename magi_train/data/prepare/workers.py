"""The encoding processes: each worker loads the models once and encodes batches from a queue; a worker that dies
costs only the batch it held. `encode_here` does the same in this process (`--workers 0`)."""

from __future__ import annotations

import os
import queue
import time
from typing import Any, Iterator

import torch

from magi_train.data.prepare.config import Plan, PrepareConfig
from magi_train.data.prepare.encoders import encode_batch, load_encoders
from magi_train.data.prepare.inputs import InputItem
from magi_train.data.prepare.records import WORKER_DIED, PrepareError, Result, Skipped

def _worker_device(cfg: PrepareConfig, worker: int) -> torch.device:
    if cfg.device == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", worker % torch.cuda.device_count())
    return torch.device(cfg.device)


def _worker_main(worker: int, plan: Plan, threads: int, tasks: Any, results: Any) -> None:
    """A worker process: load the models once, then encode batches until the None sentinel.

    Messages: ("ready", worker) | ("fatal", worker, message) | ("begin", worker, batch id)
    | ("done", worker, batch id, results).
    """
    torch.set_num_threads(threads)
    try:
        encoders = load_encoders(plan.config, _worker_device(plan.config, worker))
    except Exception as e:  # noqa: BLE001 - reported to the main process, which stops the run
        results.put(("fatal", worker, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", worker))
    while (task := tasks.get()) is not None:
        batch_id, items = task
        results.put(("begin", worker, batch_id))
        results.put(("done", worker, batch_id, encode_batch(items, encoders, plan)))


def encode_in_workers(batches: list[list[InputItem]], plan: Plan, timing: dict[str, float]
                       ) -> Iterator[list[Result]]:
    """Yield each batch's results as workers finish them; a worker that dies costs only the batch it held."""
    import multiprocessing

    cfg = plan.config
    context = multiprocessing.get_context("spawn")  # fork would copy a half-initialised torch/CUDA/FFmpeg state
    tasks, results = context.Queue(), context.Queue()
    for batch_id, batch in enumerate(batches):
        tasks.put((batch_id, batch))
    workers = min(cfg.workers, len(batches))
    for _ in range(workers):
        tasks.put(None)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // workers)  # workers share the cores instead of each starting one thread per core
    start = time.perf_counter()
    processes = [context.Process(target=_worker_main, args=(w, plan, threads, tasks, results), daemon=True)
                 for w in range(workers)]
    for p in processes:
        p.start()
    pending = set(range(len(batches)))
    holding: dict[int, int] = {}  # worker -> the batch it is encoding
    try:
        while pending:
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w, p in enumerate(processes) if not p.is_alive() and p.exitcode != 0]
                for w in dead:
                    if w in holding:
                        batch_id = holding.pop(w)
                        pending.discard(batch_id)
                        code = processes[w].exitcode
                        yield [Skipped(item.source, WORKER_DIED, f"worker {w} exited with code {code} while "
                                                                  f"encoding this batch")
                               for item in batches[batch_id]]
                if all(not p.is_alive() for p in processes):  # nobody left to take the remaining batches
                    for batch_id in sorted(pending):
                        yield [Skipped(item.source, WORKER_DIED, "no worker process left")
                               for item in batches[batch_id]]
                    pending.clear()
                continue
            kind, worker = message[0], message[1]
            if kind == "fatal":
                raise PrepareError(f"worker {worker} could not load the models: {message[2]}")
            if kind == "ready":  # start-up: spawning, imports and model loading, until the last worker is ready
                timing["startup"] = time.perf_counter() - start
            elif kind == "begin":
                holding[worker] = message[2]
            elif kind == "done":
                holding.pop(worker, None)
                pending.discard(message[2])
                yield message[3]
    finally:
        for p in processes:
            if p.is_alive() and pending:
                p.terminate()
        for p in processes:
            p.join(timeout=10)


def encode_here(batches: list[list[InputItem]], plan: Plan, timing: dict[str, float]) -> Iterator[list[Result]]:
    start = time.perf_counter()
    encoders = load_encoders(plan.config, _worker_device(plan.config, 0))
    timing["startup"] = time.perf_counter() - start
    for batch in batches:
        yield encode_batch(batch, encoders, plan)
