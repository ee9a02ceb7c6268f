"""Shared pieces of the distributed tests: the tiny preset, deterministic inputs, relative errors."""

from __future__ import annotations

import contextlib


import torch
import torch.distributed as dist

from magi_train.config.schema import ModelConfig
from magi_train.model.attention import block_causal_ranges
from tests.configs import tiny_model

def tiny(**changes) -> ModelConfig:
    """The shared tiny model (conf/model/tiny.yaml: 4 heads x 64, 2 KV heads, fp32; tests/configs.py)."""
    return tiny_model(**changes)


def singleton_groups():
    """A one-rank group per rank (every rank must create all of them); rank r uses entry r."""
    return [dist.new_group([r]) for r in range(dist.get_world_size())]


def inputs(cfg: ModelConfig, N: int = 2, chunks: int = 2, size: int = 8, caption_len: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    frames = chunks * cfg.chunk_width
    x = torch.randn(N, cfg.in_channels, frames, size, size, generator=g)
    t = torch.rand(N, chunks, generator=g).sort(dim=1, descending=True).values
    caption = torch.randn(N * chunks, caption_len, cfg.caption_channels, generator=g)
    lengths = torch.randint(3, caption_len + 1, (N * chunks,), generator=g)
    mask = torch.arange(caption_len)[None] < lengths[:, None]
    tokens = cfg.chunk_width * (size // cfg.patch_size) ** 2
    ranges = block_causal_ranges(N, chunks, tokens)
    weight = torch.randn(N, cfg.out_channels, frames, size, size, generator=g)
    return x, t, caption, mask, ranges, weight


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def single_process_parallel():
    """A `Parallel` of this rank alone (every size 1): the oracle trainer inside a multi-rank test."""
    from magi_train.mcore import ProcessGroupCollection

    from magi_train.parallel.groups import Parallel

    g = singleton_groups()[dist.get_rank()]
    groups = ProcessGroupCollection(tp=g, cp=g, pp=g, dp=g, dp_cp=g, tp_cp=g, mp=g, tp_dp_cp=g)
    return Parallel(groups, rank=0, world_size=1, device=torch.device("cpu"))


def train_config(out_dir, parallel: dict, global_batch: int = 8, micro_batch: int = 2, max_steps: int = 5, **model):
    from magi_train.config import validate
    from magi_train.config.schema import (DataConfig, DiffusionConfig, OptimizerConfig, ParallelConfig, TrainConfig,
                                          TrainerConfig, WandbConfig)

    return validate(TrainConfig(
        model=tiny(caption_channels=32, **model),
        parallel=ParallelConfig(**parallel),
        data=DataConfig(num_samples=64, chunks_per_sample=2, latent_height=8, latent_width=8, caption_length=16,
                        micro_batch_size=micro_batch, global_batch_size=global_batch),
        diffusion=DiffusionConfig(clean_prefix_prob=0.5),
        optimizer=OptimizerConfig(lr=2e-3, min_lr=2e-4, warmup_steps=3, decay="cosine"),
        trainer=TrainerConfig(max_steps=max_steps, output_dir=str(out_dir), progress_bar=False, num_threads=1,
                              wandb=WandbConfig(mode="disabled")),
    ))


@contextlib.contextmanager
def emulated_magi_cp(layout: dict):
    """With parallel.cp_impl=magi in `layout`: MagiAttention's API emulated on CPU (fake_magi_api) and its
    availability check passed, for the duration; otherwise nothing."""
    if layout.get("cp_impl") != "magi":
        yield
        return
    from magi_train.model import magi_attention
    from tests.distributed import fake_magi_api

    fake_magi_api.install()
    check = magi_attention.magi_cp_unavailable_reason
    magi_attention.magi_cp_unavailable_reason = lambda backend: None
    try:
        yield
    finally:
        magi_attention.magi_cp_unavailable_reason = check


@torch.no_grad()
def nonzero_output_layer(models, seed: int = 0) -> None:
    """Give the output layer of every (last-stage) model the same random weights.

    The DiT's output layer starts at zero (the untrained model predicts zero velocity), which makes the output
    and every gradient upstream of that layer exactly zero: a layout test would then compare only the output
    layer's own gradient. The layer is replicated over every parallel dimension."""
    for model in models:
        if model.post_process:
            weight = model.final_linear.linear.weight
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)


def grad_errors(models, oracle) -> dict:
    """Worst gradient error of the parallel `models` against the single-process `oracle`, with its name.

    Each local gradient is compared with the oracle's slice, relative to that parameter's largest gradient,
    floored at 1e-4 of the model's largest gradient: a few biases have an exactly-zero true gradient
    (k_layernorm_xattn.bias; the non-rotary part of k_layernorm.bias: softmax is shift-invariant), where
    any two summation orders leave different rounding noise. Only the gradients this rank holds are compared
    (a data-parallel rank holds those of the parameters it owns); `params_checked` counts them."""
    from magi_train.parallel.plan import shard_spec
    from magi_train.parallel.sharding import local_from_full

    full = dict(oracle.named_parameters())
    floor = 1e-4 * max(float(p.grad.abs().max()) for p in full.values())
    worst, worst_name, seen = 0.0, "", 0
    for model in models:
        for name, p in model.named_parameters():
            if p.grad is None:  # ZeRO-2: only the parameter's owner rank holds its summed gradient
                continue
            expected = local_from_full(full[name].grad, shard_spec(model, name, full[name].shape)).double()
            err = float((p.grad.double() - expected).abs().max()) / max(float(expected.abs().max()), floor)
            if err >= worst:
                worst, worst_name = err, name
            seen += 1
    return {"grad": worst, "worst_grad": worst_name, "params_checked": seen}


def check_steps(per_rank) -> None:
    """Every layout's one-step errors against the single-process oracle (loss, gradient norm, every gradient
    to 1e-5), as the training-layout tests return them per rank."""
    for rank, results in enumerate(per_rank):
        for name, err in results.items():
            assert err["params_checked"] > 0, (rank, name)
            assert err["loss"] < 1e-5 and err["grad_norm"] < 1e-5 and err["grad"] < 1e-5, (rank, name, err)
