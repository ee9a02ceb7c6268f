"""LoRA: low-rank adapters on the DiT's linears (Hu et al. 2021), several named adapters at once.

    names = apply_lora(model, DEFAULT_LORA_TARGETS, rank=16, alpha=16)   # wraps the matched linears, freezes the rest
    optimizer = AdamW(p for _, p in lora_parameters(model))
    tensors = lora_state_dict(model)                                      # {"<module>.lora_A.weight": (r, in), ...}
    merge_lora(model)                                                     # fold into the base weights, unwrap

A wrapped linear computes

    y = base(x) + sum over adapters n of  scale_n * (alpha_n / rank_n) * B_n A_n dropout_n(x)

with A_n (rank x in) drawn kaiming-uniform (a = sqrt(5), peft's and the paper's choice: U(-1/sqrt(in), 1/sqrt(in)))
and B_n (out x rank) zero, so a fresh adapter changes nothing: its product is exact zeros, and the sum is formed in
the wider of the two dtypes and rounded once to the base's output dtype (bf16 -> fp32 -> bf16 is exact), so the
output is bit-equal to the base's. An adapter whose scale is 0 is skipped.

Names. `LoraLinear` keeps the base linear as its child `base_layer` and the factors as `lora_A.<adapter>.weight` /
`lora_B.<adapter>.weight`: the parameter names of peft's LoRA layers. In the adapter files (and `lora_state_dict`) the
adapter name is dropped: `<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>` the wrapped module's name in
the plain model (`videodit_blocks.layers.0.mlp.linear_fc1`), which is peft's saved layout too.

Why not peft (issue 18 asks for it where it fits; checked with peft 0.21.2 + accelerate 1.x on torch 2.13):
- our single-process linears (model/linear.py `Linear`, `CaptionKVLinear`) are plain nn.Modules, not nn.Linear
  subclasses, so peft's dispatchers do not recognise them ("Target module Linear(...) is not supported"); the way in is
  peft's custom-module mapping, which means writing the LoRA layer class ourselves anyway;
- peft's LoRA for megatron's parallel linears (`LoraParallelLinear`) fails in 0.21.2 (`KeyError: 'fan_in_fan_out'`,
  tp_layer.py), needs a full megatron `TransformerConfig` dict, and does not know our sequence-parallel gather /
  reduce-scatter or the caption linear's row blocks;
- peft wraps the model in a PeftModel (names prefixed `base_model.model.`), which our trainer, checkpoints,
  pipeline stages and parallelize_dit would all have to see through, and it adds two dependencies (peft, accelerate).
So this module is ours, kept small and peft-compatible in naming and initialisation.

Tensor parallelism: this module knows no process group (magi_train/model imports nothing from magi_train/parallel).
A tensor-parallel variant subclasses `LoraLinear` and is passed to `apply_lora(..., factory=...)`; the hooks
`factor_shapes`, `shard_factors`, `full_factors`, `lora_hidden` and `delta_weight` are where a variant differs
(magi_train/parallel/lora.py `ParallelLoraLinear` holds A and B whole on every rank and slices them in its own
forward and `delta_weight`: A whole / B split along out for a column linear, A split along in with the rank-r
product all-reduced / B whole for a row linear). Adapters are always drawn at their whole (TP=1) size from a
generator seeded by (seed, module, adapter), so every layout starts from the same adapter.
"""

from __future__ import annotations

import fnmatch
import math
import re
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_ADAPTER = "default"
# The DiT's attention and MLP linears (module names of build_dit(...).named_modules()); the caption KV linear
# `linear_kv_xattn` can be targeted too ("*.self_attention.linear_kv_xattn") but is not by default (peers adapt
# the video-token projections; its input is the caption, the same for every video of a prompt).
DEFAULT_LORA_TARGETS = ("*.self_attention.linear_qkv.q", "*.self_attention.linear_qkv.k",
                        "*.self_attention.linear_qkv.v", "*.self_attention.linear_qkv.qx",
                        "*.self_attention.linear_proj", "*.mlp.linear_fc1", "*.mlp.linear_fc2")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")  # a ModuleDict key: no dots


