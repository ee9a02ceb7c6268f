"""Refuse a training run that cannot fit before anything is allocated.

Without this check a preset too large for the machine (or a micro-batch of too many tokens) ends in a raw
allocator error after minutes of building, or on a CPU host the kernel's OOM killer takes the whole job
without a message. The planner of memory_plan.py gives the most loaded rank's bytes; this module compares
them with what the rank's device has free and names the knobs that reduce them.

The planner counts what the trainer keeps (weights, gradients, AdamW state, saved activations), not the
allocator's fragmentation or the CUDA context, so only a request whose estimate alone exceeds what is free is
refused: a false refusal would cost more than the late error it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from magi_train.config.schema import TrainConfig
from magi_train.observability.memory_plan import (GIB, Layout, MemoryEstimate, MicroBatch, ModelParams, Tuning,
                                                   estimate)


@dataclass(frozen=True)
class Available:
    bytes: int
    what: str  # e.g. "free memory of cuda:0" or "MemAvailable of this host (/proc/meminfo)"


def available_memory(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> Optional[Available]:
    """What `device` can still allocate: the CUDA driver's free bytes, or the host's MemAvailable. None when it
    cannot be read (another OS): the check is then skipped rather than guessed."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Available(int(free), f"free memory of {device}")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return Available(int(line.split()[1]) * 1024, f"MemAvailable of this host ({meminfo})")
    except (OSError, ValueError, IndexError):
        return None
    return None


def train_micro_batch(cfg: TrainConfig, attention: str) -> MicroBatch:
    """The planner's view of one micro-batch of this run."""
    d, m = cfg.data, cfg.model
    if d.kind == "webdataset":
        return MicroBatch(d.seq_length, 1, 0, d.caption_length, 0, attention)
    per_chunk = (d.latent_frames_per_chunk // m.t_patch_size) * (d.latent_height // m.patch_size) * \
        (d.latent_width // m.patch_size)
    return MicroBatch(per_chunk * d.chunks_per_sample, d.micro_batch_size, per_chunk,
                      min(d.caption_length, m.caption_max_length), 0, attention)


def train_estimate(cfg: TrainConfig, tp: int, cp: int, pp: int, dp: int, attention: str
                   ) -> Tuple[MemoryEstimate, List[Tuple[str, int]]]:
    """(the planner's estimate of the most loaded rank, extra rows the planner does not model: the frozen
    teacher and the EMA copy of distillation)."""
    t = cfg.trainer
    layout = Layout(tp, cp, pp, dp, cfg.parallel.sequence_parallel, str(t.recompute), str(t.precision),
                    t.recompute_layers)
    # A LoRA run (lora.rank > 0) trains only its adapters: the frozen base holds weights only.
    params = ModelParams.of(cfg.model, Tuning.of_config(cfg))
    est = estimate(cfg.model, layout, train_micro_batch(cfg, attention), params)
    extra: List[Tuple[str, int]] = []
    # The EMA shadows the local trainable parameters in fp32 (distillation's, or trainer.ema_decay's).
    ema = sum(numel * 4 for _, numel, _ in params.trainable(layout, est.stage))
    if cfg.distill.enabled:
        # The teacher is whole on every rank of a stage (build_whole).
        whole = sum(numel * item for _, numel, item in params.stage(Layout(tp=tp), 0))
        extra += [("distillation teacher (frozen)", whole), ("distillation EMA (fp32)", ema)]
    elif t.ema_decay > 0:
        extra.append(("EMA (fp32, trainer.ema_decay)", ema))
    return est, extra


def check_train_memory(cfg: TrainConfig, tp: int, cp: int, pp: int, dp: int, device: torch.device,
                       ranks_sharing_device: int = 1, available: Optional[Available] = None) -> Optional[str]:
    """None when the run fits (or nothing is known about the device), else the error message.

    `ranks_sharing_device`: processes that draw on the same memory (every rank of a CPU host; 1 on GPUs)."""
    available = available or available_memory(device)
    if available is None:
        return None
    attention = "flash" if device.type == "cuda" else "torch"
    est, extra = train_estimate(cfg, tp, cp, pp, dp, attention)
    per_rank = est.total + sum(v for _, v in extra)
    need = per_rank * ranks_sharing_device
    if need <= available.bytes:
        return None
    rows = [*est.rows()[:-1], *extra]
    table = "\n".join(f"    {name}: {value / GIB:.2f} GiB" for name, value in rows)
    shared = f" x {ranks_sharing_device} ranks on this host" if ranks_sharing_device > 1 else ""
    return (f"this run needs about {per_rank / GIB:.2f} GiB per rank{shared} (memory_plan.py estimate, "
            f"tp={tp} cp={cp} pp={pp} dp={dp}, recompute={cfg.trainer.recompute}, precision={cfg.trainer.precision}), "
            f"but the {available.what} is {available.bytes / GIB:.2f} GiB:\n{table}\n"
            "  reduce it with parallel.tp / parallel.pp (split the weights and their gradients and optimizer state), "
            "parallel.cp or parallel.sequence_parallel (split the tokens), trainer.recompute=selective or full, "
            "a smaller data.micro_batch_size or data.seq_length (webdataset) / data.chunks_per_sample and "
            "data.latent_height/width (synthetic), or trainer.precision=bf16 on GPUs; "
            "tools/estimate_memory.py --gpu-memory ... --gpus ... searches a layout that fits. "
            "trainer.check_memory=false skips this check.")
