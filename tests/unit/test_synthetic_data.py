"""Synthetic moving-blob dataset and the hashed text encoder that embeds its captions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magi_train.config.schema import DataConfig
from magi_train.data.synthetic import PALETTE, SyntheticBlobDataset, collate, colour_signature
from magi_train.model.text.hash import HashTextEncoder, tokenize

CAPTION_CHANNELS = 32
CAPTION_MAX_LENGTH = 40


def make_cfg(**overrides) -> DataConfig:
    base = dict(num_samples=64, chunks_per_sample=2, latent_frames_per_chunk=6, latent_height=8,
                latent_width=8, latent_channels=16, num_blobs=1, caption_length=24, seed=0)
    base.update(overrides)
    return DataConfig(**base)


def make_ds(**overrides) -> SyntheticBlobDataset:
    return SyntheticBlobDataset(make_cfg(**overrides), CAPTION_CHANNELS, CAPTION_MAX_LENGTH)


def assert_samples_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# ---------------------------------------------------------------------------------------------------
# Dataset: determinism, shapes, content


def test_same_index_is_identical_across_calls_and_instances():
    ds = make_ds(num_blobs=2)
    assert_samples_equal(ds[5], ds[5])
    assert_samples_equal(ds[5], make_ds(num_blobs=2)[5])


def test_different_seeds_and_indices_differ():
    ds = make_ds()
    assert not torch.equal(ds[0]["latent"], ds[1]["latent"])
    assert not torch.equal(ds[0]["latent"], make_ds(seed=1)[0]["latent"])
    # Text too must depend on the sample, not just the noise: over a few items captions vary.
    assert len({tuple(ds[i]["text"]) for i in range(8)}) > 1


def test_shapes_dtypes_and_padding():
    cfg = make_cfg(chunks_per_sample=3, latent_frames_per_chunk=4, latent_height=6, latent_width=10,
                   latent_channels=5, caption_length=12)
    ds = SyntheticBlobDataset(cfg, CAPTION_CHANNELS, CAPTION_MAX_LENGTH)
    assert len(ds) == cfg.num_samples
    item = ds[0]
    assert item["latent"].shape == (5, 12, 6, 10) and item["latent"].dtype == torch.float32
    assert item["caption"].shape == (3, CAPTION_MAX_LENGTH, CAPTION_CHANNELS)
    assert item["caption"].dtype == torch.float32
    assert item["caption_mask"].shape == (3, CAPTION_MAX_LENGTH)
    assert item["caption_mask"].dtype == torch.bool
    assert isinstance(item["text"], list) and len(item["text"]) == 3
    assert all(isinstance(t, str) and t for t in item["text"])
    # Rows past caption_length are padding regardless of the caption.
    assert not item["caption_mask"][:, 12:].any()
    assert torch.count_nonzero(item["caption"][:, 12:]) == 0
    # Masked-out rows anywhere are exactly zero.
    assert torch.count_nonzero(item["caption"][~item["caption_mask"]]) == 0


def test_out_of_range_index_raises_index_error():
    ds = make_ds(num_samples=3)
    with pytest.raises(IndexError):
        ds[3]
    assert len(list(ds)) == 3  # old-style iteration stops on IndexError


def test_latent_scale_is_learnable():
    ds = make_ds()
    latents = torch.stack([ds[i]["latent"] for i in range(16)])
    assert torch.isfinite(latents).all()
    assert 0.3 < latents.std().item() < 1.5
    assert latents.abs().mean(dim=(1, 2, 3, 4)).min() > 0.1  # no empty samples


@pytest.mark.parametrize("caption_length", [24, 5])
def test_caption_rows_match_encoded_text(caption_length):
    ds = make_ds(num_blobs=2, caption_length=caption_length)
    encoder = HashTextEncoder(dim=CAPTION_CHANNELS, max_length=caption_length)
    for i in range(4):
        item = ds[i]
        counts = item["caption_mask"].sum(dim=1).tolist()
        assert counts == [min(len(tokenize(t)), caption_length) for t in item["text"]]
        rows, mask = encoder.encode(item["text"])
        assert torch.equal(item["caption"][:, :caption_length], rows)
        assert torch.equal(item["caption_mask"][:, :caption_length], mask)


CLAUSE = re.compile(r"^(an?|the) (\w+) blob (?:moves ([a-z ]+?)|stays still) (in|at|on) the ([a-z ]+)$")


def parse_clause(text: str) -> tuple[str, set[str] | None, set[str]]:
    """-> (colour, direction words or None when still, location words)."""
    match = CLAUSE.match(text)
    assert match, f"unexpected caption: {text!r}"
    direction = None if match.group(3) is None else set(match.group(3).split()) - {"and"}
    return match.group(2), direction, set(match.group(5).split())


def blob_track(latent: torch.Tensor) -> torch.Tensor:
    """(T, 2) centroid (x, y) per frame of the single bright blob: energy above half the frame's peak."""
    energy = latent.double().pow(2).sum(dim=0)  # (T, H, W)
    weight = (energy - 0.5 * energy.amax(dim=(1, 2), keepdim=True)).clamp(min=0)
    ys = torch.arange(latent.shape[2], dtype=torch.float64)[:, None]
    xs = torch.arange(latent.shape[3], dtype=torch.float64)[None, :]
    total = weight.sum(dim=(1, 2))
    return torch.stack([(weight * xs).sum(dim=(1, 2)) / total, (weight * ys).sum(dim=(1, 2)) / total], dim=1)


