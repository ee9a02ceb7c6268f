"""The Python API, in the diffusers manner: build once, then generate as often as you like.

    from magi_infer import MagiPipeline

    pipe = MagiPipeline.from_pretrained("ckpt/magi/4.5B_distill", t5_dir="ckpt/t5", vae_dir="ckpt/vae")
    video = pipe(prompt="A red fox runs through snow", num_frames=96, seed=7, output="fox.mp4")
    video.frames                        # uint8 (96, 720, 720, 3)
    for chunk in pipe.stream(prompt=["a calm sea", "a storm rises"], num_frames=48):
        show(chunk.frames)              # each chunk's frames as soon as it is clean

`from_pretrained` takes a released model directory (`inference_weight[.fp8][.distill]/` inside, and the released
`config.json` if it is there) or a checkpoint of our trainer (a run's checkpoint folder or one checkpoint). It
finds the preset from what the directory holds (magi_infer/resolve.py) and reads a released config.json's run-time
and engine sections as the sampler's defaults, so nothing of a release is retyped here. Keyword overrides are the
generate program's Hydra keys (conf/generate.yaml): `overrides={"video.height": 480}` or ["video.height=480"].

Under torchrun (several ranks serving one request: parallel.tp x cp x pp) pass `parallel=` from
`magi_train.parallel.groups.init_parallel`; every rank then calls the pipeline with the same arguments and only
rank 0 returns frames and writes files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from magi_infer.config import TEMPORAL, GenerateConfig
from magi_infer.engine import Cancelled, ChunkFrames, InferenceEngine
from magi_infer.live import LivePrompts
from magi_infer.request import Request

logger = logging.getLogger(__name__)

__all__ = ["MagiPipeline", "VideoOutput", "ChunkOutput", "LivePrompts", "Cancelled"]

OUTPUT_TYPES = ("np", "pt", "latent")


@dataclass
class VideoOutput:
    frames: Any  # np.uint8 (T, H, W, 3); torch.uint8 for output_type="pt"; None for "latent" or a non-main rank
    latents: Optional[torch.Tensor]  # (1, C, T_lat, h, w) fp32 for output_type="latent"
    prompts: List[str]  # the prompt of each generated chunk (after live updates)
    seed: Optional[int]
    seconds: float
    output: Optional[Path] = None  # the mp4 written, if one was asked for
    chunk_seconds: List[float] = field(default_factory=list)  # from the start to each chunk being ready


@dataclass
class ChunkOutput:
    index: int  # generated chunk, 0-based in output order
    frames: np.ndarray  # uint8 (t, H, W, 3): this chunk's new output frames
    latent: torch.Tensor  # (1, C, chunk_width, h, w) fp32
    prompt: str
    num_chunks: int
    seconds: float  # since the request started


class MagiPipeline:
    def __init__(self, config: GenerateConfig, parallel=None, engine: Optional[InferenceEngine] = None):
        self.config = config
        self.parallel = parallel
        self.engine = engine if engine is not None else InferenceEngine(config, parallel=parallel)
        self.is_main = self.engine.is_main
        self.device = self.engine.device
        self._sync_lora()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], *, model: Optional[str] = None, device: Optional[str] = None,
                        dtype: Optional[str] = None, parallel=None, config: Union[str, Path, None] = None,
                        t5_dir: Union[str, Path, None] = None, vae_dir: Union[str, Path, None] = None,
                        overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
                        lora: Any = None) -> "MagiPipeline":
        """`path`: a released model directory or one of our checkpoints. `model`: a preset name (conf/model),
        default inferred. `config`: a released config.json (default: one inside `path`). `t5_dir` / `vae_dir`:
        the text encoder and VAE (default: the released Hugging Face layout's `../../t5`, `../../vae` if there).
        `overrides`: further generate keys (Hydra syntax), applied last. `lora`: LoRA adapters applied unmerged,
        an adapter directory or a list of them, each a path or {"path": ..., "scale": ...} (the `lora` key)."""
        cfg = resolve_config(path, model=model, device=device, dtype=dtype, config=config, t5_dir=t5_dir,
                             vae_dir=vae_dir, overrides=overrides)
        if lora is not None:
            import dataclasses

            from magi_infer.config import lora_entries, validate_generate

            cfg = validate_generate(dataclasses.replace(cfg, lora=lora_entries(lora)))
        pipe = cls(cfg, parallel=parallel)
        if pipe.is_main:
            logger.info("loaded %s (model=%s) on %s", pipe.engine.source, cfg.model.name, pipe.device)
        return pipe

    # ------------------------------------------------------------------ LoRA adapters
    @property
    def loras(self) -> Dict[str, Dict[str, Any]]:
        """The adapters applied now: name -> {name, path, scale, sha256}."""
        return {name: dict(entry) for name, entry in self.engine.adapters.items()}

    def load_lora(self, path: Union[str, Path], scale: float = 1.0, name: Optional[str] = None) -> str:
        """Apply the adapter directory `path` (unmerged) with multiplier `scale`; returns its name (default: the
        directory's name). Under torchrun every rank calls it."""
        name = self.engine.load_lora(path, scale, name)
        self._sync_lora()
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded adapter's multiplier (0 switches it off without unloading it)."""
        self.engine.set_lora_scale(name, scale)
        self._sync_lora()

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)
        self._sync_lora()

    def _sync_lora(self) -> None:
        import dataclasses

        # The config the sidecars record says which adapters made a video (paths, scales, sha256 of each).
        self.config = dataclasses.replace(self.config, lora=list(self.engine.cfg.lora))

    # ------------------------------------------------------------------ facts
    @property
    def chunk_frames(self) -> int:
        """Output frames per chunk (24 for the released models)."""
        return self.config.model.chunk_width * TEMPORAL

    def num_chunks(self, num_frames: int, mode: str = "t2v") -> int:
        """Chunks generated for `num_frames` output frames (t2v / i2v; v2v adds the prefix's partial chunk)."""
        import math

        return math.ceil(math.ceil(num_frames / TEMPORAL) / self.config.model.chunk_width)

    # ------------------------------------------------------------------ generation
    def _request(self, prompt, mode, num_frames, image, prefix_video, prefix_frames, prefix_latents, seed, generator,
                 num_steps, output, overwrite, allow_empty_prompt) -> Request:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        c = self.config
        if generator is not None and seed is not None:
            raise ValueError("give seed or generator, not both")
        return Request(prompts, mode, c.num_frames if num_frames is None else num_frames,
                       c.seed if seed is None else seed, image, prefix_video, prefix_frames,
                       output=str(output) if output is not None else "", overwrite=overwrite,
                       allow_empty_prompt=allow_empty_prompt, num_steps=num_steps, generator=generator,
                       prefix_latents=prefix_latents)

    def __call__(self, prompt: Union[str, Sequence[str]], *, mode: str = "t2v", num_frames: Optional[int] = None,
                 image: Any = None, prefix_video: Any = None, prefix_frames: Optional[int] = None,
                 prefix_latents: Optional[torch.Tensor] = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 num_steps: Optional[int] = None, output: Union[str, Path, None] = None, overwrite: bool = False,
                 output_type: str = "np", live: Optional[LivePrompts] = None,
                 callback: Optional[Callable[[int, int], None]] = None, cancel=None,
                 allow_empty_prompt: bool = False) -> VideoOutput:
        """Generate one video. `output`: also write it there (mp4, plus a JSON sidecar `<output>.json`).
        `output_type`: "np" (uint8 numpy), "pt" (uint8 tensor) or "latent" (the clean latents, nothing decoded
        kept). `prefix_latents` (mode="v2v"): the clean latents (1, C, T, h, w) of a video to continue, e.g. an
        earlier call's `output_type="latent"`, instead of encoding `prefix_video`. `live`: a LivePrompts to change the prompt of the chunks to come while generating;
        `callback(step, total)` after every sampler step; `cancel`: a threading.Event (raises Cancelled)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {list(OUTPUT_TYPES)}")
        req = self._request(prompt, mode, num_frames, image, prefix_video, prefix_frames, prefix_latents, seed,
                            generator,
                            num_steps, output, overwrite, allow_empty_prompt)
        start = time.perf_counter()
        if output is not None:
            frames, latents = [], []
            keep = None if output_type == "latent" else frames

            def tap(chunk: ChunkFrames) -> None:  # runs where the engine decodes (maybe its worker thread)
                latents.append(chunk.latent)
                if keep is not None:
                    keep.append(chunk.frames)

            result = self.engine.generate(req, live=live, callback=callback, cancel=cancel, tap=tap)
            out = _video_output(frames, latents, output_type, result.prompts, req, time.perf_counter() - start,
                                result.chunk_seconds, self.is_main)
            out.output = result.output
            if self.is_main:
                from magi_infer.sidecar import write_sidecar

                write_sidecar(result.output, req, self.config, result, self.engine.source)
            return out
        frames, latents, prompts, times = [], [], [], []
        for chunk in self.engine.chunks(req, live=live, callback=callback, cancel=cancel):
            latents.append(chunk.latent)
            prompts.append(chunk.prompt)
            times.append(chunk.seconds)
            if output_type != "latent":
                frames.append(chunk.frames)
        return _video_output(frames, latents, output_type, prompts, req, time.perf_counter() - start, times,
                             self.is_main)

    def stream(self, prompt: Union[str, Sequence[str]], *, mode: str = "t2v", num_frames: Optional[int] = None,
               image: Any = None, prefix_video: Any = None, prefix_frames: Optional[int] = None,
               prefix_latents: Optional[torch.Tensor] = None,
               seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
               num_steps: Optional[int] = None, output: Union[str, Path, None] = None, overwrite: bool = False,
               live: Optional[LivePrompts] = None, callback: Optional[Callable[[int, int], None]] = None,
               cancel=None, allow_empty_prompt: bool = False) -> Iterator[ChunkOutput]:
        """Yield each generated chunk as soon as it is clean. `output`: the mp4 is also written as chunks arrive
        (a fragmented mp4, playable while it grows, published under `output` when complete)."""
        req = self._request(prompt, mode, num_frames, image, prefix_video, prefix_frames, prefix_latents, seed,
                            generator,
                            num_steps, output, overwrite, allow_empty_prompt)
        writer = self.engine.open_writer(req) if output is not None and self.is_main else None
        written, prompts, times = 0, [], []
        start = time.perf_counter()
        try:
            for chunk in self.engine.chunks(req, live=live, callback=callback, cancel=cancel):
                if writer is not None and len(chunk.frames):
                    writer.write(chunk.frames)
                written += len(chunk.frames)
                prompts.append(chunk.prompt)
                times.append(chunk.seconds)
                yield ChunkOutput(chunk.index, chunk.frames.numpy(), chunk.latent, chunk.prompt, chunk.num_chunks,
                                  chunk.seconds)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
            from magi_infer.engine import Result
            from magi_infer.sidecar import write_sidecar

            result = Result(writer.path, written, len(prompts), 0, time.perf_counter() - start, times, prompts)
            write_sidecar(writer.path, req, self.config, result, self.engine.source)


def _video_output(frames, latents, output_type, prompts, req, seconds, times, is_main) -> VideoOutput:
    seed = None if req.generator is not None else req.seed
    if not is_main:
        return VideoOutput(None, None, prompts, seed, seconds, chunk_seconds=times)
    if output_type == "latent":
        return VideoOutput(None, torch.cat(latents, dim=2), prompts, seed, seconds, chunk_seconds=times)
    video = torch.cat(frames) if frames else torch.zeros(0, dtype=torch.uint8)
    return VideoOutput(video if output_type == "pt" else video.numpy(), None, prompts, seed, seconds,
                       chunk_seconds=times)


def resolve_config(path, *, model=None, device=None, dtype=None, config=None, t5_dir=None, vae_dir=None,
                   overrides=None) -> GenerateConfig:
    """The validated GenerateConfig `from_pretrained` builds (see there); magi_infer/resolve.py reads `path`."""
    from magi_infer.config import register_generate_config, to_generate_config
    from magi_infer.resolve import released_overrides, user_overrides
    from magi_train.config.compose import compose

    found = released_overrides(Path(path), model=model, config=config, t5_dir=t5_dir, vae_dir=vae_dir)
    mine: Dict[str, Any] = {}
    if device is not None:
        mine["device"] = device
    if dtype is not None:
        mine["dtype"] = dtype
    user = {**mine, **user_overrides(overrides)}
    # Precedence: preset < what the directory says (released config.json, checkpoint) < the caller.
    merged = [f"{k}={v}" for k, v in found.items() if k not in user] + [f"{k}={v}" for k, v in user.items()]
    register_generate_config()
    return to_generate_config(compose("generate", merged))
