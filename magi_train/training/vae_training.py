"""Train a small instance of the released ViT VAE on the synthetic shape videos (`data/synthetic_video.py`).

The architecture is `model/vae/model.py`'s `ViTVAE`, unchanged; only its size is small (`VaeTrainConfig`'s
embed_dim / depth / heads). Training clips are drawn in memory: clip i of step s is a pure function of
(seed, s, i), so a run is reproducible on CPU for a fixed thread count; held-out clips come from another seed.

Loss per step (pixels in [-1, 1]):
    L1(x̂, x) + MSE(x̂, x) + edge_weight * L1(∇x̂, ∇x) + kl_weight * KL(q(z|x) || N(0, 1))
where x̂ decodes a sample z = mean + exp(logvar / 2) * eps of the posterior (the released `encode` keeps only the
mean; training needs the spread), ∇ is the spatial finite difference, and KL is averaged over latent elements.

After training the latent is normalised *inside the weights* (`bake_latent_normalisation`): the encoder's mean
rows are shifted by the per-channel mean and scaled so that the codec's released scale factor (0.18215, the
VaeConfig default, which tools/prepare_dataset.py applies) gives latents of overall std 1 and per-channel mean 0;
the decoder's input projection undoes it exactly. So the directory works with every default in the project.

The held-out PSNR goes through the real inference path (`VaeCodec`: uint8 frames, tiled encode of the posterior
mean, tiled decode, uint8), on the weights as written (bf16 or fp32), so what is reported is what users get.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from magi_train.checkpoint.atomic import fsync_dir, replace_dir, write_json_durably
from magi_train.data.synthetic_video import plan_clip, render_clip
from magi_train.model.vae.codec import RELEASED_SCALE_FACTOR, VaeCodec
from magi_train.model.vae.model import CONFIG_NAME, WEIGHTS_NAME, ViTVAE

RECORD_NAME = "train_vae.json"
# Logvar is clamped before exp, as the usual diagonal-Gaussian posterior does, so a stray activation cannot
# overflow the sample or the KL term.
LOGVAR_RANGE = (-30.0, 20.0)
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Seed-sequence streams: training clips, the held-out clips, the posterior noise, the normalisation batch.
_TRAIN, _HELD_OUT, _NOISE, _STATS = 0, 1, 2, 3


@dataclass(frozen=True)
class VaeTrainConfig:
    steps: int = 1500
    batch_size: int = 4
    lr: float = 1e-3
    min_lr: float = 5e-5  # end of the cosine decay
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_seed: int = 1  # held-out clips; must differ from `seed`
    sizes: Tuple[Tuple[int, int], ...] = ((128, 128), (160, 96))  # (width, height); step s trains size s mod n
    frames: int = 12  # per training clip: the codec's temporal tile at 24 fps (fps // 2)
    fps: int = 24
    kl_weight: float = 1e-4
    edge_weight: float = 0.5
    # Extra L1+MSE weight on the pixels of the shapes (1 + shape_weight there): they are a few percent of the
    # pixels but what a prompt-following detector reads (their colour); 0 = every pixel alike.
    shape_weight: float = 0.0
    # The model (the released ViTVAE; 8x8 spatial, 4x temporal patches and 16 channels as released).
    embed_dim: int = 192
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    use_final_proj: bool = True  # 4 channels per output voxel, as the released 1024-wide model has
    eval_clips: int = 4
    eval_frames: int = 24
    eval_size: Tuple[int, int] = (128, 128)
    stats_clips: int = 16  # training-distribution clips the latent normalisation is measured on
    weights_dtype: str = "bfloat16"
    log_every: int = 50

    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        for name in ("steps", "batch_size", "frames", "fps", "embed_dim", "depth", "num_heads", "eval_clips",
                     "eval_frames", "stats_clips", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            fail("lr", f"need lr > 0 and 0 <= min_lr ({self.min_lr}) <= lr")
        if self.warmup < 0 or self.grad_clip <= 0 or self.kl_weight < 0 or self.edge_weight < 0:
            fail("warmup", "warmup, kl_weight and edge_weight must be >= 0 and grad_clip > 0 "
                           f"(got warmup={self.warmup}, grad_clip={self.grad_clip}, kl_weight={self.kl_weight}, "
                           f"edge_weight={self.edge_weight})")
        if not (isinstance(self.shape_weight, (int, float)) and math.isfinite(self.shape_weight)
                and self.shape_weight >= 0):
            fail("shape_weight", f"must be a finite number >= 0, got {self.shape_weight!r}")
        if self.seed == self.eval_seed:
            fail("eval_seed", f"must differ from seed={self.seed}: the held-out clips would be training clips")
        if self.frames % 4:
            fail("frames", "must be a multiple of the VAE's patch_length 4")
        if (self.fps // 2) % 4 or self.fps < 8:
            fail("fps", "fps // 2 (the codec's temporal tile) must be a multiple of patch_length 4: 8, 16, 24, ...")
        if self.eval_frames % (self.fps // 2):
            fail("eval_frames", f"must be a whole number of codec tiles of fps // 2 = {self.fps // 2} frames")
        if not self.sizes:
            fail("sizes", "needs at least one WIDTHxHEIGHT")
        for width, height in (*self.sizes, self.eval_size):
            if width % 8 or height % 8 or width < 16 or height < 16:
                raise ValueError(f"clip size {width}x{height}: width and height must be multiples of the VAE's "
                                 f"patch_size 8, at least 16")
        if self.embed_dim % self.num_heads:
            fail("num_heads", f"must divide embed_dim={self.embed_dim}")
        if self.weights_dtype not in WEIGHT_DTYPES:
            fail("weights_dtype", f"must be one of {sorted(WEIGHT_DTYPES)}")

    def ddconfig(self) -> Dict:
        """The released ddconfig fields; the positional table's reference grid is the first training size."""
        width, height = self.sizes[0]
        if width != height:
            raise ValueError(f"sizes[0]={width}x{height}: the first size sets the VAE's square reference grid "
                             f"(video_size), so it must be square")
        return dict(video_size=width, video_length=self.frames, patch_size=8, patch_length=4, in_chans=3,
                    z_chans=16, double_z=True, embed_dim=self.embed_dim, depth=self.depth,
                    num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=True, ln_in_attn=True,
                    conv_last_layer=True, use_final_proj=self.use_final_proj)


