"""The measurements of tools/gpu_bench.py: attention kernels, training steps, inference forwards.

Each returns plain JSON-able dicts; the caller times them out and records failures. Sizes come from a `Sizes`
(the real ones on a GPU, tiny ones for --dry-run on a CPU), so the dry run exercises every line that the GPU
run does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class Sizes:
    attention_tokens: Tuple[int, ...]  # tokens of one block-causal sample per attention measurement
    chunk_tokens: int  # tokens per chunk of the attention mask
    heads: Tuple[int, int, int]  # (query heads, kv heads, head dim)
    preset: str  # the model preset whose widths the train / inference sections use
    distill_preset: str
    layers: int  # layers kept of the preset (widths full)
    latent: Tuple[int, int, int]  # latent (frames per chunk, height, width) of one chunk
    chunks: int  # chunks per sample
    caption_length: int
    iters: int  # timed repetitions (after one warm-up)


# 4.5B: 24 query heads of 128 (GQA over 8 groups); 720p-class chunks of 6 latent frames x 24 x 40 tokens.
GPU_SIZES = Sizes((16_384, 32_768, 65_536), 2_048, (24, 8, 128), "magi1_4.5b", "magi1_4.5b_distill", 2,
                  (6, 48, 80), 3, 128, 5)
DRY_SIZES = Sizes((256, 512), 64, (4, 2, 32), "tiny", "tiny", 2, (6, 8, 8), 2, 16, 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, deadline: float,
          setup: Optional[Callable[[], object]] = None) -> float:
    """Median seconds of fn(setup()) (or fn()) over `iters` runs after one warm-up run; fewer runs once
    `deadline` passes. `setup` runs untimed before each call (e.g. the forward whose backward is timed)."""
    call = (lambda: fn(setup())) if setup is not None else fn
    call()
    synchronize(device)
    times: List[float] = []
    for _ in range(iters):
        if times and time.monotonic() > deadline:
            break
        arg = setup() if setup is not None else None
        synchronize(device)
        start = time.perf_counter()
        fn(arg) if setup is not None else fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def backend_names(device: torch.device) -> List[Tuple[str, Optional[str]]]:
    """(backend, None) for each attention backend to try, or (backend, "unavailable: why")."""
    try:
        from magi_train.model.spec import available_backends
    except ImportError:
        available_backends = None
    if available_backends is not None:
        found = available_backends(device)
        return [(n, None) for n in found] + [(n, "unavailable: not in available_backends on this device")
                                             for n in ("magi", "flash", "flex", "sdpa", "torch") if n not in found]
    out = []
    from magi_train.model.spec import get_attention_backend

    for name in ("magi", "flash", "flex", "sdpa", "torch"):
        try:
            get_attention_backend(name)
            out.append((name, None))
        except Exception as exc:  # noqa: BLE001 - recorded, not raised
            out.append((name, f"unavailable: {exc}"))
    return out


def attention(sizes: Sizes, device: torch.device, dtype: torch.dtype, deadline: Callable[[], float]) -> List[Dict]:
    """TFLOP/s forward and backward of each backend on one sample's block-causal mask at each token count.
    FLOPs count the area the mask lets through: forward 4 x area x D per head, backward 2.5 x forward."""
    from magi_train.model.attention import block_causal_ranges
    from magi_train.model.spec import get_attention_backend
    from magi_train.observability.flops import block_causal_area

    hq, hkv, d = sizes.heads
    rows = []
    for name, why in backend_names(device):
        for tokens in sizes.attention_tokens:
            row = {"backend": name, "tokens": tokens, "head_dim": d}
            rows.append(row)
            if why:
                row["status"] = why
                continue
            if time.monotonic() > deadline():
                row["status"] = "skipped: section time budget spent"
                continue
            chunk = min(sizes.chunk_tokens, tokens)
            area = block_causal_area([chunk] * (tokens // chunk)) * hq
            try:
                kernel = get_attention_backend(name)
                ranges = block_causal_ranges(1, tokens // chunk, chunk)
                gen = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(tokens, hq, d, device=device, dtype=dtype, generator=gen).requires_grad_()
                k = torch.randn(tokens, hkv, d, device=device, dtype=dtype, generator=gen).requires_grad_()
                v = torch.randn(tokens, hkv, d, device=device, dtype=dtype, generator=gen).requires_grad_()
                qd, kd, vd = q.detach(), k.detach(), v.detach()  # some kernels refuse inputs that need grad
                with torch.no_grad():
                    fwd = timed(lambda: kernel(qd, kd, vd, ranges), device, sizes.iters, deadline())
                row["forward_tflops"] = 4 * area * d / fwd / 1e12
                row["forward_ms"] = fwd * 1e3
                out = kernel(q, k, v, ranges)
                grad = torch.ones_like(out)

                # The backward alone: its forward runs untimed before each timed backward (a difference of two
                # medians is noise-dominated on a loaded machine).
                bwd = timed(lambda o: o.backward(grad), device, sizes.iters, deadline(),
                            setup=lambda: kernel(q, k, v, ranges))
                row["backward_tflops"] = 10 * area * d / bwd / 1e12
                row["backward_ms"] = bwd * 1e3
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - one kernel failing must not end the benchmark
                row["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            finally:
                q = k = v = qd = kd = vd = out = grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def train_config(sizes: Sizes, out_dir: str, precision: str, fp8_recipe: str, device: torch.device):
    """The preset's full widths with `sizes.layers` layers, trained on synthetic latents of `sizes.latent`."""
    from magi_train.config import validate
    from magi_train.config.compose import load_model_preset
    from magi_train.config.schema import DataConfig, OptimizerConfig, TrainConfig, TrainerConfig, WandbConfig

    model = load_model_preset(sizes.preset)
    frames, h, w = sizes.latent
    # The preset's parameter dtype (bf16 for the released sizes: trained with fp32 masters).
    changes = dict(num_layers=sizes.layers, attention_backend="auto" if device.type == "cuda" else "sdpa")
    if fp8_recipe != "none":
        changes["layer_spec"] = "te"
    model = replace(model, **changes)
    return validate(TrainConfig(
        model=model,
        data=DataConfig(num_samples=64, chunks_per_sample=sizes.chunks, latent_frames_per_chunk=frames, latent_height=h,
                        latent_width=w, latent_channels=model.in_channels, caption_length=sizes.caption_length,
                        micro_batch_size=1, global_batch_size=1),
        optimizer=OptimizerConfig(lr=1e-5, warmup_steps=0),
        trainer=TrainerConfig(max_steps=1_000, output_dir=out_dir, progress_bar=False, precision=precision,
                              fp8_recipe=fp8_recipe, check_memory=False, wandb=WandbConfig(mode="disabled"),
                              num_threads=0 if device.type == "cuda" else 2),
    ))


