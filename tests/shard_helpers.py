"""Tiny training-sample shards for loader tests (format: magi_train/data/shards.py)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import webdataset

from magi_train.data.shards import Sample, encode_sample

CHANNELS = 4  # latent channels of the test shards
CAPTION_DIM = 8  # text-feature width of the test shards


def make_sample(key: str, frames: int, height: int = 4, width: int = 4, caption_rows: int = 1,
                bucket: str = "32x32", seed: int = 0) -> Sample:
    """A sample with a (CHANNELS, frames, height, width) latent and `caption_rows` caption rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (caption_rows,), generator=g)
    caption = torch.randn(caption_rows, int(lengths.max()), CAPTION_DIM, generator=g)
    meta = {"captions": [f"{key} row {r}" for r in range(caption_rows)], "bucket": bucket,
            "kind": "image" if frames == 1 else "video"}
    return Sample(key, torch.randn(CHANNELS, frames, height, width, generator=g), caption, lengths, meta)


def write_shard(path: Path, members: List[Dict[str, object]]) -> None:
    """Write webdataset dicts (`encode_sample` output, possibly tampered with) into one tar."""
    with webdataset.TarWriter(str(path)) as sink:
        for member in members:
            sink.write(member)


def write_dataset(root: Path, shards: int, per_shard: int, chunk_width: int, seed: int = 0,
                  tamper: Optional[Callable[[str, Dict[str, object]], Optional[Dict[str, object]]]] = None,
                  ) -> Dict[str, Sample]:
    """`shards` tars of `per_shard` samples of varied length and size; returns every written sample by key.

    Samples: images (1 frame) and videos of 1-4 chunks, latents of 4x4 or 4x8 or 8x8, one caption or one
    per chunk. `tamper(key, members)` may return changed members (or None to drop the sample entirely).
    """
    rng = random.Random(seed)
    written: Dict[str, Sample] = {}
    root.mkdir(parents=True, exist_ok=True)
    for j in range(shards):
        members = []
        for i in range(per_shard):
            key = f"s{j:03d}_{i:03d}"
            chunks = rng.choice([0, 1, 1, 2, 3, 4])  # 0 = an image
            frames = 1 if chunks == 0 else chunks * chunk_width
            height, width = rng.choice([(4, 4), (4, 8), (8, 8)])
            rows = 1 if chunks <= 1 or rng.random() < 0.5 else chunks
            sample = make_sample(key, frames, height, width, rows, bucket=f"{height * 8}x{width * 8}",
                                 seed=seed * 100003 + j * 1009 + i)
            member = encode_sample(sample)
            if tamper is not None:
                member = tamper(key, member)
                if member is None:
                    continue
            members.append(member)
            written[key] = sample
        write_shard(root / f"train-{j:06d}.tar", members)
    return written