# ------------------------------------------------------------------------------------------------ data


def synthetic_clips(seed: int, stream: int, index: int, count: int, size: Tuple[int, int], frames: int,
                    fps: int, masks: bool = False):
    """uint8 (count, frames, H, W, 3): clips drawn from (seed, stream, index, k). A training clip is a window of
    `frames` frames at a random offset in a clip twice as long, so direction changes fall inside some windows.
    `masks`: also return bool (count, frames, H, W), True where a shape is painted (the frame is not its
    background), for the loss's shape weight."""
    width, height = size
    out = np.empty((count, frames, height, width, 3), np.uint8)
    painted = np.empty((count, frames, height, width), bool) if masks else None
    for k in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFF_FFFF, stream, index, k]))
        # Long enough to span a change of direction (at frame fps) from any window start.
        total = frames if stream == _HELD_OUT else max(2 * frames, fps + frames)
        plan = plan_clip(rng, width, height, total, fps)  # make_clip's draws, with the background kept
        clip = render_clip(plan).frames
        start = 0 if stream == _HELD_OUT else int(rng.integers(0, total - frames + 1))
        out[k] = clip[start:start + frames]
        if masks:
            background = np.clip(np.round(plan.background), 0, 255).astype(np.uint8)
            painted[k] = (out[k] != background[None]).any(-1)
    return (out, painted) if masks else out


def to_pixels(clips: np.ndarray) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float32 (B, 3, T, H, W) in [-1, 1], the codec's mapping."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------ loss


