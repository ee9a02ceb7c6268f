"""Cross-field checks of a composed `TrainConfig`.

Hydra and OmegaConf already reject unknown keys and values of the wrong type; what they cannot see is a
value that is fine on its own but wrong next to another one (hidden size vs. heads x head dim, latent
size vs. patch size, ...). `validate()` checks those, collects every problem, and raises a single
`ConfigError` whose lines each name the offending field(s) and their values.

The checks run on the plain dataclasses and touch no file system, so they are cheap enough to run before
anything is built. Closed sets are checked against their one source: the enums of `choices.py` (which also
type the schema, so Hydra rejects a bad value first; these checks catch dataclasses built in Python), or the
registry in code that defines the set (attention backends, fp8 recipes), imported when a check needs it so
that importing the config package does not import torch.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Iterable, Iterator, List, Sequence, Type, Union

from magi_train.config.choices import (
    CPImpl,
    DataKind,
    DistBackend,
    DType,
    LayerSpec,
    LRDecay,
    OptimizerName,
    PPSchedule,
    Precision,
    Recompute,
    ShortcutModel,
    VaeKind,
    WandbMode,
    choices,
)
from magi_train.config.schema import (
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
)


class ConfigError(ValueError):
    """A configuration that composes (right keys, right types) but cannot be trained as written."""


def validate(cfg: TrainConfig) -> TrainConfig:
    """Return `cfg` unchanged if it is consistent; otherwise raise one `ConfigError` listing every problem."""
    problems: List[str] = []
    problems += _check_model(cfg.model)
    problems += _check_parallel(cfg.parallel, cfg.model)
    problems += _check_data(cfg.data, cfg.model, cfg.diffusion)
    problems += _check_diffusion(cfg.diffusion)
    problems += _check_optimizer(cfg.optimizer)
    problems += _check_trainer(cfg.trainer)
    problems += _check_sequence_split(cfg)
    problems += _check_packing(cfg)
    problems += _check_distill(cfg)
    problems += _check_lora(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def validate_model(m: ModelConfig) -> ModelConfig:
    """The model section alone (used by the inference entry point, which has no trainer sections)."""
    problems = list(_check_model(m))
    if problems:
        raise ConfigError("invalid model configuration:\n  - " + "\n  - ".join(problems))
    return m


# --- small helpers; each returns the problems it found ------------------------------------------------
# Comparisons are written as `not (ok)` so that NaN, which compares False to everything, is rejected.


def _at_least(section: str, obj: object, names: Iterable[str], low: float) -> List[str]:
    out = []
    for name in names:
        value = getattr(obj, name)
        if not value >= low:
            out.append(f"{section}.{name} ({value}) must be >= {low}")
    return out


def _positive(section: str, obj: object, names: Iterable[str]) -> List[str]:
    out = []
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            out.append(f"{section}.{name} ({value}) must be > 0")
    return out


def _one_of(key: str, value: str, allowed: Union[Type[enum.Enum], Sequence[str]]) -> List[str]:
    """`value` must be a member of the enum (or a name of the registry) `allowed`."""
    names = choices(allowed) if isinstance(allowed, type) and issubclass(allowed, enum.Enum) else list(allowed)
    if value in names:
        return []
    return [f"{key} ({_show(value)}) must be one of {', '.join(repr(a) for a in names)}"]


def _show(value: object) -> str:
    # A StrEnum member's repr is <Enum.name: 'value'>; messages show the value as the user wrote it.
    return repr(str(value)) if isinstance(value, str) else repr(value)


def attention_backends() -> List[str]:
    """`model.attention_backend` names: the CPU kernels' registry plus the kernels loaded on demand."""
    from magi_train.model.attention import ATTENTION_BACKENDS  # imports torch: only when validating
    from magi_train.model.spec import ON_DEMAND_ATTENTION_BACKENDS

    return [*ATTENTION_BACKENDS, *ON_DEMAND_ATTENTION_BACKENDS]