def test_blob_moves_where_its_caption_says():
    size, frames = 24, 6
    ds = make_ds(latent_height=size, latent_width=size, latent_frames_per_chunk=frames, caption_length=32)
    directions_seen = set()
    for i in range(32):
        item = ds[i]
        track = blob_track(item["latent"])
        for chunk, text in enumerate(item["text"]):
            colour, direction, location = parse_clause(text)
            first, last = chunk * frames, (chunk + 1) * frames - 1
            dx, dy = (track[last] - track[first]).tolist()

            # The caption's colour is the colour drawn: the blob projects positively onto it.
            x, y = track[first].round().long().tolist()
            pixel = item["latent"][:, first, y, x].double()
            assert colour in PALETTE
            assert torch.dot(pixel, torch.from_numpy(colour_signature(colour, 16))) > 0, (i, text)

            if direction is None:
                assert abs(dx) < 0.25 and abs(dy) < 0.25, (i, text, dx, dy)
                directions_seen.add("still")
                continue
            directions_seen.add(" ".join(sorted(direction)))
            # Image axes: x grows to the right, y (row index) grows downwards.
            expected = {"right": (dx, 1), "left": (dx, -1), "down": (dy, 1), "up": (dy, -1)}
            named = [expected[word] for word in direction]
            for delta, sign in named:
                assert delta * sign > 0.5, (i, text, dx, dy)
            if len(named) == 1:  # a pure compass direction: the other axis moves less
                assert abs(dx if "up" in direction or "down" in direction else dy) < abs(named[0][0])

            # The location names the thirds the blob is in at the middle of the chunk (with slack
            # for the centroid being measured on whole pixels).
            cx, cy = track[(first + last) // 2 : (first + last) // 2 + 2].mean(dim=0).tolist()
            third, slack = (size - 1) / 3, 0.75
            if "left" in location:
                assert cx < third + slack, (i, text, cx)
            if "right" in location:
                assert cx > 2 * third - slack, (i, text, cx)
            if "top" in location:
                assert cy < third + slack, (i, text, cy)
            if "bottom" in location:
                assert cy > 2 * third - slack, (i, text, cy)
            if "center" in location:
                assert third - slack < cx < 2 * third + slack and third - slack < cy < 2 * third + slack
    # The check is only meaningful if many directions were actually exercised.
    assert len(directions_seen) >= 7, directions_seen


def test_multiple_blobs_have_distinct_colours():
    ds = make_ds(num_blobs=len(PALETTE), caption_length=CAPTION_MAX_LENGTH)
    text = ds[0]["text"][0]
    colours = [parse_clause(clause)[0] for clause in text.split(", ")]
    assert sorted(colours) == sorted(PALETTE)


def test_collate_stacks_tensors_and_keeps_text_lists():
    ds = make_ds(chunks_per_sample=3)
    samples = [ds[0], ds[1]]
    batch = collate(samples)
    assert batch["latent"].shape == (2, 16, 18, 8, 8)
    assert batch["caption"].shape == (2, 3, CAPTION_MAX_LENGTH, CAPTION_CHANNELS)
    assert batch["caption_mask"].shape == (2, 3, CAPTION_MAX_LENGTH)
    assert torch.equal(batch["latent"][1], samples[1]["latent"])
    assert batch["text"] == [samples[0]["text"], samples[1]["text"]]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert torch.equal(next(iter(loader))["caption"], batch["caption"])
    with pytest.raises(ValueError):
        collate([])


@pytest.mark.parametrize(
    "overrides, caption_max_length, field",
    [
        (
            dict(caption_length=900),
            800,
            r"data\.caption_length \(900\) must be <= model\.caption_max_length \(800\)",
        ),
        (dict(caption_length=0), 800, r"data\.caption_length"),
        (dict(latent_height=3), 40, r"data\.latent_height \(3\)"),
        (dict(latent_width=9), 40, r"data\.latent_width \(9\)"),
        (dict(num_blobs=0), 40, r"data\.num_blobs \(0\)"),
        (dict(num_blobs=len(PALETTE) + 1), 40, r"data\.num_blobs"),
        (dict(chunks_per_sample=0), 40, r"data\.chunks_per_sample \(0\)"),
        (dict(latent_frames_per_chunk=0), 40, r"data\.latent_frames_per_chunk"),
        (dict(num_samples=0), 40, r"data\.num_samples"),
        (dict(latent_channels=0), 40, r"data\.latent_channels"),
    ],
)
def test_invalid_config_names_the_field(overrides, caption_max_length, field):
    with pytest.raises(ValueError, match=field):
        SyntheticBlobDataset(make_cfg(**overrides), CAPTION_CHANNELS, caption_max_length)


# ---------------------------------------------------------------------------------------------------
# Text encoder


def test_tokenize_lowercases_and_splits_on_non_alphanumerics():
    assert tokenize("A Red-blob, moves UP!  (x2)") == ["a", "red", "blob", "moves", "up", "x2"]
    assert tokenize(" ,. ") == []


def test_encoder_shapes_padding_and_mask():
    encoder = HashTextEncoder(dim=16, max_length=6)
    emb, mask = encoder.encode(["red blob", "", "a blue blob moves"])
    assert emb.shape == (3, 6, 16) and emb.dtype == torch.float32
    assert mask.shape == (3, 6) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [2, 0, 4]
    assert torch.count_nonzero(emb[~mask]) == 0
    assert (emb[mask].norm(dim=-1) - 1).abs().max() < 0.3  # unit-ish vectors
    empty_emb, empty_mask = encoder.encode([])
    assert empty_emb.shape == (0, 6, 16) and empty_mask.shape == (0, 6)


def test_encoder_same_word_same_vector_case_and_punctuation_insensitive():
    encoder = HashTextEncoder(dim=16, max_length=8)
    emb, _ = encoder.encode(["red blob moves", "Red, CAT... moves!", "blue blob moves"])
    assert torch.equal(emb[0, 0], emb[1, 0])  # "red" at position 0
    assert torch.equal(emb[0, 2], emb[1, 2])  # "moves" at position 2
    assert not torch.allclose(emb[0, 0], emb[2, 0])  # "red" vs "blue"
    # Different words are nearly orthogonal, so they are easy to tell apart.
    cosine = torch.nn.functional.cosine_similarity(emb[0, 0], emb[2, 0], dim=0)
    assert cosine.abs() < 0.9


def test_encoder_word_order_matters():
    encoder = HashTextEncoder(dim=16, max_length=4)
    (ab, ba), _ = encoder.encode(["red blue", "blue red"])
    assert not torch.equal(ab[0], ba[1])  # "red" at position 0 vs 1: the position code differs
    # ...and the difference is the same position code for every word.
    (rr, bb), _ = encoder.encode(["red red", "blue blue"])
    assert torch.allclose(rr[0] - rr[1], bb[0] - bb[1], atol=1e-6)


def test_encoder_truncates_long_texts():
    encoder = HashTextEncoder(dim=8, max_length=4)
    long_emb, long_mask = encoder.encode(["one two three four five six seven"])
    short_emb, short_mask = encoder.encode(["one two three four"])
    assert long_mask.all()
    assert torch.equal(long_emb, short_emb)


def test_bigram_encoder_tells_a_heading_from_a_place():
    # "left" is the heading in the first caption and the place in the second: the unigram rows differ only by
    # the faint position code; the bigram rows carry the word before it ("moves left" vs "the left").
    texts = ["a red circle moves left on the right", "a red circle moves right on the left"]
    plain, _ = HashTextEncoder(dim=64, max_length=8).encode(texts)
    pairs, mask = HashTextEncoder(dim=64, max_length=8, bigrams=True).encode(texts)
    assert mask.sum(1).tolist() == [8, 8]
    cosine = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    # Heading "left" (row 4 of text 0) vs place "left" (row 7 of text 1):
    assert cosine(plain[0, 4], plain[1, 7]) > 0.95
    assert cosine(pairs[0, 4], pairs[1, 7]) < 0.7
    # ...and the word itself still shows: the two "left" rows are closer than "left" and "right" rows.
    assert cosine(pairs[0, 4], pairs[1, 7]) > cosine(pairs[0, 4], pairs[1, 4]) + 0.3
    assert (pairs[mask].norm(dim=-1) - 1).abs().max() < 0.3  # unit-ish, as the unigram rows
    # The first word's pair is with the start of the text; the default encoder is the unigram one.
    assert not torch.equal(pairs[0, 0], plain[0, 0])
    assert torch.equal(HashTextEncoder(dim=64, max_length=8, bigrams=False).encode(texts)[0], plain)


def test_encoder_seed_changes_vectors():
    a, _ = HashTextEncoder(dim=8, max_length=2, seed=0).encode(["red"])
    b, _ = HashTextEncoder(dim=8, max_length=2, seed=1).encode(["red"])
    assert not torch.allclose(a, b)


def _fingerprint() -> str:
    """sha256 over an encoder output and a dataset item; run here and in a fresh interpreter."""
    import hashlib

    emb, mask = HashTextEncoder(dim=16, max_length=8, seed=3).encode(["a red blob moves left", "Blue!"])
    item = SyntheticBlobDataset(DataConfig(num_blobs=2, seed=7), 16, 40)[11]
    digest = hashlib.sha256()
    for tensor in (emb, mask, item["latent"], item["caption"], item["caption_mask"]):
        digest.update(tensor.numpy().tobytes())
    digest.update("|".join(item["text"]).encode())
    return digest.hexdigest()


def test_outputs_are_bit_identical_across_processes():
    # A different PYTHONHASHSEED in the child catches any use of Python's salted hash() for seeding.
    child_hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    here = str(Path(__file__).resolve().parent)
    script = (
        f"import sys; sys.path.insert(0, {here!r}); "
        "from test_synthetic_data import _fingerprint; print(_fingerprint())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONHASHSEED": child_hash_seed},
        capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() == _fingerprint()
