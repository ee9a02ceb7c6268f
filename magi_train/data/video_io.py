"""Video input and output for inference: the i2v image, the v2v prefix video, and the streamed mp4.

Everything goes through PyAV (FFmpeg's libraries), so no `ffmpeg` binary is needed. The conventions follow the
released MAGI-1 code (magi_train/model/README.md §4.1 and §11), which shells out to the ffmpeg command line:

* Scaling is a plain resize to exactly width×height (the released "fit" aspect policy: no crop, no padding,
  aspect ratio not preserved) with swscale's bicubic filter, the default of ffmpeg's `scale` filter.
* A prefix video is resampled to the target fps the way ffmpeg's `fps` filter does it (see `read_video`).
* Output is H.264 (libx264) in yuv420p at x264's default quality (crf 23) unless a crf is given.

Frames are uint8 RGB, channels last: (T, H, W, 3).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Iterator

import av
import numpy as np
import torch
from av.video.frame import VideoFrame
from av.video.stream import VideoStream

from magi_train.checkpoint.atomic import fsync_dir

logger = logging.getLogger(__name__)

# swscale's bicubic filter: what ffmpeg's `scale` filter (used by the released code) applies by default.
_INTERPOLATION = "BICUBIC"

# A fragment per frame (frag_every_frame) and an empty moov up front make the file readable while it grows;
# default_base_moof gives self-contained fragments (what MSE players and DASH tools expect).
_MOVFLAGS = "empty_moov+default_base_moof+frag_every_frame"

PathLike = str | os.PathLike[str]


def _as_rate(fps: float | int | Fraction) -> Fraction:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    # 30000/1001 given as 29.97002997... comes back as 30000/1001.
    return Fraction(fps).limit_denominator(1_000_000)


class StreamingMp4Writer:
    """Encode RGB frames to an H.264 mp4 as they arrive.

    The file is a fragmented MP4 written to `<path>.partial`: every frame becomes its own fragment and is flushed
    to disk at once, so the `.partial` file is a live preview that players and `read_video` / `probe_video` can
    open while generation continues. The muxer closes a fragment when the next frame arrives, so the preview
    lacks only the most recent frame; `close()` writes it. `close()` then fsyncs the file and atomically renames
    it to `path`, so `path` only ever holds a complete video. If the run dies, or the `with` block raises, `path`
    is left untouched and the `.partial` file keeps the frames written so far.

    `low_latency` (default) uses x264's `zerolatency` tune: no lookahead, no B-frames and sliced threads, so each
    frame is encoded as soon as it is written. With `low_latency=False` the encoder runs with x264's defaults,
    as in the released code, but buffers dozens of frames (lookahead and frame threads) before emitting
    any, so the preview trails generation by a chunk or more. `crf=None` keeps x264's default quality, crf 23.
    """

    def __init__(
        self,
        path: PathLike,
        width: int,
        height: int,
        fps: float | int | Fraction,
        crf: int | None = None,
        *,
        low_latency: bool = True,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(
                f"StreamingMp4Writer needs a positive even width and height (yuv420p halves the chroma planes), "
                f"got {width}x{height}"
            )
        if crf is not None and not 0 <= crf <= 51:
            raise ValueError(f"crf must lie in [0, 51] (x264's range), got {crf}")
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"output directory does not exist: {self.path.parent}")
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.width, self.height = width, height
        self.fps = _as_rate(fps)
        self._frames_written = 0
        self._closed = False

        options = {}
        if crf is not None:
            options["crf"] = str(crf)
        if low_latency:
            options["tune"] = "zerolatency"
        # The name ends in .partial, so the format is named; flush_packets pushes each fragment out of FFmpeg's
        # I/O buffer as soon as it is complete instead of when 32 KiB have piled up.
        self._container = av.open(
            str(self.partial_path),
            mode="w",
            format="mp4",
            container_options={"movflags": _MOVFLAGS, "flush_packets": "1"},
        )
        try:
            self._stream = self._container.add_stream("libx264", rate=self.fps, options=options)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.time_base = 1 / self.fps
            # Write the header now: the .partial file exists (and is a valid, empty video) from the start.
            self._container.start_encoding()
        except BaseException:
            self._container.close()
            self.partial_path.unlink(missing_ok=True)
            raise

    @property
    def frames_written(self) -> int:
        return self._frames_written

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Encode uint8 RGB frames of shape (T, height, width, 3) now."""
        if self._closed:
            raise RuntimeError(f"write() on a closed StreamingMp4Writer ({self.path})")
        expected = (self.height, self.width, 3)
        if isinstance(frames, torch.Tensor):
            frames = frames.detach().to("cpu").numpy()
        if not isinstance(frames, np.ndarray):
            raise TypeError(f"frames must be a torch.Tensor or numpy array, got {type(frames).__name__}")
        if frames.ndim != 4 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"frames must have shape (T, {self.height}, {self.width}, 3), got {tuple(frames.shape)}")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 of shape (T, {self.height}, {self.width}, 3), got {frames.dtype}")
        for rgb in frames:
            frame = VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            # Convert to yuv420p ourselves so the chroma subsampling uses the same bicubic filter as the ffmpeg
            # command line; the encoder's implicit conversion would use bilinear.
            frame = frame.reformat(format="yuv420p", interpolation=_INTERPOLATION)
            frame.pts = self._frames_written  # in codec time base 1/fps
            self._container.mux(self._stream.encode(frame))
            self._frames_written += 1

    def close(self) -> None:
        """Flush the encoder, finish the file, fsync it and rename `<path>.partial` to `path`."""
        if self._closed:
            return
        self._finish()
        fd = os.open(self.partial_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.partial_path, self.path)
        fsync_dir(self.path.parent)  # makes the rename itself durable

    def abort(self) -> None:
        """Finish the `.partial` file with what was written so far, without publishing it under `path`."""
        if not self._closed:
            self._finish()

    def _finish(self) -> None:
        self._closed = True
        try:
            self._container.mux(self._stream.encode(None))  # frames still inside the encoder
        finally:
            self._container.close()  # writes the last fragment

    def __enter__(self) -> StreamingMp4Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.abort()
        except Exception:  # the original error matters more than a failure to tidy up after it
            logger.exception("could not finish %s after an error", self.partial_path)


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # frames that actually decode
    width: int
    height: int
    fps: float  # the stream's average frame rate
    codec: str  # decoder name, e.g. "h264"
    pix_fmt: str  # pixel format of the decoded frames, e.g. "yuv420p"


