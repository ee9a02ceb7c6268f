"""Packing: First-Fit-Decreasing, the online packer's utilisation, and how samples become packable items."""

from __future__ import annotations

import random
from typing import List, Tuple

import pytest
import torch

from magi_train.data.packing import (
    OnlinePacker,
    PackingGeometry,
    SampleRejected,
    first_fit_decreasing,
    fit_sample,
)
from magi_train.data.shards import Sample

# --- First-Fit-Decreasing ------------------------------------------------------------------------------


def test_ffd_by_hand():
    # Longest first, each into the first bin with room: 5, 4 -> bin 0 (9); 3, 3, 2, 2 -> bin 1 (10); 1 -> bin 0.
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10) == [[0, 1, 6], [2, 3, 4, 5]]
    # Two rows per bin at most: pairs in decreasing order.
    assert first_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 10, max_rows=2) == [[0, 1], [2, 3], [4, 5], [6]]
    # Rows weigh per item: the 3-row item cannot join the 5-token one under max_rows 4.
    assert first_fit_decreasing([5, 3, 2], 10, rows=[2, 3, 1], max_rows=4) == [[0, 2], [1]]


def test_ffd_respects_both_limits_and_keeps_every_item_once():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 80)
        capacity, max_rows = rng.randint(20, 200), rng.randint(1, 10)
        lengths = [rng.randint(1, capacity) for _ in range(n)]
        rows = [rng.randint(1, max_rows) for _ in range(n)]
        bins = first_fit_decreasing(lengths, capacity, rows, max_rows)
        assert sorted(i for b in bins for i in b) == list(range(n))
        for b in bins:
            assert sum(lengths[i] for i in b) <= capacity
            assert sum(rows[i] for i in b) <= max_rows


def test_ffd_rejects_an_item_that_fits_no_bin():
    with pytest.raises(ValueError, match="item 1 .11 tokens"):
        first_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="item 0 .3 tokens, 5 rows"):
        first_fit_decreasing([3], 10, rows=[5], max_rows=4)


# --- the online packer ---------------------------------------------------------------------------------

SEQ_LENGTH = 131072  # 128k tokens per packed sequence
CHUNK_FRAMES = 6  # latent frames per chunk (MAGI-1)
# Tokens per latent frame at patch 2 of an 8x-downsampled VAE latent: 256x256, 480x832 and 720x1280 pixels.
FRAME_TOKENS = (16 * 16, 30 * 52, 45 * 80)


