"""The tests' shared configurations: the tiny model is conf/model/tiny.yaml (the preset `make demo` trains),
read through the same Hydra composition as the entry points; tests change only what they are about.

    tiny_model(num_layers=3)                 the preset with one field changed
    tiny_train_config(tmp_path, ...)         a short synthetic-data training run of it on one process
    webdataset_train_config(shards, ...)     a small model trained on packed webdataset shards
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Optional

from magi_train.config import validate
from magi_train.config.schema import (DataConfig, DiffusionConfig, ModelConfig, OptimizerConfig, TrainConfig,
                                      TrainerConfig, WandbConfig)


@functools.lru_cache(maxsize=1)
def _tiny_preset() -> ModelConfig:
    from magi_train.config.compose import load_model_preset

    return load_model_preset("tiny")


def tiny_model(**changes) -> ModelConfig:
    """conf/model/tiny.yaml, with `changes` applied (a fresh dataclass each call)."""
    return replace(_tiny_preset(), **changes)


def tiny_train_config(out_dir, **trainer) -> TrainConfig:
    """20 steps of the tiny model on the synthetic moving blobs (2 chunks of 6 x 8 x 8 latents, 2 samples per
    micro-batch), fp32, one thread, no wandb; `trainer` sets TrainerConfig fields."""
    fields = dict(max_steps=20, output_dir=str(out_dir), progress_bar=False, num_threads=1,
                  wandb=WandbConfig(mode="disabled"))
    fields.update(trainer)
    return validate(TrainConfig(
        model=tiny_model(),
        data=DataConfig(num_samples=64, chunks_per_sample=2, latent_height=8, latent_width=8, caption_length=16,
                        micro_batch_size=2),
        diffusion=DiffusionConfig(clean_prefix_prob=0.5),
        optimizer=OptimizerConfig(lr=2e-3, min_lr=2e-4, warmup_steps=3, decay="cosine"),
        trainer=TrainerConfig(**fields),
    ))


# The shard helpers' sample shape (tests/shard_helpers.py) and a chunk of 2 latent frames: short samples, many chunks.
WDS_CHUNK = 2


def webdataset_train_config(shards: Path, out_dir: Path, val_shards: Optional[Path] = None, diffusion=None,
                            **trainer) -> TrainConfig:
    """6 steps of a narrow tiny model (64 wide, 2 heads of 32) on packed sequences of 96 tokens from `shards`."""
    from tests.shard_helpers import CAPTION_DIM, CHANNELS

    model = tiny_model(in_channels=CHANNELS, out_channels=CHANNELS, caption_channels=CAPTION_DIM, caption_max_length=8,
                       null_caption_length=4, chunk_width=WDS_CHUNK, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=2, num_query_groups=1, kv_channels=32)
    data = DataConfig(kind="webdataset", shards=str(shards), val_shards=str(val_shards or ""), seq_length=96,
                      max_rows_per_sequence=8, pack_pool=6, shuffle_buffer=4, num_streams=2, num_workers=0,
                      latent_channels=CHANNELS, latent_frames_per_chunk=WDS_CHUNK, caption_length=6, micro_batch_size=1,
                      global_batch_size=2, seed=5)
    fields = dict(max_steps=6, output_dir=str(out_dir), progress_bar=False, num_threads=1,
                  wandb=WandbConfig(mode="disabled"))
    fields.update(trainer)
    return validate(TrainConfig(model=model, data=data, diffusion=diffusion or DiffusionConfig(),
                                optimizer=OptimizerConfig(lr=3e-3, warmup_steps=0), trainer=TrainerConfig(**fields)))
