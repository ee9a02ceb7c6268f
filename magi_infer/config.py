"""Typed configuration of `magi_infer/generate.py` (stored in Hydra's ConfigStore as `generate_schema`).

Field names follow the released `RuntimeConfig` / `EngineConfig` (magi_train/model/README.md §10) where they
exist. What the released code reads from environment variables (special-token flags, the nearly-clean blend
weight) is a config field here. Closed sets are the enums of magi_train/config/choices.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from magi_train.config.choices import ComputeDType, GenerateMode, TextEncoder, VaeKind, choices
from magi_train.config.schema import ModelConfig, ParallelConfig, SamplerConfig, VaeConfig


@dataclass
class CheckpointConfig:
    # A released model directory (holding inference_weight[.fp8][.distill]/), or a checkpoint of our
    # trainer (a directory with complete.json, or a run's checkpoint root: its newest complete one).
    dir: Optional[str] = None
    # A sha256sum-format manifest (`<hex>  <file name>` lines, tools/hash_weights.py writes one) the released
    # shard files must match; a SHA256SUMS file beside the shards is checked without it.
    sha256: Optional[str] = None
    # A checkpoint of ours that kept an EMA (trainer.ema_decay > 0, or distillation): generate with its EMA weights.
    ema: bool = False


@dataclass
class VideoConfig:
    height: int = 720
    width: int = 720
    fps: int = 24
    crf: Optional[int] = None  # x264 quality; None = encoder default (as released)


@dataclass
class TextConfig:
    encoder: TextEncoder = TextEncoder.t5  # t5 | hash | hash_bigram (synthetic-data encoders: tiny presets)
    t5_dir: Optional[str] = None  # t5-v1_1-xxl directory, or its parent
    device: str = "cpu"  # where T5 runs (released: cpu for 4.5B, cuda for 24B)
    max_length: int = 800
    special_tokens: Optional[str] = None  # released special_tokens.npz; None = the copy in magi_infer/assets
    hq: bool = True
    duration: bool = True
    negative_tokens: bool = False
    static_first_frames: bool = False
    dynamic_first_frames: bool = False
    borderness: bool = False
    three_d_model: bool = False
    two_d_anime: bool = False


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    mode: GenerateMode = GenerateMode.t2v  # t2v | i2v | v2v
    prompt: Any = ""  # one prompt, or a list: one per generated chunk (the last repeats)
    image: Optional[str] = None  # i2v conditioning image
    prefix_video: Optional[str] = None  # v2v prefix
    prefix_frames: Optional[int] = None  # v2v: frames of the prefix used (None = all; released 32)
    num_frames: int = 96  # output frames (t2v/i2v: the whole video; v2v: the continuation)
    output: str = "out.mp4"  # .mp4 (or .m4v / .mov); its directory must exist
    overwrite: bool = False  # replace an existing `output`; false: an existing file is an error, before any work
    allow_empty_prompt: bool = False  # an empty prompt means unconditional generation: say so explicitly
    check_memory: bool = True  # estimate the generation's memory first and stop if it cannot fit (magi_infer/memory.py)
    seed: int = 1234
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: ComputeDType = ComputeDType.auto  # of the DiT: auto = the preset's params_dtype on CUDA, float32 on CPU
    progress: bool = True
    # torch.compile of the per-step DiT forward (magi_infer/compile.py): none | default | reduce-overhead (CUDA
    # graphs) | max-autotune | max-autotune-no-cudagraphs. Compiling costs time up front; pays on long videos.
    compile: str = "none"
    compile_backend: str = "inductor"  # torch.compile's backend (modes other than default are inductor's)
    # Decode and write chunk n in a background thread (CUDA: its own stream) while chunk n+1 denoises
    # (magi_infer/overlap.py). One process only: under model parallelism the decode is a collective and runs in line.
    overlap_decode: bool = True
    # LoRA adapters applied unmerged after the weights are loaded (adapter directories, see
    # magi_train/checkpoint/adapters.py): each a path or {path, scale} (also `name`; `sha256`: the safetensors
    # file must have it), e.g. lora='[runs/x/adapter]' or lora='[{path: a, scale: 0.8}, {path: b, scale: 0.5}]'.
    lora: List[Any] = field(default_factory=list)


LORA_KEYS = ("path", "scale", "name", "sha256")


def lora_entries(entries) -> List[dict]:
    """`lora` as {path, scale, name, sha256} dicts (a plain path is {path, scale 1}); ValueError names the bad entry."""
    if entries is None:
        return []
    if isinstance(entries, (str, dict)) or not isinstance(entries, (list, tuple)):
        entries = [entries]  # one adapter given without the list around it
    out = []
    for i, entry in enumerate(entries):
        where = f"lora[{i}]"
        if isinstance(entry, (str, bytes)) or hasattr(entry, "__fspath__"):
            entry = {"path": str(entry)}
        elif hasattr(entry, "items"):
            entry = {str(k): v for k, v in entry.items()}
        else:
            raise ValueError(f"{where}={entry!r} must be an adapter path or {{path: PATH, scale: S}}")
        unknown = sorted(set(entry) - set(LORA_KEYS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; known: {list(LORA_KEYS)}")
        path, scale = entry.get("path"), entry.get("scale", 1.0)
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where} needs path: the adapter directory (adapter_model.safetensors + "
                             "adapter_config.json)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
            raise ValueError(f"{where}.scale={scale!r} must be a number")
        name, sha = entry.get("name"), entry.get("sha256")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{where}.name={name!r} must be a string")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError(f"{where}.sha256={sha!r} must be 64 lower-case hex digits")
        out.append({"path": path, "scale": float(scale), "name": name, "sha256": sha})
    names = [e["name"] for e in out if e["name"] is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"lora: adapter names repeat ({names}); each loaded adapter needs its own name")
    return out


def lora_problems(c: GenerateConfig) -> List[str]:
    """The `lora` field's entries (unmerged adapters run under every layout: tp, cp, pp)."""
    try:
        lora_entries(c.lora)
    except ValueError as e:
        return [str(e)]
    if c.lora and c.parallel.tp > 1 and c.model.layer_spec != "local":
        return [f"lora with parallel.tp={c.parallel.tp} and model.layer_spec={c.model.layer_spec}: the tensor-"
                "parallel adapters wrap the local spec's linears (model.layer_spec=local), or merge the adapters "
                "first (magi-merge-lora --base DIR --lora PATH --out DIR) and generate from the merged directory"]
    return []


