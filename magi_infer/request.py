"""One generation request: what `InferenceEngine.generate` makes (the engine itself holds the model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from magi_infer.config import GenerateConfig


@dataclass
class Request:
    prompts: List[str]
    mode: str = "t2v"
    num_frames: int = 96
    seed: int = 1234
    # A path, or frames already in memory: uint8 (H, W, 3) for the image, (T, H, W, 3) for the prefix video (at
    # video.fps); either is resized to the video size as a file would be.
    image: Any = None
    prefix_video: Any = None
    prefix_frames: Optional[int] = None
    output: str = "out.mp4"
    overwrite: bool = False  # replace an existing output file
    allow_empty_prompt: bool = False  # empty prompts (unconditional generation) are meant
    num_steps: Optional[int] = None  # sampler steps per chunk; None = sampler.num_steps of the config
    generator: Any = None  # a CPU torch.Generator for the noise, instead of `seed`
    # v2v: clean latents (1, C, T, h, w) of the video to continue, instead of encoding prefix_video (which
    # then must be None); prefix_frames (pixel frames) keeps the first ceil(prefix_frames / 4) of them.
    prefix_latents: Any = None

    @staticmethod
    def from_config(cfg: GenerateConfig) -> "Request":
        prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else [str(p) for p in cfg.prompt]
        return Request(prompts, cfg.mode, cfg.num_frames, cfg.seed, cfg.image, cfg.prefix_video, cfg.prefix_frames,
                       cfg.output, overwrite=cfg.overwrite, allow_empty_prompt=cfg.allow_empty_prompt)
