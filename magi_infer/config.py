"""Typed configuration of `magi_infer/generate.py` (stored in Hydra's ConfigStore as `generate_schema`).

Field names follow the released `RuntimeConfig` / `EngineConfig` (spec §10) where they exist. What the
released code reads from environment variables (special-token flags, the nearly-clean blend weight) is a
config field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from magi_train.config.schema import ModelConfig, ParallelConfig


@dataclass
class SamplerConfig:
    cfg_number: int = 3  # 3: three-pass guidance (base models); 1: one pass (distilled / fp8)
    cfg_t_range: List[float] = field(default_factory=lambda: [0.0, 0.0217, 0.1, 0.3, 0.999])
    prev_chunk_scales: List[float] = field(default_factory=lambda: [1.5, 1.5, 1.5, 1.0, 1.0])
    text_scales: List[float] = field(default_factory=lambda: [7.5, 7.5, 7.5, 0.0, 0.0])
    # Chunks (itself included) a denoising chunk attends to, per 1/len of its steps; [] = all earlier chunks.
    noise2clean_kvrange: List[int] = field(default_factory=lambda: [5, 4, 3, 2])
    clean_chunk_kvrange: int = 1  # lookback of the clean re-forward and the prefix; -1 = released fallback
    clean_t: float = 0.9999
    num_steps: int = 64  # denoising steps per chunk
    window_size: int = 4  # chunks denoised at once
    shortcut_mode: str = "8,16,16"  # 12-step grid only: "8,16,16" or "16,16,8"
    nearly_clean_threshold: float = 0.3  # distill: blend the oldest chunk once its t exceeds this
    nearly_clean_weight: float = 0.7  # weight of the with-context prediction (released env prev_chunks_scale)
    fp8: bool = False  # released fp8 linears; weights from inference_weight.fp8[.distill]
    kv_cache: bool = True  # false recomputes every past chunk in each call (slow; an oracle for tests)
    kv_offload: bool = False  # keep the KV cache in (pinned) CPU memory


@dataclass
class CheckpointConfig:
    # A released model directory (holding inference_weight[.fp8][.distill]/), or a checkpoint of our
    # trainer (a directory with complete.json, or a run's checkpoint root: its newest complete one).
    dir: Optional[str] = None


@dataclass
class VideoConfig:
    height: int = 720
    width: int = 720
    fps: int = 24
    crf: Optional[int] = None  # x264 quality; None = encoder default (as released)


@dataclass
class TextConfig:
    encoder: str = "t5"  # t5 | hash (the synthetic-data encoder of the tiny preset)
    t5_dir: Optional[str] = None  # t5-v1_1-xxl directory, or its parent
    device: str = "cpu"  # where T5 runs (released: cpu for 4.5B, cuda for 24B)
    max_length: int = 800
    special_tokens: Optional[str] = None  # released special_tokens.npz; None = the copy in magi_infer/assets
    hq: bool = True
    duration: bool = True
    negative_tokens: bool = False
    static_first_frames: bool = False
    dynamic_first_frames: bool = False
    borderness: bool = False
    three_d_model: bool = False
    two_d_anime: bool = False


@dataclass
class VaeConfig:
    kind: str = "vit"  # vit (the released VAE) | preview (latent colours, for the synthetic tiny model)
    dir: Optional[str] = None  # diffusers-style directory: config.json + diffusion_pytorch_model.safetensors
    tile_px: int = 256
    overlap: float = 0.25
    scale_factor: float = 0.18215
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    mode: str = "t2v"  # t2v | i2v | v2v
    prompt: Any = ""  # one prompt, or a list: one per generated chunk (the last repeats)
    image: Optional[str] = None  # i2v conditioning image
    prefix_video: Optional[str] = None  # v2v prefix
    prefix_frames: Optional[int] = None  # v2v: frames of the prefix used (None = all; released 32)
    num_frames: int = 96  # output frames (t2v/i2v: the whole video; v2v: the continuation)
    output: str = "out.mp4"
    seed: int = 1234
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # compute dtype of the DiT: auto = the preset's params_dtype on CUDA, float32 on CPU
    progress: bool = True
