"""Typed configuration schemas.

Every knob of the trainer is a field here; Hydra merges the YAML presets under `conf/` into these
dataclasses, so an unknown key, a value of the wrong type or a value outside a closed set (the enums of
`choices.py`) fails at composition time with the full key name. Constraints between fields, and fields whose
allowed values are a registry in code (attention backends, fp8 recipes, shortcut modes), are checked by
`validate()` (see `validate.py`), which also names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from magi_train.config.choices import (
    CPImpl,
    ComputeDType,
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
)

# The released guidance of base-model inference, defined once (tuples: immutable module constants): t bucket
# lower edges, w_prev and w_text per bucket (magi_train/model/README.md §3.3). SamplerConfig uses them, and
# DistillConfig folds them into the m = 1 target.
RELEASED_CFG_T_RANGE = (0.0, 0.0217, 0.1, 0.3, 0.999)
RELEASED_PREV_CHUNK_SCALES = (1.5, 1.5, 1.5, 1.0, 1.0)
RELEASED_TEXT_SCALES = (7.5, 7.5, 7.5, 0.0, 0.0)


@dataclass
class ModelConfig:
    """The DiT. Field names follow the released MAGI-1 `ModelConfig` so presets can be read side by side."""

    name: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 256
    ffn_hidden_size: int = 512
    num_attention_heads: int = 2
    num_query_groups: int = 1  # GQA: number of KV heads
    kv_channels: int = 128  # head dim; RoPE rotates the first 6 * (kv_channels // 8) of them
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True  # q/k/post/final norms store gamma - 1
    x_rescale_factor: float = 1.0  # input is multiplied by it, output divided (24B: 0.1)
    half_channel_vae: bool = False  # 16-channel latent duplicated to 32 input channels (24B)
    params_dtype: DType = DType.float32  # dtype of the parameters and the residual stream
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 16
    out_channels: int = 16
    cond_hidden_ratio: float = 0.25  # width of the timestep / adaLN condition = hidden * ratio
    caption_channels: int = 4096  # T5 width
    caption_max_length: int = 800  # rows of the learned null caption
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False  # SwiGLU (24B) instead of GELU (4.5B)
    # Step-size ("shortcut") embedding of distilled models: t_emb += t_embedder(dt).
    distill: bool = False
    # The released checkpoints interleave [self | cross] attention outputs in 8 groups before
    # linear_proj (their TP8 training layout); kept configurable only for tiny test models.
    proj_interleave_groups: int = 8
    null_caption_length: int = 50  # valid rows of the null caption's cross-attention mask
    chunk_width: int = 6  # latent frames per chunk
    rope_temperature: float = 10000.0
    rope_reference_tokens: int = 16  # RoPE grid rescaled to a 16x16-token reference (256^2 pixels)
    timestep_rescale_factor: float = 1000.0
    # Which implementation of the layers: local = megatron-core tensor-parallel layers + torch attention
    # (CPU, exact); te = Transformer Engine linears (CUDA GPUs with Transformer Engine installed; fp8 through
    # trainer.fp8_recipe).
    layer_spec: LayerSpec = LayerSpec.local
    # Core attention kernel, a name in the backend registry (magi_train/model/attention.py ATTENTION_BACKENDS, plus
    # the on-demand kernels of model/spec.py): torch (per-range fp32 softmax, exact on CPU), sdpa (one masked SDPA,
    # dense mask up to SDPA_MAX_MASK_ELEMENTS), flex (FlexAttention BlockMask, memory O(tiles)), flash (flash-attn 2
    # varlen, bf16/fp16, Ampere+), magi (MagiAttention; Hopper GPUs, bf16/fp16), auto (magi > flash > flex on CUDA
    # where each runs; sdpa > torch elsewhere: model/spec.py auto_backend_name).
    attention_backend: str = "torch"
    init_std: float = 0.02
    # LayerNorm kernel (magi_train/model/norms.py FUSED_NORMS): auto = NVIDIA apex's fused LayerNorm for CUDA tensors
    # where apex imports (torch's under trainer.compile: inductor fuses it itself), torch = always torch's, apex = apex
    # or an error. The CPU always runs torch's. How the model runs, not what its weights are.
    fused_norms: str = "auto"


@dataclass
class ParallelConfig:
    """Sizes of the process grid, laid out tp-cp-pp-dp (tp ranks are neighbours, dp ranks the farthest apart)."""

    tp: int = 1  # tensor parallel: heads and ffn columns split
    cp: int = 1  # context parallel: the token sequence split over ranks (see cp_impl)
    pp: int = 1  # pipeline parallel: contiguous layer stages
    dp: int = -1  # data parallel: world / (tp * cp * pp); -1 means "whatever is left"
    sequence_parallel: bool = False  # with tp > 1: activations outside attention/MLP split over the tp ranks
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B when > 1)
    pp_schedule: PPSchedule = PPSchedule["1f1b"]  # 1f1b | interleaved_1f1b (vpp > 1) | gpipe
    backend: DistBackend = DistBackend.auto  # torch.distributed backend: gloo | nccl | auto (nccl when CUDA is available)
    # How cp splits the tokens in training: ulysses (contiguous windows, all-to-all in attention, any kernel),
    # magi (MagiAttention's load-balanced dispatch + distributed attention; Hopper GPUs, nccl), or auto
    # (magi where it can run, else ulysses). Inference always uses ulysses (its KV cache needs whole heads).
    cp_impl: CPImpl = CPImpl.auto


@dataclass
class SamplerConfig:
    """The staircase sampler of MAGI-1 inference (training's validation videos use it too)."""

    cfg_number: int = 3  # 3: three-pass guidance (base models); 1: one pass (distilled / fp8)
    cfg_t_range: List[float] = field(default_factory=lambda: list(RELEASED_CFG_T_RANGE))
    prev_chunk_scales: List[float] = field(default_factory=lambda: list(RELEASED_PREV_CHUNK_SCALES))
    text_scales: List[float] = field(default_factory=lambda: list(RELEASED_TEXT_SCALES))
    # Chunks (itself included) a denoising chunk attends to, per 1/len of its steps; [] = all earlier chunks.
    noise2clean_kvrange: List[int] = field(default_factory=lambda: [5, 4, 3, 2])
    clean_chunk_kvrange: int = 1  # lookback of the clean re-forward and the prefix; -1 = released fallback
    clean_t: float = 0.9999
    num_steps: int = 64  # denoising steps per chunk
    window_size: int = 4  # chunks denoised at once
    shortcut_mode: str = "8,16,16"  # 12-step grid only: a mode of magi_train/diffusion/time_grid.py SHORTCUT_MODES
    nearly_clean_threshold: float = 0.3  # distill: blend the oldest chunk once its t exceeds this
    nearly_clean_weight: float = 0.7  # weight of the with-context prediction (released env prev_chunks_scale)
    fp8: bool = False  # released fp8 linears; weights from inference_weight.fp8[.distill]
    kv_cache: bool = True  # false recomputes every past chunk in each call (slow; an oracle for tests)
    kv_offload: bool = False  # keep the KV cache in (pinned) CPU memory


@dataclass
class VaeConfig:
    """The video decoder: the released ViT VAE, or the latent-colour preview of the synthetic data."""

    kind: VaeKind = VaeKind.vit  # vit (the released VAE) | preview (latent colours, for the synthetic tiny model)
    dir: Optional[str] = None  # diffusers-style directory: config.json + diffusion_pytorch_model.safetensors
    tile_px: int = 256
    overlap: float = 0.25
    scale_factor: float = 0.18215
    dtype: ComputeDType = ComputeDType.auto  # auto = bfloat16 on CUDA, float32 on CPU


@dataclass
class DataConfig:
    kind: DataKind = DataKind.synthetic  # synthetic (built-in moving blobs, drawn as latents) | webdataset (shards, data/README.md)
    num_samples: int = 4096  # size of one synthetic epoch
    chunks_per_sample: int = 2
    latent_frames_per_chunk: int = 6  # must equal model.chunk_width
    latent_height: int = 8
    latent_width: int = 8
    latent_channels: int = 16
    num_blobs: int = 1
    # A one-style synthetic dataset (e.g. to train a style LoRA): every blob is drawn in this palette colour while
    # the captions still name the colour sampled for it, so the style is in the pixels, not the text. "" = off.
    style_colour: str = ""
    # Text tokens per caption row (<= model.caption_max_length): synthetic captions have this many; shard
    # captions are padded or cut to it (>= model.null_caption_length), so every packed sequence has one shape.
    caption_length: int = 32
    micro_batch_size: int = 2  # samples per forward on one data-parallel rank
    # Samples per optimizer step over all data-parallel ranks; a multiple of micro_batch_size * dp.
    # The quotient is the number of micro-batches (gradient accumulation / pipeline micro-batches).
    # 0 = micro_batch_size * dp (one micro-batch).
    global_batch_size: int = 0
    num_workers: int = 0
    # kind=synthetic: steps whose samples and noise are built ahead in a background thread while the current
    # step computes (bit-identical batches; training/batches.py); 0 builds each on the step's critical path.
    prefetch: int = 1
    seed: int = 0
    # ---- kind=webdataset: streamed shards, packed online into fixed-length sequences (one per micro-batch)
    shards: str = ""  # a directory of .tar shards, a glob, or a brace pattern (data/train-{000000..000099}.tar)
    seq_length: int = 0  # tokens per packed sequence; divisible by parallel.tp x parallel.cp
    max_rows_per_sequence: int = 64  # (sample, chunk) rows per packed sequence: conditions/captions are padded to it
    pack_pool: int = 64  # samples gathered before First-Fit-Decreasing packs them into sequences
    shuffle_buffer: int = 256  # samples; 0 disables shuffling within the stream
    num_streams: int = 4  # independent shard streams over dp ranks x workers (a multiple of dp x max(1, num_workers))
    buckets: List[str] = field(default_factory=list)  # keep only these "HxW" pixel buckets; empty = all
    max_chunks: int = 0  # longer samples keep their first max_chunks chunks; 0 = no cap
    # Held-out shards for trainer.eval_every (same format); "" = no validation loss for webdataset runs.
    val_shards: str = ""


@dataclass
class DiffusionConfig:
    """Flow matching with MAGI-1's conventions: t = 0 is noise, t = 1 is clean."""

    t_logit_mean: float = 0.0
    t_logit_std: float = 0.5
    t_shift: float = 1.0 / 3.0  # SD3-style shift w: t' = w t / (1 - (1 - w) t)
    # Probability that a sample's leading chunks are clean context (video continuation); the
    # number of clean chunks is then uniform in [1, chunks_per_sample - 1]. Loss skips them.
    clean_prefix_prob: float = 0.25
    # Probability that a sample is image-to-video: the first latent frame is given clean (no loss on it).
    # t2v takes the rest: 1 - i2v_prob - clean_prefix_prob.
    i2v_prob: float = 0.25
    # Clean chunks get up to 5% noise (MAGI-1 report: exposure bias): t ~ U[clean_t_min, 1].
    clean_t_min: float = 0.95
    caption_dropout: float = 0.1  # rows replaced by the learned null caption (for CFG)
    # Share of samples whose chunk times are those of the inference window instead of sorted draws: chunk 0 at
    # grid position u ~ U[0, 1], chunk k `1 / staircase_stages` behind it (0 = not started yet: pure noise),
    # each mapped to t as the sampler's grid maps it (u², then the shift). Sorted draws give chunk 0 the largest
    # of `chunks` draws, so the first chunk is almost never seen near noise, where sampling starts it; a model
    # trained for a long time gets away with that, a small one trained for minutes does not. 0 = released.
    staircase_prob: float = 0.0
    staircase_stages: int = 4  # = sampler.window_size (released 4): a chunk is one stage behind the one before
    # Loss weight of moving content: an element's weight is 1 + motion_weight * min(d / motion_scale, 1), d the
    # RMS over channels of its clean latent's departure from the clip's temporal median at that position. The
    # moving shapes of the demo clips are ~10% of the tokens (d ~ 1-2 against ~0.005 for the background); a
    # small model trained for minutes otherwise spends its updates on the background. 0 = released (off).
    motion_weight: float = 0.0
    motion_scale: float = 0.5


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1.0e-4
    min_lr: float = 1.0e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    warmup_steps: int = 1000
    decay: LRDecay = LRDecay.constant  # constant | cosine | linear (after warm-up, down to min_lr at decay_steps)
    decay_steps: int = 0  # 0 = trainer.max_steps
    clip_grad: float = 1.0  # 0 disables clipping
    # Data-parallel gradient reduction (parallel/grad_buckets.py): the dtype of the flat buckets that collect and
    # sum the gradients (float32: whatever the parameters' dtype; bfloat16 halves the bytes sent), the bucket size
    # in elements, and whether a bucket is reduced as soon as backward has produced it (false: all after backward).
    grad_reduce_dtype: DType = DType.float32
    bucket_numel: int = 40_000_000
    overlap_grad_reduce: bool = True
    # Fused AdamW kernels on CUDA: auto = NVIDIA apex's FusedAdam when importable, else torch's fused AdamW;
    # torch = torch's (fused on CUDA); apex = apex or an error. The CPU always runs torch's per-tensor AdamW.
    fused: str = "auto"


@dataclass
class WandbConfig:
    # auto: online when an API key is configured (WANDB_API_KEY or `wandb login`'s ~/.netrc entry), else
    # offline (files under output_dir/wandb, `wandb sync` uploads them later); the choice is printed.
    mode: WandbMode = WandbMode.auto  # auto | offline | online | disabled
    project: str = "magi"
    name: Optional[str] = None


@dataclass
class TrainerConfig:
    max_steps: int = 100
    seed: int = 1234
    precision: Precision = Precision.fp32  # fp32 | bf16 (autocast)
    log_every: int = 1
    # Validation loss every N steps on held-out samples (synthetic: another data seed; webdataset:
    # data.val_shards) with fixed noise, once at each of eval_t (every chunk at that t, text-to-video, no
    # caption dropout): logged per t as eval_loss/t=<t> and their mean as eval_loss. 0 disables.
    eval_every: int = 0
    eval_batches: int = 2  # per t: held-out global batches (synthetic) / packed sequences per dp rank (webdataset)
    eval_t: List[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    # Validation videos every N steps (0 disables): the held-out captions of sample_count samples generated
    # with the inference sampler (sample_steps steps, no KV cache needed), written under
    # output_dir/videos and logged to wandb as videos. Decoded with the latent colour preview (synthetic
    # data) or the VAE in sample_vae_dir (kind vit).
    sample_every: int = 0
    sample_count: int = 2
    sample_steps: int = 16
    sample_chunks: int = 2
    sample_vae: VaeKind = VaeKind.preview  # preview | vit
    sample_vae_dir: Optional[str] = None
    save_every: int = 0  # 0 disables periodic checkpoints
    keep_last: int = 2
    # none: a new run, refused in an output_dir that holds another run's checkpoints or metrics (see overwrite) |
    # auto: the newest checkpoint that verifies (newer broken ones are skipped with a warning) | <path to a
    # checkpoint directory>. A resumed run must keep the model, the data order and the seed (see allow_config_change).
    resume: str = "none"
    # One run per directory, held by an exclusive lock (<output_dir>/.lock, magi_train/training/run_dir.py). Under
    # a Hydra multirun (-m) every job trains in <output_dir>/<hydra job number> (magi_train/train.py).
    output_dir: str = "runs/default"
    # With resume=none: delete the checkpoints, metrics, wandb run id and videos of the run in output_dir
    # (printed) instead of refusing to start there.
    overwrite: bool = False
    # Guarded config fields that a resume may change knowingly (the model's shape-giving fields, the data fields
    # that pick or order samples, trainer.seed, the global batch): dotted keys or prefixes, e.g.
    # [data.shards] to switch datasets. Other changes (lr, t shift, max_steps, parallel layout) are printed.
    allow_config_change: List[str] = field(default_factory=list)
    # Under torchrun: a worker whose launcher (the torchrun agent) died exits instead of training on as an orphan.
    exit_with_launcher: bool = True
    # Before the model is built: the memory estimate of the most loaded rank (observability/memory_check.py)
    # against the device's free memory; a run that cannot fit stops naming the knobs. false skips the check.
    check_memory: bool = True
    # Steps whose loss or gradient norm is NaN/inf are skipped (no update; counted and logged as
    # skipped_steps); more than this many in a row stop the run. 0 stops at the first.
    max_bad_steps: int = 3
    # Graceful stop (magi_train/training/stop.py): this file under output_dir ("" disables), or one of these signals
    # caught by a training process, ends the run after the step in flight with a checkpoint.
    stop_file: str = "STOP"
    stop_signals: List[str] = field(default_factory=lambda: ["SIGUSR1"])
    # Step time per phase (data/forward/backward/comm/optimizer) logged as time/<phase>; on a GPU each phase
    # ends with a synchronisation. false: only the step time.
    step_timers: bool = True
    # Peak dense TFLOP/s of one device for the logged MFU; 0: looked up by GPU name (bf16 dense peak of
    # A100/H100/H200/B200), otherwise (CPU, unknown GPU) MFU is not logged, only tflops_per_device.
    peak_tflops: float = 0.0
    progress_bar: bool = True
    deterministic: bool = True  # torch deterministic algorithms (CPU runs are then bit-reproducible)
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # Activation recompute: none | full (each layer re-runs its forward in backward) | selective (only the
    # attention kernels are re-run: their inputs are small, their score matrices large).
    recompute: Recompute = Recompute.none
    recompute_layers: int = 0  # recompute the first N layers of every pipeline stage; 0 = all of them
    # fp8 training: none, or a recipe of the backend that trainer.fp8_backend picks: Transformer Engine's
    # (layer_spec=te; magi_train/model/te_spec.py FP8_RECIPES: delayed | tensorwise | mxfp8 | blockwise) or torchao's
    # (layer_spec=local; magi_train/model/float8.py TORCHAO_RECIPES: tensorwise | rowwise | rowwise_with_gw_hp).
    fp8_recipe: str = "none"
    # Which fp8 implementation runs trainer.fp8_recipe (magi_train/model/float8.py FP8_BACKENDS): te (Transformer
    # Engine's autocast, model.layer_spec=te), torchao (torchao.float8 training linears on model.layer_spec=local:
    # tensorwise | rowwise | rowwise_with_gw_hp; one tensor-parallel rank, CUDA sm89+), auto (te with
    # model.layer_spec=te, else torchao).
    fp8_backend: str = "auto"
    # torch.compile of each transformer layer (regional: one layer's compile time, no recompiles across layers),
    # dynamic=False; the attention kernels stay outside the compiled regions (magi_train/model/compile.py).
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Fine-tuning (magi_train/training/init_from.py): the weights a new run starts from, nothing else (step 0, a
    # fresh optimizer, any parallel layout): a released model directory (any variant; fp8 ones dequantised), a run
    # directory of ours (its newest checkpoint) or one checkpoint. None: the preset's random initialisation. A run
    # that resumes its own checkpoints (trainer.resume) keeps them and ignores this (printed).
    init_from: Optional[str] = None
    # trainer.init_from a checkpoint of ours that kept an EMA (trainer.ema_decay > 0, or distillation): start from
    # its EMA weights (ema.<parameter>) instead of the trained ones.
    init_from_ema: bool = False
    # An exponential moving average of the trained weights for any run (training/ema.py), saved in every
    # checkpoint as ema.<parameter>; 0 = off. Distillation keeps its own (distill.ema_decay).
    ema_decay: float = 0.0
    # With an EMA: validation videos are sampled with the EMA weights (false: with the live weights).
    sample_ema: bool = True


@dataclass
class DistillConfig:
    """Shortcut + CFG distillation (experiment=distill): a student with the step-size embedding
    (model.distill=true), initialised from the base model `teacher`, learns v(x, t, s) for s = m/64.
    m = 1: the teacher's three-pass guided velocity (CFG distillation); m > 1: the shortcut target, two
    half steps of the EMA student on the 64-step inference grid (magi_train/diffusion/distill.py)."""

    enabled: bool = False
    # The base model: a checkpoint of this trainer (or a run's checkpoint root) or a released MAGI-1 directory.
    # It initialises the student (unless the run resumes) and stays frozen as the guidance teacher.
    teacher: str = ""
    step_cycle: List[int] = field(default_factory=lambda: [1] * 8 + [2, 4, 8])  # m per step, cyclic
    ema_decay: float = 0.999
    # Which weights take the two half steps of the shortcut target: ema (the released recipe) | student.
    shortcut_model: ShortcutModel = ShortcutModel.ema
    # Guidance folded in at m = 1 (the released base-model inference scales, by bucket of t).
    cfg_t_range: List[float] = field(default_factory=lambda: list(RELEASED_CFG_T_RANGE))
    prev_chunk_scales: List[float] = field(default_factory=lambda: list(RELEASED_PREV_CHUNK_SCALES))
    text_scales: List[float] = field(default_factory=lambda: list(RELEASED_TEXT_SCALES))


# The DiT linears LoRA adapts by default (fnmatch patterns over `build_dit(...).named_modules()` names): both
# attentions' projections and the MLP; the caption KV linear (linear_kv_xattn) only when named.
DEFAULT_LORA_TARGETS = ("*.self_attention.linear_qkv.q", "*.self_attention.linear_qkv.k",
                        "*.self_attention.linear_qkv.v", "*.self_attention.linear_qkv.qx",
                        "*.self_attention.linear_proj", "*.mlp.linear_fc1", "*.mlp.linear_fc2")


@dataclass
class LoraConfig:
    """LoRA fine-tuning (experiment=lora; magi_train/model/lora.py, magi_train/parallel/lora.py): rank > 0 adds
    adapters B A (B = 0 at the start) to the target linears and freezes everything else; only the adapters are
    trained, checkpointed and exported (<output_dir>/adapter/)."""

    rank: int = 0  # 0 = no LoRA (full training); > 0: adapters of this rank, base frozen
    alpha: float = 16.0  # scale = alpha / rank (as peft / the LoRA paper)
    dropout: float = 0.0  # on the adapter's input
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # dtype of the frozen base weights: auto = model.params_dtype; bfloat16 halves the base's memory (with
    # trainer.precision=bf16, whose autocast runs the products in bf16 anyway).
    base_dtype: ComputeDType = ComputeDType.auto


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    experiment: Optional[str] = None
    tags: List[str] = field(default_factory=list)