# ---------------------------------------------------------------------------- Hydra glue and validation

SCHEMA_NAME = "generate_schema"
MODES = tuple(choices(GenerateMode))
TEMPORAL = 4  # pixel frames per latent frame (the VAE's temporal factor)
SPATIAL = 8  # pixels per latent pixel (the VAE's spatial factor)


def runtime_model(c: GenerateConfig):
    """The model config the engine runs: the preset with `dtype` applied (a copy; `c` keeps describing the preset)."""
    import dataclasses

    return c.model if c.dtype == "auto" else dataclasses.replace(c.model, params_dtype=c.dtype)


def summary(c: GenerateConfig, source: str, device, parallel=None) -> str:
    """The resolved configuration in a few lines: what the CLI prints once at start-up (rank 0)."""
    s, v, m = c.sampler, c.video, c.model
    layout = "" if parallel is None else f", parallel tp{parallel.tp} cp{parallel.cp} pp{parallel.pp}"
    return "\n".join([
        f"loaded {source} (model={m.name}) on {device}, dtype {m.params_dtype}{layout}",
        f"  sampler: {s.num_steps} steps/chunk, window {s.window_size}, cfg_number={s.cfg_number}, fp8={s.fp8}, "
        f"kv_cache={s.kv_cache}, text_scales={list(s.text_scales)}",
        f"  video: {v.width}x{v.height} at {v.fps} fps; text: {c.text.encoder}; vae: {c.vae.kind}"
        f"{'' if c.vae.dir is None else ' ' + c.vae.dir}; compile={c.compile}, overlap_decode={c.overlap_decode}",
    ] + (["  lora: " + ", ".join(f"{e['path']} (scale {e['scale']:g})" for e in lora_entries(c.lora))]
         if c.lora else []))


