"""Conditioning frames given in memory (the Python API) instead of as files: resized exactly as a file would be.

A decoded image file goes through FFmpeg's bicubic scaler to the video size (`read_image`); an array given to the
pipeline goes through the same scaler, so `pipe(image=array)` and `pipe(image="same.png")` condition identically.
A PIL image is taken as its RGB array; a torch tensor as its numpy array.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

import numpy as np
import torch


def is_path(value: Any) -> bool:
    return isinstance(value, (str, PathLike))


def as_uint8_frames(value: Any, what: str, ndim: int) -> np.ndarray:
    """uint8 RGB frames of `ndim` dims ((H, W, 3) or (T, H, W, 3)) from an array, tensor or PIL image."""
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image, without importing PIL
        value = np.asarray(value.convert("RGB"))
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{what} must be a file path, a PIL image or a uint8 array, got {type(value).__name__}")
    shape = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
    if value.ndim != ndim or value.shape[-1] != 3 or 0 in value.shape:
        raise ValueError(f"{what} must be uint8 RGB of shape {shape}, got shape {tuple(value.shape)}")
    if value.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB of shape {shape}, got dtype {value.dtype}")
    return value


def resize_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8 through FFmpeg's bicubic scaler (as `read_image`)."""
    from av import VideoFrame

    from magi_train.data.video_io import _to_rgb

    out = [_to_rgb(VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24"), height, width) for f in frames]
    return torch.from_numpy(np.stack(out))
