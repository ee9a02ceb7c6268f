"""One clip's pixels: decode with PyAV, resample to the target fps the way ffmpeg's `fps` filter does
(`FpsResampler`), resize the shorter side and centre-crop to the bucket nearest in aspect ratio (`choose_bucket`,
`resize_crop_geometry`), and keep whole chunks (`load_clip`); an image gives one frame."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import av
import numpy as np

from magi_train.data.prepare.inputs import InputItem
from magi_train.data.prepare.records import TOO_SHORT, UNDECODABLE, PrepareError, SkipClip
from magi_train.data.video_io import decoded_frames

# Landscape, portrait and square buckets at about 720p, all multiples of 16 (VAE 8 x DiT patch 2).
DEFAULT_BUCKETS = ("720x1280", "1280x720", "960x960")
# swscale's bicubic filter, as magi_train/data/video_io.py uses (ffmpeg's `scale` default).
_INTERPOLATION = "BICUBIC"


# ---------------------------------------------------------------------------------------------------------------
# Buckets, resizing, frame-rate resampling


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"


def parse_buckets(specs: Sequence[str], multiple: int) -> list[Bucket]:
    """"720x1280" (HEIGHTxWIDTH) strings -> buckets; each side a positive multiple of `multiple`."""
    buckets = []
    for spec in specs:
        try:
            height, width = (int(v) for v in spec.strip().lower().split("x"))
        except ValueError:
            raise PrepareError(f"bucket {spec!r} is not HEIGHTxWIDTH (e.g. 720x1280)") from None
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise PrepareError(f"bucket {spec!r}: height and width must be positive multiples of {multiple}")
        buckets.append(Bucket(height, width))
    if not buckets:
        raise PrepareError("no buckets given")
    return buckets


def choose_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest in aspect ratio, the distance being |log(aspect / bucket aspect)| (so 2:1 and 1:2 are
    equally far from 1:1, and a crop to either loses the same share of the frame); the first listed wins a tie.

    Compared exactly, as max(r, 1/r) with r the ratio of aspects: common sizes tie exactly (4:3 lies half-way
    between 16:9 and 1:1), and floating-point logs would break such ties by rounding noise."""

    def distance(bucket: Bucket) -> Fraction:
        r = Fraction(width * bucket.height, height * bucket.width)
        return max(r, 1 / r)

    return min(buckets, key=distance)


def resize_crop_geometry(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int, int, int]:
    """(scaled height, scaled width, top, left): scale so the frame just covers out_height x out_width (the side
    that is short relative to the target fits exactly), then crop the centre."""
    scale = max(out_height / height, out_width / width)
    scaled_h = max(out_height, round(height * scale))
    scaled_w = max(out_width, round(width * scale))
    return scaled_h, scaled_w, (scaled_h - out_height) // 2, (scaled_w - out_width) // 2


def resize_crop(frame: av.VideoFrame, bucket: Bucket) -> np.ndarray:
    """A decoded frame -> uint8 RGB (bucket.height, bucket.width, 3)."""
    scaled_h, scaled_w, top, left = resize_crop_geometry(frame.height, frame.width, bucket.height, bucket.width)
    rgb = frame.reformat(width=scaled_w, height=scaled_h, format="rgb24", interpolation=_INTERPOLATION).to_ndarray()
    return rgb[top : top + bucket.height, left : left + bucket.width]


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


class FpsResampler:
    """Which source frames make up a video resampled to `fps`, as ffmpeg's `fps` filter (and
    magi_train.data.video_io.read_video) picks them.

    With times measured from the first frame, source frame i belongs to output slot round(t_i * fps); output frame k
    shows the last source frame whose slot is <= k. Frames are repeated when the source is slower and dropped when
    it is faster; the output lasts as long as the source (the last frame's end, rounded to whole output frames).
    Fed one source frame at a time, it says how many copies of the *previous* frame to output, so a decoder can
    stream through a clip holding one frame; `limit` stops the output early.
    """

    def __init__(self, fps: int | Fraction, limit: Optional[int] = None) -> None:
        self.rate = Fraction(fps)
        self.limit = math.inf if limit is None else limit
        self.emitted = 0
        self._t0: Optional[Fraction] = None
        self._t_held = Fraction(0)
        self._end = Fraction(0)

    @property
    def full(self) -> bool:
        return self.emitted >= self.limit

    def _emit_until(self, slot: int) -> int:
        count = max(0, int(min(slot, self.limit)) - self.emitted)
        self.emitted += count
        return count

    def push(self, t: Fraction, duration: Fraction) -> int:
        """A source frame at time `t` lasting `duration` (0 if unknown): copies of the previous frame to output."""
        if self._t0 is None:
            self._t0 = t
            count = 0
        else:
            count = self._emit_until(_round_half_up((t - self._t0) * self.rate))
        t -= self._t0
        # The last frame lasts its stated duration, else as long as the gap before it.
        self._end = t + (duration if duration > 0 else max(t - self._t_held, Fraction(0)))
        self._t_held = t
        return count

    def finish(self) -> int:
        """Copies of the last pushed frame to output at the end of the stream."""
        if self._t0 is None:
            return 0
        return self._emit_until(max(_round_half_up(self._end * self.rate), 1))


