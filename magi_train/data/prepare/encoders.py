"""The VAE and the text encoder (T5 or the hash encoder; `magi_train/model/vae`, `magi_train/model/text`), and
`encode_batch`: each clip of a batch through the VAE, then all their caption rows through the text encoder at once,
into the samples of `magi_train/data/shards.py`. The T5 code (transformers) is imported only when it is used."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch

from magi_train.data.prepare.clips import Clip, load_clip
from magi_train.data.prepare.config import Plan, PrepareConfig, parse_text_encoder
from magi_train.data.prepare.inputs import InputItem, caption_rows, sample_key
from magi_train.data.prepare.records import ENCODE_FAILED, UNDECODABLE, Encoded, Result, SkipClip, Skipped
from magi_train.data.shards import Sample, SampleError, encode_sample

# HashTextEncoder pads every row to max_length in float64; encoding a few rows at a time bounds that memory.
_HASH_ROWS_PER_CALL = 16


class CaptionEncoder(Protocol):
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> features float32 (n, L, D) on the CPU, trimmed to the longest row, and valid lengths int64 (n,)."""
        ...


def _trimmed(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = mask.to(torch.int64).sum(dim=1).cpu()
    longest = max(int(lengths.max()), 1) if lengths.numel() else 1
    return features[:, :longest].float().cpu(), lengths


class T5Captions:
    def __init__(self, directory: str, device: torch.device, max_length: int) -> None:
        from magi_train.model.text.t5 import T5TextEncoder

        self.encoder = T5TextEncoder(directory, device=device, max_length=max_length)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _trimmed(*self.encoder.encode(texts))


class HashCaptions:
    def __init__(self, dim: int, max_length: int, bigrams: bool = False) -> None:
        from magi_train.model.text.hash import HashTextEncoder

        self.encoder = HashTextEncoder(dim=dim, max_length=max_length, bigrams=bigrams)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_trimmed(*self.encoder.encode(texts[i : i + _HASH_ROWS_PER_CALL]))
                 for i in range(0, len(texts), _HASH_ROWS_PER_CALL)]
        longest = max(p[0].shape[1] for p in parts)
        features = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[1])) for f, _ in parts])
        return features, torch.cat([lengths for _, lengths in parts])


@dataclass
class Encoders:
    codec: Any  # magi_train.model.vae.VaeCodec
    text: CaptionEncoder


def load_encoders(cfg: PrepareConfig, device: torch.device) -> Encoders:
    from magi_train.model.vae import VaeCodec, ViTVAE

    if cfg.vae_dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.vae_dtype)
    vae = ViTVAE.from_pretrained(cfg.vae, dtype=dtype, device=device)
    codec = VaeCodec(vae, fps=cfg.fps, tile_px=cfg.vae_tile_px, overlap=cfg.vae_overlap)
    kind, arg = parse_text_encoder(cfg.text_encoder)
    text: CaptionEncoder = (T5Captions(arg, device, cfg.text_length) if kind == "t5"
                            else HashCaptions(int(arg), cfg.text_length, bigrams=kind == "hash_bigram"))
    return Encoders(codec, text)


# ---------------------------------------------------------------------------------------------------------------
# Encoding a batch


def encode_batch(items: Sequence[InputItem], encoders: Encoders, plan: Plan) -> list[Result]:
    """Each clip through the VAE, then all their caption rows through the text encoder at once."""
    cfg = plan.config
    results: list[Optional[Result]] = [None] * len(items)
    ready: list[tuple[int, Clip, torch.Tensor, list[str]]] = []
    for i, item in enumerate(items):
        try:
            rows, caption_chunks = caption_rows(item)
            limit = plan.max_frames
            if caption_chunks is not None:  # frames past the last per-chunk caption would be undescribed
                limit = min(limit or math.inf, caption_chunks * cfg.chunk_frames)
            clip = load_clip(item, plan.buckets, cfg.fps, cfg.chunk_frames, limit)
        except SkipClip as e:
            results[i] = Skipped(item.source, e.reason, e.detail)
            continue
        except Exception as e:  # noqa: BLE001 - a bad input is skipped, never a crash
            results[i] = Skipped(item.source, UNDECODABLE, f"{type(e).__name__}: {e}")
            continue
        try:
            latent = encoders.codec.encode_frames(torch.from_numpy(clip.frames))[0].cpu()
        except Exception as e:  # noqa: BLE001
            results[i] = Skipped(item.source, ENCODE_FAILED, f"VAE: {type(e).__name__}: {e}")
            continue
        if len(rows) > 1:
            rows = rows[: len(clip.frames) // cfg.chunk_frames]
        ready.append((i, clip, latent, rows))

    if ready:
        texts = [row for *_, rows in ready for row in rows]
        try:
            features, lengths = encoders.text.encode(texts)
        except Exception as e:  # noqa: BLE001
            for i, *_ in ready:
                results[i] = Skipped(items[i].source, ENCODE_FAILED, f"text encoder: {type(e).__name__}: {e}")
            ready = []
        offset = 0
        for i, clip, latent, rows in ready:
            item, span = items[i], slice(offset, offset + len(rows))
            offset += len(rows)
            frames, height, width = clip.frames.shape[:3]
            meta = {"captions": rows, "fps": float(cfg.fps), "frames": int(frames), "height": int(height),
                    "width": int(width), "duration": 0.0 if item.kind == "image" else frames / cfg.fps,
                    "bucket": str(clip.bucket), "source": item.source, "kind": item.kind}
            key = sample_key(item.source)
            try:
                members = encode_sample(Sample(key, latent, features[span], lengths[span], meta))
            except SampleError as e:
                results[i] = Skipped(item.source, ENCODE_FAILED, str(e))
                continue
            results[i] = Encoded(item.source, key, members)
    return [r for r in results if r is not None]