def posterior(vae: ViTVAE, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, logvar), each (B, 16, T/4, H/8, W/8), with gradients (ViTVAE.encode has none)."""
    moments = vae.encoder(x)
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(*LOGVAR_RANGE)


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences: sharp shape edges cost what blurs them."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return 0.5 * ((dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean())


def vae_loss(vae: ViTVAE, x: torch.Tensor, noise: torch.Generator, cfg: VaeTrainConfig,
             shapes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """`shapes`: bool (B, T, H, W) shape pixels, weighted 1 + cfg.shape_weight in L1 and MSE (mean weight 1)."""
    mean, logvar = posterior(vae, x)
    eps = torch.randn(mean.shape, generator=noise, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * eps
    recon = vae.decoder(z)
    if shapes is None or cfg.shape_weight == 0:
        l1 = (recon - x).abs().mean()
        mse = F.mse_loss(recon, x)
    else:
        w = 1.0 + cfg.shape_weight * shapes[:, None].float()
        w = w / w.mean()
        l1 = (w * (recon - x).abs()).mean()
        mse = (w * (recon - x).square()).mean()
    edge = edge_l1(recon, x)
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + mse + cfg.edge_weight * edge + cfg.kl_weight * kl
    parts = {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "edge": edge.item(), "kl": kl.item()}
    return loss, parts


def lr_at(step: int, cfg: VaeTrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from lr down to min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ training


@dataclass
class TrainResult:
    vae: ViTVAE
    losses: List[Dict[str, float]] = field(default_factory=list)  # one entry per logged step
    first_loss: float = math.nan
    last_loss: float = math.nan  # mean of the last min(log_every, steps) steps
    first_window_loss: float = math.nan  # mean of the first min(log_every, steps) steps
    wall_s: float = 0.0


def build_vae(cfg: VaeTrainConfig) -> ViTVAE:
    torch.manual_seed(cfg.seed)
    # Fused SDPA for speed; the saved directory is loaded with the exact "math" attention in fp32 (same formula).
    return ViTVAE(cfg.ddconfig(), attention="sdpa")


def train_vae(cfg: VaeTrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    cfg.validate()
    vae = build_vae(cfg).train()
    decay = [p for n, p in vae.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in vae.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    noise = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, _NOISE]).generate_state(1)[0]))
    result = TrainResult(vae)
    window: List[float] = []
    first_window: List[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        size = cfg.sizes[step % len(cfg.sizes)]
        weighted = cfg.shape_weight > 0
        drawn = synthetic_clips(cfg.seed, _TRAIN, step, cfg.batch_size, size, cfg.frames, cfg.fps, masks=weighted)
        clips, shapes = (drawn[0], torch.from_numpy(drawn[1])) if weighted else (drawn, None)
        x = to_pixels(clips)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss, parts = vae_loss(vae, x, noise, cfg, shapes)
        if not math.isfinite(parts["loss"]):
            raise FloatingPointError(f"VAE training diverged at step {step}: loss {parts['loss']} ({parts}); "
                                     f"try a lower lr (now {cfg.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        if step == 0:
            result.first_loss = parts["loss"]
        if step < cfg.log_every:
            first_window.append(parts["loss"])
        window = (window + [parts["loss"]])[-cfg.log_every:]
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            entry = {"step": step + 1, "lr": lr_at(step, cfg), "mean_loss": float(np.mean(window)), **parts}
            result.losses.append(entry)
            log(f"step {step + 1}/{cfg.steps}  loss {entry['mean_loss']:.4f} (l1 {parts['l1']:.4f} mse "
                f"{parts['mse']:.4f} edge {parts['edge']:.4f} kl {parts['kl']:.2f})  lr {entry['lr']:.2e}  "
                f"{time.perf_counter() - start:.0f} s")
    result.wall_s = time.perf_counter() - start
    result.first_window_loss = float(np.mean(first_window))
    result.last_loss = float(np.mean(window))
    vae.eval()
    return result


# ------------------------------------------------------------------------------------------------ latents


@torch.no_grad()
def bake_latent_normalisation(vae: ViTVAE, channel_mean: torch.Tensor, std: float,
                              scale_factor: float = RELEASED_SCALE_FACTOR) -> None:
    """Rewrite the weights so the new posterior mean is (mean - channel_mean) / (std * scale_factor): after the
    codec's `scale_factor` the latent has per-channel mean 0 and overall std 1. The logvar rows shift by the same
    log-scale and the decoder's proj_in takes the inverse map, so decode(encode(x)) is unchanged (up to rounding)."""
    z = vae.config.z_chans
    k = 1.0 / (std * scale_factor)
    head = vae.encoder.last_layer  # rows [0, z) mean, [z, 2z) logvar
    m = channel_mean.to(head.weight.dtype)
    head.weight[:z] *= k
    head.bias[:z] = (head.bias[:z] - m) * k
    head.bias[z:] += 2.0 * math.log(k)
    proj = vae.decoder.proj_in  # y = W z + b, with z = z' / k + m
    proj.bias += proj.weight @ m
    proj.weight /= k