def estimate_bytes(cfg, device: torch.device) -> int:
    """The planner's total for this run, as the trainer's own memory check asks it (flash-like kernels on
    CUDA: the backends there keep no score matrix; the per-range torch kernel's scores on the CPU)."""
    from magi_train.observability.memory_check import train_estimate

    est, extra = train_estimate(cfg, 1, 1, 1, 1, "flash" if device.type == "cuda" else "torch")
    return est.total + sum(b for _, b in extra)


def train_step(sizes: Sizes, device: torch.device, out_dir: str, precision: str, fp8_recipe: str,
               deadline: Callable[[], float]) -> Dict:
    """The trainer's own step (Trainer.train_step): median time, its MFU, peak memory against the planner."""
    from magi_train.config.schema import TrainConfig
    from magi_train.model.spec import auto_backend_name
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    cfg = train_config(sizes, out_dir, precision, fp8_recipe, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parallel = init_parallel(TrainConfig().parallel)
    trainer = Trainer(cfg, parallel)
    try:
        recs = [trainer.train_step()]  # warm-up (compilation, allocator)
        while len(recs) < 1 + sizes.iters and time.monotonic() < deadline():
            recs.append(trainer.train_step())
    finally:
        trainer.batches.close()
        trainer.close()
    timed_recs = recs[1:] or recs
    timed_recs.sort(key=lambda r: r["time/step"])
    rec = timed_recs[len(timed_recs) // 2]
    tokens = trainer.last_tokens
    backend = cfg.model.attention_backend
    if backend == "auto":
        backend = auto_backend_name(device, tokens, tokens, torch.bfloat16 if precision == "bf16" else None)
    out = {"precision": precision, "fp8_recipe": fp8_recipe, "layers": cfg.model.num_layers,
           "hidden_size": cfg.model.hidden_size, "tokens": tokens, "attention_backend": backend,
           "steps_timed": len(timed_recs), "step_ms": rec["time/step"] * 1e3,
           "tflops_per_device": rec["tflops_per_device"], "mfu": rec.get("mfu"),
           "estimate_bytes": estimate_bytes(cfg, device)}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_over_estimate"] = out["peak_bytes"] / out["estimate_bytes"]
    out["status"] = "ok"
    return out


def inference(sizes: Sizes, device: torch.device, dtype: torch.dtype, peak: Optional[float],
              deadline: Callable[[], float]) -> Dict:
    """The distilled preset (few layers, full widths) in `dtype`: one no-grad forward over a block-causal sample
    of `sizes.chunks` chunks (what a denoising step of the chunk-wise sampler computes with every chunk in
    flight); latency per chunk = that time / chunks."""
    from magi_train.config.compose import load_model_preset
    from magi_train.model.attention import block_causal_ranges
    from magi_train.model.dit import build_dit
    from magi_train.observability.flops import SampleShape, forward_flops

    cfg = load_model_preset(sizes.distill_preset)
    cfg = replace(cfg, num_layers=sizes.layers, params_dtype=str(dtype).replace("torch.", ""), distill=True,
                  attention_backend="auto" if device.type == "cuda" else "sdpa")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_dit(cfg, device=device).eval()
    frames, h, w = sizes.latent
    n = sizes.chunks
    per_chunk = frames // cfg.t_patch_size * (h // cfg.patch_size) * (w // cfg.patch_size)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, frames * n, h, w, device=device, dtype=dtype, generator=gen)
    t = torch.linspace(0.2, 0.8, n, device=device).flip(0)[None]
    caption = torch.randn(n, cfg.caption_max_length, cfg.caption_channels, device=device, dtype=dtype, generator=gen)
    mask = torch.zeros(n, cfg.caption_max_length, dtype=torch.bool, device=device)
    mask[:, :sizes.caption_length] = True
    ranges = block_causal_ranges(1, n, per_chunk)
    adaln = torch.zeros(1, dtype=torch.bool, device=device)
    dt = 0.5 if cfg.distill else None

    def forward():
        return model(x, t, caption, mask, ranges, adaln, distill_dt=dt)

    with torch.no_grad():
        seconds = timed(forward, device, sizes.iters, deadline())
    flops = forward_flops(cfg, SampleShape((per_chunk,) * n, sizes.caption_length))
    out = {"preset": sizes.distill_preset, "layers": cfg.num_layers, "dtype": str(dtype).replace("torch.", ""),
           "tokens": per_chunk * n, "chunks": n, "forward_ms": seconds * 1e3, "per_chunk_ms": seconds * 1e3 / n,
           "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    out["status"] = "ok"
    return out
