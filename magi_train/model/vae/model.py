"""The released MAGI-1 ViT VAE (model/README.md §5.1): a patchifying ViT encoder and an unpatchifying ViT decoder.

Built from the released `ddconfig` dict (the field names of the released `ViTEncoder`/`ViTDecoder`), with the
released state-dict keys, so the released `vae/` directory (diffusers layout) loads as is. Numerics follow the
released forward: per-head q/k/v normalisation with eps added to the *std* (not inside the sqrt), a cls token that
takes part in attention, a trilinearly resized positional table (align_corners=False) when the latent grid differs
from the reference grid, the posterior mean as the latent, and the single-frame special cases.

The computation dtype is the parameters' dtype: fp32 for the CPU oracle, bf16 on GPU as released.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, Union

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "ViTVAE"

# Eps of the parameter-free q/k/v norm and of every nn.LayerNorm in the released VAE (torch's default).
NORM_EPS = 1e-5
# The released encode() repeats a single frame this many times (a literal 4, not patch_length).
SINGLE_FRAME_REPEAT = 4

AttentionImpl = Literal["math", "sdpa"]


@dataclass(frozen=True)
class ViTVAEConfig:
    """The released `ddconfig`; defaults are the released constructor defaults (used when a field is absent)."""

    video_size: int = 256  # reference spatial size (pixels) of the positional table
    video_length: int = 16  # reference frame count of the positional table
    patch_size: int = 8
    patch_length: int = 4
    in_chans: int = 3
    z_chans: int = 4
    double_z: bool = True
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: Optional[float] = None  # accepted and ignored, as released: attention always scales by 1/sqrt(head_dim)
    drop_rate: float = 0.0  # dropout is inactive at inference
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # the released blocks use Identity whatever this says
    with_cls_token: bool = True
    norm_code: bool = False
    ln_in_attn: bool = False
    conv_last_layer: bool = False
    use_rope: bool = False
    use_final_proj: bool = False

    @staticmethod
    def from_ddconfig(ddconfig: Mapping[str, Any]) -> "ViTVAEConfig":
        known = {f.name for f in dataclasses.fields(ViTVAEConfig)}
        if "norm_layer" in ddconfig:
            raise ValueError("ddconfig field 'norm_layer' is not supported: the released VAE uses nn.LayerNorm")
        unknown = sorted(set(ddconfig) - known)
        if unknown:
            raise ValueError(f"ddconfig has fields the released ViTEncoder/ViTDecoder do not take: {unknown}")
        # Without this field the released tiler assumes temporal factor 1 while the model uses the default 4:
        # the released code disagrees with itself, so ask for the value.
        if "patch_length" not in ddconfig:
            raise ValueError("ddconfig must set 'patch_length' explicitly")
        config = ViTVAEConfig(**dict(ddconfig))
        config.validate()
        return config

    def validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"ddconfig field '{field}'={getattr(self, field)!r} is not supported: {why}")

        if self.use_rope:
            fail("use_rope", "the VAE rotary path is not implemented (the released path is a debug path)")
        if not self.conv_last_layer:
            fail("conv_last_layer", "the released decoder only supports conv_last_layer=True")
        if not self.with_cls_token:
            fail("with_cls_token", "the released positional resize assumes a cls row")
        if not self.double_z:
            fail("double_z", "the posterior needs mean and logvar channels")
        if self.attn_drop_rate != 0.0:
            fail("attn_drop_rate", "the released flash-attn call applies it even in eval mode (non-deterministic)")
        for name in ("video_size", "video_length", "patch_size", "patch_length", "in_chans", "z_chans",
                     "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        if self.embed_dim % self.num_heads:
            fail("num_heads", f"must divide embed_dim={self.embed_dim}")
        if not self.use_final_proj and self.embed_dim % self.patch_voxels:
            fail("embed_dim", f"must be a multiple of patch_length*patch_size^2={self.patch_voxels}")

    @property
    def patch_voxels(self) -> int:
        return self.patch_length * self.patch_size * self.patch_size

    @property
    def reference_grid(self) -> Tuple[int, int, int]:
        """Latent (T, H, W) grid the stored positional table was trained for."""
        side = self.video_size // self.patch_size
        return (self.video_length // self.patch_length, side, side)

    @property
    def unpatch_channels(self) -> int:
        # The released final_proj path hard-codes 4 channels per output voxel.
        return 4 if self.use_final_proj else self.embed_dim // self.patch_voxels

    def to_ddconfig(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def qkv_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free norm over the last dim: (x - mean) / (biased std + eps); eps is added to the std."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, correction=0)
    return (x - mean) / (std + NORM_EPS)


def resize_pos_embed(table: torch.Tensor, src: Tuple[int, int, int], dst: Tuple[int, int, int]) -> torch.Tensor:
    """(1, prod(src), D) -> (1, prod(dst), D) by trilinear interpolation on the (T, H, W) grid."""
    dim = table.shape[-1]
    grid = table.reshape(1, *src, dim).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=dst, mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(1, dst[0] * dst[1] * dst[2], dim)


class Attention(nn.Module):
    def __init__(self, config: ViTVAEConfig, attention: AttentionImpl):
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.normalize_qkv = config.ln_in_attn
        self.attention = attention
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        if self.normalize_qkv:
            qkv = qkv_norm(qkv)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # Plain softmax(q k^T / sqrt(d)) v: the exact reference the fused kernels approximate.
            scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: ViTVAEConfig, attention: AttentionImpl):
        super().__init__()
        dim = config.embed_dim
        # With ln_in_attn the pre-attention LayerNorm is replaced by the per-head q/k/v norm (no norm1 weights).
        self.norm1 = nn.Identity() if config.ln_in_attn else nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(config, attention)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: ViTVAEConfig):
        super().__init__()
        kernel = (config.patch_length, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_chans, config.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Trunk(nn.Module):
    """cls token + positional table + blocks + final norm, shared by the encoder and the decoder."""

    def __init__(self, config: ViTVAEConfig, attention: AttentionImpl):
        super().__init__()
        self.reference_grid = config.reference_grid
        dim = config.embed_dim
        num_tokens = self.reference_grid[0] * self.reference_grid[1] * self.reference_grid[2]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, dim))
        self.blocks = nn.ModuleList(Block(config, attention) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def positions(self, grid: Tuple[int, int, int]) -> torch.Tensor:
        if grid == self.reference_grid:
            return self.pos_embed
        resized = resize_pos_embed(self.pos_embed[:, 1:], self.reference_grid, grid)
        return torch.cat([self.pos_embed[:, :1], resized], dim=1)

    def run(self, tokens: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
        """(B, N, D) tokens in (T, H, W) order -> normalised (B, 1 + N, D), cls token first."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.positions(grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ViTEncoder(_Trunk):
    def __init__(self, config: ViTVAEConfig, attention: AttentionImpl):
        super().__init__(config, attention)
        self.patch_embed = PatchEmbed(config)
        self.last_layer = nn.Linear(config.embed_dim, 2 * config.z_chans)
        self.norm_code = config.norm_code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) pixels -> (B, 2z, T/pT, H/p, W/p) posterior moments (mean first)."""
        x = self.patch_embed(x)
        B, _, t, h, w = x.shape
        # The cls row is dropped after last_layer, as released (keeps the GEMM shape, hence the bits, equal).
        x = self.last_layer(self.run(x.flatten(2).transpose(1, 2), (t, h, w)))[:, 1:]
        x = x.reshape(B, t, h, w, -1).permute(0, 4, 1, 2, 3)
        if self.norm_code:
            # Unit L2 norm over all moment channels, computed in fp32 as released.
            dtype = x.dtype
            x = x.float()
            x = (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).to(dtype)
        return x


class ViTDecoder(_Trunk):
    def __init__(self, config: ViTVAEConfig, attention: AttentionImpl):
        super().__init__(config, attention)
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.patch_length = config.patch_length
        self.unpatch_channels = config.unpatch_channels
        self.proj_in = nn.Linear(config.z_chans, dim)
        self.use_final_proj = config.use_final_proj
        if config.use_final_proj:
            out = self.unpatch_channels * config.patch_voxels
            self.final_proj = nn.Linear(dim, out)
            self.final_norm = nn.LayerNorm(out, eps=NORM_EPS)
        self.last_layer = nn.Conv3d(self.unpatch_channels, 3, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, t, h, w) latent -> (B, 3, t*pT, h*p, w*p) pixels in about [-1, 1]."""
        B, C, t, h, w = z.shape
        x = self.run(self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(B, -1, C)), (t, h, w))[:, 1:]
        if self.use_final_proj:
            x = self.final_norm(self.final_proj(x))
        pT, p, c = self.patch_length, self.patch_size, self.unpatch_channels
        x = x.reshape(B, t, h, w, pT, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(B, c, t * pT, h * p, w * p)
        return self.last_layer(x)


class ViTVAE(nn.Module):
    """`encode`/`decode` are the released inference entry points (posterior mean, single-frame cases)."""

    def __init__(self, ddconfig: Union[ViTVAEConfig, Mapping[str, Any]], attention: AttentionImpl = "math"):
        super().__init__()
        config = ddconfig if isinstance(ddconfig, ViTVAEConfig) else ViTVAEConfig.from_ddconfig(ddconfig)
        config.validate()
        if attention not in ("math", "sdpa"):
            raise ValueError(f"attention must be 'math' or 'sdpa', got {attention!r}")
        self.config = config
        self.encoder = ViTEncoder(config, attention)
        self.decoder = ViTDecoder(config, attention)

    @property
    def spatial_downsample_factor(self) -> int:
        return self.config.patch_size

    @property
    def temporal_downsample_factor(self) -> int:
        return self.config.patch_length

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.last_layer.weight.dtype

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) pixels in [-1, 1] -> unscaled posterior mean (B, z, T', H/p, W/p).

        One frame is repeated 4 times and yields one latent frame. Otherwise T' = T // patch_length (trailing
        frames that do not fill a patch are dropped, as the released strided convolution does).
        """
        x = x.to(self.dtype)
        frames = x.shape[2]
        single = frames == 1
        if single:
            x = x.repeat(1, 1, SINGLE_FRAME_REPEAT, 1, 1)
        if x.shape[2] < self.config.patch_length:
            raise ValueError(
                f"cannot encode {frames} frames: the VAE needs 1 frame or at least patch_length="
                f"{self.config.patch_length} frames (the released model fails on this input too)"
            )
        mean = self.encoder(x)[:, : self.config.z_chans]
        return mean[:, :, :1] if single else mean

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z, t, h, w) unscaled latent -> (B, 3, T, h*p, w*p); one latent frame decodes to one frame."""
        x = self.decoder(z.to(self.dtype))
        return x[:, :, :1] if z.shape[2] == 1 else x

    # ---------------------------------------------------------------- diffusers-style directory

    @classmethod
    def from_pretrained(
        cls,
        directory: Union[str, Path],
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        attention: Optional[AttentionImpl] = None,
    ) -> "ViTVAE":
        """Load `config.json` + `diffusion_pytorch_model.safetensors`. `attention` defaults to the exact
        formula in fp32 and to torch's fused SDPA otherwise (the released model runs flash-attn in bf16)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"VAE directory {directory} does not exist")
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"VAE config {config_path} is missing")
        raw = json.loads(config_path.read_text())
        if raw.get("_class_name") != CLASS_NAME:
            raise ValueError(f"{config_path}: '_class_name' is {raw.get('_class_name')!r}, expected {CLASS_NAME!r}")
        if raw.get("model_type", "vit") != "vit":
            raise ValueError(f"{config_path}: 'model_type'={raw['model_type']!r} is not supported (only 'vit')")
        if not isinstance(raw.get("ddconfig"), dict):
            raise ValueError(f"{config_path}: 'ddconfig' is missing or not an object")
        try:
            config = ViTVAEConfig.from_ddconfig(raw["ddconfig"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_path}: {err}") from err

        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"VAE weights {weights_path} are missing")
        state = safetensors.torch.load_file(str(weights_path), device="cpu")

        if attention is None:
            attention = "math" if dtype == torch.float32 else "sdpa"
        with torch.device("meta"):
            model = cls(config, attention=attention)
        check_state_dict(model, state, str(weights_path))
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": CLASS_NAME, "ddconfig": self.config.to_ddconfig(), "model_type": "vit"}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        safetensors.torch.save_file(state, str(directory / WEIGHTS_NAME))


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one error naming every missing, unexpected and mis-shaped key of `state`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if shapes:
        problems.append(f"mis-shaped keys [{'; '.join(shapes)}]")
    if problems:
        raise ValueError(f"{source} does not match the VAE ddconfig: " + "; ".join(problems))