class _Factor(nn.Module):
    """One LoRA factor as a module holding `weight`, so the parameter is named `lora_A.<adapter>.weight`."""

    def __init__(self, shape: Tuple[int, int], dtype: torch.dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))


def linear_features(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) whole-model features of a linear this module can wrap, or None for anything else."""
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    # magi_train/model/linear.py and megatron's parallel linears (global sizes); the fp8 linears (model/fp8.py)
    for a, b in (("input_size", "output_size"), ("in_features", "out_features")):
        i, o = getattr(module, a, None), getattr(module, b, None)
        if isinstance(i, int) and isinstance(o, int) and isinstance(getattr(module, "weight", None), torch.Tensor):
            return i, o
    return None


class LoraLinear(nn.Module):
    """A linear plus any number of named low-rank adapters (see the module docstring)."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int):
        super().__init__()
        if isinstance(base, LoraLinear):
            raise ValueError("LoraLinear wraps a plain linear; add another adapter to the LoraLinear instead")
        self.base_layer = base
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.ranks: Dict[str, int] = {}
        self.alphas: Dict[str, float] = {}
        self.scales: Dict[str, float] = {}  # the user's multiplier per adapter (inference: lora=[{path, scale}])

    # ------------------------------------------------------------------ hooks of a tensor-parallel variant
    def factor_shapes(self, rank: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """Shapes of (A, B) held here: the whole (rank x in, out x rank) on one process."""
        return (rank, self.in_features), (self.out_features, rank)

    def shard_factors(self, a_full: torch.Tensor, b_full: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of whole-size factors (one process: all of them)."""
        return a_full, b_full

    def full_factors(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole-size (A, B) of adapter `name` (a tensor-parallel variant gathers them)."""
        return self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()

    def lora_hidden(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The rank-r intermediate A dropout(x) (a row-parallel variant all-reduces it over the tp group)."""
        a = self.lora_A[name].weight
        return F.linear(self.lora_dropout[name](x).to(a.dtype), a)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> List[str]:
        return list(self.lora_A.keys())

    # Code around a linear reads its `weight` (e.g. the embedders cast their input to `mlp[0].weight.dtype`): a
    # wrapped linear answers with the frozen base's, so any linear of the DiT can be a target.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base_layer, "bias", None)

    def weight_device(self) -> torch.device:
        w = getattr(self.base_layer, "weight", None)
        return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, scale: float = 1.0,
                    dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> None:
        """A fresh adapter: A kaiming-uniform (drawn whole-size from `generator` on the CPU), B zero. On the meta
        device (shapes only) nothing is drawn: apply adapters to a materialised model to have them initialised."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"adapter name {name!r} must be an identifier (letters, digits, _ or -, no dots)")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this linear (adapters: {self.adapters})")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank={rank!r} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout={dropout} must lie in [0, 1)")
        device = self.weight_device()
        a_shape, b_shape = self.factor_shapes(rank)
        self.lora_A[name] = _Factor(a_shape, dtype, device)
        self.lora_B[name] = _Factor(b_shape, dtype, device)
        # A module made now starts in training mode; it follows the model's mode (an eval model drops nothing).
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.ranks[name], self.alphas[name], self.scales[name] = rank, float(alpha), float(scale)
        if device.type != "meta":
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) of a (rank, in) weight
            a_full = torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=generator)
            self.set_factors(name, a_full, torch.zeros(self.out_features, rank))

    def set_factors(self, name: str, a_full: torch.Tensor, b_full: torch.Tensor) -> None:
        """Load whole-size factors (rank x in, out x rank) into adapter `name`."""
        r = self.ranks[name]
        if tuple(a_full.shape) != (r, self.in_features) or tuple(b_full.shape) != (self.out_features, r):
            raise ValueError(f"adapter {name!r}: factors of shapes A {tuple(a_full.shape)}, B {tuple(b_full.shape)} "
                             f"do not fit rank {r} on a linear of {self.in_features} -> {self.out_features}")
        a, b = self.shard_factors(a_full, b_full)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(a)
            self.lora_B[name].weight.copy_(b)

    def scaling(self, name: str) -> float:
        return self.scales[name] * self.alphas[name] / self.ranks[name]

    def set_scale(self, name: str, scale: float) -> None:
        self._known(name)
        self.scales[name] = float(scale)

    def remove_adapter(self, name: str) -> None:
        self._known(name)
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        for d in (self.ranks, self.alphas, self.scales):
            del d[name]

    def _known(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this linear (adapters: {self.adapters})")

    # ------------------------------------------------------------------ compute
    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """B A x of adapter `name`, unscaled (a tensor-parallel subclass adds its communication here)."""
        return F.linear(self.lora_hidden(name, x), self.lora_B[name].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        delta = None
        for name in self.lora_A:
            s = self.scaling(name)
            if s == 0.0:
                continue
            d = self._delta(name, x) * s
            delta = d if delta is None else delta + d
        if delta is None:
            return out
        # One rounding to the base's dtype: a zero delta leaves the base output bit for bit.
        wide = torch.promote_types(out.dtype, delta.dtype)
        return (out.to(wide) + delta.to(wide)).to(out.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scale * alpha / rank * B A in fp32, the shape of this rank's base weight (out x in)."""
        a, b = self.lora_A[name].weight.detach().float(), self.lora_B[name].weight.detach().float()
        return (b @ a) * self.scaling(name)

    def merge(self) -> nn.Module:
        """Fold every adapter into the base weight (fp32 sum, one rounding) and return the base linear."""
        weight = getattr(self.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16,
                                                                         torch.float64):
            kind = type(self.base_layer).__name__
            raise ValueError(f"cannot merge LoRA into a {kind} with weight dtype "
                             f"{getattr(weight, 'dtype', None)}: merging needs a floating base weight (an fp8 base "
                             f"would be requantised; merge into the bf16 weights and quantise afterwards)")
        if self.adapters:
            delta = sum(self.delta_weight(n) for n in self.adapters)
            if tuple(delta.shape) != tuple(weight.shape):
                raise ValueError(f"LoRA update of shape {tuple(delta.shape)} does not fit the base weight "
                                 f"{tuple(weight.shape)}")
            with torch.no_grad():
                weight.copy_((weight.float() + delta).to(weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        parts = [f"{n}: rank={self.ranks[n]}, alpha={self.alphas[n]}, scale={self.scales[n]}" for n in self.adapters]
        return f"in={self.in_features}, out={self.out_features}, adapters=[{'; '.join(parts)}]"


# ---------------------------------------------------------------------------- whole-model functions
LoraFactory = Callable[[str, nn.Module, int, int], LoraLinear]


def lora_modules(model: nn.Module) -> Dict[str, LoraLinear]:
    """Module name -> LoraLinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(model: nn.Module) -> List[str]:
    """The adapters held by the model (first-seen order)."""
    seen: Dict[str, None] = {}
    for m in lora_modules(model).values():
        seen.update(dict.fromkeys(m.adapters))
    return list(seen)


def _inside_lora(name: str, lora_names: Iterable[str]) -> bool:
    return any(name.startswith(p + ".") for p in lora_names)


def match_targets(model: nn.Module, targets: Sequence[str]) -> List[str]:
    """Names of the linears matched by the fnmatch patterns `targets` (model order). A pattern that matches no
    linear is an error naming it (and what it did match, if anything)."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("lora targets is empty: give fnmatch patterns over module names, e.g. '*.mlp.linear_fc1'")
    wrapped = list(lora_modules(model))
    candidates = [(n, m) for n, m in model.named_modules() if n and not _inside_lora(n, wrapped)]
    chosen: Dict[str, None] = {}
    for pattern in targets:
        hits = [n for n, _ in candidates if fnmatch.fnmatchcase(n, pattern)]
        linears = [n for n, m in candidates if n in hits and linear_features(m) is not None]
        if not linears:
            other = f"; it matches only non-linear modules: {hits[:4]}" if hits else ""
            examples = [n for n, m in candidates if linear_features(m) is not None][:3]
            raise ValueError(f"lora target pattern {pattern!r} matches no linear of the model{other} (linears are "
                             f"named like {examples})")
        chosen.update(dict.fromkeys(linears))
    return [n for n, _ in candidates if n in chosen]


def _seed_of(seed: int, module: str, adapter: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{module}:{adapter}".encode())) % (2**63)


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
               name: str = DEFAULT_ADAPTER, *, scale: float = 1.0, dtype: torch.dtype = torch.float32, seed: int = 0,
               freeze_base: bool = True, factory: Optional[LoraFactory] = None) -> List[str]:
    """Add adapter `name` to every linear matched by `targets` (wrapping it in a LoraLinear, or adding to the one
    there) and return the matched module names. `freeze_base`: every parameter that is not a LoRA factor stops
    requiring gradients. `factory(name, linear, in, out)` builds the wrapper (default LoraLinear; tensor
    parallelism passes its own). Adapter factors are drawn from (seed, module name, adapter name)."""
    names = match_targets(model, targets)
    make = factory or (lambda _n, linear, i, o: LoraLinear(linear, i, o))
    for module_name in names:
        module = model.get_submodule(module_name)
        if not isinstance(module, LoraLinear):
            i, o = linear_features(module)
            module = make(module_name, module, i, o).train(module.training)
            _set_child(model, module_name, module)
        gen = torch.Generator().manual_seed(_seed_of(seed, module_name, name))
        module.add_adapter(name, rank, alpha, dropout, scale=scale, dtype=dtype, generator=gen)
    if freeze_base:
        freeze_non_lora(model)
    return names


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in f".{name}" or ".lora_B." in f".{name}"


def freeze_non_lora(model: nn.Module) -> None:
    """requires_grad=False for every parameter but the LoRA factors (which are set trainable)."""
    for n, p in model.named_parameters():
        p.requires_grad_(is_lora_parameter(n))


def lora_parameters(model: nn.Module, name: Optional[str] = None) -> List[Tuple[str, nn.Parameter]]:
    """(parameter name, parameter) of the LoRA factors (of adapter `name`, or all), in model order."""
    out = []
    for n, p in model.named_parameters():
        if is_lora_parameter(n) and (name is None or n.split(".")[-2] == name):
            out.append((n, p))
    return out


def _single_adapter(model: nn.Module, name: Optional[str]) -> str:
    names = adapter_names(model)
    if name is None:
        if len(names) != 1:
            raise ValueError(f"the model holds adapters {names}: name the one wanted")
        return names[0]
    if name not in names:
        raise KeyError(f"the model holds no adapter {name!r} (adapters: {names})")
    return name


def lora_state_dict(model: nn.Module, name: Optional[str] = DEFAULT_ADAPTER) -> Dict[str, torch.Tensor]:
    """The adapter's whole-size factors: `<module>.lora_A.weight` (rank x in) and `<module>.lora_B.weight`
    (out x rank), module names as in the plain model (the adapter-file layout)."""
    name = _single_adapter(model, name)
    out = {}
    for module_name, m in lora_modules(model).items():
        if name in m.adapters:
            a, b = m.full_factors(name)
            out[f"{module_name}.lora_A.weight"] = a
            out[f"{module_name}.lora_B.weight"] = b
    return out


def adapter_settings(model: nn.Module, name: Optional[str] = DEFAULT_ADAPTER) -> Dict[str, float]:
    """{rank, alpha, dropout} of adapter `name` (the same on every module it adapts)."""
    name = _single_adapter(model, name)
    m = next(m for m in lora_modules(model).values() if name in m.adapters)
    drop = m.lora_dropout[name]
    return {"rank": m.ranks[name], "alpha": m.alphas[name], "dropout": drop.p if isinstance(drop, nn.Dropout) else 0.0}


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    _single_adapter(model, name)
    for m in lora_modules(model).values():
        if name in m.adapters:
            m.set_scale(name, scale)


def remove_lora(model: nn.Module, name: str) -> List[str]:
    """Remove adapter `name` everywhere; a wrapper left with no adapter is replaced by its base linear (the model
    is then the plain model again). Returns the modules it was removed from."""
    _single_adapter(model, name)
    touched = []
    for module_name, m in lora_modules(model).items():
        if name in m.adapters:
            m.remove_adapter(name)
            touched.append(module_name)
            if not m.adapters:
                _set_child(model, module_name, m.base_layer)
    return touched


def merge_lora(model: nn.Module) -> List[str]:
    """Fold every adapter into its base weight and put the base linears back (the plain model, whose state dict
    has the released keys). Returns the merged module names."""
    merged = []
    for module_name, m in lora_modules(model).items():
        _set_child(model, module_name, m.merge())
        merged.append(module_name)
    return merged


def load_adapter(model: nn.Module, path, name: Optional[str] = None, scale: float = 1.0,
                 factory: Optional[LoraFactory] = None, base_model: Optional[dict] = None,
                 require_all: bool = True) -> str:
    """Read an adapter directory (magi_train/checkpoint/adapters.py) and add it to `model` as adapter `name`
    (default: the directory's name made an identifier, numbered if taken) with multiplier `scale`. `base_model`:
    the identity of the model (as `adapters.base_model_identity`) the adapter's recorded base is checked against.
    `require_all=False`: adapt the modules this model holds (a pipeline stage), at least one. Returns the name."""
    from magi_train.checkpoint.adapters import read_adapter

    adapter = read_adapter(path, base_model=base_model)
    taken = adapter_names(model)
    name = default_adapter_name(adapter.path, taken) if name is None else name
    if name in taken:
        raise ValueError(f"the model already holds an adapter named {name!r}: give load_adapter(name=...)")
    cfg = adapter.config
    present = [m for m in adapter.modules if _has_module(model, m)]
    missing = [m for m in adapter.modules if m not in present]
    if not present and not require_all:
        return name  # a pipeline stage holding none of the adapted modules: nothing to do here
    if missing and require_all or not present:
        raise ValueError(f"adapter {adapter.path}: the model has no module {missing[0]!r} "
                         f"({len(missing)} of its {len(adapter.modules)} modules are missing)")
    apply_lora(model, [fnmatch_escape(m) for m in present], cfg["rank"], cfg["alpha"], cfg["dropout"], name,
               scale=scale, freeze_base=False, factory=factory)
    try:
        for module_name in present:
            try:
                model.get_submodule(module_name).set_factors(name, adapter.tensors[f"{module_name}.lora_A.weight"],
                                                             adapter.tensors[f"{module_name}.lora_B.weight"])
            except ValueError as e:
                raise ValueError(f"adapter {adapter.path}, module {module_name}: {e}") from e
    except BaseException:
        remove_lora(model, name)  # nothing half-loaded stays behind
        raise
    return name


def default_adapter_name(path, taken: Iterable[str] = ()) -> str:
    """An adapter directory's name made an identifier, numbered (_2, _3, ...) when `taken` has it."""
    from pathlib import Path

    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).name) or "adapter"
    stem = stem if _NAME.match(stem) else f"a_{stem}"
    taken = set(taken)
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    return name


def save_adapter(model: nn.Module, directory, name: Optional[str] = DEFAULT_ADAPTER,
                 targets: Optional[Sequence[str]] = None, step: Optional[int] = None,
                 base_model: Optional[dict] = None, dtype: Optional[torch.dtype] = None):
    """Write adapter `name` of `model` as an adapter directory (magi_train/checkpoint/adapters.py). `targets`: the
    patterns it was made with (default: its module names); `base_model`: default from `model.cfg`."""
    from magi_train.checkpoint.adapters import base_model_identity, write_adapter

    name = _single_adapter(model, name)
    if base_model is None:
        if not hasattr(model, "cfg"):
            raise ValueError("save_adapter needs base_model= for a model without a ModelConfig `cfg`")
        base_model = base_model_identity(model.cfg)
    tensors = lora_state_dict(model, name)
    settings = adapter_settings(model, name)
    modules = list(dict.fromkeys(k.rsplit(".lora_", 1)[0] for k in tensors))
    return write_adapter(directory, tensors, rank=settings["rank"], alpha=settings["alpha"],
                         dropout=settings["dropout"], targets=list(targets) if targets is not None else modules,
                         base_model=base_model, step=step, dtype=dtype)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def fnmatch_escape(name: str) -> str:
    """A pattern matching exactly `name` (fnmatch's special characters bracketed)."""
    return re.sub(r"([*?\[])", r"[\1]", name)
