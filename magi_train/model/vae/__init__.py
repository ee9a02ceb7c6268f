"""The released MAGI-1 ViT VAE for inference: model, tiled coding and the frames <-> latents codec."""

from .codec import RELEASED_SCALE_FACTOR, VaeCodec, to_uint8
from .model import ViTVAE, ViTVAEConfig, qkv_norm, resize_pos_embed
from .tiling import blend_ramp_, tiled_decode, tiled_encode

__all__ = [
    "RELEASED_SCALE_FACTOR",
    "VaeCodec",
    "ViTVAE",
    "ViTVAEConfig",
    "blend_ramp_",
    "qkv_norm",
    "resize_pos_embed",
    "tiled_decode",
    "tiled_encode",
    "to_uint8",
]
