"""The closed sets of values that config fields take, one enum per set: the schema types its fields with them,
so Hydra rejects a bad value at composition with the key and the allowed values, and `validate` checks
dataclasses built in Python against the same enums.

OmegaConf converts a YAML or command-line string to a member by NAME (`Enum[value]`), and code compares
the fields with plain strings, writes them into JSON checkpoints and f-strings: so every member's name
equals its value, and every enum is a `StrEnum` (a member is a `str`, equal to and printed as its value).
Names that are not identifiers ("1f1b") are declared with the functional API.

Sets that are registries in code (attention backends, fp8 recipes, shortcut modes) are not copied here:
`validate` checks those fields against the registry itself.
"""

from __future__ import annotations

import enum
from typing import List, Type


def _values(*values: str) -> List[tuple]:
    return [(v, v) for v in values]


class DType(enum.StrEnum):
    """`model.params_dtype`: dtype of the DiT's parameters and residual stream."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ComputeDType(enum.StrEnum):
    """A compute dtype chosen at run time (`dtype`, `vae.dtype`): auto picks by device."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class LayerSpec(enum.StrEnum):
    """`model.layer_spec`: which implementation builds the layers (magi_train/model/spec.py)."""

    local = "local"
    te = "te"


PPSchedule = enum.StrEnum("PPSchedule", _values("1f1b", "interleaved_1f1b", "gpipe"), module=__name__)
PPSchedule.__doc__ = "`parallel.pp_schedule`: how pipeline stages order their micro-batches."


class DistBackend(enum.StrEnum):
    """`parallel.backend`: the torch.distributed backend."""

    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class CPImpl(enum.StrEnum):
    """`parallel.cp_impl`: how context parallelism splits the tokens."""

    auto = "auto"
    ulysses = "ulysses"
    magi = "magi"


class DataKind(enum.StrEnum):
    synthetic = "synthetic"
    webdataset = "webdataset"


class VaeKind(enum.StrEnum):
    """The video decoder: the released ViT VAE, or the latent-colour preview."""

    vit = "vit"
    preview = "preview"


class OptimizerName(enum.StrEnum):
    adamw = "adamw"


class LRDecay(enum.StrEnum):
    """`optimizer.decay`: the learning-rate schedule after warm-up (magi_train/training/optim.py)."""

    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class WandbMode(enum.StrEnum):
    auto = "auto"
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Precision(enum.StrEnum):
    """`trainer.precision`: fp32 runs the model in its params dtype; bf16 is CUDA autocast."""

    fp32 = "fp32"
    bf16 = "bf16"


class Recompute(enum.StrEnum):
    none = "none"
    full = "full"
    selective = "selective"


class ShortcutModel(enum.StrEnum):
    """`distill.shortcut_model`: which weights take the two half steps of the shortcut target."""

    ema = "ema"
    student = "student"


class GenerateMode(enum.StrEnum):
    t2v = "t2v"
    i2v = "i2v"
    v2v = "v2v"


class TextEncoder(enum.StrEnum):
    t5 = "t5"
    hash = "hash"
    hash_bigram = "hash_bigram"  # hash + each word's left neighbour (magi_train/model/text/hash.py: when)


def choices(enum_type: Type[enum.Enum]) -> List[str]:
    """The allowed values of a closed set, in declaration order."""
    return [member.value for member in enum_type]