def decoded_frames(path: PathLike, what: str) -> Iterator[tuple[VideoFrame, VideoStream]]:
    """Yield (frame, stream) for every decodable frame of the first video stream, with errors naming the file.

    A decoding error after at least one good frame ends the stream with a warning instead of failing: that is
    how a file still being written (a `.partial` preview) or a damaged tail looks, and ffmpeg also keeps what
    decoded. A file with no decodable frame at all is an error.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot open {what} {path}: {e}") from e
    with container:
        if not container.streams.video:
            raise ValueError(f"{what} {path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        count = 0
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.FFmpegError as e:
                if count == 0:
                    raise ValueError(f"cannot decode {what} {path}: {e}") from e
                logger.warning("%s %s: decoding stopped after %d frames: %s", what, path, count, e)
                break
            count += 1
            yield frame, stream
    if count == 0:
        raise ValueError(f"{what} {path} contains no decodable frames")


def _to_rgb(frame: VideoFrame, height: int, width: int) -> np.ndarray:
    return frame.reformat(width=width, height=height, format="rgb24", interpolation=_INTERPOLATION).to_ndarray()


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")


def read_image(path: PathLike, height: int, width: int) -> torch.Tensor:
    """Load an image (any format FFmpeg decodes: png, jpg, webp, ...) as uint8 RGB of shape (1, height, width, 3).

    The image is resized to exactly width×height with bicubic interpolation, without preserving its aspect
    ratio (the released "fit" policy); an alpha channel is dropped.
    """
    _check_size(height, width)
    with contextlib.closing(decoded_frames(path, "image")) as decoded:
        frame, _ = next(decoded)
    return torch.from_numpy(_to_rgb(frame, height, width)).unsqueeze(0)


def read_video(
    path: PathLike, fps: float | int | Fraction, height: int, width: int, max_frames: int | None = None
) -> torch.Tensor:
    """Decode a video, resample it to `fps`, resize it to width×height: uint8 RGB of shape (T, height, width, 3).

    Resampling reproduces ffmpeg's `fps` filter (the released code runs `fps=fps,scale=w:h`): with times taken
    from the first frame, source frame i at time t_i belongs to output slot round(t_i·fps) (halves round up), and
    output frame k is the last source frame whose slot is ≤ k, that is the last one shown before
    (k + ½)/fps. Frames are repeated when the source is slower and dropped when it is faster. The output lasts
    as long as the source (its last frame's end time, rounded to whole output frames); a source shorter than
    half an output frame still gives its first frame. Resizing is bicubic without preserving the aspect ratio.

    `max_frames` keeps only the first frames (the released code keeps 32); None keeps all of them. Decoding
    stops as soon as enough frames are collected.
    """
    _check_size(height, width)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 or None, got {max_frames}")
    rate = _as_rate(fps)
    limit = math.inf if max_frames is None else max_frames

    out: list[np.ndarray] = []
    held: VideoFrame | None = None  # the latest source frame: what the next output slots show
    held_rgb: np.ndarray | None = None  # held, resized; computed once however often it is repeated
    t0 = t_held = end = Fraction(0)  # t_held and end (the held frame's start and end) are relative to t0

    def emit_until(slot: int) -> None:
        nonlocal held_rgb
        while len(out) < min(slot, limit):
            if held_rgb is None:
                assert held is not None  # slots are only emitted once a frame has been decoded
                held_rgb = _to_rgb(held, height, width)
            out.append(held_rgb)

    with contextlib.closing(decoded_frames(path, "video")) as decoded:
        for index, (frame, stream) in enumerate(decoded):
            t, duration = _frame_time(frame, stream, index, path)
            if index == 0:
                t0 = t
            t -= t0
            if held is not None:
                emit_until(_round_half_up(t * rate))
                if len(out) >= limit:
                    break
            # The last frame lasts its stated duration, else as long as the gap before it.
            end = t + (duration if duration > 0 else max(t - t_held, Fraction(0)))
            held, held_rgb, t_held = frame, None, t
        else:
            emit_until(max(_round_half_up(end * rate), 1))
    return torch.from_numpy(np.stack(out))


def _frame_time(frame: VideoFrame, stream: VideoStream, index: int, path: PathLike) -> tuple[Fraction, Fraction]:
    """Presentation time and duration of a frame in seconds; a frame without a timestamp is placed by its index."""
    if frame.pts is not None and frame.time_base is not None:
        return frame.pts * frame.time_base, (frame.duration or 0) * frame.time_base
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise ValueError(f"video {path} has frames without timestamps and no frame rate")
    return Fraction(index) / rate, 1 / Fraction(rate)


def _round_half_up(x: Fraction) -> int:
    # AV_ROUND_NEAR_INF, the fps filter's default rounding; times are never negative here.
    return math.floor(x + Fraction(1, 2))


def probe_video(path: PathLike) -> VideoInfo:
    """Describe a video by decoding all of it: the frame count is what actually decodes, not the header's claim."""
    frames = 0
    first: VideoFrame | None = None
    for frame, stream in decoded_frames(path, "video"):
        if first is None:
            first = frame
        frames += 1
    rate = stream.average_rate or stream.guessed_rate or 0
    return VideoInfo(
        frames=frames,
        width=first.width,
        height=first.height,
        fps=float(rate),
        codec=stream.codec_context.name,
        pix_fmt=first.format.name,
    )