def register_generate_config() -> None:
    """Store `GenerateConfig` in Hydra's ConfigStore as `generate_schema`. Safe to call more than once."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=GenerateConfig)


def to_generate_config(cfg) -> GenerateConfig:
    """A composed config -> validated `GenerateConfig`; unknown keys and bad values raise ConfigError."""
    from magi_train.config.compose import to_typed
    from magi_train.config.validate import validate_model

    obj = to_typed(GenerateConfig, cfg, "magi_infer/config.py")
    validate_model(obj.model)
    validate_generate(obj)
    return obj


def _check_parallel(c: GenerateConfig) -> List[str]:
    """The model-parallel layout of inference: tp x cp x pp processes serve one request together."""
    from magi_train.config.validate import check_parallel

    p, m, v = c.parallel, c.model, c.video
    errors = list(check_parallel(p, m))
    # One request runs on all ranks; independent replicas would each need their own request and output.
    if p.dp not in (-1, 1):
        errors.append(f"parallel.dp={p.dp}: inference runs one request on all ranks, data-parallel replicas are not "
                      f"supported; start tp x cp x pp = {p.tp * p.cp * p.pp} processes (parallel.dp=1)")
    if p.cp_impl == "magi":
        errors.append("parallel.cp_impl=magi: inference splits context with Ulysses (its KV cache holds whole "
                      "sequences of each rank's heads); use parallel.cp_impl=ulysses or auto")
    if p.vpp != 1:
        errors.append(f"parallel.vpp={p.vpp}: inference pipelines hold one contiguous stage per rank; use parallel.vpp=1")
    if c.sampler.fp8 and p.tp > 1:
        errors.append(f"sampler.fp8=true with parallel.tp={p.tp}: the fp8 linears do no tensor-parallel "
                      "communication; use parallel.cp and/or parallel.pp")
    # Every DiT call holds whole chunks (one sample, or one sample per chunk), so the tokens of one chunk
    # must split evenly over the ranks that split the sequence.
    split = p.cp * (p.tp if p.sequence_parallel else 1)
    unit = SPATIAL * m.patch_size
    if split > 1 and min(m.patch_size, m.t_patch_size) >= 1 and v.height % unit == 0 and v.width % unit == 0:
        tokens = (m.chunk_width // m.t_patch_size) * (v.height // unit) * (v.width // unit)
        if tokens % split:
            errors.append(f"tokens per chunk ({tokens} = model.chunk_width / t_patch_size x video.height / {unit} x "
                          f"video.width / {unit}) must be divisible by parallel.cp"
                          f"{' x parallel.tp (sequence_parallel)' if p.sequence_parallel else ''} ({split})")
    return errors


def validate_generate(c: GenerateConfig) -> GenerateConfig:
    from magi_train.config.validate import ConfigError, _show
    from magi_train.diffusion.time_grid import SHORTCUT_MODES  # the registry of the 12-step grid's modes

    s = c.sampler
    errors = []
    if c.mode not in MODES:
        errors.append(f"mode={_show(c.mode)} is not one of {list(MODES)}")
    if c.mode == "i2v" and not c.image:
        errors.append("mode=i2v needs image=PATH")
    if c.mode == "v2v" and not c.prefix_video:
        errors.append("mode=v2v needs prefix_video=PATH")
    if not isinstance(c.prompt, (str, list)) or (isinstance(c.prompt, list) and not c.prompt):
        errors.append(f"prompt must be a string or a non-empty list of strings, got {c.prompt!r}")
    if c.num_frames < 1:
        errors.append(f"num_frames={c.num_frames} must be >= 1")
    if c.prefix_frames is not None and c.prefix_frames < 1:
        errors.append(f"prefix_frames={c.prefix_frames} must be >= 1 (or null: the whole prefix_video)")
    if c.mode in ("i2v", "v2v") and c.vae.kind == "preview":
        errors.append(f"mode={c.mode} needs a VAE that encodes {'the image' if c.mode == 'i2v' else 'the prefix'}; "
                      "vae.kind=preview only decodes latents to colours: use vae.kind=vit with vae.dir=PATH")
    # Released rule (MagiConfig.post_validation): guidance was distilled into distill/fp8 weights.
    guided = not (c.model.distill or s.fp8)
    if s.cfg_number != (3 if guided else 1):
        errors.append(f"sampler.cfg_number={s.cfg_number} does not fit model={c.model.name} (model.distill="
                      f"{c.model.distill}, sampler.fp8={s.fp8}): use {3 if guided else 1}")
    if s.fp8 and not c.model.distill:
        errors.append("sampler.fp8=true: the released fp8 weights exist only for distilled models "
                      "(model=magi1_4.5b_distill_fp8 or magi1_24b_distill_fp8)")
    if s.num_steps < 1 or s.window_size < 1 or s.num_steps % s.window_size:
        errors.append(f"sampler.num_steps={s.num_steps} must be a positive multiple of sampler.window_size={s.window_size}")
    if s.noise2clean_kvrange and s.num_steps % len(s.noise2clean_kvrange):
        errors.append(f"sampler.num_steps={s.num_steps} must be divisible by len(sampler.noise2clean_kvrange)="
                      f"{len(s.noise2clean_kvrange)}")
    if any(r < 1 for r in s.noise2clean_kvrange) or not (s.clean_chunk_kvrange == -1 or s.clean_chunk_kvrange >= 1):
        errors.append("sampler.noise2clean_kvrange entries must be >= 1 and sampler.clean_chunk_kvrange >= 1 or -1")
    if not len(s.cfg_t_range) == len(s.prev_chunk_scales) == len(s.text_scales):
        errors.append("sampler.cfg_t_range, prev_chunk_scales and text_scales must have the same length")
    if not 0.0 < s.clean_t <= 1.0:
        errors.append(f"sampler.clean_t={s.clean_t} must be in (0, 1]")
    if s.num_steps == 12 and s.shortcut_mode not in SHORTCUT_MODES:
        errors.append(f"sampler.shortcut_mode={s.shortcut_mode!r} must be "
                      f"{' or '.join(repr(m) for m in SHORTCUT_MODES)}")
    if c.video.fps < 1 or c.video.height < 1 or c.video.width < 1:
        errors.append("video.fps, video.height and video.width must be positive")
    unit = SPATIAL * c.model.patch_size
    if unit > 0 and (c.video.height % unit or c.video.width % unit):
        errors.append(f"video.height={c.video.height} and video.width={c.video.width} must be multiples of {unit} "
                      f"(VAE factor {SPATIAL} x model.patch_size {c.model.patch_size})")
    if c.video.crf is not None and not 0 <= c.video.crf <= 51:
        errors.append(f"video.crf={c.video.crf} must lie in [0, 51] (x264's range; null = x264's default, 23)")
    errors.extend(_check_parallel(c))
    errors.extend(lora_problems(c))
    from magi_infer.compile import COMPILE_MODES

    if c.compile not in COMPILE_MODES:
        errors.append(f"compile={_show(c.compile)} is not one of {', '.join(COMPILE_MODES)}")
    elif c.compile not in ("none", "default") and c.compile_backend != "inductor":
        errors.append(f"compile={c.compile} is a mode of compile_backend=inductor, not of {c.compile_backend}")
    if c.dtype not in choices(ComputeDType):
        errors.append(f"dtype={_show(c.dtype)} is not one of {', '.join(choices(ComputeDType))}")
    if c.text.encoder not in choices(TextEncoder):
        errors.append(f"text.encoder={_show(c.text.encoder)} is not one of {', '.join(choices(TextEncoder))}")
    if c.vae.kind not in choices(VaeKind):
        errors.append(f"vae.kind={_show(c.vae.kind)} is not one of {', '.join(choices(VaeKind))}")
    if errors:
        raise ConfigError("invalid generate config:\n  " + "\n  ".join(errors))
    return c