def realistic_mix(n: int, seed: int = 0) -> List[Tuple[int, int]]:
    """(tokens, rows) of n samples: 30% images (one 1-frame chunk), 70% videos of 1..16 chunks, each
    resolution equally likely; a video longer than SEQ_LENGTH keeps the leading chunks that fit (as the
    loader does)."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        frame = rng.choice(FRAME_TOKENS)
        if rng.random() < 0.3:
            items.append((frame, 1))
        else:
            chunk = CHUNK_FRAMES * frame
            chunks = min(rng.randint(1, 16), SEQ_LENGTH // chunk)
            items.append((chunks * chunk, chunks))
    return items


def test_online_packer_reaches_99_percent_on_a_realistic_mix():
    items = realistic_mix(3000)
    packer: OnlinePacker[int] = OnlinePacker(SEQ_LENGTH, max_rows=64, pool_size=64)
    bins: List[List[int]] = []
    for i, (tokens, rows) in enumerate(items):
        bins += packer.add(tokens, rows, i)
    bins += packer.flush()
    assert len(packer) == 0
    assert sorted(i for b in bins for i in b) == list(range(len(items)))
    for b in bins:
        assert sum(items[i][0] for i in b) <= SEQ_LENGTH
        assert sum(items[i][1] for i in b) <= 64
    utilisation = sum(tokens for tokens, _ in items) / (len(bins) * SEQ_LENGTH)
    assert utilisation == pytest.approx(packer.utilisation)
    assert utilisation >= 0.99, utilisation


def test_online_packer_bounds_pool_and_waiting():
    items = realistic_mix(2000, seed=1)
    pool_size = 32
    packer: OnlinePacker[int] = OnlinePacker(SEQ_LENGTH, max_rows=64, pool_size=pool_size)
    out_at = {}
    for i, (tokens, rows) in enumerate(items):
        for b in packer.add(tokens, rows, i):
            out_at.update({j: i for j in b})
        assert len(packer) < pool_size
    # An item leaves at the first packing after it is max_age (4 x pool_size) arrivals old, and packing
    # happens whenever the pool fills up again: within max_age + pool_size arrivals.
    assert all(out_at[j] - j < 5 * pool_size for j in out_at)
    assert max(out_at[j] - j for j in out_at) > pool_size  # (not vacuous: some items did wait)


def test_online_packer_emits_full_bins_and_keeps_the_rest():
    packer: OnlinePacker[str] = OnlinePacker(capacity=100, max_rows=3, pool_size=3)
    assert packer.add(60, 1, "a") == []
    assert packer.add(39, 1, "b") == []
    # The pool is full: FFD makes [a, b] (99 tokens, full enough) and [c] (50), which waits.
    assert packer.add(50, 1, "c") == [["a", "b"]]
    assert packer.add(50, 1, "d") == []  # two in the pool: no packing yet
    # [c, d] = 100 tokens is emitted, [e] waits.
    assert packer.add(10, 1, "e") == [["c", "d"]]
    assert packer.flush() == [["e"]]
    assert packer.flush() == []
    assert packer.utilisation == pytest.approx((99 + 100 + 10) / 300)


def test_online_packer_full_rows_and_forced_bins():
    # Three rows used is full too, whatever the tokens.
    rows: OnlinePacker[str] = OnlinePacker(capacity=100, max_rows=3, pool_size=3)
    assert rows.add(1, 1, "x") == [] and rows.add(1, 2, "y") == []
    # FFD places z (longest) and then y (two rows): three rows, emitted; x waits.
    assert rows.add(5, 1, "z") == [["y", "z"]]
    # Nothing full, but the pool may not stay at pool_size: the fullest bin goes anyway.
    forced: OnlinePacker[str] = OnlinePacker(capacity=100, max_rows=8, pool_size=2)
    assert forced.add(60, 1, "a") == []
    assert forced.add(50, 1, "b") == [["a"]]
    assert len(forced) == 1


# --- samples as items ---------------------------------------------------------------------------------

GEO = PackingGeometry(seq_length=64, max_rows=8, max_chunks=0, chunk_width=2, patch_size=2, t_patch_size=1,
                      latent_channels=4, caption_channels=8, caption_max_length=16)


def sample(frames: int, height: int = 4, width: int = 4, rows: int = 1, channels: int = 4, dim: int = 8) -> Sample:
    lengths = torch.arange(1, rows + 1)
    return Sample("k", torch.randn(channels, frames, height, width), torch.randn(rows, rows, dim), lengths,
                  {"captions": [f"row {r}" for r in range(rows)]})


def test_fit_counts_tokens_of_videos_and_images():
    video = fit_sample(sample(6, 4, 8), GEO)  # 3 chunks x 2 frames x (2 x 4) tokens
    assert (video.tokens, video.chunks, video.truncated, video.capped) == (48, 3, False, False)
    image = fit_sample(sample(1, 8, 8), GEO)  # one chunk of one frame of 4 x 4 tokens
    assert (image.tokens, image.chunks) == (16, 1)


def test_fit_keeps_the_leading_chunks_that_fit_with_their_captions():
    s = sample(8, 8, 8, rows=4)  # 4 chunks of 2 x 16 = 32 tokens: only 2 fit in 64
    fitted = fit_sample(s, GEO)
    assert (fitted.tokens, fitted.chunks, fitted.truncated) == (64, 2, True)
    assert torch.equal(fitted.sample.latent, s.latent[:, :4])
    assert torch.equal(fitted.sample.caption_lengths, torch.tensor([1, 2]))
    assert torch.equal(fitted.sample.caption, s.caption[:2, :2])  # trimmed to the longest row left
    assert fitted.sample.meta["captions"] == ["row 0", "row 1"]
    one = fit_sample(sample(8, 8, 8, rows=1), GEO)  # a single caption stays as it is
    assert one.chunks == 2 and torch.equal(one.sample.caption_lengths, torch.tensor([1]))


def test_fit_caps_chunks_and_rows():
    capped = fit_sample(sample(8, rows=4), PackingGeometry(**{**GEO.__dict__, "max_chunks": 3}))
    assert (capped.chunks, capped.capped, capped.truncated) == (3, True, False)
    rows = fit_sample(sample(8), PackingGeometry(**{**GEO.__dict__, "max_rows": 2}))
    assert (rows.chunks, rows.truncated) == (2, True)


@pytest.mark.parametrize("bad, reason, message", [
    (sample(3), "bad_shape", "3 frames, not a multiple of model.chunk_width (2)"),
    (sample(4, rows=3), "bad_shape", "3 caption rows for 2 chunks"),
    (sample(2, channels=3), "bad_shape", "3 channels, data.latent_channels is 4"),
    (sample(2, height=5), "bad_shape", "not divisible by model.patch_size"),
    (sample(2, dim=5), "bad_shape", "model.caption_channels is 8"),
    (sample(2, 16, 16), "too_long", "one chunk is 128 tokens, more than data.seq_length (64)"),
])
def test_fit_rejects_with_a_reason(bad, reason, message):
    with pytest.raises(SampleRejected, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        fit_sample(bad, GEO)
    assert info.value.reason == reason
