"""Tiled VAE encode/decode with the released tile arithmetic and blending (model/README.md §5.3).

Tiles are cut on a regular grid in (T, H, W); each is encoded (or decoded) on its own. Spatial neighbours
overlap: after coding, the first rows (columns) of a tile are faded in from the last rows (columns) of the tile
above (to the left) with a linear ramp, then every tile is cropped to its stride and the crops are concatenated.
There is no temporal overlap (the released temporal overlap factor is 0).

With the released arguments (256 px, overlap 0.25, 12 frames, 8x/4x compression):
  encode: pixel tiles 12x256x256 at stride 12/192/192 -> latent tiles 3x32x32, ramp 8 latents, keep 3x24x24;
  decode: latent tiles 3x32x32 at stride 3/24/24 -> pixel tiles 12x256x256, ramp 64 px, keep 12x192x192.
All sizes use the released float formulas (`int(size * (1 - overlap))`, `int(size * overlap)`).

One released asymmetry is kept: encode blends each tile with its neighbours *after* they were blended
themselves (the released code blends in place), decode blends with the neighbours' raw decoded pixels.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

Codec = Callable[[torch.Tensor], torch.Tensor]
# How the tiles of one call are coded: (codec, tiles in order) -> coded tiles in the same order. The default
# codes them one by one here; `magi_train/parallel/vae_tiles.py` spreads them over ranks.
TileMap = Callable[[Codec, List[torch.Tensor]], List[torch.Tensor]]
Grid = List[List[List[torch.Tensor]]]  # [t][row][col] -> (B, C, T, H, W) tile

RELEASED_TILE_PX = 256
RELEASED_OVERLAP = 0.25
RELEASED_TILE_LENGTH = 12  # fps // 2 at the released 24 fps


def blend_ramp_(prev: torch.Tensor, cur: torch.Tensor, dim: int, extent: int) -> torch.Tensor:
    """Fade `cur` in from `prev` along `dim`, in place: slice k of `cur` becomes
    prev[-e + k] * (1 - k/e) + cur[k] * (k/e) for k < e = min(extent, both sizes)."""
    e = min(prev.shape[dim], cur.shape[dim], extent)
    start = prev.shape[dim] - e
    for k in range(e):
        w = k / e  # a Python float, so the weights round exactly as the released scalar arithmetic does
        cur.select(dim, k).copy_(prev.select(dim, start + k) * (1 - w) + cur.select(dim, k) * w)
    return cur


def _starts(size: int, stride: int) -> range:
    return range(0, size, stride)  # ceil(size / stride) tiles, the last one possibly short


def code_each(fn: Codec, tiles: List[torch.Tensor]) -> List[torch.Tensor]:
    """The one-process tile loop: every tile, in order, on this process."""
    return [fn(tile) for tile in tiles]


def _code_tiles(fn: Codec, x: torch.Tensor, strides: Sequence[int], sizes: Sequence[int], tile_map: TileMap) -> Grid:
    st, sh, sw = strides
    lt, lh, lw = sizes
    frames, rows, cols = _starts(x.shape[2], st), _starts(x.shape[3], sh), _starts(x.shape[4], sw)
    tiles = [x[:, :, f : f + lt, i : i + lh, j : j + lw] for f in frames for i in rows for j in cols]
    coded = iter(tile_map(fn, tiles))  # in cutting order: (t, row, col) row-major
    return [[[next(coded) for _ in cols] for _ in rows] for _ in frames]


def _blend_and_assemble(
    tiles: Grid, extent: Tuple[int, int], keep: Tuple[int, int, int], ramp_from_blended: bool
) -> torch.Tensor:
    blended: Grid = [[[] for _ in plane] for plane in tiles]
    for f, plane in enumerate(tiles):
        source = blended[f] if ramp_from_blended else plane
        for i, row in enumerate(plane):
            for j, tile in enumerate(row):
                cur = tile.clone()
                if i > 0:
                    blend_ramp_(source[i - 1][j], cur, dim=3, extent=extent[0])
                if j > 0:
                    blend_ramp_(source[i][j - 1], cur, dim=4, extent=extent[1])
                blended[f][i].append(cur)
    kt, kh, kw = keep
    planes = [
        torch.cat([torch.cat([t[:, :, :kt, :kh, :kw] for t in row], dim=4) for row in plane], dim=3)
        for plane in blended
    ]
    return torch.cat(planes, dim=2)


def _check(x: torch.Tensor, what: str, tile_length: int, tile_px: int, overlap: float, temporal_factor: int) -> None:
    if x.ndim != 5 or min(x.shape[2:]) < 1:
        raise ValueError(f"{what} must be a non-empty (B, C, T, H, W) tensor, got shape {tuple(x.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile_length < temporal_factor:
        raise ValueError(f"tile_length={tile_length} frames is shorter than the temporal factor {temporal_factor}")
    if tile_px < 1:
        raise ValueError(f"tile_px must be positive, got {tile_px}")


def tiled_encode(
    encode: Codec,
    video: torch.Tensor,
    *,
    spatial_factor: int,
    temporal_factor: int,
    tile_length: int = RELEASED_TILE_LENGTH,
    tile_px: int = RELEASED_TILE_PX,
    overlap: float = RELEASED_OVERLAP,
    tile_map: TileMap = code_each,
) -> torch.Tensor:
    """(B, 3, T, H, W) pixels -> latent, encoding tiles of tile_length x tile_px x tile_px pixels."""
    _check(video, "video", tile_length, tile_px, overlap, temporal_factor)
    stride_px = int(tile_px * (1 - overlap))
    latent_px = tile_px // spatial_factor
    ramp = int(latent_px * overlap)
    if stride_px < 1 or latent_px < 1:
        raise ValueError(f"tile_px={tile_px} with overlap={overlap} gives an empty tile or stride")
    tiles = _code_tiles(encode, video, (tile_length, stride_px, stride_px), (tile_length, tile_px, tile_px), tile_map)
    keep = (tile_length // temporal_factor, latent_px - ramp, latent_px - ramp)
    return _blend_and_assemble(tiles, (ramp, ramp), keep, ramp_from_blended=True)


def tiled_decode(
    decode: Codec,
    latent: torch.Tensor,
    *,
    spatial_factor: int,
    temporal_factor: int,
    tile_length: int = RELEASED_TILE_LENGTH,
    tile_px: int = RELEASED_TILE_PX,
    overlap: float = RELEASED_OVERLAP,
    tile_map: TileMap = code_each,
) -> torch.Tensor:
    """(B, z, t, h, w) latent -> pixels, decoding latent tiles that correspond to tile_length x tile_px^2 pixels."""
    _check(latent, "latent", tile_length, tile_px, overlap, temporal_factor)
    latent_len = tile_length // temporal_factor
    latent_px = tile_px // spatial_factor
    stride_latent = int(latent_px * (1 - overlap))
    if stride_latent < 1:
        raise ValueError(f"tile_px={tile_px} with overlap={overlap} gives an empty latent stride")
    pixel_tile = latent_px * spatial_factor
    ramp = int(pixel_tile * overlap)
    tiles = _code_tiles(decode, latent, (latent_len, stride_latent, stride_latent), (latent_len, latent_px, latent_px),
                        tile_map)
    keep = (latent_len * temporal_factor, pixel_tile - ramp, pixel_tile - ramp)
    return _blend_and_assemble(tiles, (ramp, ramp), keep, ramp_from_blended=False)
