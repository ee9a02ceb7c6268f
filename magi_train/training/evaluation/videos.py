"""Validation videos during training: sample a few clips with the inference sampler and write them as mp4.

The clips are generated exactly as `magi_infer` generates a t2v video (the staircase sampler with its KV
cache and guidance, caption rows [conditional, null]), from the caption rows the training data carries, so
what is logged is what the checkpoint would produce at inference time, not a training-time approximation.

Under tensor/context parallelism every rank of the model-parallel group calls `sample_validation_videos`
with identical arguments (the noise comes from a CPU generator seeded per video, so it is the same
everywhere) and takes part in every DiT call; only the ranks with `write=True` decode and write files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from magi_train.config.schema import SamplerConfig, VaeConfig
from magi_train.diffusion.sampler import Captions, StaircaseSampler
from magi_train.data.video_io import StreamingMp4Writer

# latent (1, C, chunk_width, H, W) -> frames (F, H', W', 3), uint8 (or float on the uint8 scale 0..255)
Decoder = Callable[[torch.Tensor], Union[torch.Tensor, np.ndarray]]
DECODER_KINDS = ("preview", "vit")


def make_decoder(kind: str, vae_dir: Optional[str], device, *, latent_channels: int = 16, fps: int = 24) -> Decoder:
    """The latent -> frames decoder of the validation videos, built like the inference engine's `_build_vae`.

    kind "preview": the colour projection of the synthetic dataset's toy latent space (no weights);
    kind "vit": the released ViT VAE from `vae_dir` (diffusers-style directory), tiled as in inference with
    temporal tiles of fps // 2 frames and the `VaeConfig` defaults for tile size, overlap and scale factor.
    `latent_channels` is the latent's channel count (model.in_channels, halved for half_channel_vae)."""
    if kind == "preview":
        from magi_train.data.preview import LatentPreviewDecoder

        return LatentPreviewDecoder(latent_channels).decode_latents
    if kind == "vit":
        from magi_train.model.vae import VaeCodec, ViTVAE

        if not vae_dir:
            raise ValueError("trainer.sample_vae_dir is required to decode validation videos with the ViT VAE "
                             "(a diffusers-style directory: config.json + diffusion_pytorch_model.safetensors); "
                             "use the preview decoder for the synthetic dataset")
        device = torch.device(device)
        defaults = VaeConfig()
        # As the engine's dtype "auto": bf16 on CUDA (how the released VAE runs), exact fp32 on CPU.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vae = ViTVAE.from_pretrained(vae_dir, dtype=dtype, device=device)
        codec = VaeCodec(vae, fps=fps, tile_px=defaults.tile_px, overlap=defaults.overlap,
                         scale_factor=defaults.scale_factor)
        return codec.decode_latents
    raise ValueError(f"validation-video decoder (trainer.sample_vae) {kind!r} is not one of {list(DECODER_KINDS)}")


def latent_channels(model) -> int:
    """Channels of the latent the model denoises (the 24B duplicates a 16-channel latent to 32 inputs)."""
    mc = model.cfg
    return mc.in_channels // (2 if mc.half_channel_vae else 1)


def build_captions(caption: torch.Tensor, caption_mask: torch.Tensor, null_caption: torch.Tensor,
                   null_length: int, num_chunks: int) -> Captions:
    """Inference caption rows for one video: row 0 the training caption of each chunk (padded to the null
    caption's length with zero rows / False), row 1 the learned null caption with its first `null_length`
    rows valid (what `drop()` feeds the model for dropped captions in training)."""
    null = null_caption.detach().float()
    length, width = null.shape
    if caption.ndim != 3 or caption_mask.shape != caption.shape[:2]:
        raise ValueError(f"caption must be (num_chunks, L, C) with caption_mask (num_chunks, L), got "
                         f"{tuple(caption.shape)} and {tuple(caption_mask.shape)}")
    rows, L, C = caption.shape
    if rows != num_chunks:
        raise ValueError(f"caption has {rows} chunk rows but {num_chunks} chunks are sampled (one row per chunk)")
    if C != width:
        raise ValueError(f"caption width {C} does not match the model's caption_channels {width}")
    if L > length:
        raise ValueError(f"caption has {L} tokens, more than the model's caption_max_length {length}")
    if not 0 < null_length <= length:
        raise ValueError(f"null_caption_length must be in 1..{length}, got {null_length}")
    cond = torch.zeros(num_chunks, length, width, device=null.device)
    cond[:, :L] = caption.detach().to(null.device, torch.float32)
    cond_mask = torch.zeros(num_chunks, length, dtype=torch.bool, device=null.device)
    cond_mask[:, :L] = caption_mask.to(null.device).bool()
    null_mask = (torch.arange(length, device=null.device) < null_length).expand(num_chunks, length)
    y = torch.stack([cond, null.expand(num_chunks, length, width)])
    return Captions(y, torch.stack([cond_mask, null_mask]))


