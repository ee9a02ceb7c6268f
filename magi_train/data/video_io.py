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
import errno
import logging
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator

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

# What os.link raises on a file system that has no hard links (FAT, some FUSE and SMB mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}

PathLike = str | os.PathLike[str]


def _as_rate(fps: float | int | Fraction) -> Fraction:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    # 30000/1001 given as 29.97002997... comes back as 30000/1001.
    return Fraction(fps).limit_denominator(1_000_000)


# The file name endings the writer accepts and the muxer each one gets: all three are ISO-BMFF containers that
# hold the fragmented H.264 stream and decode as it grows (tests/unit/test_video_io.py writes and reads each),
# with the brand players expect of the ending (isom, M4V, qt). Anything else would be a misnamed mp4.
CONTAINERS = {".mp4": "mp4", ".m4v": "ipod", ".mov": "mov"}


def output_path_problems(path: PathLike, overwrite: bool) -> list[tuple[type[OSError] | type[ValueError], str]]:
    """Why a new video cannot be published at `path`, as (exception type, message) pairs; empty when it can.

    Nothing is created. A symlink at `path` counts as an existing file: it is replaced (with `overwrite`), never
    followed."""
    p = Path(path)
    problems: list[tuple[type[OSError] | type[ValueError], str]] = []
    if p.suffix.lower() not in CONTAINERS:
        problems.append((ValueError, f"extension {p.suffix or '(none)'!r} is not a video container this writer "
                                     f"makes (H.264 in {', '.join(CONTAINERS)})"))
    parent = p.parent
    if not parent.is_dir():
        problems.append((FileNotFoundError, f"directory {parent} does not exist"))
    elif not os.access(parent, os.W_OK | os.X_OK):
        problems.append((PermissionError, f"directory {parent} is not writable"))
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return problems
    except OSError as e:
        problems.append((type(e), f"cannot inspect {p}: {e}"))
        return problems
    if stat.S_ISDIR(st.st_mode):
        problems.append((IsADirectoryError, f"{p} is a directory"))
    elif not overwrite:
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a file"
        problems.append((FileExistsError, f"{p} already exists ({kind}); not overwriting it without overwrite=true"))
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        problems.append((ValueError, f"{p} exists and is not a regular file; not replacing it"))
    return problems


def _private_umask() -> int:
    # os.umask can only be read by setting it; put it back at once.
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


