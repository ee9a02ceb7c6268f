"""The settings of a run (`PrepareConfig`, as the command line gives them) and the `Plan`: the settings checked
against the VAE's config before any model is loaded, with messages that name the option."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from magi_train.data.prepare.clips import DEFAULT_BUCKETS, Bucket, parse_buckets
from magi_train.data.prepare.records import PrepareError

@dataclass(frozen=True)
class PrepareConfig:
    input: Path
    out: Path
    vae: Path
    text_encoder: str  # t5:DIR | hash:DIM | hash_bigram:DIM
    buckets: tuple[str, ...] = DEFAULT_BUCKETS  # HEIGHTxWIDTH
    fps: int = 24
    max_seconds: Optional[float] = None  # longer clips keep their first whole chunks within this
    samples_per_shard: int = 100
    workers: int = 1  # processes; 0 encodes in this process
    batch_size: int = 8  # clips per worker task; their captions are text-encoded together
    device: str = "cpu"  # cpu | cuda | cuda:N (cuda spreads the workers over the visible GPUs)
    resume: bool = False
    text_length: int = 800  # tokens per caption row before trimming (the released T5 max_length)
    chunk_frames: int = 24  # pixel frames per chunk: model.chunk_width (6) x the VAE's patch_length (4)
    size_multiple: int = 16  # bucket sides: VAE patch (8) x DiT patch (2)
    vae_tile_px: int = 256
    vae_overlap: float = 0.25
    vae_dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    progress: bool = True

    def recorded(self) -> dict[str, Any]:
        """What must not change when a run is resumed: every sample of a dataset is made the same way."""
        return {"buckets": list(self.buckets), "fps": self.fps, "max_seconds": self.max_seconds,
                "chunk_frames": self.chunk_frames, "text_encoder": self.text_encoder, "text_length": self.text_length,
                "vae": str(self.vae.resolve()), "vae_tile_px": self.vae_tile_px, "vae_overlap": self.vae_overlap}


@dataclass(frozen=True)
class Plan:
    """Settings checked against the VAE, shared with the workers."""

    config: PrepareConfig
    buckets: tuple[Bucket, ...]
    max_frames: Optional[int]  # a whole number of chunks, or None


def make_plan(cfg: PrepareConfig) -> Plan:
    """Check every setting that can be checked without loading a model, with messages that name the option."""
    from magi_train.model.vae.model import ViTVAEConfig

    config_path = cfg.vae / "config.json"
    try:
        raw = json.loads(config_path.read_text())
        vae = ViTVAEConfig.from_ddconfig(raw["ddconfig"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"--vae {cfg.vae}: cannot read the VAE config {config_path} ({type(e).__name__}: {e})") \
            from None
    parse_text_encoder(cfg.text_encoder)
    checks = [
        (cfg.fps >= 2 and (cfg.fps // 2) % vae.patch_length == 0,
         f"--fps {cfg.fps}: the VAE codes fps//2-frame tiles, which must be a multiple of its patch_length "
         f"{vae.patch_length} (e.g. 8, 16, 24, 32)"),
        (cfg.chunk_frames > 0 and cfg.chunk_frames % vae.patch_length == 0,
         f"--chunk-frames {cfg.chunk_frames} must be a positive multiple of the VAE's patch_length {vae.patch_length}"),
        (cfg.size_multiple > 0 and cfg.size_multiple % vae.patch_size == 0,
         f"--size-multiple {cfg.size_multiple} must be a positive multiple of the VAE's patch_size {vae.patch_size}"),
        (cfg.samples_per_shard >= 1, f"--samples-per-shard {cfg.samples_per_shard} must be >= 1"),
        (cfg.workers >= 0, f"--workers {cfg.workers} must be >= 0"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be >= 1"),
        (cfg.text_length >= 1, f"--text-length {cfg.text_length} must be >= 1"),
        (cfg.vae_dtype in ("auto", "float32", "bfloat16"),
         f"--vae-dtype {cfg.vae_dtype!r} is not auto|float32|bfloat16"),
        (not cfg.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {cfg.device}: CUDA is not available"),
    ]
    for ok, message in checks:
        if not ok:
            raise PrepareError(message)
    max_frames = None
    if cfg.max_seconds is not None:
        max_frames = int(cfg.max_seconds * cfg.fps) // cfg.chunk_frames * cfg.chunk_frames
        if max_frames < cfg.chunk_frames:
            raise PrepareError(f"--max-seconds {cfg.max_seconds} is shorter than one chunk "
                               f"({cfg.chunk_frames} frames at {cfg.fps} fps)")
    return Plan(cfg, tuple(parse_buckets(cfg.buckets, cfg.size_multiple)), max_frames)


def parse_text_encoder(spec: str) -> tuple[str, str]:
    """"t5:DIR", "hash:DIM" or "hash_bigram:DIM" -> (kind, argument). Only the folder's existence is checked here: importing the T5
    code (transformers) costs seconds, so the workers check the folder's contents when they load it."""
    kind, _, arg = spec.partition(":")
    if kind == "t5" and arg:
        if not Path(arg).expanduser().is_dir():
            raise PrepareError(f"--text-encoder {spec}: {arg} is not a folder (a t5-v1_1-xxl folder, or its parent)")
        return kind, arg
    if kind in ("hash", "hash_bigram") and arg.isdigit() and int(arg) >= 1:
        return kind, arg
    raise PrepareError(f"--text-encoder {spec!r} is not t5:DIR (a T5 encoder folder), hash:DIM (e.g. hash:32) "
                       "or hash_bigram:DIM")
