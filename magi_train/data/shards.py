"""The training-sample format: one webdataset sample per clip or image (data/README.md documents it).

A sample in a tar shard is a group of members sharing the key `<key>`:

    <key>.latent.npy   float16 (C, T, H, W)  VAE latent as the DiT consumes it (posterior mean x scale factor,
                                             `VaeCodec.encode_frames`); an image is a one-frame video (T = 1)
    <key>.t5.npy       float16 (R, L, D)     text-encoder features of R caption rows, trimmed to the longest
                                             valid row (L); R = 1 (one caption) or one row per latent chunk
    <key>.t5len.npy    int32   (R,)          valid tokens of each row (the mask is arange(L) < len)
    <key>.json         {"captions": [R strings], "fps": float, "frames": int (pixel frames encoded),
                        "height": int, "width": int (pixels after resize/crop), "duration": float (s),
                        "bucket": "HxW", "source": str, "kind": "video" | "image"}

`encode_sample` / `decode_sample` convert between a `Sample` and the member bytes; a member that is missing or
does not parse raises `SampleError` naming the key and the member, which the loader counts and skips.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import torch

MEMBERS = ("latent.npy", "t5.npy", "t5len.npy", "json")
KINDS = ("video", "image")


class SampleError(ValueError):
    """A sample that cannot be used; the message names the sample key and the member."""


@dataclass
class Sample:
    key: str
    latent: torch.Tensor  # float32 (C, T, H, W)
    caption: torch.Tensor  # float32 (R, L, D)
    caption_lengths: torch.Tensor  # int64 (R,)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def latent_frames(self) -> int:
        return int(self.latent.shape[1])

    def caption_mask(self) -> torch.Tensor:
        """(R, L) bool."""
        return torch.arange(self.caption.shape[1])[None] < self.caption_lengths[:, None]


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(raw: bytes, key: str, member: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad sample
        raise SampleError(f"sample {key!r}: member {member} is not a valid .npy ({type(e).__name__}: {e})") from None


def encode_sample(sample: Sample) -> Dict[str, Any]:
    """The webdataset dict (`__key__` and member bytes) of a sample; checks it first."""
    check_sample(sample)
    lengths = sample.caption_lengths.to(torch.int32).numpy()
    longest = int(lengths.max()) if lengths.size else 0
    latent, caption = sample.latent.to(torch.float16), sample.caption[:, :longest].to(torch.float16)
    # Shards store float16: a finite float32 value beyond +-65504 would be read back as inf.
    for name, half in (("latent", latent), ("t5 text features", caption)):
        if not torch.isfinite(half).all():
            raise SampleError(f"sample {sample.key!r}: {name} overflow float16 (|value| > 65504), the shards' dtype")
    return {
        "__key__": sample.key,
        "latent.npy": _npy_bytes(latent.numpy()),
        "t5.npy": _npy_bytes(caption.numpy()),
        "t5len.npy": _npy_bytes(lengths),
        "json": json.dumps(sample.meta, sort_keys=True).encode("utf-8"),
    }


def decode_sample(raw: Dict[str, Any]) -> Sample:
    """A webdataset dict (member name -> bytes) -> Sample, or SampleError naming what is wrong."""
    key = str(raw.get("__key__", "?"))
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise SampleError(f"sample {key!r}: missing member(s) {', '.join(missing)} (has {sorted(k for k in raw if not k.startswith('__'))})")
    latent = _load_npy(raw["latent.npy"], key, "latent.npy")
    caption = _load_npy(raw["t5.npy"], key, "t5.npy")
    lengths = _load_npy(raw["t5len.npy"], key, "t5len.npy")
    try:
        meta = json.loads(raw["json"])
    except Exception as e:  # noqa: BLE001
        raise SampleError(f"sample {key!r}: member json does not parse ({type(e).__name__}: {e})") from None
    sample = Sample(key, torch.from_numpy(latent.astype(np.float32)), torch.from_numpy(caption.astype(np.float32)),
                    torch.from_numpy(lengths.astype(np.int64)), meta)
    check_sample(sample)
    return sample


def check_sample(sample: Sample) -> None:
    key = sample.key
    if not key or "." in key or "/" in key:
        # webdataset splits member names at the first dot: such a key would silently break the sample.
        raise SampleError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    if sample.latent.ndim != 4 or min(sample.latent.shape) < 1:
        raise SampleError(f"sample {key!r}: latent must be (C, T, H, W), got {tuple(sample.latent.shape)}")
    if not torch.isfinite(sample.latent).all():
        raise SampleError(f"sample {key!r}: latent has non-finite values")
    R = sample.caption.shape[0] if sample.caption.ndim == 3 else -1
    if sample.caption.ndim != 3 or R < 1 or sample.caption_lengths.shape != (R,):
        raise SampleError(f"sample {key!r}: t5 must be (R, L, D) with t5len (R,), got {tuple(sample.caption.shape)} "
                          f"and {tuple(sample.caption_lengths.shape)}")
    # Text features feed every attention layer through cross-attention: one NaN makes the whole step NaN, and
    # the trainer can only skip steps, not name the sample, so they are checked here like the latents.
    if not torch.isfinite(sample.caption).all():
        bad = (~torch.isfinite(sample.caption)).nonzero()[0].tolist()
        raise SampleError(f"sample {key!r}: t5 text features have non-finite values (first at row {bad[0]}, "
                          f"position {bad[1]}, channel {bad[2]})")
    if int(sample.caption_lengths.min()) < 1 or int(sample.caption_lengths.max()) > sample.caption.shape[1]:
        raise SampleError(f"sample {key!r}: t5len {sample.caption_lengths.tolist()} must be in [1, {sample.caption.shape[1]}] "
                          f"(a missing or empty caption)")
    captions: List[str] = sample.meta.get("captions") or []
    if len(captions) != R or not all(isinstance(c, str) and c.strip() for c in captions):
        raise SampleError(f"sample {key!r}: json captions must be {R} non-empty strings, got {captions!r}")
    if sample.meta.get("kind", "video") not in KINDS:
        raise SampleError(f"sample {key!r}: json kind {sample.meta.get('kind')!r} is not one of {KINDS}")
