"""Per-step throughput figures: tokens/s, samples/s, achieved TFLOP/s per device and model FLOPs utilisation.

MFU = (model FLOPs of the step, from the analytic count in magi_train/observability/flops.py) / (step time x devices x
peak FLOP/s of one device). The count has no recompute and no padding, so MFU does not reward either.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from magi_train.observability.flops import mfu

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets (SXM parts).
_GPU_PEAK_TFLOPS = (("H200", 989.4), ("H100", 989.4), ("B200", 2250.0), ("A100", 312.0))


def peak_flops_per_device(configured_tflops: float, device: torch.device) -> Optional[float]:
    """trainer.peak_tflops in FLOP/s, or the GPU's bf16 peak looked up by name; None when unknown (CPU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _GPU_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def throughput_record(seconds: float, tokens: int, samples: int, flops: int, devices: int,
                      peak_flops: Optional[float]) -> Dict[str, float]:
    """The step's figures (tokens, samples and FLOPs are over every rank)."""
    rec = {"time/step": seconds, "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds,
           "tflops_per_device": flops / seconds / devices / 1e12}
    if peak_flops:
        rec["mfu"] = mfu(flops, seconds, devices, peak_flops)
    return rec
