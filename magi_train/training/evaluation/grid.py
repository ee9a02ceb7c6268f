"""One grid per evaluation: every validation prompt's video tiled into one mp4 (and its middle frame as a PNG),
each tile with its caption drawn over its top rows, so one wandb.Video shows the whole evaluation.

The per-prompt mp4s stay as they are (held_out.py writes them); the grid is read back from them, so it shows
exactly what those files hold. Small tiles (the synthetic data's previews) are enlarged by an integer factor,
nearest neighbour, to at least `MIN_TILE_WIDTH` pixels, so that a caption fits. Tiles of different sizes (packed
data samples each prompt at its own size) are padded with black to the largest; a shorter video holds its
last frame.

The text is drawn with the 5x7 bitmap font below (printable ASCII; anything else shows as '?'): no imaging
library is a dependency of this project, and a caption needs no more. PNGs are written with zlib.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from magi_train.observability.metrics import GRID_VIDEO as GRID_NAME  # noqa: F401 - the grid's key, for callers

MIN_TILE_WIDTH = 256
MAX_CAPTION_LINES = 3

# 5x7 glyphs, printable ASCII from ' ' (32) to '~' (126): seven rows of five pixels, bit 4 the leftmost.
_FONT_ROWS = (
    "00 00 00 00 00 00 00|04 04 04 04 04 00 04|0A 0A 00 00 00 00 00|0A 0A 1F 0A 1F 0A 0A|04 0F 14 0E 05 1E 04|"
    "18 19 02 04 08 13 03|0C 12 14 08 15 12 0D|04 04 00 00 00 00 00|02 04 08 08 08 04 02|08 04 02 02 02 04 08|"
    "00 04 15 0E 15 04 00|00 04 04 1F 04 04 00|00 00 00 00 0C 04 08|00 00 00 1F 00 00 00|00 00 00 00 00 0C 0C|"
    "00 01 02 04 08 10 00|0E 11 13 15 19 11 0E|04 0C 04 04 04 04 0E|0E 11 01 02 04 08 1F|1F 02 04 02 01 11 0E|"
    "02 06 0A 12 1F 02 02|1F 10 1E 01 01 11 0E|06 08 10 1E 11 11 0E|1F 01 02 04 08 08 08|0E 11 11 0E 11 11 0E|"
    "0E 11 11 0F 01 02 0C|00 0C 0C 00 0C 0C 00|00 0C 0C 00 0C 04 08|02 04 08 10 08 04 02|00 00 1F 00 1F 00 00|"
    "08 04 02 01 02 04 08|0E 11 01 02 04 00 04|0E 11 01 0D 15 15 0E|0E 11 11 11 1F 11 11|1E 11 11 1E 11 11 1E|"
    "0E 11 10 10 10 11 0E|1C 12 11 11 11 12 1C|1F 10 10 1E 10 10 1F|1F 10 10 1E 10 10 10|0E 11 10 17 11 11 0F|"
    "11 11 11 1F 11 11 11|0E 04 04 04 04 04 0E|07 02 02 02 02 12 0C|11 12 14 18 14 12 11|10 10 10 10 10 10 1F|"
    "11 1B 15 15 11 11 11|11 11 19 15 13 11 11|0E 11 11 11 11 11 0E|1E 11 11 1E 10 10 10|0E 11 11 11 15 12 0D|"
    "1E 11 11 1E 14 12 11|0F 10 10 0E 01 01 1E|1F 04 04 04 04 04 04|11 11 11 11 11 11 0E|11 11 11 11 11 0A 04|"
    "11 11 11 15 15 15 0A|11 11 0A 04 0A 11 11|11 11 11 0A 04 04 04|1F 01 02 04 08 10 1F|0E 08 08 08 08 08 0E|"
    "00 10 08 04 02 01 00|0E 02 02 02 02 02 0E|04 0A 11 00 00 00 00|00 00 00 00 00 00 1F|08 04 00 00 00 00 00|"
    "00 00 0E 01 0F 11 0F|10 10 16 19 11 11 1E|00 00 0E 10 10 11 0E|01 01 0D 13 11 11 0F|00 00 0E 11 1F 10 0E|"
    "06 09 08 1C 08 08 08|00 0F 11 11 0F 01 0E|10 10 16 19 11 11 11|04 00 0C 04 04 04 0E|02 00 06 02 02 12 0C|"
    "10 10 12 14 18 14 12|0C 04 04 04 04 04 0E|00 00 1A 15 15 11 11|00 00 16 19 11 11 11|00 00 0E 11 11 11 0E|"
    "00 00 1E 11 1E 10 10|00 00 0D 13 0F 01 01|00 00 16 19 10 10 10|00 00 0E 10 0E 01 1E|08 08 1C 08 08 09 06|"
    "00 00 11 11 11 13 0D|00 00 11 11 11 0A 04|00 00 11 11 15 15 0A|00 00 11 0A 04 0A 11|00 00 11 11 0F 01 0E|"
    "00 00 1F 02 04 08 1F|02 04 04 08 04 04 02|04 04 04 04 04 04 04|08 04 04 02 04 04 08|00 00 08 15 02 00 00"
)
GLYPH_W, GLYPH_H = 5, 7
CELL_W, CELL_H = GLYPH_W + 1, GLYPH_H + 2  # one column and two rows of spacing


def _glyphs() -> np.ndarray:
    """(95, 7, 5) bool: the font, decoded (a pure function of the constant above: no module-level state)."""
    rows = [[int(h, 16) for h in glyph.split()] for glyph in _FONT_ROWS.split("|")]
    bits = np.array(rows, dtype=np.uint8)[:, :, None] >> np.arange(GLYPH_W - 1, -1, -1, dtype=np.uint8)
    return (bits & 1).astype(bool)


def wrap(text: str, columns: int, max_lines: int = MAX_CAPTION_LINES) -> List[str]:
    """Words wrapped to `columns` characters per line; at most `max_lines`, the last cut with '...'."""
    lines: List[str] = []
    line = ""
    for word in " ".join(text.split()).split(" "):
        while len(word) > columns:  # a word longer than a line is split
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:columns])
            word = word[columns:]
        if not line:
            line = word
        elif len(line) + 1 + len(word) <= columns:
            line += " " + word
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = (lines[-1][: max(columns - 3, 0)] + "...")[:columns]
    return lines


def text_mask(lines: Sequence[str], scale: int = 1) -> np.ndarray:
    """(len(lines) * CELL_H * scale, longest * CELL_W * scale) bool: the lines drawn, `scale`x enlarged."""
    font = _glyphs()
    width = max((len(line) for line in lines), default=0)
    mask = np.zeros((len(lines) * CELL_H, width * CELL_W), dtype=bool)
    for r, line in enumerate(lines):
        for c, ch in enumerate(line):
            code = ord(ch) - 32
            glyph = font[code if 0 <= code < len(font) else ord("?") - 32]
            y, x = r * CELL_H + 1, c * CELL_W
            mask[y:y + GLYPH_H, x:x + GLYPH_W] = glyph
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def caption_overlay(frames: np.ndarray, caption: str) -> np.ndarray:
    """(F, H, W, 3) uint8 with `caption` in white on a darkened band over the top rows (a copy)."""
    out = frames.copy()
    if not caption.strip():
        return out
    width, height = frames.shape[2], frames.shape[1]
    scale = max(1, width // 320)
    lines = wrap(caption, max(1, (width - 4) // (CELL_W * scale)))
    lines = lines[: max(1, (height // 3) // (CELL_H * scale))]  # the band covers at most a third of the tile
    mask = text_mask(lines, scale)[:, : width - 2]
    band = min(height, mask.shape[0] + 2)
    out[:, :band] = (out[:, :band].astype(np.uint16) * 2 // 5).astype(np.uint8)  # darkened: text on any video
    region = out[:, 1:1 + mask.shape[0], 2:2 + mask.shape[1]]
    region[:, mask[: region.shape[1], : region.shape[2]]] = 255
    return out


def tile_videos(videos: Sequence[np.ndarray], captions: Sequence[Optional[str]],
                min_tile_width: int = MIN_TILE_WIDTH) -> np.ndarray:
    """(F, rows * h, cols * w, 3) uint8: the (F_i, H_i, W_i, 3) videos on a near-square grid, row by row, each
    captioned; h, w even (H.264's yuv420p halves the chroma planes)."""
    if not videos or len(videos) != len(captions):
        raise ValueError(f"tile_videos needs one caption per video, got {len(videos)} videos and "
                         f"{len(captions)} captions")
    scale = max(1, math.ceil(min_tile_width / max(v.shape[2] for v in videos)))
    tiles = [caption_overlay(v.repeat(scale, axis=1).repeat(scale, axis=2), c or "") for v, c in zip(videos, captions)]
    frames = max(t.shape[0] for t in tiles)
    h = max(t.shape[1] for t in tiles)
    w = max(t.shape[2] for t in tiles)
    h, w = h + h % 2, w + w % 2
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    grid = np.zeros((frames, rows * h, cols * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        held = np.concatenate([tile, np.repeat(tile[-1:], frames - tile.shape[0], axis=0)])
        grid[:, r * h:r * h + tile.shape[1], c * w:c * w + tile.shape[2]] = held
    return grid


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An (H, W, 3) uint8 image as an 8-bit RGB PNG (zlib; no imaging library)."""
    height, width = rgb.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(height))  # filter 0 per row
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def read_frames(path: Path) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of an mp4, at its own size."""
    from magi_train.data.video_io import decoded_frames

    return np.stack([frame.to_ndarray(format="rgb24") for frame, _ in decoded_frames(path, "validation video")])


def grid_paths(videos_dir: Path, step: int) -> Dict[str, Path]:
    return {"mp4": Path(videos_dir) / f"step{step:07d}_grid.mp4", "png": Path(videos_dir) / f"step{step:07d}_grid.png"}


def write_grid(videos: Sequence[Path], captions: Sequence[Optional[str]], videos_dir: Path, step: int,
               fps: int) -> Dict[str, Path]:
    """The grid of one evaluation's videos as `step{step:07d}_grid.mp4` and its middle frame as `..._grid.png`
    in `videos_dir`; returns {"mp4": path, "png": path}."""
    from magi_train.data.video_io import StreamingMp4Writer

    grid = tile_videos([read_frames(p) for p in videos], captions)
    out = grid_paths(videos_dir, step)
    with StreamingMp4Writer(out["mp4"], grid.shape[2], grid.shape[1], fps, overwrite=True) as writer:
        writer.write(grid)
    write_png(out["png"], grid[grid.shape[0] // 2])
    return out


def prompt_captions(held_out) -> List[Optional[str]]:
    """The caption text of each validation prompt (training/evaluation/held_out.py `video_prompts` picks the
    first trainer.sample_count held-out samples): the first chunk's caption, with ' | ' before each later chunk's
    that differs, up to trainer.sample_chunks chunks. None where the data carries no text."""
    tc = held_out.cfg.trainer
    if not held_out.batches.packed:
        texts = [held_out.batches.held_out[i].get("text") for i in range(tc.sample_count)]
    else:
        samples = [s for seq in held_out.sequences() for s in seq.samples][:tc.sample_count]
        texts = [s.meta.get("captions") for s in samples]
    out: List[Optional[str]] = []
    for chunks in texts:
        if not chunks:
            out.append(None)
            continue
        chunks = [chunks[min(i, len(chunks) - 1)] for i in range(tc.sample_chunks)]
        shown = [chunks[0]] + [c for prev, c in zip(chunks, chunks[1:]) if c != prev]
        out.append(" | ".join(shown))
    return out
