"""What one generation holds in memory, computed from the preset (no weights needed).

* DiT weights: every parameter in its run-time dtype (model dtype, fp32 promotion list, fp8 linears of
  layers 1..L-2 at one byte plus their scales).
* KV cache: one `[K | V]` buffer per layer over the chunks of the attention window, in the model dtype
  (model/README.md §2.3): `cache_window` of the sampler's own plans (magi_train/diffusion/kv_cache.py), so it
  does not grow with the video; with `kv_offload` it sits in host memory instead of on the GPU.
* Activations: the largest DiT call (a full window plus the clean re-forward, or the distill duplicate):
  the residual stream and the widest intermediate (the MLP's fc1 output) of one layer, plus the keys and
  values the call attends over where they are not the cache itself (kv_offload or no cache: the window copied
  to the GPU and concatenated with the call's own). Kernels' own workspaces are not counted.
* T5-XXL encoder (fp32, 4.76e9 parameters) and the ViT VAE are separate rows: T5 runs on the CPU for the
  released 4.5B configs and on the GPU for 24B.

`generation_rows` turns one generate config into rows per memory pool (the DiT's device, host memory) and phase
(while the weights load: the whole state dict as read plus this rank's model built on the CPU; while sampling),
with this rank's share under tp / cp / pp. `memory_problem` compares each pool's peak with what is free
(`torch.cuda.mem_get_info`, or MemAvailable of /proc/meminfo) and says what does not fit and which settings
reduce it. The rows are an estimate: allocator slack, kernels' workspaces and the VAE's decode activations
are not counted, so a generation that passes can still run short by a little, never by the large amounts
(a whole KV cache, a model too big for the device) the check exists for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from magi_infer.config import SPATIAL, TEMPORAL, GenerateConfig, runtime_model
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


def kv_window(cfg: ModelConfig, sampler: SamplerConfig, num_chunks: int, prefix_chunks: int = 0):
    """The sampler's `CacheWindow` for a generation of `num_chunks` chunks (capacity: chunks per layer)."""
    from magi_train.diffusion.kv_cache import cache_window
    from magi_train.diffusion.schedule import staircase

    plans = staircase(num_chunks, sampler.window_size, sampler.num_steps, prefix_chunks,
                      tuple(sampler.noise2clean_kvrange), sampler.clean_chunk_kvrange)
    return cache_window(plans, prefix_chunks, duplicate=sampler.cfg_number == 1 and cfg.distill)