def fp8_recipes() -> List[str]:
    """`trainer.fp8_recipe` names: Transformer Engine's recipes that magi_train/model/te_spec.py can build, then
    torchao's (magi_train/model/float8.py; which backend takes which is checked with the layout)."""
    from magi_train.model.float8 import TORCHAO_RECIPES
    from magi_train.model.te_spec import FP8_RECIPES  # imports torch (not Transformer Engine)

    return [*FP8_RECIPES, *(r for r in TORCHAO_RECIPES if r not in FP8_RECIPES)]


def _integer_width(key: str, hidden_size: int, ratio: float) -> List[str]:
    # The released model sizes these layers as int(hidden_size * ratio); demand an exact, non-empty width
    # rather than silently truncating.
    width = hidden_size * ratio
    if math.isfinite(width) and width >= 1 and width == int(width):
        return []
    return [f"{key} ({ratio}) must make model.hidden_size x {key} ({hidden_size} x {ratio} = {width}) "
            "a positive integer"]


# --- sections -------------------------------------------------------------------------------------------


def _check_model(m: ModelConfig) -> Iterator[str]:
    sizes = _at_least("model", m, (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
        "kv_channels", "patch_size", "t_patch_size", "in_channels", "out_channels", "caption_channels",
        "caption_max_length", "proj_interleave_groups", "null_caption_length", "chunk_width",
        "rope_reference_tokens"), 1)
    if sizes:
        # The relations below divide by these sizes; report the sizes alone until they are sane.
        yield from sizes
        return
    yield from _positive("model", m, (
        "layernorm_epsilon", "x_rescale_factor", "cond_hidden_ratio", "xattn_cond_hidden_ratio",
        "rope_temperature", "timestep_rescale_factor", "init_std"))

    heads, kv = m.num_attention_heads, m.kv_channels
    # Attention projects hidden -> heads x head_dim, and RoPE is built for head_dim = hidden // heads.
    if m.hidden_size != heads * kv:
        yield (f"model.hidden_size ({m.hidden_size}) must equal model.num_attention_heads x "
               f"model.kv_channels ({heads} x {kv} = {heads * kv})")
    # RoPE rotates 6 * (kv // 8) dims: (t, h, w) x (sin, cos) x kv // 8 frequency bands. Multiples of 16
    # keep the band count even, as in the released head dim of 128 (16 bands, 96 rotated dims).
    if kv % 16 != 0:
        yield f"model.kv_channels ({kv}) must be a multiple of 16 (RoPE frequency bands)"
    if heads % m.num_query_groups != 0:
        yield (f"model.num_attention_heads ({heads}) must be divisible by model.num_query_groups "
               f"({m.num_query_groups}) (GQA)")
    # The released checkpoints interleave [self | cross] attention outputs in 8 groups of channels (not
    # necessarily whole heads: the conformance model has 2 heads and 8 groups of 32 channels).
    groups = m.proj_interleave_groups
    if (heads * kv) % groups != 0:
        yield (f"model.num_attention_heads x model.kv_channels ({heads} x {kv} = {heads * kv}) must be "
               f"divisible by model.proj_interleave_groups ({groups})")
    if m.cond_gating_ratio != 1.0:
        yield f"model.cond_gating_ratio ({m.cond_gating_ratio}) must be 1.0: the adaLN gate is hidden-sized"
    yield from _integer_width("model.cond_hidden_ratio", m.hidden_size, m.cond_hidden_ratio)
    yield from _integer_width("model.xattn_cond_hidden_ratio", m.hidden_size, m.xattn_cond_hidden_ratio)
    if m.null_caption_length > m.caption_max_length:
        yield (f"model.null_caption_length ({m.null_caption_length}) must be <= model.caption_max_length "
               f"({m.caption_max_length})")
    if m.half_channel_vae and m.in_channels % 2 != 0:
        yield f"model.in_channels ({m.in_channels}) must be even when model.half_channel_vae is true"
    if m.chunk_width % m.t_patch_size != 0:
        yield (f"model.chunk_width ({m.chunk_width}) must be divisible by model.t_patch_size "
               f"({m.t_patch_size})")
    yield from _one_of("model.params_dtype", m.params_dtype, DType)
    yield from _one_of("model.layer_spec", m.layer_spec, LayerSpec)
    from magi_train.model.norms import FUSED_NORMS  # imports torch (not apex)

    yield from _one_of("model.fused_norms", m.fused_norms, FUSED_NORMS)
    yield from _one_of("model.attention_backend", m.attention_backend, attention_backends())