def to_uint8_frames(frames) -> torch.Tensor:
    """Decoder output -> CPU uint8 (F, H, W, 3). Floating frames are on the uint8 scale (0..255): rounded and
    clamped, so a decoder may skip its own cast."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"decode must return a tensor or numpy array of frames, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"decode must return frames of shape (F, H, W, 3), got {tuple(frames.shape)}")
    frames = frames.detach().cpu()
    if frames.dtype == torch.uint8:
        return frames
    if not frames.is_floating_point():
        raise ValueError(f"decode must return uint8 or floating frames, got {frames.dtype}")
    return frames.float().round().clamp(0, 255).to(torch.uint8)


def video_path(out_dir: Path, step: int, index: int) -> Path:
    return Path(out_dir) / f"step{step:07d}_{index}.mp4"


def sample_validation_videos(model, captions: Sequence[Tuple[torch.Tensor, torch.Tensor]], null_caption: torch.Tensor,
                             *, latent_hw: Union[Tuple[int, int], Sequence[Tuple[int, int]]], num_chunks: int, sampler_cfg: SamplerConfig, seed: int,
                             decode: Decoder, out_dir, step: int, fps: int, write: bool = True) -> List[Path]:
    """Sample one t2v video per (caption, caption_mask) entry and write `out_dir/step{step:07d}_{i}.mp4`.
    `latent_hw` is the latent (H, W) of every video, or a list with one per video (packed training data mixes
    sizes, and each held-out caption is sampled at its own sample's size).

    Video i starts from `torch.randn(1, C, num_chunks * chunk_width, H, W)` drawn from a CPU generator seeded
    with `seed + i`, so the same step and seed give the same clip on every rank and in every run. Each chunk
    is decoded as soon as the sampler emits it (it is final then) and appended to the mp4, which only
    appears under its name once complete. `decode` is called only where `write` is true, so it must be a
    local operation (not a collective). Returns the written paths; [] when `write` is false."""
    if not (getattr(model, "pre_process", False) and getattr(model, "post_process", False)):
        raise ValueError("sample_validation_videos needs the whole DiT (pre_process and post_process); a pipeline "
                         "stage cannot sample on its own")
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    mc = model.cfg
    device = next(model.parameters()).device
    sizes = [tuple(latent_hw)] * len(captions) if isinstance(latent_hw[0], int) else [tuple(hw) for hw in latent_hw]
    if len(sizes) != len(captions):
        raise ValueError(f"latent_hw has {len(sizes)} sizes for {len(captions)} captions")
    C = latent_channels(model)
    null = null_caption.detach().float().to(device)
    rows = [build_captions(caption.to(device), mask.to(device), null, mc.null_caption_length, num_chunks)
            for caption, mask in captions]
    sampler = StaircaseSampler(model, sampler_cfg)
    out_dir = Path(out_dir)
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)

    was_training = model.training
    model.eval()
    paths: List[Path] = []
    try:
        with torch.no_grad():
            for i, caps in enumerate(rows):
                gen = torch.Generator().manual_seed(seed + i)  # CPU stream: the same noise on every device
                H, W = sizes[i]
                noise = torch.randn(1, C, num_chunks * mc.chunk_width, H, W, generator=gen).to(device)
                path = video_path(out_dir, step, i)
                _sample_one(sampler, noise, caps, decode if write else None, path, fps)
                if write:
                    paths.append(path)
    finally:
        model.train(was_training)
    return paths


def _sample_one(sampler: StaircaseSampler, noise: torch.Tensor, captions: Captions, decode: Optional[Decoder],
                path: Path, fps: int) -> None:
    """Run the sampler over one video; with a decoder, stream its chunks into `path`."""
    # The writer needs the frame size, known only after the first decode; the ExitStack closes it (atomic
    # rename) on success and leaves only the `.partial` file if sampling or decoding fails.
    with contextlib.ExitStack() as stack:
        writer = None
        for chunk in sampler.sample(noise, captions):
            if decode is None:
                continue
            frames = to_uint8_frames(decode(chunk.latent))
            if writer is None:
                writer = stack.enter_context(StreamingMp4Writer(path, frames.shape[2], frames.shape[1], fps,
                                                                overwrite=True))
            writer.write(frames)
