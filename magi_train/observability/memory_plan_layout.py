"""What the training memory planner is asked about (memory_plan.py): one rank's parallel layout and trainer
settings (`Layout`), one micro-batch (`MicroBatch`), and the unit constants every part of the planner shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from magi_train.config.choices import Precision, Recompute, choices

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
F32 = 4
# trainer.recompute / trainer.precision values (their enums are the one list); the search tries the least
# recompute first.
RECOMPUTE = (Recompute.none.value, Recompute.selective.value, Recompute.full.value)
PRECISIONS = tuple(choices(Precision))
ATTENTION = ("flash", "torch")  # kernels the estimate models (see memory_plan.py's docstring), not a config field
# model.attention_backend values whose range-derived memory is counted, with the kernel family each saves like.
BACKEND_FAMILY = {"torch": "torch", "sdpa": "torch", "flex": "flash", "flash": "flash", "magi": "flash"}
FLEX_BLOCK = 128  # model/flex.py BLOCK: FlexAttention's tile


@dataclass(frozen=True)
class Layout:
    """One rank's view of a parallel layout and the trainer settings that change memory."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # trainer.recompute: none | selective | full
    precision: str = "bf16"  # trainer.precision: fp32 (no autocast) | bf16 (autocast)
    # trainer.recompute_layers: recompute only the first N layers of every pipeline stage (VideoDiT.set_recompute);
    # 0 = all of them.
    recompute_layers: int = 0

    def __post_init__(self) -> None:
        if min(self.tp, self.cp, self.pp, self.dp) < 1:
            raise ValueError(f"parallel sizes must be >= 1: {self}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r} is not one of {RECOMPUTE}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if self.recompute_layers < 0:
            raise ValueError(f"recompute_layers={self.recompute_layers} (trainer.recompute_layers) must be >= 0")

    @property
    def model_parallel(self) -> int:
        return self.tp * self.cp * self.pp

    @property
    def gpus(self) -> int:
        return self.model_parallel * self.dp

    def recomputed_layers(self, layers: int) -> int:
        """How many of a stage's `layers` layers recompute (set_recompute: the first recompute_layers of them)."""
        if self.recompute == "none":
            return 0
        return min(self.recompute_layers, layers) if self.recompute_layers else layers

    def describe(self) -> str:
        sp = " sp" if self.sequence_parallel else ""
        first = f" (first {self.recompute_layers} layers)" if self.recompute != "none" and self.recompute_layers else ""
        return (f"tp={self.tp} cp={self.cp} pp={self.pp} dp={self.dp}{sp} recompute={self.recompute}{first} "
                f"precision={self.precision}")


@dataclass(frozen=True)
class MicroBatch:
    """What one forward of one rank's pipeline stage sees."""

    seq_length: int  # video tokens of one sample (dense) or of one packed sequence
    micro_batch_size: int = 1  # samples (sequences) per micro-batch
    chunk_tokens: int = 0  # tokens per chunk (block-causal attention, one caption/condition row each); 0 = seq_length
    caption_length: int = 0  # caption rows of each chunk as padded (data.caption_length); 0 = model.caption_max_length
    caption_tokens: int = 0  # valid caption tokens of each chunk (cross-attention keys); 0 = caption_length
    attention: str = "flash"  # flash | torch (see memory_plan.py's docstring)
    backend: str = ""  # model.attention_backend (BACKEND_FAMILY); "" = magi for flash attention, torch for torch

    def __post_init__(self) -> None:
        if self.seq_length < 1 or self.micro_batch_size < 1:
            raise ValueError(f"seq_length and micro_batch_size must be >= 1: {self}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION}")
        if self.backend and self.backend not in BACKEND_FAMILY:
            raise ValueError(f"backend={self.backend!r} (model.attention_backend) is not one of "
                             f"{sorted(BACKEND_FAMILY)}; auto is one of them per device (model/spec.py)")
        if self.backend and BACKEND_FAMILY[self.backend] != self.attention:
            raise ValueError(f"backend={self.backend!r} saves like the {BACKEND_FAMILY[self.backend]} kernel: "
                             f"use attention={BACKEND_FAMILY[self.backend]!r} with it")

    @property
    def attention_backend(self) -> str:
        return self.backend or ("magi" if self.attention == "flash" else "torch")

    def chunk_sizes(self) -> List[int]:
        """Tokens of each chunk of one sample (the last one may be shorter)."""
        c = self.chunk_tokens or self.seq_length
        return [min(c, self.seq_length - start) for start in range(0, self.seq_length, c)]