def estimate(cfg: ModelConfig, height: int, width: int, num_frames: int, window: int, fp8: bool,
             released_text_and_vae: bool = True, sampler: Optional[SamplerConfig] = None,
             prefix_latents: int = 0) -> MemoryEstimate:
    """Bytes of one generation; guidance passes run one after another, so cfg_number does not change the peak.
    `released_text_and_vae=False` leaves the t5 and vae fields 0 (counting them imports transformers).
    `sampler`: the sampler settings (default: the released ones with window_size=`window`); `prefix_latents`:
    latent frames of a v2v prefix among the video's (a long prefix widens the cache's window)."""
    sampler = SamplerConfig(window_size=window) if sampler is None else sampler
    window = sampler.window_size
    itemsize = DTYPES[cfg.params_dtype].itemsize
    chunks = math.ceil(math.ceil(num_frames / 4) / cfg.chunk_width)
    chunk_tokens = tokens(cfg, height, width, cfg.chunk_width)
    per_token = cfg.num_query_groups * 2 * cfg.kv_channels * itemsize  # [K | V] of one token in one layer
    win = kv_window(cfg, sampler, chunks, min(prefix_latents // cfg.chunk_width, chunks - 1))
    kv = cfg.num_layers * win.capacity * chunk_tokens * per_token if sampler.kv_cache else 0
    call_tokens = (window + 1) * chunk_tokens  # full window + clean re-forward (or distill duplicate)
    widest = max(cfg.ffn_hidden_size * (2 if cfg.gated_linear_unit else 1), 2 * cfg.num_attention_heads * cfg.kv_channels)
    # fp32 residual copies in the modulated add, the widest intermediate, q/k/v of the call.
    act = call_tokens * (4 * cfg.hidden_size * 4 + widest * itemsize + 3 * cfg.num_attention_heads * cfg.kv_channels * itemsize)
    if sampler.kv_offload or not sampler.kv_cache:
        # Keys attended over are a copy there: the window read from the host (or recomputed) + the call's own,
        # concatenated. On the device the call writes its keys into the cache and attends over it in place.
        act += (win.max_read + 2 * (window + 1)) * chunk_tokens * per_token
    t5, vae = (4 * t5_xxl_encoder_params(), 2 * vae_params()) if released_text_and_vae else (0, 0)
    return MemoryEstimate(dit_weight_bytes(cfg, fp8), kv, int(act), t5, vae)


def t5_xxl_encoder_params() -> int:
    """Parameters of the t5-v1_1-xxl encoder (released T5, run in fp32), counted on the meta device."""
    from magi_train.model.text.extra import t5_dependency

    transformers = t5_dependency("transformers", "the T5 memory estimate")
    T5Config, T5EncoderModel = transformers.T5Config, transformers.T5EncoderModel

    config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        return sum(p.numel() for p in T5EncoderModel(config).parameters())


def measured_weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def vae_params(vae_dir: Optional[str] = None) -> int:
    """Parameters of the ViT VAE in `vae_dir` (its config.json's ddconfig), else of the released one."""
    from magi_train.model.vae import ViTVAE

    ddconfig = RELEASED_VAE_DDCONFIG
    if vae_dir is not None:
        try:
            ddconfig = json.loads((Path(vae_dir) / "config.json").read_text())["ddconfig"]
        except (OSError, ValueError, KeyError, TypeError):  # the engine reports a broken VAE directory itself
            pass
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in ViTVAE(ddconfig).parameters())
    except (TypeError, ValueError, KeyError):
        with torch.device("meta"):
            return sum(p.numel() for p in ViTVAE(RELEASED_VAE_DDCONFIG).parameters())


# ---------------------------------------------------------------------------- one generation, per pool

GIB = 2**30
DEVICE, HOST = "device", "host"
LOAD, RUN = "loading the weights", "sampling"


@dataclass(frozen=True)
class Row:
    name: str
    nbytes: int
    pool: str  # DEVICE (where the DiT runs; the same memory as HOST on a CPU) or HOST
    phases: Tuple[str, ...]  # when it is held: LOAD and/or RUN
    per_rank: bool = True  # every rank holds one (False: one for the whole job, T5 on rank 0)


def peak(rows: List[Row], pool: str, ranks: int = 1) -> Tuple[int, str]:
    """(bytes, phase) of the pool's fullest phase, with `ranks` processes drawing on it."""
    def total(phase: str) -> int:
        return sum(r.nbytes * (ranks if r.per_rank else 1) for r in rows if r.pool == pool and phase in r.phases)

    return max(((total(phase), phase) for phase in (LOAD, RUN)), key=lambda t: t[0])


def generation_rows(cfg: GenerateConfig, device_type: str, is_main: bool = True) -> List[Row]:
    """This rank's memory for `cfg` (rank 0 also runs T5), pooled by where it lives. On a CPU device every row
    is host memory."""
    mc, s, p, v = runtime_model(cfg), cfg.sampler, cfg.parallel, cfg.video
    cuda = device_type == "cuda"
    frames = cfg.num_frames + ((cfg.prefix_frames or 0) if cfg.mode == "v2v" else 0)
    # v2v: the prefix is part of the video the sampler runs over (its latents, rounded down to whole frames).
    prefix_latents = (cfg.prefix_frames or 0) // TEMPORAL if cfg.mode == "v2v" else 0
    est = estimate(mc, v.height, v.width, frames, s.window_size, s.fp8, released_text_and_vae=False, sampler=s,
                   prefix_latents=prefix_latents)
    chunks = math.ceil(math.ceil(frames / TEMPORAL) / mc.chunk_width)
    latent_frames = chunks * mc.chunk_width
    channels = mc.in_channels // (2 if mc.half_channel_vae else 1)
    latent_px = (v.height // SPATIAL) * (v.width // SPATIAL)
    kv_share = p.pp * min(p.tp * p.cp, mc.num_query_groups)  # heads split over tp x cp, replicated past the groups
    cached_chunks = est.kv_cache // max(1, mc.num_layers * tokens(mc, v.height, v.width, mc.chunk_width) *
                                        mc.num_query_groups * 2 * mc.kv_channels * DTYPES[mc.params_dtype].itemsize)
    rows = [
        Row(f"DiT weights ({mc.params_dtype}{', fp8 linears' if s.fp8 else ''}; this rank's share of "
            f"tp={p.tp} x pp={p.pp})", est.weights // (p.tp * p.pp), DEVICE, (LOAD, RUN) if not cuda else (RUN,)),
        Row("the whole state dict as read from ckpt.dir (every rank reads all of it)", est.weights, HOST, (LOAD,)),
    ]
    if cuda:
        rows.append(Row("this rank's model, built on the CPU before it moves to the GPU", est.weights // (p.tp * p.pp),
                        HOST, (LOAD,)))
    if s.kv_cache:
        rows.append(Row(f"KV cache ({mc.params_dtype}, a window of {cached_chunks} of {chunks} chunks x "
                        f"{mc.num_layers} layers; this rank's share: 1/{kv_share})", est.kv_cache // kv_share,
                        HOST if s.kv_offload else DEVICE, (RUN,)))
    rows += [
        Row(f"activations of the largest DiT call ({s.window_size}-chunk window; 1/{p.tp * p.cp} of it)",
            est.activations // (p.tp * p.cp), DEVICE, (RUN,)),
        Row(f"latents, noise and sampler state (fp32, {latent_frames} latent frames)",
            2 * channels * latent_frames * latent_px * 4, DEVICE, (RUN,)),
        Row(f"caption rows (fp32, {chunks} chunks x {mc.caption_max_length} tokens)",
            2 * chunks * mc.caption_max_length * mc.caption_channels * 4, DEVICE, (RUN,)),
    ]
    on_gpu = cuda and str(cfg.text.device).startswith("cuda")
    # Rank 0's T5 on the GPU weighs on rank 0 only; in host memory on the host it shares with the other ranks.
    if cfg.text.encoder == "t5" and (is_main or not on_gpu):
        rows.append(Row(f"T5 encoder (fp32, on text.device={cfg.text.device}; rank 0 only)",
                        4 * t5_encoder_params(cfg.text.t5_dir), DEVICE if on_gpu else HOST, (RUN,), per_rank=False))
    if cfg.vae.kind == "vit":
        vae_itemsize = (2 if cuda else 4) if cfg.vae.dtype == "auto" else DTYPES[cfg.vae.dtype].itemsize
        rows.append(Row(f"VAE weights ({'bfloat16' if vae_itemsize == 2 else 'float32'})",
                        vae_itemsize * vae_params(cfg.vae.dir), DEVICE, (RUN,)))
    if not cuda:
        rows = [Row(r.name, r.nbytes, HOST, r.phases, r.per_rank) for r in rows]
    return rows


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory of `device` (CUDA: mem_get_info), or of the host (MemAvailable); None if it cannot be read."""
    from magi_train.observability.memory_check import available_memory  # the one reader, shared with training

    available = available_memory(device)
    return None if available is None else available.bytes


def memory_problem(cfg: GenerateConfig, device: torch.device, is_main: bool = True,
                   ranks_on_host: int = 1) -> Optional[str]:
    """None when the generation fits in what `device` and the host have free; else what does not, in GiB.

    `ranks_on_host`: processes of the job on this host, each holding its own rows of host memory."""
    rows = generation_rows(cfg, device.type, is_main)
    pools = [(DEVICE, device, str(device), 1)] if device.type == "cuda" else []
    pools.append((HOST, torch.device("cpu"), "host memory", ranks_on_host))
    short = []
    for pool, where, label, ranks in pools:
        need, phase = peak(rows, pool, ranks)
        have = available_bytes(where)
        if have is None or need <= have:
            continue
        shared = f" ({ranks} ranks on this host, each holding the rows marked x{ranks})" if ranks > 1 else ""
        lines = [f"  {label}: {need / GIB:.2f} GiB needed while {phase}{shared}, {have / GIB:.2f} GiB free"]
        lines += [f"    {r.nbytes / GIB:10.2f} GiB{f' x{ranks}' if ranks > 1 and r.per_rank else ''}  {r.name}"
                  for r in rows if r.pool == pool and phase in r.phases]
        short.append("\n".join(lines))
    if not short:
        return None
    return ("this generation does not fit in memory (an estimate; check_memory=false skips the check):\n"
            + "\n".join(short) + "\n  reduce it with: " + ", ".join(_knobs(cfg, device)))


def _knobs(cfg: GenerateConfig, device: torch.device) -> List[str]:
    mc, v = runtime_model(cfg), cfg.video
    knobs = [f"num_frames (now {cfg.num_frames})", f"video.height / video.width (now {v.height}x{v.width})",
             f"more processes: parallel.cp / parallel.pp / parallel.tp (now {cfg.parallel.cp} / {cfg.parallel.pp} / "
             f"{cfg.parallel.tp})"]
    if DTYPES[mc.params_dtype].itemsize == 4:
        knobs.append("dtype=bfloat16 (now float32)")
    if device.type == "cuda" and cfg.sampler.kv_cache and not cfg.sampler.kv_offload:
        knobs.append("sampler.kv_offload=true (the KV cache in host memory)")
    if device.type == "cuda" and cfg.text.encoder == "t5" and str(cfg.text.device).startswith("cuda"):
        knobs.append("text.device=cpu (T5 off the GPU)")
    return knobs


def t5_encoder_params(t5_dir: Optional[str] = None) -> int:
    """Parameters of the T5 encoder in `t5_dir` (its config.json, counted on the meta device); the released
    t5-v1_1-xxl when there is none to read."""
    from magi_train.model.text.extra import t5_dependency
    from magi_train.model.text.t5 import resolve_t5_directory

    transformers = t5_dependency("transformers", "the T5 memory estimate")
    T5Config, T5EncoderModel = transformers.T5Config, transformers.T5EncoderModel

    try:
        config = T5Config.from_pretrained(resolve_t5_directory(t5_dir), local_files_only=True)
    except (TypeError, OSError, ValueError):  # None, absent or unreadable: the engine reports that itself
        return t5_xxl_encoder_params()
    with torch.device("meta"):
        return sum(p.numel() for p in T5EncoderModel(config).parameters())