def _check_parallel(p: ParallelConfig, m: ModelConfig) -> Iterator[str]:
    yield from check_parallel(p, m)


def check_parallel(p: ParallelConfig, m: ModelConfig) -> Iterator[str]:
    """Layout rules that depend only on the model (the world size is checked when the groups are built)."""
    sizes = list(_at_least("parallel", p, ("tp", "cp", "pp", "vpp"), 1))
    yield from sizes
    if not (p.dp == -1 or p.dp >= 1):
        yield f"parallel.dp ({p.dp}) must be >= 1, or -1 for 'the rest of the world'"
    yield from _one_of("parallel.pp_schedule", p.pp_schedule, PPSchedule)
    yield from _one_of("parallel.backend", p.backend, DistBackend)
    yield from _one_of("parallel.cp_impl", p.cp_impl, CPImpl)
    if sizes:
        return
    if (p.vpp > 1) != (p.pp_schedule == "interleaved_1f1b"):
        yield (f"parallel.vpp ({p.vpp}) > 1 goes with parallel.pp_schedule=interleaved_1f1b and only with it "
               f"(got {_show(p.pp_schedule)})")
    tp, cp = p.tp, p.cp
    # Tensor parallelism splits whole heads, whole ffn columns and whole groups of the released
    # [self | cross] interleave that feeds linear_proj.
    for name, value in (("num_attention_heads", m.num_attention_heads), ("ffn_hidden_size", m.ffn_hidden_size),
                        ("proj_interleave_groups", m.proj_interleave_groups)):
        if value % tp:
            yield f"model.{name} ({value}) must be divisible by parallel.tp ({tp})"
    kv = m.num_query_groups
    # GQA: fewer KV heads than ranks is allowed when each KV head is replicated on tp / kv ranks.
    if kv % tp and tp % kv:
        yield (f"model.num_query_groups ({kv}) and parallel.tp ({tp}): one must divide the other "
               f"(KV heads are split over tp ranks, or each replicated on tp / num_query_groups ranks)")
    if p.sequence_parallel and tp == 1:
        # Megatron would silently turn it off; say so instead.
        yield "parallel.sequence_parallel (True) needs parallel.tp > 1 (got 1)"
    # Ulysses context parallelism hands every cp rank a slice of the (tp-local) heads (MagiAttention's
    # dispatch keeps whole heads and splits tokens only).
    if cp > 1 and m.num_attention_heads % tp == 0 and p.cp_impl != "magi":
        local_heads = m.num_attention_heads // tp
        if local_heads % cp:
            yield (f"model.num_attention_heads / parallel.tp ({local_heads}) must be divisible by parallel.cp ({cp}) "
                   f"(Ulysses context parallelism splits heads over the cp ranks; parallel.cp_impl=magi does not)")
        local_kv = max(1, kv // tp) if (kv % tp == 0 or tp % kv == 0) else 0
        if local_kv and local_kv % cp and cp % local_kv:
            yield (f"KV heads per tp rank ({local_kv}) and parallel.cp ({cp}): one must divide the other")
    stages = p.pp * p.vpp
    if m.num_layers % stages:
        yield f"model.num_layers ({m.num_layers}) must be divisible by parallel.pp x parallel.vpp ({p.pp} x {p.vpp})"


def _check_sequence_split(cfg: TrainConfig) -> Iterator[str]:
    """Context and sequence parallelism cut every sample's token sequence into equal slices."""
    p, m, d = cfg.parallel, cfg.model, cfg.data
    if min(p.tp, p.cp, m.patch_size, m.t_patch_size) < 1:
        return
    # MagiAttention pads its dispatch to an even split (the sequence-parallel part is checked when it runs).
    split = (1 if p.cp_impl == "magi" else p.cp) * (p.tp if p.sequence_parallel else 1)
    tokens = (d.chunks_per_sample * (d.latent_frames_per_chunk // m.t_patch_size)
              * (d.latent_height // m.patch_size) * (d.latent_width // m.patch_size))
    # Packed sequences (kind=webdataset): _check_packing checks data.seq_length instead.
    if split > 1 and tokens % split and d.kind != "webdataset":
        yield (f"tokens per sample ({tokens} = data.chunks_per_sample x frames x height x width in patches) must be "
               f"divisible by {'parallel.cp' if p.cp_impl != 'magi' else ''}"
               f"{' x ' if p.cp_impl != 'magi' and p.sequence_parallel else ''}"
               f"{'parallel.tp (sequence_parallel)' if p.sequence_parallel else ''} ({split})")
    if cfg.trainer.fp8_recipe in fp8_recipes():  # an unknown recipe is reported by _check_trainer
        from magi_train.model.float8 import fp8_config_problems

        yield from fp8_config_problems(cfg.trainer.fp8_backend, cfg.trainer.fp8_recipe, m.layer_spec, p.tp)


def _check_data(d: DataConfig, m: ModelConfig, diff: DiffusionConfig) -> Iterator[str]:
    yield from _one_of("data.kind", d.kind, DataKind)
    webdataset = d.kind == "webdataset"
    if webdataset:
        yield from _check_webdataset(d, m)
    # The synthetic generator's sizes mean nothing to shards, which carry their own.
    synthetic_sizes = () if webdataset else (
        "num_samples", "chunks_per_sample", "latent_height", "latent_width", "num_blobs", "caption_length")
    sizes = _at_least("data", d, synthetic_sizes + ("latent_frames_per_chunk", "latent_channels", "micro_batch_size"), 1)
    yield from sizes
    yield from _at_least("data", d, ("num_workers", "global_batch_size", "prefetch"), 0)
    if d.style_colour:
        from magi_train.data.synthetic import PALETTE

        if webdataset:
            yield "data.style_colour applies to data.kind=synthetic only (shards carry their own pixels)"
        elif d.style_colour not in PALETTE:
            yield f"data.style_colour ({d.style_colour!r}) must be one of {list(PALETTE)} or \"\" (off)"
    if d.global_batch_size and d.micro_batch_size >= 1 and d.global_batch_size % d.micro_batch_size:
        yield (f"data.global_batch_size ({d.global_batch_size}) must be a multiple of data.micro_batch_size "
               f"({d.micro_batch_size})")
    if sizes or m.patch_size < 1 or m.t_patch_size < 1:
        return  # the model section already reports bad patch sizes

    # The model cuts the sequence into chunks of model.chunk_width latent frames.
    if d.latent_frames_per_chunk != m.chunk_width:
        yield (f"data.latent_frames_per_chunk ({d.latent_frames_per_chunk}) must equal model.chunk_width "
               f"({m.chunk_width})")
    # half_channel_vae (24B): the 16-channel latent is duplicated into 32 input channels and the first
    # 16 output channels are kept. (For webdataset the loader checks each sample's latent against
    # data.latent_channels.)
    if m.half_channel_vae:
        if d.latent_channels != m.in_channels // 2:
            yield (f"data.latent_channels ({d.latent_channels}) must equal model.in_channels // 2 "
                   f"({m.in_channels} // 2 = {m.in_channels // 2}) when model.half_channel_vae is true")
        if m.out_channels < d.latent_channels:
            yield (f"model.out_channels ({m.out_channels}) must be >= data.latent_channels "
                   f"({d.latent_channels})")
    else:
        if d.latent_channels != m.in_channels:
            yield (f"data.latent_channels ({d.latent_channels}) must equal model.in_channels "
                   f"({m.in_channels})")
        if m.out_channels != d.latent_channels:
            yield (f"model.out_channels ({m.out_channels}) must equal data.latent_channels "
                   f"({d.latent_channels}): the model predicts the velocity of the latent")
    if webdataset:
        return  # the rest describes the synthetic samples
    # Patchify needs whole patches, and RoPE needs a token grid of at least 2 x 2.
    for axis in ("height", "width"):
        size = getattr(d, f"latent_{axis}")
        if size % m.patch_size != 0:
            yield (f"data.latent_{axis} ({size}) must be divisible by model.patch_size ({m.patch_size})")
        elif size // m.patch_size < 2:
            yield (f"data.latent_{axis} // model.patch_size ({size} // {m.patch_size} = "
                   f"{size // m.patch_size}) must be >= 2 tokens (RoPE grid)")
    if d.caption_length > m.caption_max_length:
        yield (f"data.caption_length ({d.caption_length}) must be <= model.caption_max_length "
               f"({m.caption_max_length})")
    # A clean prefix is 1 .. chunks_per_sample - 1 chunks, so it needs at least two chunks.
    if diff.clean_prefix_prob > 0 and d.chunks_per_sample < 2:
        yield (f"data.chunks_per_sample ({d.chunks_per_sample}) must be >= 2 when "
               f"diffusion.clean_prefix_prob ({diff.clean_prefix_prob}) > 0")


_BUCKET = re.compile(r"^[1-9][0-9]*x[1-9][0-9]*$")


def _check_webdataset(d: DataConfig, m: ModelConfig) -> Iterator[str]:
    """Streamed shards packed online into one sequence of data.seq_length tokens per micro-batch."""
    if not d.shards.strip():
        yield "data.shards ('') must name the training shards (a directory, a glob or a brace pattern) for data.kind=webdataset"
    yield from _positive("data", d, ("seq_length",))
    yield from _at_least("data", d, ("num_streams", "pack_pool", "max_rows_per_sequence"), 1)
    yield from _at_least("data", d, ("shuffle_buffer", "max_chunks"), 0)
    # A micro-batch is one packed sequence; more samples per forward come from a longer data.seq_length.
    if d.micro_batch_size > 1:
        yield (f"data.micro_batch_size ({d.micro_batch_size}) must be 1 for data.kind=webdataset "
               f"(one packed sequence per micro-batch; raise data.seq_length instead)")
    if d.caption_length > m.caption_max_length or d.caption_length < m.null_caption_length:
        yield (f"data.caption_length ({d.caption_length}) must be in [model.null_caption_length, "
               f"model.caption_max_length] ([{m.null_caption_length}, {m.caption_max_length}]): shard captions are "
               f"padded or cut to it, and a dropped caption is the null caption's first null_caption_length rows")
    for bucket in d.buckets:
        if not isinstance(bucket, str) or not _BUCKET.match(bucket):
            yield f"data.buckets entry {bucket!r} must look like 'HxW' in pixels (e.g. '480x832')"


def _check_packing(cfg: TrainConfig) -> Iterator[str]:
    """How packed sequences meet the parallel layout (MAGI-1: max_length divisible by TP x CP)."""
    d, p = cfg.data, cfg.parallel
    if d.kind != "webdataset" or min(p.tp, p.cp) < 1:
        return
    if d.seq_length > 0 and d.seq_length % (p.tp * p.cp):
        yield (f"data.seq_length ({d.seq_length}) must be divisible by parallel.tp x parallel.cp "
               f"({p.tp} x {p.cp} = {p.tp * p.cp})")
    # Streams are dealt out whole to (dp rank, worker) readers; with dp = -1 the world decides (the
    # loader checks it then).
    readers = p.dp * max(1, d.num_workers)
    if p.dp >= 1 and d.num_streams >= 1 and d.num_workers >= 0 and d.num_streams % readers:
        yield (f"data.num_streams ({d.num_streams}) must be a multiple of parallel.dp x max(1, data.num_workers) "
               f"({p.dp} x {max(1, d.num_workers)} = {readers})")


def _check_distill(cfg: TrainConfig) -> Iterator[str]:
    """Distillation runs the teacher and the EMA student inside the step: whole models on every rank."""
    x = cfg.distill
    yield from _one_of("distill.shortcut_model", x.shortcut_model, ShortcutModel)
    if not x.enabled:
        if cfg.model.distill:
            yield ("model.distill=true trains the step-size embedding, which only distillation feeds: set "
                   "distill.enabled=true (experiment=distill) or use a base model preset")
        return
    if not cfg.model.distill:
        yield "distill.enabled=true needs a student with the step-size embedding: model.distill=true"
    if not x.teacher.strip():
        yield "distill.teacher ('') must name the base model (a checkpoint of ours or a released MAGI-1 directory)"
    if cfg.parallel.pp > 1:
        yield f"distill.enabled=true supports parallel.pp=1 only (got {cfg.parallel.pp}): the teacher runs whole"
    if cfg.diffusion.caption_dropout != 0:
        yield (f"diffusion.caption_dropout ({cfg.diffusion.caption_dropout}) must be 0 when distilling: the guided "
               f"teacher target folds the null caption in (MAGI-1 introduces no null-text token in distillation)")
    if not 0.0 <= x.ema_decay < 1.0:
        yield f"distill.ema_decay ({x.ema_decay}) must be in [0, 1)"
    steps = [m for m in x.step_cycle]
    if not steps or any(not (isinstance(m, int) and m > 0 and m & (m - 1) == 0 and 64 % m == 0) for m in steps):
        yield f"distill.step_cycle ({steps}) must be a non-empty list of powers of two dividing 64"
    if not len(x.cfg_t_range) == len(x.prev_chunk_scales) == len(x.text_scales):
        yield (f"distill.cfg_t_range ({len(x.cfg_t_range)}), prev_chunk_scales ({len(x.prev_chunk_scales)}) and "
               f"text_scales ({len(x.text_scales)}) must have the same length")


def _check_lora(cfg: TrainConfig) -> Iterator[str]:
    """LoRA (lora.rank > 0): the adapter's numbers, and what a frozen base in another dtype needs."""
    x = cfg.lora
    if not (isinstance(x.rank, int) and x.rank >= 0):
        yield f"lora.rank ({x.rank}) must be an integer >= 0 (0 = no LoRA)"
    if not x.alpha > 0:
        yield f"lora.alpha ({x.alpha}) must be > 0"
    if not 0.0 <= x.dropout < 1.0:
        yield f"lora.dropout ({x.dropout}) must be in [0, 1)"
    if not x.targets or not all(isinstance(t, str) and t.strip() for t in x.targets):
        yield f"lora.targets ({list(x.targets)}) must be a non-empty list of module name patterns"
    yield from _one_of("lora.base_dtype", x.base_dtype, ("auto", "float32", "bfloat16", "float16"))
    if x.rank > 0 and x.base_dtype not in ("auto", cfg.model.params_dtype) and cfg.trainer.precision == "fp32":
        yield (f"lora.base_dtype={_show(x.base_dtype)} differs from model.params_dtype={_show(cfg.model.params_dtype)}: "
               f"the frozen base's products then need trainer.precision=bf16 (autocast)")
    if x.rank > 0 and cfg.distill.enabled:
        yield "lora.rank > 0 with distill.enabled=true is not supported (distillation trains the whole student)"


def _check_diffusion(f: DiffusionConfig) -> Iterator[str]:
    yield from _positive("diffusion", f, ("t_shift", "t_logit_std"))
    if not 0.0 <= f.clean_prefix_prob <= 1.0:
        yield f"diffusion.clean_prefix_prob ({f.clean_prefix_prob}) must be in [0, 1]"
    if not 0.0 <= f.i2v_prob <= 1.0:
        yield f"diffusion.i2v_prob ({f.i2v_prob}) must be in [0, 1]"
    elif f.i2v_prob + f.clean_prefix_prob > 1.0:
        yield (f"diffusion.i2v_prob ({f.i2v_prob}) + diffusion.clean_prefix_prob ({f.clean_prefix_prob}) must be "
               f"<= 1 (t2v takes the rest)")
    if not 0.0 <= f.caption_dropout < 1.0:
        yield f"diffusion.caption_dropout ({f.caption_dropout}) must be in [0, 1)"
    if not 0.0 <= f.staircase_prob <= 1.0:
        yield f"diffusion.staircase_prob ({f.staircase_prob}) must be in [0, 1]"
    if f.staircase_stages < 1:
        yield f"diffusion.staircase_stages ({f.staircase_stages}) must be >= 1"
    if not f.motion_weight >= 0.0:  # also NaN
        yield f"diffusion.motion_weight ({f.motion_weight}) must be >= 0 (0 = off)"
    if not f.motion_scale > 0.0:
        yield f"diffusion.motion_scale ({f.motion_scale}) must be > 0"
    if not 0.0 < f.clean_t_min <= 1.0:
        yield f"diffusion.clean_t_min ({f.clean_t_min}) must be in (0, 1]"
    if f.t_logit_mean != f.t_logit_mean:  # NaN
        yield f"diffusion.t_logit_mean ({f.t_logit_mean}) must be a number"


def _check_optimizer(o: OptimizerConfig) -> Iterator[str]:
    yield from _one_of("optimizer.name", o.name, OptimizerName)
    yield from _positive("optimizer", o, ("lr", "eps"))
    if not 0.0 <= o.min_lr <= o.lr:
        yield f"optimizer.min_lr ({o.min_lr}) must be in [0, optimizer.lr ({o.lr})]"
    for name in ("beta1", "beta2"):
        beta = getattr(o, name)
        if not 0.0 <= beta < 1.0:
            yield f"optimizer.{name} ({beta}) must be in [0, 1)"
    yield from _at_least("optimizer", o, ("weight_decay", "clip_grad", "warmup_steps", "decay_steps"), 0)
    yield from _one_of("optimizer.decay", o.decay, LRDecay)
    yield from _one_of("optimizer.grad_reduce_dtype", o.grad_reduce_dtype, ("float32", "bfloat16"))
    yield from _one_of("optimizer.fused", o.fused, ("auto", "torch", "apex"))
    yield from _at_least("optimizer", o, ("bucket_numel",), 1)
    # An explicit decay horizon must leave room to decay after the warm-up (Megatron asserts the same).
    # With decay_steps = 0 the horizon is trainer.max_steps; a run shorter than its warm-up (a smoke
    # test) is allowed and simply ends inside the warm-up.
    if o.decay != "constant" and o.decay_steps > 0 and o.decay_steps <= o.warmup_steps:
        yield (f"optimizer.decay_steps ({o.decay_steps}) must be > optimizer.warmup_steps "
               f"({o.warmup_steps}) when optimizer.decay is {_show(o.decay)}")


def _check_trainer(t: TrainerConfig) -> Iterator[str]:
    yield from _at_least("trainer", t, ("max_steps", "log_every"), 1)
    yield from _at_least("trainer", t, ("save_every", "keep_last", "num_threads", "eval_every", "max_bad_steps"), 0)
    yield from _at_least("trainer", t, ("eval_batches",), 1)
    if not t.eval_t or not all(0.0 <= v <= 1.0 for v in t.eval_t):
        yield f"trainer.eval_t ({list(t.eval_t)}) must be a non-empty list of times in [0, 1]"
    yield from _at_least("trainer", t, ("sample_every",), 0)
    yield from _at_least("trainer", t, ("sample_count", "sample_steps", "sample_chunks"), 1)
    yield from _one_of("trainer.sample_vae", t.sample_vae, VaeKind)
    if t.sample_every and t.sample_vae == "vit" and not t.sample_vae_dir:
        yield "trainer.sample_vae_dir must name the VAE directory when trainer.sample_vae=vit"
    yield from _one_of("trainer.precision", t.precision, Precision)
    yield from _one_of("trainer.recompute", t.recompute, Recompute)
    yield from _at_least("trainer", t, ("recompute_layers",), 0)
    yield from _one_of("trainer.fp8_recipe", t.fp8_recipe, fp8_recipes())
    from magi_train.model.compile import COMPILE_MODES
    from magi_train.model.float8 import FP8_BACKENDS

    yield from _one_of("trainer.fp8_backend", t.fp8_backend, FP8_BACKENDS)
    yield from _one_of("trainer.compile_mode", t.compile_mode, COMPILE_MODES)
    yield from _one_of("trainer.wandb.mode", t.wandb.mode, WandbMode)
    if t.peak_tflops < 0:
        yield f"trainer.peak_tflops ({t.peak_tflops}) must be >= 0 (0: look up the GPU's peak)"
    from magi_train.training.stop import parse_signal  # imports torch: only when validating

    for name in t.stop_signals:
        try:
            parse_signal(name)
        except ValueError as e:
            yield str(e)
    if "/" in t.stop_file or t.stop_file in (".", ".."):
        yield f"trainer.stop_file ({t.stop_file!r}) must be a file name (it lives in trainer.output_dir) or ''"
    # "none", "auto", or a checkpoint directory; whether that directory exists is the trainer's concern.
    if not t.resume.strip():
        yield "trainer.resume ('') must be 'none', 'auto' or a checkpoint path"
    if not t.output_dir.strip():
        yield "trainer.output_dir ('') must be a directory path"
    if t.overwrite and t.resume != "none":
        # A relaunch with the same arguments (a Slurm requeue passes trainer.resume=auto) must never delete the
        # run it is meant to continue.
        yield (f"trainer.overwrite=true replaces the run in trainer.output_dir and goes with trainer.resume=none "
               f"(got {t.resume!r})")
    from dataclasses import asdict

    def keys(tree: dict, prefix: str = "") -> Iterator[str]:  # every dotted field name of TrainConfig
        for k, v in tree.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")

    known = list(keys(asdict(TrainConfig())))
    for entry in t.allow_config_change:
        prefix = entry.rstrip(".")
        if not prefix or not any(k == prefix or k.startswith(prefix + ".") for k in known):
            yield (f"trainer.allow_config_change: {entry!r} names no config field (a dotted key such as "
                   f"'data.shards' or a section prefix such as 'data')")


def check_train_layout(cfg: TrainConfig, dp: int, cp_impl: str) -> int:
    """The rules that need the running job's data-parallel size and the resolved parallel.cp_impl (known once
    the process groups exist). Returns the global batch; raises `ConfigError` naming the fields."""
    d, tc, pp = cfg.data, cfg.trainer, cfg.parallel.pp
    global_batch = d.global_batch_size or d.micro_batch_size * dp
    problems = []
    if global_batch % (d.micro_batch_size * dp):
        problems.append(f"data.global_batch_size ({global_batch}) must be a multiple of data.micro_batch_size x "
                        f"data-parallel size ({d.micro_batch_size} x {dp})")
    elif pp > 1 and global_batch // (d.micro_batch_size * dp) < pp:
        problems.append(f"the pipeline needs at least parallel.pp ({pp}) micro-batches per step; "
                        f"data.global_batch_size ({global_batch}) gives {global_batch // (d.micro_batch_size * dp)} "
                        f"of data.micro_batch_size ({d.micro_batch_size}) per data-parallel rank")
    if d.kind == "synthetic" and tc.eval_every and not problems:
        # Held-out synthetic samples are indices 0.. of another data seed: eval_batches whole global batches.
        need = tc.eval_batches * global_batch
        if need > d.num_samples:
            problems.append(f"trainer.eval_every > 0 evaluates trainer.eval_batches ({tc.eval_batches}) global batches "
                            f"of {global_batch} held-out samples ({need}), but data.num_samples is {d.num_samples}: "
                            "raise data.num_samples or lower trainer.eval_batches / data.global_batch_size")
    if d.kind == "synthetic" and tc.sample_every and tc.sample_count > d.num_samples:
        problems.append(f"trainer.sample_count ({tc.sample_count}) validation videos need as many held-out samples, "
                        f"but data.num_samples is {d.num_samples}")
    if pp > 1 and tc.eval_every:
        problems.append("trainer.eval_every > 0 is not supported with parallel.pp > 1 yet (set trainer.eval_every=0)")
    if pp > 1 and tc.sample_every:
        problems.append("trainer.sample_every > 0 needs the whole model on each rank: not supported with "
                        "parallel.pp > 1 yet (set trainer.sample_every=0)")
    if tc.sample_every and cp_impl == "magi":
        problems.append("trainer.sample_every > 0 samples with the inference KV cache, which needs "
                        "parallel.cp_impl=ulysses (MagiAttention's dispatch splits heads' tokens over ranks)")
    if d.kind == "webdataset" and pp > 1 and cp_impl == "magi":
        problems.append("data.kind=webdataset with parallel.pp > 1 needs parallel.cp_impl=ulysses (MagiAttention's "
                        "dispatch of a packed sequence has a shape per sequence; pipeline boundaries are static)")
    if problems:
        raise ConfigError("invalid layout for this job:\n  - " + "\n  - ".join(problems))
    return global_batch
