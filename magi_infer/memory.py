"""What one generation holds in memory, computed from the preset (no weights needed).

* DiT weights: every parameter in its run-time dtype (model dtype, fp32 promotion list, fp8 linears of
  layers 1..L-2 at one byte plus their scales).
* KV cache: one `[K | V]` buffer per layer over the whole video's tokens, in the model dtype (model/README.md §2.3);
  with `kv_offload` it sits in host memory instead of on the GPU.
* Activations: the largest DiT call (a full window plus the clean re-forward, or the distill duplicate):
  the residual stream and the widest intermediate (the MLP's fc1 output) of one layer, plus the keys and
  values the call attends over. Kernels' own workspaces are not counted.
* T5-XXL encoder (fp32, 4.76e9 parameters) and the ViT VAE are separate rows: T5 runs on the CPU for the
  released 4.5B configs and on the GPU for 24B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch

from magi_train.config.schema import ModelConfig
from magi_train.model.dit import DTYPES, build_dit, module_dtype_plan

# The released VAE's shape (model/README.md §5.1: width 1024, 24 + 24 blocks, 8x8x4 patches, 16 latent channels,
# a 16 x 256^2 reference grid); the head count does not change the parameter count.
RELEASED_VAE_DDCONFIG = dict(video_size=256, video_length=16, patch_size=8, patch_length=4, in_chans=3, z_chans=16,
                             double_z=True, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True,
                             ln_in_attn=True, conv_last_layer=True)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int
    t5: int
    vae: int

    def gib(self) -> Dict[str, float]:
        return {k: v / 2**30 for k, v in self.__dict__.items()}


def dit_weight_bytes(cfg: ModelConfig, fp8: bool) -> int:
    model = build_dit(cfg, device="meta")
    plan = module_dtype_plan(model)
    quantised = set()
    if fp8:
        from magi_train.model.fp8 import fp8_module_names

        quantised = {name + ".weight" for name in fp8_module_names(cfg.num_layers)}
    total = 0
    for name, p in model.named_parameters():
        if name in quantised:
            out_f, in_f = p.shape
            total += out_f * in_f + 4 * (1 + in_f + 1 + in_f)  # fp8 weight + fp32 scales (upper bound)
        else:
            total += p.numel() * plan[name].itemsize
    return total


def tokens(cfg: ModelConfig, height: int, width: int, latent_frames: int) -> int:
    return latent_frames // cfg.t_patch_size * (height // 8 // cfg.patch_size) * (width // 8 // cfg.patch_size)


def estimate(cfg: ModelConfig, height: int, width: int, num_frames: int, window: int, fp8: bool) -> MemoryEstimate:
    """Bytes of one generation; guidance passes run one after another, so cfg_number does not change the peak."""
    itemsize = DTYPES[cfg.params_dtype].itemsize
    latents = math.ceil(math.ceil(num_frames / 4) / cfg.chunk_width) * cfg.chunk_width
    video_tokens = tokens(cfg, height, width, latents)
    chunk_tokens = tokens(cfg, height, width, cfg.chunk_width)
    kv = cfg.num_layers * video_tokens * cfg.num_query_groups * 2 * cfg.kv_channels * itemsize
    call_tokens = (window + 1) * chunk_tokens  # full window + clean re-forward (or distill duplicate)
    widest = max(cfg.ffn_hidden_size * (2 if cfg.gated_linear_unit else 1), 2 * cfg.num_attention_heads * cfg.kv_channels)
    # fp32 residual copies in the modulated add, the widest intermediate, q/k/v of the call, keys over
    # the whole attended range (cache + call).
    act = call_tokens * (4 * cfg.hidden_size * 4 + widest * itemsize + 3 * cfg.num_attention_heads * cfg.kv_channels * itemsize)
    act += (window + 1 + window) * chunk_tokens * cfg.num_query_groups * 2 * cfg.kv_channels * itemsize
    return MemoryEstimate(dit_weight_bytes(cfg, fp8), kv, int(act), 4 * t5_xxl_encoder_params(), 2 * vae_params())


def t5_xxl_encoder_params() -> int:
    """Parameters of the t5-v1_1-xxl encoder (released T5, run in fp32), counted on the meta device."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        return sum(p.numel() for p in T5EncoderModel(config).parameters())


def measured_weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def vae_params() -> int:
    from magi_train.model.vae import ViTVAE

    with torch.device("meta"):
        return sum(p.numel() for p in ViTVAE(RELEASED_VAE_DDCONFIG).parameters())
