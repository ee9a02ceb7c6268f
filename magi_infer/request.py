"""One generation request: what `InferenceEngine.generate` makes (the engine itself holds the model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from magi_infer.config import GenerateConfig


@dataclass
class Request:
    prompts: List[str]
    mode: str = "t2v"
    num_frames: int = 96
    seed: int = 1234
    image: Optional[str] = None
    prefix_video: Optional[str] = None
    prefix_frames: Optional[int] = None
    output: str = "out.mp4"
    overwrite: bool = False  # replace an existing output file
    allow_empty_prompt: bool = False  # empty prompts (unconditional generation) are meant

    @staticmethod
    def from_config(cfg: GenerateConfig) -> "Request":
        prompts = [cfg.prompt] if isinstance(cfg.prompt, str) else [str(p) for p in cfg.prompt]
        return Request(prompts, cfg.mode, cfg.num_frames, cfg.seed, cfg.image, cfg.prefix_video, cfg.prefix_frames,
                       cfg.output, overwrite=cfg.overwrite, allow_empty_prompt=cfg.allow_empty_prompt)
