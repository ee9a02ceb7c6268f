"""Dataset preparation: captioned videos and images -> webdataset shards of VAE latents and text features.

`tools/prepare_dataset.py` is the command line; data/README.md documents the input lists and the output. The steps:

  1. `read_inputs`: a folder (media files with .json/.txt caption sidecars), a CSV or a JSONL list -> `InputItem`s.
  2. Per clip, in a worker process (`encode_batch`): decode with PyAV, resample to the target fps the way ffmpeg's
     `fps` filter does (`FpsResampler`), resize the shorter side and centre-crop to the bucket nearest in aspect
     ratio (`choose_bucket`, `resize_crop_geometry`), keep whole chunks, VAE-encode (`VaeCodec.encode_frames`);
     the captions of a batch of clips go through the text encoder together.
  3. In the main process (`ShardWriter`): samples in `magi_train/data/shards.py`'s format, K per tar shard, each
     shard written under a temporary name and renamed when complete; `manifest.jsonl` records the inputs of every
     completed shard, so `--resume` skips them (`Manifest`).

A bad input (missing file, undecodable, no caption, too short, ...) is skipped with a reason, never a crash; the
`Summary` lists them by reason.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import queue
import re
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional, Protocol, Sequence

import av
import numpy as np
import torch

from magi_train.data.video_io import decoded_frames
from magi_train.data.shards import Sample, SampleError, encode_sample

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Landscape, portrait and square buckets at about 720p, all multiples of 16 (VAE 8 x DiT patch 2).
DEFAULT_BUCKETS = ("720x1280", "1280x720", "960x960")
SHARD_NAME = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
PARTIAL_SUFFIX = ".partial"
MANIFEST_NAME = "manifest.jsonl"
SETTINGS_NAME = "prepare.json"

# Skip reasons, as the summary groups them.
MISSING_FILE = "missing file"
DUPLICATE = "duplicate input"
MISSING_CAPTION = "missing caption"
UNDECODABLE = "undecodable"
TOO_SHORT = "too short"
ENCODE_FAILED = "encode failed"
WORKER_DIED = "worker died"

# swscale's bicubic filter, as magi_train/data/video_io.py uses (ffmpeg's `scale` default).
_INTERPOLATION = "BICUBIC"
# HashTextEncoder pads every row to max_length in float64; encoding a few rows at a time bounds that memory.
_HASH_ROWS_PER_CALL = 16


class InputListError(ValueError):
    """A malformed input list; the message names the file and line."""


class PrepareError(RuntimeError):
    """A setting or an output folder that does not allow the run to start (or continue)."""


class SkipClip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------------------------
# Input lists


@dataclass(frozen=True)
class InputItem:
    source: str  # the path as listed (relative to the list or folder): the manifest and the sample's json name it
    path: Path  # where to read it
    captions: tuple[str, ...] = ()  # one per chunk (AR captions), possibly empty
    caption: Optional[str] = None  # the whole clip
    where: str = ""  # where it was listed ("list.csv:12", a sidecar file), for messages
    problem: Optional[str] = None  # a caption that could not be read (folder sidecars)

    @property
    def kind(self) -> str:
        return "image" if self.path.suffix.lower() in IMAGE_SUFFIXES else "video"


def read_inputs(path: str | os.PathLike[str]) -> list[InputItem]:
    """A folder, a .csv or a .jsonl list -> the inputs, in listed (folder: sorted) order."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    if not path.is_file():
        raise InputListError(f"input {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv_list(path)
    if suffix == ".jsonl":
        return read_jsonl_list(path)
    raise InputListError(f"input {path}: expected a folder, a .csv or a .jsonl list (got {suffix or 'no suffix'!r})")


def _normalised(source: str) -> str:
    return PurePosixPath(os.path.normpath(source.replace("\\", "/"))).as_posix()


def _resolve(base: Path, source: str) -> Path:
    candidate = Path(source).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def _captions_value(value: Any, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise InputListError(f"{where}: 'captions' must be a list of strings, got {value!r}"[:300])
    return tuple(c.strip() for c in value)


def _caption_value(value: Any, where: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputListError(f"{where}: 'caption' must be a string, got {type(value).__name__}")
    return value.strip() or None


def read_jsonl_list(path: Path) -> list[InputItem]:
    """One JSON object a line: `path` and `caption` and/or `captions`; blank lines are ignored."""
    items = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first line
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputListError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(entry, dict):
                raise InputListError(f"{where}: expected a JSON object with 'path', got {type(entry).__name__}")
            source = entry.get("path")
            if not isinstance(source, str) or not source.strip():
                raise InputListError(f"{where}: missing or empty 'path'")
            items.append(InputItem(_normalised(source), _resolve(path.parent, source),
                                   _captions_value(entry.get("captions"), where),
                                   _caption_value(entry.get("caption"), where), where))
    return items


def read_csv_list(path: Path) -> list[InputItem]:
    """A header with `path` and `caption` and/or `captions` (a JSON list of strings); other columns are ignored."""
    items = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # spreadsheets often write a byte-order mark
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "path" not in header:
            raise InputListError(f"{path}:1: the header {header} has no 'path' column (expected path,caption)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                raise InputListError(f"{where}: {len(row.get(None, [])) + len(header)} fields where the header "
                                     f"has {len(header)} (quote captions that contain commas)")
            source = row["path"].strip()
            if not source:
                raise InputListError(f"{where}: empty 'path'")
            raw = (row.get("captions") or "").strip()
            try:
                captions = json.loads(raw) if raw else None
            except json.JSONDecodeError as e:
                raise InputListError(f"{where}: 'captions' is not a JSON list of strings ({e.msg})") from None
            items.append(InputItem(_normalised(source), _resolve(path.parent, source),
                                   _captions_value(captions, where), _caption_value(row.get("caption"), where),
                                   where))
    return items


def read_folder(folder: Path) -> list[InputItem]:
    """Every video and image under `folder` (recursively, sorted); the caption comes from `<name>.json` (the
    `caption`/`captions` fields of a list entry) or else `<name>.txt` (the whole-clip caption)."""
    items = []
    media = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in media:
        source = path.relative_to(folder).as_posix()
        sidecar_json, sidecar_txt = path.with_suffix(".json"), path.with_suffix(".txt")
        captions: tuple[str, ...] = ()
        caption: Optional[str] = None
        problem: Optional[str] = None
        where = str(path)
        try:
            if sidecar_json.is_file():
                where = str(sidecar_json)
                entry = json.loads(sidecar_json.read_text(encoding="utf-8"))
                if not isinstance(entry, dict):
                    raise InputListError(f"{where}: expected a JSON object with 'caption' and/or 'captions'")
                captions = _captions_value(entry.get("captions"), where)
                caption = _caption_value(entry.get("caption"), where)
            elif sidecar_txt.is_file():
                where = str(sidecar_txt)
                caption = " ".join(sidecar_txt.read_text(encoding="utf-8").split()) or None
            else:
                problem = f"no caption file ({sidecar_json.name} or {sidecar_txt.name}) next to {path}"
        except (InputListError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            # One broken sidecar in a large folder skips that clip; it does not stop the run.
            problem = f"{where}: {e}" if not isinstance(e, InputListError) else str(e)
        items.append(InputItem(source, path, captions, caption, where, problem))
    return items


def caption_rows(item: InputItem) -> tuple[list[str], Optional[int]]:
    """The caption rows of a clip and the most chunks they can describe (None: any number).

    Two or more per-chunk captions give one row per chunk, and a clip is cut to the chunks they describe; else
    the whole-clip caption (or the one per-chunk caption) is a single row for the whole clip (R = 1).
    """
    if item.problem:
        raise SkipClip(MISSING_CAPTION, item.problem)
    if len(item.captions) >= 2:
        empty = [i for i, c in enumerate(item.captions) if not c]
        if empty:
            raise SkipClip(MISSING_CAPTION, f"{item.where}: per-chunk caption {empty[0]} is empty")
        return list(item.captions), len(item.captions)
    text = item.caption or (item.captions[0] if item.captions else None)
    if not text:
        raise SkipClip(MISSING_CAPTION, f"{item.where}: no 'caption' or 'captions'")
    return [text], None


def sample_key(source: str) -> str:
    """A webdataset key for a source path: readable, unique, and free of dots (webdataset splits on them)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", PurePosixPath(source).stem)[:48] or "clip"
    return f"{stem}-{hashlib.sha1(source.encode('utf-8')).hexdigest()[:12]}"


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


# ---------------------------------------------------------------------------------------------------------------
# Encoders


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
    def __init__(self, dim: int, max_length: int) -> None:
        from magi_train.model.text.hash import HashTextEncoder

        self.encoder = HashTextEncoder(dim=dim, max_length=max_length)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_trimmed(*self.encoder.encode(texts[i : i + _HASH_ROWS_PER_CALL]))
                 for i in range(0, len(texts), _HASH_ROWS_PER_CALL)]
        longest = max(p[0].shape[1] for p in parts)
        features = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[1])) for f, _ in parts])
        return features, torch.cat([lengths for _, lengths in parts])


def parse_text_encoder(spec: str) -> tuple[str, str]:
    """"t5:DIR" or "hash:DIM" -> (kind, argument). Only the folder's existence is checked here: importing the T5
    code (transformers) costs seconds, so the workers check the folder's contents when they load it."""
    kind, _, arg = spec.partition(":")
    if kind == "t5" and arg:
        if not Path(arg).expanduser().is_dir():
            raise PrepareError(f"--text-encoder {spec}: {arg} is not a folder (a t5-v1_1-xxl folder, or its parent)")
        return kind, arg
    if kind == "hash" and arg.isdigit() and int(arg) >= 1:
        return kind, arg
    raise PrepareError(f"--text-encoder {spec!r} is not t5:DIR (a T5 encoder folder) or hash:DIM (e.g. hash:32)")


@dataclass
class Encoders:
    codec: Any  # magi_train.model.vae.VaeCodec
    text: CaptionEncoder


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class PrepareConfig:
    input: Path
    out: Path
    vae: Path
    text_encoder: str  # t5:DIR | hash:DIM
    buckets: tuple[str, ...] = DEFAULT_BUCKETS  # HEIGHTxWIDTH
    fps: int = 24
    max_seconds: Optional[float] = None  # longer clips keep their first whole chunks within this
    samples_per_shard: int = 100
    workers: int = 1  # processes; 0 encodes in this process
    batch_size: int = 8  # clips per worker task; their captions are text-encoded together
    device: str = "cpu"  # cpu | cuda | cuda:N (cuda spreads the workers over the visible GPUs)
    resume: bool = False
    text_length: int = 800  # tokens per caption row before trimming (the released T5 max_length)
    chunk_frames: int = 24  # pixel frames per chunk: model.chunk_width (6) x the VAE's patch_length (4)
    size_multiple: int = 16  # bucket sides: VAE patch (8) x DiT patch (2)
    vae_tile_px: int = 256
    vae_overlap: float = 0.25
    vae_dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    progress: bool = True

    def recorded(self) -> dict[str, Any]:
        """What must not change when a run is resumed: every sample of a dataset is made the same way."""
        return {"buckets": list(self.buckets), "fps": self.fps, "max_seconds": self.max_seconds,
                "chunk_frames": self.chunk_frames, "text_encoder": self.text_encoder, "text_length": self.text_length,
                "vae": str(self.vae.resolve()), "vae_tile_px": self.vae_tile_px, "vae_overlap": self.vae_overlap}


@dataclass(frozen=True)
class Plan:
    """Settings checked against the VAE, shared with the workers."""

    config: PrepareConfig
    buckets: tuple[Bucket, ...]
    max_frames: Optional[int]  # a whole number of chunks, or None


def make_plan(cfg: PrepareConfig) -> Plan:
    """Check every setting that can be checked without loading a model, with messages that name the option."""
    from magi_train.model.vae.model import ViTVAEConfig

    config_path = cfg.vae / "config.json"
    try:
        raw = json.loads(config_path.read_text())
        vae = ViTVAEConfig.from_ddconfig(raw["ddconfig"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"--vae {cfg.vae}: cannot read the VAE config {config_path} ({type(e).__name__}: {e})") \
            from None
    parse_text_encoder(cfg.text_encoder)
    checks = [
        (cfg.fps >= 2 and (cfg.fps // 2) % vae.patch_length == 0,
         f"--fps {cfg.fps}: the VAE codes fps//2-frame tiles, which must be a multiple of its patch_length "
         f"{vae.patch_length} (e.g. 8, 16, 24, 32)"),
        (cfg.chunk_frames > 0 and cfg.chunk_frames % vae.patch_length == 0,
         f"--chunk-frames {cfg.chunk_frames} must be a positive multiple of the VAE's patch_length {vae.patch_length}"),
        (cfg.size_multiple > 0 and cfg.size_multiple % vae.patch_size == 0,
         f"--size-multiple {cfg.size_multiple} must be a positive multiple of the VAE's patch_size {vae.patch_size}"),
        (cfg.samples_per_shard >= 1, f"--samples-per-shard {cfg.samples_per_shard} must be >= 1"),
        (cfg.workers >= 0, f"--workers {cfg.workers} must be >= 0"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be >= 1"),
        (cfg.text_length >= 1, f"--text-length {cfg.text_length} must be >= 1"),
        (cfg.vae_dtype in ("auto", "float32", "bfloat16"),
         f"--vae-dtype {cfg.vae_dtype!r} is not auto|float32|bfloat16"),
        (not cfg.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {cfg.device}: CUDA is not available"),
    ]
    for ok, message in checks:
        if not ok:
            raise PrepareError(message)
    max_frames = None
    if cfg.max_seconds is not None:
        max_frames = int(cfg.max_seconds * cfg.fps) // cfg.chunk_frames * cfg.chunk_frames
        if max_frames < cfg.chunk_frames:
            raise PrepareError(f"--max-seconds {cfg.max_seconds} is shorter than one chunk "
                               f"({cfg.chunk_frames} frames at {cfg.fps} fps)")
    return Plan(cfg, tuple(parse_buckets(cfg.buckets, cfg.size_multiple)), max_frames)


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
                            else HashCaptions(int(arg), cfg.text_length))
    return Encoders(codec, text)


# ---------------------------------------------------------------------------------------------------------------
# Encoding a batch


@dataclass(frozen=True)
class Encoded:
    source: str
    key: str
    members: dict[str, Any]  # encode_sample's dict: what the tar gets


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str
    detail: str


Result = Encoded | Skipped


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


# ---------------------------------------------------------------------------------------------------------------
# Output folder: manifest and shards


def _fsync_dir(directory: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Manifest:
    """`manifest.jsonl`: one line per completed shard, {"shard", "samples", "keys", "sources"}.

    A shard is committed by appending its line *before* renaming it from `<shard>.partial`: a line whose shard is
    missing is therefore an interrupted commit (or a shard someone deleted), and its inputs are redone. A run that
    dies mid-shard leaves only a `.partial` file, which the next `--resume` deletes.
    """

    def __init__(self, out: Path, entries: list[dict[str, Any]]) -> None:
        self.out = out
        self.entries = entries

    @property
    def path(self) -> Path:
        return self.out / MANIFEST_NAME

    @property
    def sources(self) -> set[str]:
        return {s for e in self.entries for s in e["sources"]}

    @property
    def samples(self) -> int:
        return sum(int(e["samples"]) for e in self.entries)

    @property
    def next_index(self) -> int:
        indices = [int(SHARD_RE.match(e["shard"]).group(1)) for e in self.entries]  # type: ignore[union-attr]
        return max(indices) + 1 if indices else 0

    @classmethod
    def open(cls, out: Path, settings: dict[str, Any], resume: bool) -> tuple["Manifest", list[str]]:
        """Start (or with `resume`, continue) the dataset in `out`; returns the manifest and notes for the user."""
        out.mkdir(parents=True, exist_ok=True)
        settings_path, manifest_path = out / SETTINGS_NAME, out / MANIFEST_NAME
        shards = sorted(p.name for p in out.iterdir() if SHARD_RE.match(p.name))
        partials = sorted(p for p in out.iterdir() if p.name.endswith(".tar" + PARTIAL_SUFFIX))
        existing = [p.name for p in (settings_path, manifest_path) if p.exists()] + shards + [p.name for p in partials]
        if existing and not resume:
            raise PrepareError(f"{out} already holds a dataset ({', '.join(existing[:4])}"
                               f"{', ...' if len(existing) > 4 else ''}): pass --resume to continue it, or choose "
                               f"an empty folder")
        notes: list[str] = []
        if settings_path.exists():
            try:
                recorded = json.loads(settings_path.read_text())
            except json.JSONDecodeError as e:
                raise PrepareError(f"{settings_path} does not parse ({e})") from None
            changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            if changed:
                detail = "; ".join(f"{k}: was {recorded.get(k)!r}, now {settings.get(k)!r}" for k in changed)
                raise PrepareError(f"--resume with other settings than {settings_path} records ({detail}): a dataset "
                                   f"must be prepared one way; use a new output folder")
        else:
            _write_atomic(settings_path, json.dumps(settings, indent=2) + "\n")

        for partial in partials:  # an interrupted shard: its inputs are not in the manifest and are redone
            partial.unlink()
            notes.append(f"discarded the interrupted shard {partial.name}")
        entries = cls._read_entries(manifest_path, notes)
        kept = []
        for entry in entries:
            if (out / entry["shard"]).is_file():
                kept.append(entry)
            else:
                notes.append(f"{entry['shard']} is in the manifest but missing: its {entry['samples']} inputs "
                             f"will be redone")
        listed = {e["shard"] for e in kept}
        strays = [s for s in shards if s not in listed]
        if strays:
            raise PrepareError(f"{out}: {', '.join(strays)} not recorded in {MANIFEST_NAME} (not written by this tool, "
                               f"or the manifest was edited); move them away, then resume")
        manifest = cls(out, kept)
        if kept != entries or not manifest_path.exists():
            _write_atomic(manifest_path, "".join(json.dumps(e) + "\n" for e in kept))
        return manifest, notes

    @staticmethod
    def _read_entries(path: Path, notes: list[str]) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        entries = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                ok = (isinstance(entry, dict) and isinstance(entry.get("shard"), str) and SHARD_RE.match(entry["shard"])
                      and isinstance(entry.get("sources"), list) and isinstance(entry.get("samples"), int))
            except json.JSONDecodeError:
                ok = False
            if not ok:
                if number == len(lines):  # a line cut short by a crash while it was written: not committed
                    notes.append(f"ignored the incomplete last line of {path}")
                    continue
                raise PrepareError(f"{path}:{number}: not a manifest entry ({line[:120]!r})")
            entries.append(entry)
        return entries

    def commit(self, shard: str, keys: Sequence[str], sources: Sequence[str]) -> None:
        entry = {"shard": shard, "samples": len(keys), "keys": list(keys), "sources": list(sources)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)


class ShardWriter:
    """Collects encoded samples into `shard-NNNNNN.tar`, `samples_per_shard` each, numbered after the manifest's."""

    def __init__(self, manifest: Manifest, samples_per_shard: int) -> None:
        import webdataset

        self._tar_writer = webdataset.TarWriter
        self.manifest = manifest
        self.samples_per_shard = samples_per_shard
        self.written: list[str] = []
        self._index = manifest.next_index
        self._file: Any = None
        self._tar: Any = None
        self._keys: list[str] = []
        self._sources: list[str] = []

    @property
    def _name(self) -> str:
        return SHARD_NAME.format(self._index)

    def add(self, sample: Encoded) -> None:
        if self._tar is None:
            self._file = open(self.manifest.out / (self._name + PARTIAL_SUFFIX), "wb")
            self._tar = self._tar_writer(self._file, encoder=False)
        self._tar.write(sample.members)
        self._keys.append(sample.key)
        self._sources.append(sample.source)
        if len(self._keys) >= self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        out = self.manifest.out
        self.manifest.commit(self._name, self._keys, self._sources)
        os.replace(out / (self._name + PARTIAL_SUFFIX), out / self._name)
        _fsync_dir(out)
        self.written.append(self._name)
        self._index += 1
        self._file = self._tar = None
        self._keys, self._sources = [], []

    def close(self) -> None:
        """Complete the last, partly filled shard."""
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written (its inputs are not in the manifest, so a resume redoes them)."""
        if self._file is not None:
            try:
                self._tar.close()  # else the tar stream would write its end blocks into a closed file later
            finally:
                self._file.close()
            (self.manifest.out / (self._name + PARTIAL_SUFFIX)).unlink(missing_ok=True)
            self._file = self._tar = None


# ---------------------------------------------------------------------------------------------------------------
# Worker processes


def _worker_device(cfg: PrepareConfig, worker: int) -> torch.device:
    if cfg.device == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", worker % torch.cuda.device_count())
    return torch.device(cfg.device)


def _worker_main(worker: int, plan: Plan, threads: int, tasks: Any, results: Any) -> None:
    """A worker process: load the models once, then encode batches until the None sentinel.

    Messages: ("ready", worker) | ("fatal", worker, message) | ("begin", worker, batch id)
    | ("done", worker, batch id, results).
    """
    torch.set_num_threads(threads)
    try:
        encoders = load_encoders(plan.config, _worker_device(plan.config, worker))
    except Exception as e:  # noqa: BLE001 - reported to the main process, which stops the run
        results.put(("fatal", worker, f"{type(e).__name__}: {e}"))
        return
    results.put(("ready", worker))
    while (task := tasks.get()) is not None:
        batch_id, items = task
        results.put(("begin", worker, batch_id))
        results.put(("done", worker, batch_id, encode_batch(items, encoders, plan)))


def _encode_in_workers(batches: list[list[InputItem]], plan: Plan, timing: dict[str, float]
                       ) -> Iterator[list[Result]]:
    """Yield each batch's results as workers finish them; a worker that dies costs only the batch it held."""
    import multiprocessing

    cfg = plan.config
    context = multiprocessing.get_context("spawn")  # fork would copy a half-initialised torch/CUDA/FFmpeg state
    tasks, results = context.Queue(), context.Queue()
    for batch_id, batch in enumerate(batches):
        tasks.put((batch_id, batch))
    workers = min(cfg.workers, len(batches))
    for _ in range(workers):
        tasks.put(None)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // workers)  # workers share the cores instead of each starting one thread per core
    start = time.perf_counter()
    processes = [context.Process(target=_worker_main, args=(w, plan, threads, tasks, results), daemon=True)
                 for w in range(workers)]
    for p in processes:
        p.start()
    pending = set(range(len(batches)))
    holding: dict[int, int] = {}  # worker -> the batch it is encoding
    try:
        while pending:
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w, p in enumerate(processes) if not p.is_alive() and p.exitcode != 0]
                for w in dead:
                    if w in holding:
                        batch_id = holding.pop(w)
                        pending.discard(batch_id)
                        code = processes[w].exitcode
                        yield [Skipped(item.source, WORKER_DIED, f"worker {w} exited with code {code} while "
                                                                  f"encoding this batch")
                               for item in batches[batch_id]]
                if all(not p.is_alive() for p in processes):  # nobody left to take the remaining batches
                    for batch_id in sorted(pending):
                        yield [Skipped(item.source, WORKER_DIED, "no worker process left")
                               for item in batches[batch_id]]
                    pending.clear()
                continue
            kind, worker = message[0], message[1]
            if kind == "fatal":
                raise PrepareError(f"worker {worker} could not load the models: {message[2]}")
            if kind == "ready":  # start-up: spawning, imports and model loading, until the last worker is ready
                timing["startup"] = time.perf_counter() - start
            elif kind == "begin":
                holding[worker] = message[2]
            elif kind == "done":
                holding.pop(worker, None)
                pending.discard(message[2])
                yield message[3]
    finally:
        for p in processes:
            if p.is_alive() and pending:
                p.terminate()
        for p in processes:
            p.join(timeout=10)


def _encode_here(batches: list[list[InputItem]], plan: Plan, timing: dict[str, float]) -> Iterator[list[Result]]:
    start = time.perf_counter()
    encoders = load_encoders(plan.config, _worker_device(plan.config, 0))
    timing["startup"] = time.perf_counter() - start
    for batch in batches:
        yield encode_batch(batch, encoders, plan)


# ---------------------------------------------------------------------------------------------------------------
# The whole run


@dataclass
class Summary:
    out: Path
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    already_done: int = 0  # inputs found in the manifest (--resume)
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until the last worker had its models loaded; part of `seconds`
    notes: list[str] = field(default_factory=list)

    @property
    def clips_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when the dataset holds samples (written now or by the run this one resumes)."""
        return 0 if self.written or self.already_done else 1

    def format(self) -> str:
        shards = f" ({self.shards[0]} .. {self.shards[-1]})" if self.shards else ""
        lines = [f"wrote {self.written} clips in {len(self.shards)} shards{shards} to {self.out}",
                 f"  {self.seconds:.1f} s wall, {self.clips_per_second:.2f} clips/s "
                 f"(of which {self.startup_seconds:.1f} s starting workers and loading models)"]
        if self.already_done:
            lines.append(f"  {self.already_done} inputs were already in completed shards (--resume)")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"skipped {len(self.skipped)} inputs" + (":" if self.skipped else ""))
        by_reason: dict[str, list[Skipped]] = {}
        for s in self.skipped:
            by_reason.setdefault(s.reason, []).append(s)
        for reason in sorted(by_reason):
            lines.append(f"  {reason} ({len(by_reason[reason])}):")
            lines.extend(f"    {s.source}: {s.detail}" for s in sorted(by_reason[reason], key=lambda s: s.source))
        return "\n".join(lines)


def run_prepare(cfg: PrepareConfig) -> Summary:
    """Prepare (or continue) the dataset in `cfg.out`; raises InputListError / PrepareError for unusable settings."""
    from tqdm import tqdm

    start = time.perf_counter()
    plan = make_plan(cfg)
    items = read_inputs(cfg.input)
    manifest, notes = Manifest.open(cfg.out, cfg.recorded(), cfg.resume)
    summary = Summary(cfg.out, notes=notes)
    done, seen = manifest.sources, set()
    pending: list[InputItem] = []
    for item in items:
        if item.source in seen:
            summary.skipped.append(Skipped(item.source, DUPLICATE, f"listed again at {item.where}"))
            continue
        seen.add(item.source)
        if item.source in done:
            summary.already_done += 1
        elif not item.path.is_file():
            summary.skipped.append(Skipped(item.source, MISSING_FILE, f"{item.path} (listed at {item.where})"))
        else:
            try:  # caption problems are known without decoding anything
                caption_rows(item)
                pending.append(item)
            except SkipClip as e:
                summary.skipped.append(Skipped(item.source, e.reason, e.detail))

    batches = [pending[i : i + cfg.batch_size] for i in range(0, len(pending), cfg.batch_size)]
    timing: dict[str, float] = {}
    writer = ShardWriter(manifest, cfg.samples_per_shard)
    encode = _encode_in_workers if cfg.workers > 0 else _encode_here
    bar = tqdm(total=len(pending), unit="clip", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        if batches:
            with contextlib.closing(encode(batches, plan, timing)) as stream:  # stops the workers on any error
                for results in stream:
                    for result in results:
                        if isinstance(result, Encoded):
                            writer.add(result)
                            summary.written += 1
                        else:
                            summary.skipped.append(result)
                    bar.update(len(results))
                    bar.set_postfix(skipped=len(summary.skipped), refresh=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    summary.shards = writer.written
    summary.startup_seconds = timing.get("startup", 0.0)
    summary.seconds = time.perf_counter() - start
    return summary

