"""A decoder for the latent space of the built-in synthetic dataset (`magi_train/data/synthetic.py`).

The tiny preset is trained on blobs drawn directly as 16-channel "latents", with no VAE: each palette
colour is a fixed channel signature. To watch what such a model generates we project every latent pixel on
the signatures and paint the colours it contains, upsampled 8x like the real VAE's spatial factor and
4 frames per latent frame like its temporal factor. It is a faithful view of that toy latent space, not a
VAE: a model trained on real VAE latents needs `vae.kind=vit`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from magi_train.data.synthetic import PALETTE, colour_signature

_RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
        "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "cyan": (40, 220, 230)}
_BACKGROUND = (24, 24, 32)
_FULL_SCALE = 2.0  # a projection of this size paints the full colour (the blob peak amplitude is 2-3)


class LatentPreviewDecoder:
    spatial = 8
    temporal = 4

    def __init__(self, channels: int = 16):
        sig = torch.from_numpy(np.stack([colour_signature(name, channels) for name in PALETTE])).float()
        self.signatures = sig / channels  # (K, C): <z, sig> / C is the amplitude of a unit-RMS signature
        self.colours = torch.tensor([_RGB[name] for name in PALETTE], dtype=torch.float32)  # (K, 3)

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        """(1, C, T, h, w) -> uint8 frames (4T, 8h, 8w, 3)."""
        z = latent[0].float().cpu()
        weights = torch.einsum("kc,cthw->kthw", self.signatures, z).clamp(min=0) / _FULL_SCALE
        weights = weights.clamp(max=1.0)
        background = torch.tensor(_BACKGROUND, dtype=torch.float32)
        rgb = background[:, None, None, None] + torch.einsum("kthw,kr->rthw", weights, self.colours)
        rgb = rgb.clamp(0, 255)  # (3, T, h, w)
        frames = F.interpolate(rgb[None], scale_factor=(self.temporal, self.spatial, self.spatial), mode="nearest")[0]
        return frames.permute(1, 2, 3, 0).to(torch.uint8)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("vae.kind=preview cannot encode images or videos (i2v/v2v need vae.kind=vit)")
