"""What a decoded video of the synthetic shapes shows, read off analytically: per chunk, the shape's colour and
the compass direction of its motion (or that it stays still).

The videos are those of `magi_train/data/synthetic_video.py` (or a model's imitation of them): a shape painted
in one of the palette colours `COLOUR_RGB` over a dark or grey background, plain or a linear gradient. Per frame:

1. **Background.** A smooth surface per RGB channel (quadratic in x and y, so plain colours and both gradient
   directions fit exactly, and a VAE's gentle shading nearly), fitted by least squares and refitted on the
   pixels it explains (a shape covers at most about an eighth of the frame, so it is trimmed away).
2. **Colour segmentation.** A blurred edge (VAE, x264) is a mixture `a * colour + (1 - a) * background`, so
   each pixel is unmixed against every palette colour: `a` by least squares along the line from the
   background to the colour, and the colour whose line passes closest wins. A dark blend of orange is then
   orange, not red, as a nearest-RGB rule would call it. Pixels at least half shape (`a` >= 0.5) and close to
   the line are the shape; the rest is background.

Per chunk, the dominant colour is the one with the most shape pixels over the chunk's frames, and its
per-frame centroid is fitted by a straight line in time: the slope is the velocity, quantised like the
captions (the nearest of the eight 45 degree compass directions of `DIRECTIONS`, or still below a speed that
is a third of the slowest the data moves). Numpy only: it scores any generator's frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from magi_train.data.synthetic import DIRECTIONS, PALETTE
from magi_train.data.synthetic_video import COLOUR_RGB

STILL = "still"  # a chunk whose shape does not move (the captions' "stays still")

_PALETTE_RGB = np.array([COLOUR_RGB[c] for c in PALETTE], np.float64)  # (K, 3)
_UNIT = np.array([(dx, dy) for _, dx, dy in DIRECTIONS], np.float64)
_UNIT /= np.linalg.norm(_UNIT, axis=1, keepdims=True)  # (8, 2) compass unit vectors, x right, y down


@dataclass(frozen=True)
class DetectorConfig:
    # Travel per second (fraction of min(H, W)) below which the shape "stays still": synthetic_video moves a
    # shape 0.15-0.35 of min(H, W) per second, so a third of the slowest leaves room for centroid jitter.
    still_speed: float = 0.05
    min_alpha: float = 0.5  # a pixel is shape when it is at least this much shape colour in the unmixing
    # RGB distance from the background-to-colour line beyond which a pixel is neither (VAE colour errors are
    # far smaller; noise and other colours far larger).
    max_residual: float = 60.0
    # Frames at the start of each chunk left out of the track: a generator's change of direction takes a few
    # frames to show (the VAE decodes 4 frames per latent frame), the caption speaks of the whole second.
    skip_frames: int = 3
    min_pixels: int = 4  # a frame with fewer shape pixels gives no centroid
    # Every `frame_step`-th frame is analysed: a dozen points per second fit a line as well as 24 do, at half
    # the cost (the unmixing is the detector's whole cost).
    frame_step: int = 2


@dataclass(frozen=True)
class ChunkDetection:
    colour: Optional[str]  # the dominant palette colour; None when no frame shows a shape
    direction: Optional[str]  # a DIRECTIONS phrase or STILL; None when the track has fewer than 2 points
    speed: float  # centroid speed, fraction of min(H, W) per second
    coverage: float  # mean fraction of a frame that is the dominant colour


def fit_background(frame: np.ndarray, design: Optional[np.ndarray] = None, iterations: int = 4) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) float64: the smooth background under whatever is painted on it.
    `design`: `background_design(H, W)`, to build once per video."""
    height, width, _ = frame.shape
    grid = background_design(height, width) if design is None else design
    # A thousand or two pixels decide six coefficients per channel as well as all of them would.
    stride = max(1, min(height, width) // 40)
    sample = grid[::stride, ::stride].reshape(-1, 6)
    pixels = frame[::stride, ::stride].reshape(-1, 3).astype(np.float64)
    inliers = np.ones(len(pixels), bool)
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(sample[inliers], pixels[inliers], rcond=None)
        residual = np.linalg.norm(pixels - sample @ coef, axis=1)
        # Shape pixels sit >= 100 away from any background; 3x the median keeps a noisy background's pixels.
        keep = residual < max(24.0, 3.0 * float(np.median(residual[inliers])))
        if keep.sum() < 6:  # nothing is smooth (noise): the last fit is as good as any
            break
        inliers = keep
    return (grid.reshape(-1, 6) @ coef).reshape(height, width, 3)


def background_design(height: int, width: int) -> np.ndarray:
    """(H, W, 6): 1, x, y, x^2, xy, y^2 with x, y in [-1, 1] (well conditioned at any size)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    x = 2.0 * x / max(width - 1, 1) - 1.0
    y = 2.0 * y / max(height - 1, 1) - 1.0
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)


def label_pixels(frame: np.ndarray, background: np.ndarray, config: DetectorConfig = DetectorConfig()
                 ) -> np.ndarray:
    """(H, W) int: the PALETTE index of each shape pixel, -1 for background (see the module docstring)."""
    offset = frame.astype(np.float64) - background  # (H, W, 3)
    # Only pixels far enough from the background can be half a colour: alpha <= |p - b| / |c - b|, and |c - b|
    # is at least the distance from c to the box spanned by the background's colours. On a clip this skips
    # ~90% of the pixels (the unmixing below is the detector's whole cost).
    low, high = background.reshape(-1, 3).min(0), background.reshape(-1, 3).max(0)
    nearest = float(np.linalg.norm(_PALETTE_RGB - np.clip(_PALETTE_RGB, low, high), axis=1).min())
    candidates = np.linalg.norm(offset, axis=-1) >= config.min_alpha * nearest
    labels = np.full(frame.shape[:2], -1, np.int64)
    p = offset[candidates][:, None, :]  # (N, 1, 3)
    d = _PALETTE_RGB - background[candidates][:, None, :]  # (N, K, 3): background -> each colour
    length2 = np.maximum((d * d).sum(-1), 1.0)
    alpha = np.clip((p * d).sum(-1) / length2, 0.0, 1.0)  # (N, K)
    residual = np.linalg.norm(p - alpha[..., None] * d, axis=-1)
    best = residual.argmin(-1)
    rows = np.arange(len(best))
    shape = (alpha[rows, best] >= config.min_alpha) & (residual[rows, best] <= config.max_residual)
    labels[candidates] = np.where(shape, best, -1)
    return labels


def quantise(velocity_x: float, velocity_y: float) -> str:
    """The compass phrase nearest a velocity (x right, y down), as the captions quantise headings."""
    return DIRECTIONS[int(np.argmax(_UNIT @ np.array([velocity_x, velocity_y])))][0]


def detect_chunks(frames: np.ndarray, chunk_frames: int, fps: Optional[int] = None,
                  config: DetectorConfig = DetectorConfig()) -> List[ChunkDetection]:
    """(T, H, W, 3) uint8 -> one ChunkDetection per `chunk_frames` frames (the last chunk possibly partial).
    `fps`: frames per second for the speed (default `chunk_frames`: a chunk is a second, as the captions)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames ({chunk_frames}) must be >= 1")
    total, height, width, _ = frames.shape
    fps = chunk_frames if fps is None else fps
    if config.frame_step < 1:
        raise ValueError(f"frame_step ({config.frame_step}) must be >= 1")
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    design = background_design(height, width)
    out = []
    for start in range(0, total, chunk_frames):
        length = min(chunk_frames, total - start)
        # The track leaves out the chunk's first frames, unless that would leave fewer than 2.
        skip = min(config.skip_frames, max(length - 2, 0))
        times = list(range(skip, length, config.frame_step))
        if len(times) < 2:
            times = list(range(length))
        chunk = [label_pixels(frames[start + t], fit_background(frames[start + t], design), config) for t in times]
        counts = np.bincount(np.concatenate([c[c >= 0] for c in chunk]), minlength=len(PALETTE))
        if counts.sum() == 0:
            out.append(ChunkDetection(None, None, 0.0, 0.0))
            continue
        colour = int(counts.argmax())
        track, xs, ys = [], [], []
        for t, frame_labels in zip(times, chunk):
            mask = frame_labels == colour
            if mask.sum() >= config.min_pixels:
                track.append(t)
                xs.append(float(x[mask].mean()))
                ys.append(float(y[mask].mean()))
        coverage = float(counts[colour]) / (len(chunk) * height * width)
        if len(track) < 2:
            out.append(ChunkDetection(PALETTE[colour], None, 0.0, coverage))
            continue
        vx = float(np.polyfit(track, xs, 1)[0])  # pixels per frame
        vy = float(np.polyfit(track, ys, 1)[0])
        speed = math.hypot(vx, vy) * fps / min(height, width)
        direction = STILL if speed < config.still_speed else quantise(vx, vy)
        out.append(ChunkDetection(PALETTE[colour], direction, speed, coverage))
    return out
