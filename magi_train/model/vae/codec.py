"""Frames <-> DiT latents through the VAE, as the released pipeline does it (model/README.md §5.2, §5.3).

encode: uint8 -> /127.5 - 1 -> model dtype -> tiled encode (posterior mean) -> x scale_factor.
decode: / scale_factor -> model dtype -> tiled decode -> x127.5 + 127.5 -> clamp -> uint8 (truncating).
"""

from __future__ import annotations

import torch

from .model import ViTVAE
from .tiling import RELEASED_OVERLAP, RELEASED_TILE_PX, TileMap, code_each, tiled_decode, tiled_encode

RELEASED_SCALE_FACTOR = 0.18215


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output in about [-1, 1] -> uint8. The cast truncates (100.7 -> 100), as released; the affine map
    runs in the decoder's dtype, so a bf16 decoder rounds there first, as released."""
    return (pixels * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)


class VaeCodec:
    """Batch-1 video codec. `fps // 2` frames per temporal tile, square spatial tiles of `tile_px` pixels.

    `tile_map` codes the tiles of one call: one by one here (default), or spread over the ranks of a
    multi-process job (`SplitTiles`), each rank then returning the same full result."""

    def __init__(
        self,
        vae: ViTVAE,
        fps: int = 24,
        tile_px: int = RELEASED_TILE_PX,
        overlap: float = RELEASED_OVERLAP,
        scale_factor: float = RELEASED_SCALE_FACTOR,
        tile_map: TileMap = code_each,
    ):
        self.vae = vae
        self.tile_map = tile_map
        self.tile_length = fps // 2
        self.tile_px = tile_px
        self.overlap = overlap
        self.scale_factor = scale_factor
        if self.tile_length < vae.temporal_downsample_factor:
            raise ValueError(
                f"fps={fps} gives temporal tiles of {self.tile_length} frames, fewer than the VAE's "
                f"patch_length={vae.temporal_downsample_factor}"
            )

    def _tiling(self) -> dict:
        return dict(
            spatial_factor=self.vae.spatial_downsample_factor,
            temporal_factor=self.vae.temporal_downsample_factor,
            tile_length=self.tile_length,
            tile_px=self.tile_px,
            overlap=self.overlap,
            tile_map=self.tile_map,
        )

    @property
    def _device(self) -> torch.device:
        return self.vae.decoder.last_layer.weight.device

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float32 latent (1, z, T', H/p, W/p), scaled by scale_factor.

        Each temporal tile of fps//2 frames gives tile // patch_length latents; a last tile of exactly one frame
        gives one latent (the released single-frame case), a tail of 2..patch_length-1 frames is an error.
        """
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        T, H, W, _ = frames.shape
        p, pT = self.vae.spatial_downsample_factor, self.vae.temporal_downsample_factor
        if H % p or W % p or T < 1:
            raise ValueError(f"frames of shape {tuple(frames.shape)}: need T >= 1 and H, W multiples of {p}")
        tail = T % self.tile_length
        if 1 < tail < pT:
            raise ValueError(
                f"{T} frames leave a last temporal tile of {tail} frames; the VAE encodes 1 frame or at least "
                f"patch_length={pT} frames per tile (tile = fps//2 = {self.tile_length} frames)"
            )
        video = frames.to(self._device).permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, T, H, W)
        pixels = (video.float() / 127.5 - 1.0).to(self.vae.dtype)
        latent = tiled_encode(self.vae.encode, pixels, **self._tiling())
        # The scale is applied in the model dtype (bf16 as released), then widened.
        return (latent * self.scale_factor).float()

    @torch.no_grad()
    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent (1, z, t, h, w) -> uint8 frames (T, h*p, w*p, 3) on the model's device.

        T = 4 * t per full temporal tile; a temporal tile of one latent decodes to one frame (e.g. t = 4 with
        3-latent tiles gives 12 + 1 = 13 frames).
        """
        if latent.ndim != 5 or latent.shape[0] != 1:
            raise ValueError(f"latent must be (1, z, t, h, w), got {tuple(latent.shape)}")
        z = (latent.to(self._device) / self.scale_factor).to(self.vae.dtype)
        reduced = self.vae.dtype != torch.float32
        # The released decode runs under bf16 autocast (its encode does not); in fp32 autocast is off.
        with torch.autocast(device_type=self._device.type, dtype=self.vae.dtype, enabled=reduced):
            pixels = tiled_decode(self.vae.decode, z, **self._tiling())
        return to_uint8(pixels[0]).permute(1, 2, 3, 0)