@torch.no_grad()
def latent_stats(latents: torch.Tensor) -> Dict:
    """Statistics of (N, C, t, h, w) latents: overall and per channel."""
    per_channel = latents.transpose(0, 1).flatten(1)
    return {"mean": latents.mean().item(), "std": latents.std().item(),
            "channel_mean": [round(v, 4) for v in per_channel.mean(1).tolist()],
            "channel_std": [round(v, 4) for v in per_channel.std(1).tolist()]}


@torch.no_grad()
def training_latents(vae: ViTVAE, cfg: VaeTrainConfig) -> torch.Tensor:
    """Posterior means (unscaled) of `stats_clips` fresh training-distribution clips at every training size."""
    out = []
    for i, size in enumerate(cfg.sizes):
        clips = synthetic_clips(cfg.seed, _STATS, i, cfg.stats_clips, size, cfg.frames, cfg.fps)
        for k in range(len(clips)):  # one by one: the memory of a batch of 128x128 clips adds up
            out.append(posterior(vae, to_pixels(clips[k:k + 1]))[0].flatten(2))
    return torch.cat(out, dim=2)  # (1, C, all positions)


# ------------------------------------------------------------------------------------------------ evaluation


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 arrays (peak 255)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * math.log10(255.0 ** 2 / mse))


@dataclass
class Evaluation:
    psnr: float  # dB over all held-out clips together
    clip_psnr: List[float]
    latent: Dict  # latent_stats of the scaled latents the codec returns
    encode_s: float  # per clip, the fastest of the clips
    decode_s: float


@torch.no_grad()
def evaluate(vae: ViTVAE, clips: np.ndarray, fps: int, scale_factor: float = RELEASED_SCALE_FACTOR) -> Evaluation:
    """Round-trip uint8 (N, T, H, W, 3) clips through VaeCodec (the inference and prepare_dataset path)."""
    codec = VaeCodec(vae, fps=fps, scale_factor=scale_factor)
    recon, latents, enc, dec = [], [], [], []
    for clip in clips:
        t0 = time.perf_counter()
        latent = codec.encode_frames(torch.from_numpy(clip))
        t1 = time.perf_counter()
        frames = codec.decode_latents(latent).numpy()
        t2 = time.perf_counter()
        recon.append(frames)
        latents.append(latent)
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    recon_all = np.stack(recon)
    if recon_all.shape != clips.shape:
        raise RuntimeError(f"the codec returned {recon_all.shape} for clips of shape {clips.shape}")
    return Evaluation(psnr(recon_all, clips), [round(psnr(r, c), 3) for r, c in zip(recon, clips)],
                      latent_stats(torch.cat(latents)), min(enc), min(dec))


def held_out_clips(eval_seed: int, count: int, size: Tuple[int, int], frames: int, fps: int) -> np.ndarray:
    """The held-out clips: whole synthetic clips (not windows) from `eval_seed`."""
    return synthetic_clips(eval_seed, _HELD_OUT, 0, count, size, frames, fps)


