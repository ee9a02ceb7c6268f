"""Built-in synthetic dataset: coloured blobs moving through latent space, with per-chunk captions.

It lets the trainer run end to end with no files and no VAE / T5: the "video" is drawn directly as
VAE-like latents `(C, T, H, W)`, and the captions are embedded by `HashTextEncoder`. The content is
simple but learnable, and it exercises what matters for MAGI-1-style training: the caption of chunk
`k` describes motion during chunk `k`, so a model must use both the text and the previous chunks.

Every sample is a pure function of `(cfg.seed, index)`, so data-loader workers, ranks and resumed runs
all see identical data without sharing any state.
"""

from __future__ import annotations

import math
import operator
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from magi_train.config.schema import DataConfig
from magi_train.model.text.hash import HashTextEncoder

# Named blob colours. Each name maps to a fixed channel signature (see `colour_signature`), independent
# of the dataset seed, so "red" means the same latent direction in every run.
PALETTE: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")

# Eight compass directions as (caption phrase, unit vector in (x = right, y = down) pixel axes), in
# 45 degree steps; `None` direction is a blob that stays still.
DIRECTIONS: tuple[tuple[str, float, float], ...] = (
    ("right", 1.0, 0.0),
    ("right and down", 1.0, 1.0),
    ("down", 0.0, 1.0),
    ("left and down", -1.0, 1.0),
    ("left", -1.0, 0.0),
    ("left and up", -1.0, -1.0),
    ("up", 0.0, -1.0),
    ("right and up", 1.0, -1.0),
)
STILL_PROBABILITY = 1.0 / 9.0

# The true heading is jittered by less than half the 45 degree sector, so the caption's quantised
# direction is always the nearest compass word (and each named axis really moves).
_MAX_HEADING_JITTER_DEG = 15.0

# Phrase for a location given (vertical third, horizontal third), each 0, 1 or 2.
_LOCATIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left",
    (0, 1): "at the top",
    (0, 2): "in the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "in the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right",
}

# Scales chosen so that the latent's std is about 0.5-1 (see the unit test) for any grid size: the
# blob's radius scales with the grid, so the fraction of pixels it covers does not.
_BLOB_AMPLITUDE = (2.0, 3.0)  # peak value range, times a unit-RMS channel signature
_BLOB_SIGMA_FRACTION = (0.10, 0.16)  # Gaussian sigma as a fraction of min(H, W)
_MAX_SPEED_FRACTION = 0.1  # at most this fraction of min(H, W) per latent frame
_BACKGROUND_AMPLITUDE = 0.3  # static linear ramp, so the background is structured but easy
_NOISE_STD = 0.05
_CAPTION_CACHE_BYTES = 64 << 20  # per dataset: the caption embeddings kept (see SyntheticBlobDataset._encode)


def colour_signature(name: str, channels: int) -> np.ndarray:
    """The fixed channel vector (float64, shape (channels,), unit RMS) of palette colour `name`."""
    rng = np.random.default_rng(zlib.crc32(f"colour:{name}".encode("utf-8")))
    signature = rng.standard_normal(channels)
    return signature / math.sqrt(float(np.mean(signature**2)))


@dataclass(frozen=True)
class Blob:
    """One blob's trajectory: position (x, y) in pixels at latent frame t is start + t * velocity."""

    colour: str
    direction: str | None  # a `DIRECTIONS` phrase, or None when still
    start_x: float
    start_y: float
    velocity_x: float
    velocity_y: float
    sigma: float
    amplitude: float

    def position(self, t: float) -> tuple[float, float]:
        return self.start_x + t * self.velocity_x, self.start_y + t * self.velocity_y