class StreamingMp4Writer:
    """Encode RGB frames to an H.264 mp4 (or .m4v / .mov, see `CONTAINERS`) as they arrive.

    The video is written to a new temporary file beside `path`, named `.<name>.<random>.partial`
    (`partial_path`), created with O_CREAT | O_EXCL so that no existing file or planted symlink is ever opened,
    and written through that open file (nothing re-opens it by name). It is a fragmented MP4: every frame
    becomes its own fragment and is flushed to disk at once, so the temporary file is a live preview that
    players and `read_video` / `probe_video` can open while generation continues. The muxer closes a fragment
    when the next frame arrives, so the preview lacks only the most recent frame; `close()` writes it.

    `close()` fsyncs the file and publishes it atomically: with `overwrite`, `os.replace` (an existing file or
    symlink at `path` is replaced, a symlink's target never touched); without, a hard link to `path` that
    fails if anything appeared there meanwhile, so of two writers racing for one path exactly one publishes and
    the other raises FileExistsError naming the temporary file, which it keeps. `path` only ever holds a
    complete video. If the run dies, or the `with` block raises, `path` is left untouched and the temporary
    file keeps the frames written so far.

    `overwrite` defaults to False: an existing `path` is an error; callers that regenerate their own outputs
    (validation videos of a resumed run) pass True, magi_infer/generate.py its `overwrite` field. Either way `path` is checked up front
    (`output_path_problems`): a directory, a missing parent or an unknown extension is an error at once.

    `low_latency` (default) uses x264's `zerolatency` tune: no lookahead, no B-frames and sliced threads, so each
    frame is encoded as soon as it is written. With `low_latency=False` the encoder runs with x264's defaults,
    as in the released code, but buffers dozens of frames (lookahead and frame threads) before emitting
    any, so the preview trails generation by a chunk or more. `crf=None` keeps x264's default quality, crf 23.

    `on_bytes`, when given, is called (on the writing thread) with every piece of the file right after it is
    written, in file order: a server streams the video from it as it is made. The muxer then gets a file it
    cannot seek, so it can only append and the pieces concatenated are exactly the file's bytes (with these
    movflags FFmpeg never seeks anyway; the seekable and unseekable files are byte-identical).
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
        overwrite: bool = False,
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(
                f"StreamingMp4Writer needs a positive even width and height (yuv420p halves the chroma planes), "
                f"got {width}x{height}"
            )
        if crf is not None and not 0 <= crf <= 51:
            raise ValueError(f"crf must lie in [0, 51] (x264's range), got {crf}")
        self.path = Path(path)
        problems = output_path_problems(self.path, overwrite)
        if problems:
            error, _ = problems[0]
            raise error(f"cannot write a video to {self.path}: " + "; ".join(message for _, message in problems))
        self.overwrite = overwrite
        self.width, self.height = width, height
        self.fps = _as_rate(fps)
        self._frames_written = 0
        self._closed = False

        options = {}
        if crf is not None:
            options["crf"] = str(crf)
        if low_latency:
            options["tune"] = "zerolatency"
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        self.partial_path = Path(name)
        try:
            # mkstemp makes the file private (0600); the published video gets the usual mode under the umask.
            os.fchmod(fd, 0o666 & ~_private_umask())
            self._file = os.fdopen(fd, "r+b", buffering=0)  # unbuffered: each flushed fragment reaches the file
        except BaseException:
            os.close(fd)
            self.partial_path.unlink(missing_ok=True)
            raise
        try:
            # flush_packets pushes each fragment out of FFmpeg's I/O buffer as soon as it is complete instead of
            # when 32 KiB have piled up.
            self._container = av.open(
                self._file if on_bytes is None else _TeeFile(self._file, on_bytes),
                mode="w",
                format=CONTAINERS[self.path.suffix.lower()],
                container_options={"movflags": _MOVFLAGS, "flush_packets": "1"},
            )
            try:
                self._stream = self._container.add_stream("libx264", rate=self.fps, options=options)
                self._stream.width, self._stream.height = width, height
                self._stream.pix_fmt = "yuv420p"
                self._stream.codec_context.time_base = 1 / self.fps
                # Write the header now: the temporary file is a valid, empty video from the start.
                self._container.start_encoding()
            except BaseException:
                self._container.close()
                raise
        except BaseException:
            self._file.close()
            self.partial_path.unlink(missing_ok=True)
            raise
        logger.info("writing %s (playable while it grows; %s when complete)", self.partial_path, self.path)

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
        """Flush the encoder, finish and fsync the temporary file and publish it as `path` (see the class)."""
        if self._closed:
            return
        self._finish()
        self._publish()
        fsync_dir(self.path.parent)  # makes the new name durable

    def abort(self) -> None:
        """Finish the temporary file with what was written so far, without publishing it under `path`."""
        if not self._closed:
            self._finish()
            logger.warning("%s was not completed; the frames written so far are in %s", self.path, self.partial_path)

    def _publish(self) -> None:
        if self.overwrite:
            os.replace(self.partial_path, self.path)
            return
        taken = (f"{self.path} appeared while this video was being written (another run writing the same output?); "
                 f"not overwriting it. This run's complete video is kept at {self.partial_path}")
        try:
            os.link(self.partial_path, self.path)  # fails if anything, a dangling symlink included, is there
        except FileExistsError:
            raise FileExistsError(taken) from None
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            # A file system without hard links has no rename that refuses to replace: check, then rename. A
            # file appearing in between would be replaced; the window is one system call wide.
            if os.path.lexists(self.path):
                raise FileExistsError(taken) from None
            os.rename(self.partial_path, self.path)
            return
        self.partial_path.unlink()

    def _finish(self) -> None:
        self._closed = True
        try:
            try:
                self._container.mux(self._stream.encode(None))  # frames still inside the encoder
            finally:
                self._container.close()  # writes the last fragment
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

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


class _TeeFile:
    """Write-only, unseekable view of a file that hands every written piece to `on_bytes` too (see
    StreamingMp4Writer). Without seek/tell PyAV tells FFmpeg the output is a stream."""

    def __init__(self, file, on_bytes: Callable[[bytes], None]) -> None:
        self._file, self._on_bytes = file, on_bytes

    def write(self, data) -> int:
        data = bytes(data)
        view = memoryview(data)
        while view:  # an unbuffered file may take less than asked; FFmpeg would not retry
            view = view[self._file.write(view):]
        self._on_bytes(data)
        return len(data)


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
    header_frames: int = 0  # the frame count the container states; 0 = it states none (fragmented mp4s)
    decode_error: str | None = None  # why decoding stopped before the end of the stream, if it did
    duration: Fraction = Fraction(0)  # seconds from the first frame's start to the last frame's end

    @property
    def truncated(self) -> bool:
        """Fewer frames decode than the container states, or decoding stopped at an error."""
        return self.decode_error is not None or self.frames < self.header_frames

    def frames_at(self, fps: float | int | Fraction) -> int:
        """How many frames `read_video(path, fps, ...)` yields without `max_frames` (its resampling rule)."""
        return max(_round_half_up(self.duration * _as_rate(fps)), 1)


def decoded_frames(
    path: PathLike, what: str, errors: list[str] | None = None
) -> Iterator[tuple[VideoFrame, VideoStream]]:
    """Yield (frame, stream) for every decodable frame of the first video stream, with errors naming the file.

    A decoding error after at least one good frame ends the stream with a warning instead of failing: that is
    how a file still being written (a `.partial` preview) or a damaged tail looks, and ffmpeg also keeps what
    decoded. The error is appended to `errors` when given. A file with no decodable frame at all is an error.
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
                if errors is not None:
                    errors.append(f"decoding stopped after {count} frames: {e}")
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
    """Describe a video by decoding all of it: the frame count is what actually decodes, not the header's claim
    (which is kept as `header_frames`, so a truncated file shows: `VideoInfo.truncated`)."""
    frames = 0
    first: VideoFrame | None = None
    errors: list[str] = []
    t0 = t_last = end = Fraction(0)
    for index, (frame, stream) in enumerate(decoded_frames(path, "video", errors)):
        if first is None:
            first = frame
        frames += 1
        # The same times read_video resamples by, so frames_at(fps) is what it yields.
        t, length = _frame_time(frame, stream, index, path)
        if index == 0:
            t0 = t
        t -= t0
        end = t + (length if length > 0 else max(t - t_last, Fraction(0)))
        t_last = t
    rate = stream.average_rate or stream.guessed_rate or 0
    return VideoInfo(
        frames=frames,
        width=first.width,
        height=first.height,
        fps=float(rate),
        codec=stream.codec_context.name,
        pix_fmt=first.format.name,
        header_frames=int(stream.frames or 0),
        decode_error=errors[0] if errors else None,
        duration=end,
    )