def resample_counts(times: Sequence[float | Fraction], fps: int, durations: Optional[Sequence[float]] = None,
                    limit: Optional[int] = None) -> list[int]:
    """How many output frames each source frame becomes (0 = dropped); a pure helper around `FpsResampler`."""
    resampler = FpsResampler(fps, limit)
    counts = [0] * len(times)
    for i, t in enumerate(times):
        duration = Fraction(durations[i]) if durations is not None else Fraction(0)
        copies = resampler.push(Fraction(t), duration)
        if i:
            counts[i - 1] += copies
    if times:
        counts[-1] += resampler.finish()
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Decoding one clip


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 (T, H, W, 3), T a whole number of chunks (1 for an image)
    bucket: Bucket
    source_size: tuple[int, int]  # (height, width) before resizing
    available: int  # frames the resampled source had (up to the limit): how much was cut


def _frame_time(frame: av.VideoFrame, stream: Any, index: int) -> tuple[Fraction, Fraction]:
    if frame.pts is not None and frame.time_base is not None:
        return frame.pts * frame.time_base, (frame.duration or 0) * frame.time_base
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise SkipClip(UNDECODABLE, "frames without timestamps and no frame rate")
    return Fraction(index) / rate, 1 / Fraction(rate)


def _decoded(path: Path) -> Iterator[tuple[av.VideoFrame, Any]]:
    """(frame, stream) for each decodable frame (`video_io.decoded_frames`: an error after some frames ends
    the clip, a damaged tail); a file that does not open or decode is a skipped clip."""
    try:
        yield from decoded_frames(path, "clip")
    except (ValueError, OSError) as e:
        raise SkipClip(UNDECODABLE, str(e)) from None


def load_clip(item: InputItem, buckets: Sequence[Bucket], fps: int, chunk_frames: int,
              max_frames: Optional[int] = None) -> Clip:
    """Decode, resample, resize/crop and cut to whole chunks; an image gives one frame. Raises SkipClip."""
    decoded = _decoded(item.path)
    try:
        if item.kind == "image":
            frame, _ = next(decoded)
            bucket = choose_bucket(frame.height, frame.width, buckets)
            return Clip(resize_crop(frame, bucket)[None].copy(), bucket, (frame.height, frame.width), 1)

        resampler = FpsResampler(fps, max_frames)
        out: list[np.ndarray] = []
        held: Optional[av.VideoFrame] = None
        held_rgb: Optional[np.ndarray] = None  # resized once however often it is repeated
        bucket: Optional[Bucket] = None
        size = (0, 0)

        def emit(copies: int) -> None:
            nonlocal held_rgb
            if copies and held_rgb is None:
                assert held is not None and bucket is not None
                held_rgb = resize_crop(held, bucket)
            out.extend([held_rgb] * copies)  # type: ignore[list-item]

        for index, (frame, stream) in enumerate(decoded):
            if bucket is None:
                size = (frame.height, frame.width)
                bucket = choose_bucket(frame.height, frame.width, buckets)
            emit(resampler.push(*_frame_time(frame, stream, index)))
            if resampler.full:
                break
            held, held_rgb = frame, None
        else:
            emit(resampler.finish())
    finally:
        decoded.close()

    assert bucket is not None
    kept = len(out) // chunk_frames * chunk_frames
    if kept == 0:
        raise SkipClip(TOO_SHORT, f"{len(out)} frames at {fps} fps ({len(out) / fps:.2f} s), fewer than one "
                                  f"chunk of {chunk_frames} frames")
    return Clip(np.stack(out[:kept]), bucket, size, len(out))