# ------------------------------------------------------------------------------------------------ output


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_vae_directory(vae: ViTVAE, out: Path, record: Dict, weights_dtype: str) -> Path:
    """Write config.json, the safetensors weights (in `weights_dtype`) and train_vae.json into a temporary
    directory beside `out`, fsync them, and rename it to `out` (an existing `out` is replaced only then)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        vae.save_pretrained(tmp)
        dtype = WEIGHT_DTYPES[weights_dtype]
        state = {k: v.detach().to(dtype).contiguous() for k, v in vae.state_dict().items()}
        safetensors.torch.save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            _fsync(tmp / name)
        write_json_durably(tmp / RECORD_NAME, record)
        fsync_dir(tmp)
        return replace_dir(tmp, out, aside_prefix=f".{out.name}.old-")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_written(out: Path) -> ViTVAE:
    """The directory as users load it: fp32 compute, the exact attention formula."""
    return ViTVAE.from_pretrained(out, dtype=torch.float32)


def run(cfg: VaeTrainConfig, out: Path, command: Sequence[str], threads: Optional[int] = None,
        log: Callable[[str], None] = print) -> Dict:
    """Train, normalise the latent, write `out`, reload it and measure the held-out PSNR; returns the record."""
    cfg.validate()
    if threads is not None:
        torch.set_num_threads(threads)
    wall_start = time.perf_counter()
    result = train_vae(cfg, log=log)
    vae = result.vae

    raw = training_latents(vae, cfg)
    channel_mean = raw.mean(dim=(0, 2))
    raw_std = (raw - channel_mean[None, :, None]).std().item()
    bake_latent_normalisation(vae, channel_mean, raw_std)
    log(f"latent before normalisation: std {raw_std:.4f}, channel means {channel_mean.abs().max().item():.3f} "
        f"at most; baked so that x{RELEASED_SCALE_FACTOR} gives std 1")

    record = {
        "command": list(command),
        "config": dataclasses.asdict(cfg),
        "steps": cfg.steps,
        "seed": cfg.seed,
        "eval_seed": cfg.eval_seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "loss": {"first_step": result.first_loss, "first_window": result.first_window_loss,
                 "last_window": result.last_loss, "log": result.losses},
        "train_wall_s": round(result.wall_s, 1),
        "scale_factor": RELEASED_SCALE_FACTOR,
        "latent_before_normalisation": {"std": raw_std, "channel_mean": [round(v, 4) for v in channel_mean.tolist()]},
    }
    # Written once to reload the weights as stored (bf16 rounding included), then rewritten with the figures.
    write_vae_directory(vae, out, record, cfg.weights_dtype)
    loaded = load_written(out)
    evaluations = {}
    for size in (cfg.eval_size, *[s for s in cfg.sizes if s != cfg.eval_size]):
        clips = held_out_clips(cfg.eval_seed, cfg.eval_clips, size, cfg.eval_frames, cfg.fps)
        ev = evaluate(loaded, clips, cfg.fps)
        evaluations[f"{size[0]}x{size[1]}"] = ev
        log(f"held-out PSNR {size[0]}x{size[1]}x{cfg.eval_frames} ({cfg.eval_clips} clips, seed {cfg.eval_seed}): "
            f"{ev.psnr:.2f} dB  per clip {ev.clip_psnr}; latent x{RELEASED_SCALE_FACTOR}: mean "
            f"{ev.latent['mean']:.3f} std {ev.latent['std']:.3f}; encode {ev.encode_s * 1000:.0f} ms, decode "
            f"{ev.decode_s * 1000:.0f} ms per clip")
    main = evaluations[f"{cfg.eval_size[0]}x{cfg.eval_size[1]}"]
    record.update({
        "psnr_db": round(main.psnr, 3),
        "eval": {name: {"psnr_db": round(ev.psnr, 3), "clip_psnr_db": ev.clip_psnr, "frames": cfg.eval_frames,
                        "clips": cfg.eval_clips, "latent": ev.latent, "encode_s_per_clip": round(ev.encode_s, 4),
                        "decode_s_per_clip": round(ev.decode_s, 4)} for name, ev in evaluations.items()},
        "latent": main.latent,
        "recommended_scale_factor": RELEASED_SCALE_FACTOR,
        "wall_s": round(time.perf_counter() - wall_start, 1),
    })
    # The weights are unchanged: rewrite the directory with the complete record (still one atomic rename).
    write_vae_directory(loaded, out, record, cfg.weights_dtype)
    return record