def _location_phrase(x: float, y: float, height: int, width: int) -> str:
    def third(value: float, size: int) -> int:
        return min(int(3.0 * value / (size - 1)), 2) if value > 0 else 0

    return _LOCATIONS[(third(y, height), third(x, width))]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class SyntheticBlobDataset(Dataset):
    """Map-style dataset of moving-blob latents with one caption per chunk.

    Item `i` is a dict:
      latent        float32 (C, T, H, W), T = chunks_per_sample * latent_frames_per_chunk
      caption       float32 (chunks_per_sample, caption_max_length, caption_channels)
      caption_mask  bool    (chunks_per_sample, caption_max_length); only the first
                    cfg.caption_length rows can be True
      text          list[str], one caption per chunk
    """

    def __init__(self, cfg: DataConfig, caption_channels: int, caption_max_length: int) -> None:
        _check(cfg.num_samples >= 1, f"data.num_samples ({cfg.num_samples}) must be >= 1")
        _check(cfg.chunks_per_sample >= 1, f"data.chunks_per_sample ({cfg.chunks_per_sample}) must be >= 1")
        _check(
            cfg.latent_frames_per_chunk >= 1,
            f"data.latent_frames_per_chunk ({cfg.latent_frames_per_chunk}) must be >= 1",
        )
        for name in ("latent_height", "latent_width"):
            value = getattr(cfg, name)
            _check(value >= 4 and value % 2 == 0, f"data.{name} ({value}) must be even and >= 4")
        _check(cfg.latent_channels >= 1, f"data.latent_channels ({cfg.latent_channels}) must be >= 1")
        _check(cfg.num_blobs >= 1, f"data.num_blobs ({cfg.num_blobs}) must be >= 1")
        # Colours are drawn without replacement so that every blob in a caption is unambiguous.
        _check(
            cfg.num_blobs <= len(PALETTE),
            f"data.num_blobs ({cfg.num_blobs}) must be <= {len(PALETTE)} (the number of palette colours)",
        )
        _check(
            cfg.style_colour == "" or cfg.style_colour in PALETTE,
            f"data.style_colour ({cfg.style_colour!r}) must be one of {list(PALETTE)} or \"\" (off)",
        )
        _check(caption_channels >= 1, f"model.caption_channels ({caption_channels}) must be >= 1")
        _check(cfg.caption_length >= 1, f"data.caption_length ({cfg.caption_length}) must be >= 1")
        _check(
            cfg.caption_length <= caption_max_length,
            f"data.caption_length ({cfg.caption_length}) must be <= "
            f"model.caption_max_length ({caption_max_length})",
        )
        self.cfg = cfg
        self.caption_channels = caption_channels
        self.caption_max_length = caption_max_length
        self.num_frames = cfg.chunks_per_sample * cfg.latent_frames_per_chunk
        self.encoder = HashTextEncoder(dim=caption_channels, max_length=cfg.caption_length)
        # Captions come from a small phrase set, so their embeddings (most of a sample's cost, and Python
        # bound: a prefetch thread holding the GIL delays the training step) are kept, up to a byte budget;
        # a kept row is the very tensor `encode` returns for it, so the data are unchanged.
        row_bytes = cfg.caption_length * (caption_channels * 4 + 1)
        self._caption_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._caption_rows_max = _CAPTION_CACHE_BYTES // row_bytes
        self._signatures: dict[str, np.ndarray] = {}  # colour -> colour_signature(colour, channels)

    def __len__(self) -> int:
        return self.cfg.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        # SeedSequence mixes (seed, index) properly: no collisions like seed * N + index would have.
        return np.random.default_rng(np.random.SeedSequence([self.cfg.seed & 0xFFFF_FFFF_FFFF_FFFF, index]))

    def _sample_blob(self, rng: np.random.Generator, colour: str) -> Blob:
        cfg = self.cfg
        height, width = cfg.latent_height, cfg.latent_width
        sigma = max(rng.uniform(*_BLOB_SIGMA_FRACTION) * min(height, width), 0.7)
        # Keep the centre off the border, but leave at least half of each axis to move along.
        margin_x = min(sigma, 0.25 * (width - 1))
        margin_y = min(sigma, 0.25 * (height - 1))
        span_x = (width - 1) - 2.0 * margin_x
        span_y = (height - 1) - 2.0 * margin_y
        steps = max(self.num_frames - 1, 1)

        direction: str | None = None
        vx = vy = 0.0
        if rng.uniform() >= STILL_PROBABILITY:
            direction, dx, dy = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
            heading = math.atan2(dy, dx) + math.radians(rng.uniform(-1.0, 1.0) * _MAX_HEADING_JITTER_DEG)
            ux, uy = math.cos(heading), math.sin(heading)
            # The fastest speed whose whole trajectory still fits inside the margins.
            fit = min(span_x / (steps * abs(ux) + 1e-12), span_y / (steps * abs(uy) + 1e-12))
            speed = rng.uniform(0.5, 1.0) * min(fit, _MAX_SPEED_FRACTION * min(height, width))
            vx, vy = speed * ux, speed * uy

        # Start anywhere that keeps the entire trajectory inside the margins.
        travel_x, travel_y = vx * steps, vy * steps
        start_x = rng.uniform(margin_x + max(0.0, -travel_x), (width - 1) - margin_x - max(0.0, travel_x))
        start_y = rng.uniform(margin_y + max(0.0, -travel_y), (height - 1) - margin_y - max(0.0, travel_y))
        amplitude = rng.uniform(*_BLOB_AMPLITUDE)
        return Blob(colour, direction, start_x, start_y, vx, vy, sigma, amplitude)

    def _draw_latent(self, rng: np.random.Generator, blobs: list[Blob]) -> np.ndarray:
        cfg = self.cfg
        channels, height, width = cfg.latent_channels, cfg.latent_height, cfg.latent_width
        t = np.arange(self.num_frames, dtype=np.float64)[:, None, None]
        y = np.arange(height, dtype=np.float64)[None, :, None]
        x = np.arange(width, dtype=np.float64)[None, None, :]

        # Background: a static linear ramp along a random axis with its own channel mix.
        angle = rng.uniform(0.0, 2.0 * math.pi)
        x_unit, y_unit = 2.0 * x / (width - 1) - 1.0, 2.0 * y / (height - 1) - 1.0  # both in [-1, 1]
        ramp = math.cos(angle) * x_unit + math.sin(angle) * y_unit  # (1, H, W)
        background_mix = rng.standard_normal(channels) * _BACKGROUND_AMPLITUDE
        latent = background_mix[:, None, None, None] * ramp[None] * np.ones((1, self.num_frames, 1, 1))

        for blob in blobs:
            cx, cy = blob.start_x + t * blob.velocity_x, blob.start_y + t * blob.velocity_y
            bump = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * blob.sigma**2))  # (T, H, W)
            drawn = cfg.style_colour or blob.colour  # a one-style dataset paints every blob in its colour
            if drawn not in self._signatures:
                self._signatures[drawn] = colour_signature(drawn, channels)
            signature = self._signatures[drawn] * blob.amplitude
            latent = latent + signature[:, None, None, None] * bump[None]

        latent = latent + rng.standard_normal(latent.shape) * _NOISE_STD
        return latent.astype(np.float32)

    def _captions(self, blobs: list[Blob]) -> list[str]:
        cfg = self.cfg
        texts = []
        for chunk in range(cfg.chunks_per_sample):
            # Describe where each blob is in the middle of the chunk; the direction is constant.
            t_mid = chunk * cfg.latent_frames_per_chunk + (cfg.latent_frames_per_chunk - 1) / 2.0
            clauses = []
            for blob in blobs:
                # Later chunks refer back to the blob introduced in the first one.
                article = ("an" if blob.colour[0] in "aeiou" else "a") if chunk == 0 else "the"
                motion = "stays still" if blob.direction is None else f"moves {blob.direction}"
                where = _location_phrase(*blob.position(t_mid), cfg.latent_height, cfg.latent_width)
                clauses.append(f"{article} {blob.colour} blob {motion} {where}")
            texts.append(", ".join(clauses))
        return texts

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder.encode(texts), each row computed once (encode embeds every row independently)."""
        rows = []
        for text in texts:
            row = self._caption_rows.get(text)
            if row is None:
                embedding, mask = self.encoder.encode([text])
                row = (embedding[0], mask[0])
                if len(self._caption_rows) < self._caption_rows_max:
                    self._caption_rows[text] = row
            rows.append(row)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        rng = self._rng(index)
        colours = [PALETTE[k] for k in rng.permutation(len(PALETTE))[: self.cfg.num_blobs]]
        blobs = [self._sample_blob(rng, colour) for colour in colours]
        latent = self._draw_latent(rng, blobs)
        texts = self._captions(blobs)

        rows, mask_rows = self._encode(texts)  # (chunks, caption_length, ...)
        chunks = self.cfg.chunks_per_sample
        caption = torch.zeros(chunks, self.caption_max_length, self.caption_channels, dtype=torch.float32)
        caption_mask = torch.zeros(chunks, self.caption_max_length, dtype=torch.bool)
        caption[:, : self.cfg.caption_length] = rows
        caption_mask[:, : self.cfg.caption_length] = mask_rows
        return {
            "latent": torch.from_numpy(latent),
            "caption": caption,
            "caption_mask": caption_mask,
            "text": texts,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into a batch: tensors gain a leading batch dim, other values become lists.

    For this dataset: latent (B, C, T, H, W), caption (B, chunks, L, Cc), caption_mask (B, chunks, L),
    text a list (per sample) of lists (per chunk) of strings.
    """
    if not samples:
        raise ValueError("collate() needs at least one sample")
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [sample[key] for sample in samples]
        batch[key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
    return batch
