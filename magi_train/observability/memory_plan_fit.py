"""The cheapest training setting that fits one memory budget (tools/estimate_memory.py --fit).

For a fixed parallel layout (one GPU by default) and a wished-for run (model, tuning, clip of `chunks` chunks of
`chunk_tokens` tokens, micro-batch size), `fit` walks the settings the trainer has, from the one that gives up
nothing to the one that gives up most, and returns the first whose estimate (memory_plan.estimate) fits.
What is given up, in this order (outermost last):

1. compute: trainer.recompute / trainer.recompute_layers, ordered by the forward FLOPs they re-run
   (observability/flops.py: selective re-runs the attention kernels, full a whole layer, on the first k layers of
   the stage), and at equal recompute the largest data.micro_batch_size (fewer samples per forward cost nothing in
   the result: gradient accumulation keeps the global batch);
2. numerics: the frozen base's dtype (lora.base_dtype; float8 only when asked for: the trainer has no fp8 base
   yet);
3. the task: fewer chunks per clip (data.chunks_per_sample, shorter videos), then a smaller lora.rank.

Not searched, because the trainer does not have them: CPU offload of the optimizer state or of activations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple

from magi_train.config.schema import ModelConfig
from magi_train.observability.flops import SampleShape, flops_breakdown
from magi_train.observability.memory_plan import MemoryEstimate, estimate
from magi_train.observability.memory_plan_layout import BYTES, Layout, MicroBatch
from magi_train.observability.memory_plan_params import ModelParams, Tuning


@dataclass(frozen=True)
class Setting:
    """One point of the search: what the trainer is told."""

    recompute: str  # trainer.recompute
    recompute_layers: int  # trainer.recompute_layers (0 = every layer)
    micro_batch_size: int  # data.micro_batch_size
    chunks: int  # data.chunks_per_sample
    base_dtype: str  # lora.base_dtype (auto: model.params_dtype)
    lora_rank: int  # lora.rank (0: full training)
    recompute_cost: float = 0.0  # forward FLOPs re-run, as a fraction of the step's FLOPs

    def overrides(self) -> List[str]:
        """The command-line overrides that select it."""
        out = [f"trainer.recompute={self.recompute}"]
        if self.recompute != "none":
            out.append(f"trainer.recompute_layers={self.recompute_layers}")
        out += [f"data.micro_batch_size={self.micro_batch_size}", f"data.chunks_per_sample={self.chunks}"]
        if self.lora_rank:
            out += [f"lora.rank={self.lora_rank}", f"lora.base_dtype={self.base_dtype}"]
        return out

    def describe(self, layers: int) -> str:
        rc = self.recompute if self.recompute == "none" or self.recompute_layers in (0, layers) else \
            f"{self.recompute} ({self.recompute_layers}/{layers} layers)"
        lora = f", LoRA rank {self.lora_rank}, base {self.base_dtype}" if self.lora_rank else ""
        return f"recompute {rc}, micro-batch {self.micro_batch_size}, {self.chunks} chunk(s){lora}"


@dataclass(frozen=True)
class Fit:
    setting: Setting
    estimate: MemoryEstimate
    # The setting just before it in the search order (cheaper, and over the budget), with its estimate; None when
    # the first setting fits.
    previous: Optional[Tuple[Setting, MemoryEstimate]] = None


def recompute_options(cfg: ModelConfig, layers: int, chunk_tokens: int, chunks: int, caption_tokens: int,
                      lora: bool) -> List[Tuple[str, int, float]]:
    """(recompute, recompute_layers, cost) of every recompute the trainer has for a stage of `layers` layers,
    cheapest first; cost = forward FLOPs re-run / FLOPs of a step without recompute (backward = 2 forwards, or
    1 with a frozen base: no weight gradients)."""
    sample = SampleShape(tuple([chunk_tokens] * chunks), caption_tokens)
    f = flops_breakdown(cfg, sample)
    per_layer = (f["linear"] + f["caption_kv"] + f["adaln"] + f["self_attention"] + f["cross_attention"]) / cfg.num_layers
    attention = (f["self_attention"] + f["cross_attention"]) / cfg.num_layers
    step = sum(f.values()) * (2 if lora else 3)
    out = [("none", 0, 0.0)]
    for k in range(1, layers + 1):
        n = 0 if k == layers else k  # recompute_layers=0 is "every layer"
        out.append(("selective", n, k * attention / step))
        out.append(("full", n, k * per_layer / step))
    return sorted(out, key=lambda o: (o[2], o[0] != "selective"))


def settings(cfg: ModelConfig, layout: Layout, tuning: Tuning, chunk_tokens: int, chunks: int, micro_batch_size: int,
             caption_tokens: int, base_dtypes: Sequence[str], ranks: Sequence[int]) -> Iterator[Setting]:
    """Every setting, in the order `fit` tries them (the module docstring)."""
    layers = cfg.num_layers // layout.pp
    for rank in ranks if tuning.lora else [0]:
        for n in range(chunks, 0, -1):
            recomputes = recompute_options(cfg, layers, chunk_tokens, n, caption_tokens, tuning.lora)
            for base in base_dtypes if tuning.lora else ["auto"]:
                for rc, k, cost in recomputes:
                    for mbs in range(micro_batch_size, 0, -1):
                        yield Setting(rc, k, mbs, n, base, rank, cost)


def base_dtype_options(cfg: ModelConfig, requested: str, fp8: bool) -> List[str]:
    """The requested frozen-base dtype, then the trainer's smaller ones (bfloat16 for an fp32 model), then float8
    when `fp8`."""
    size = BYTES[cfg.params_dtype if requested == "auto" else requested] if requested != "float8" else 1
    out = [requested]
    if requested != "float8" and BYTES["bfloat16"] < size:
        out.append("bfloat16")
    if fp8 and requested != "float8":
        out.append("float8")
    return out


def setting_estimate(cfg: ModelConfig, layout: Layout, tuning: Tuning, setting: Setting, mb: MicroBatch,
                     params: Optional[ModelParams] = None) -> MemoryEstimate:
    """The estimate of `setting` (mb gives the chunk size, captions and attention)."""
    t = replace(tuning, lora_rank=setting.lora_rank, base_dtype=setting.base_dtype) if tuning.lora else tuning
    lay = replace(layout, recompute=setting.recompute, recompute_layers=setting.recompute_layers)
    chunk = mb.chunk_tokens or mb.seq_length
    m = replace(mb, seq_length=chunk * setting.chunks, micro_batch_size=setting.micro_batch_size, chunk_tokens=chunk)
    return estimate(cfg, lay, m, params if params is not None and params.tuning == t else ModelParams.of(cfg, t))


def fit(cfg: ModelConfig, budget: int, mb: MicroBatch, tuning: Tuning = Tuning(), layout: Layout = Layout(),
        fp8_base: bool = False, min_rank: int = 4) -> Optional[Fit]:
    """The first setting of the search order (module docstring) whose estimate is at most `budget` bytes; None
    when none fits. `mb`: the wished-for micro-batch (its seq_length / chunk_tokens chunks, its size);
    `tuning`: the wished-for training (its rank is the largest tried, halved down to `min_rank`)."""
    chunk = mb.chunk_tokens or mb.seq_length
    chunks = -(-mb.seq_length // chunk)
    caption = mb.caption_tokens or mb.caption_length or cfg.caption_max_length
    ranks = [tuning.lora_rank]
    while ranks[-1] // 2 >= min_rank:
        ranks.append(ranks[-1] // 2)
    memo = {}
    previous = None
    for s in settings(cfg, layout, tuning, chunk, chunks, mb.micro_batch_size, caption,
                      base_dtype_options(cfg, tuning.base_dtype, fp8_base), ranks):
        key = (s.lora_rank, s.base_dtype)
        if key not in memo:
            t = replace(tuning, lora_rank=s.lora_rank, base_dtype=s.base_dtype) if tuning.lora else tuning
            memo[key] = ModelParams.of(cfg, t)
        est = setting_estimate(cfg, layout, tuning, s, mb, memo[key])
        if est.total <= budget:
            return Fit(s, est, previous)
        previous = (s, est)
    return None
