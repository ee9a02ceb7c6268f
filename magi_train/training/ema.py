"""An exponential moving average of the weights, kept by an optimizer-step callback that any run can use.

`EmaCallback` holds one fp32 `EmaWeights` per model chunk of this rank (the local shards, beside the
parameters), updates it after every optimizer step, and is saved in every checkpoint as `ema.<parameter>`
(reshardable like the weights, through the checkpoint's `extra_weights`; `read_full_weights(path, "ema")`
exports it; `magi_train.checkpoint.weights.load_weights(..., ema=True)` loads it for inference). A resumed
run reloads it exactly; a run that starts, or resumes from a checkpoint without an EMA, starts it from the
weights. Any run turns it on with trainer.ema_decay > 0 (validation videos then sample the EMA weights unless
trainer.sample_ema=false); distillation keeps its own (distill.ema_decay) and reads its shortcut targets from it.

Only trainable parameters are averaged (a frozen one, such as a LoRA run's base weight, would average to
itself): the EMA then holds the adapters alone.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from magi_train.checkpoint.distributed import checkpoint_has, is_distributed_checkpoint

NamedParams = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.Tensor]]]
# Prefix -> one {parameter name: tensor} per held model chunk (the checkpoint's `extra_weights`).
ExtraWeights = Dict[str, List[Dict[str, torch.Tensor]]]

def trainable(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """The parameters an EMA of `model` averages: those that train."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _named(params: NamedParams) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(params, nn.Module):
        return list(params.named_parameters())
    if isinstance(params, Mapping):
        return list(params.items())
    return list(params)


class EmaWeights:
    """fp32 exponential moving average of named parameters (distillation's shortcut targets come from the EMA student).

    Holds one fp32 shadow per name, on the parameter's device (with tensor/data parallel each rank keeps
    the shadow of its own local shard). The parameter sets passed later must have exactly the same names and
    shapes; a mismatch is an error rather than a silently partial average.
    """

    def __init__(self, named_params: NamedParams):
        with torch.no_grad():
            self._shadow: Dict[str, torch.Tensor] = {
                name: p.detach().to(torch.float32).clone() for name, p in _named(named_params)}

    @property
    def names(self) -> List[str]:
        return list(self._shadow)

    def _match(self, pairs: List[Tuple[str, torch.Tensor]], what: str) -> None:
        names = [name for name, _ in pairs]
        missing = sorted(set(self._shadow) - set(names))
        unexpected = sorted(set(names) - set(self._shadow))
        if missing or unexpected:
            raise KeyError(f"EMA {what}: missing names {missing}, unexpected names {unexpected}")
        for name, p in pairs:
            if tuple(p.shape) != tuple(self._shadow[name].shape):
                raise ValueError(f"EMA {what}: {name} has shape {tuple(p.shape)}, the EMA holds "
                                 f"{tuple(self._shadow[name].shape)}")

    def update(self, named_params: NamedParams, decay: float) -> None:
        """ema = decay * ema + (1 - decay) * p, in fp32."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"the EMA decay (ema_decay) must lie in [0, 1], got {decay}")
        pairs = _named(named_params)
        self._match(pairs, "update")
        with torch.no_grad():
            for name, p in pairs:
                ema = self._shadow[name]
                ema.mul_(decay).add_(p.detach().to(ema.device, torch.float32), alpha=1.0 - decay)

    def copy_to(self, named_params: NamedParams) -> None:
        """Write the EMA weights into the live parameters (cast to each parameter's dtype)."""
        pairs = _named(named_params)
        self._match(pairs, "copy_to")
        with torch.no_grad():
            for name, p in pairs:
                p.copy_(self._shadow[name])

    @contextlib.contextmanager
    def swapped(self, named_params: NamedParams) -> Iterator[None]:
        """Run the block with the EMA weights in the live parameters; the live weights are restored exactly
        afterwards (kept as copies in their own dtype), also when the block raises."""
        pairs = _named(named_params)
        self._match(pairs, "swapped")
        with torch.no_grad():
            backup = [p.detach().clone() for _, p in pairs]
        self.copy_to(pairs)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(pairs, backup):
                    p.copy_(saved)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """name -> fp32 shadow (the tensors themselves, as nn.Module.state_dict returns)."""
        return dict(self._shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        pairs = list(state.items())
        self._match(pairs, "load_state_dict")
        with torch.no_grad():
            for name, value in pairs:
                self._shadow[name].copy_(value.to(torch.float32))


class StepCallback:
    """Something a run keeps beside the model, updated after every optimizer step and saved with the weights."""

    def start(self, models: Sequence[nn.Module]) -> None:
        """The weights are final for step `trainer.step` (initialised, resumed or loaded): set up."""

    def after_optimizer_step(self, models: Sequence[nn.Module]) -> None:
        pass

    def extra_weights(self) -> ExtraWeights:
        """Per-parameter tensors to save with the weights."""
        return {}

    def extra_weights_to_load(self, path: Path, models: Sequence[nn.Module]) -> ExtraWeights:
        """Tensors to fill from checkpoint `path` on resume (in place); {} when it holds none of ours."""
        return {}


class EmaCallback(StepCallback):
    """ema = decay * ema + (1 - decay) * weights after every optimizer step, per model chunk, in fp32.
    `field` names the config value of `decay` in errors."""

    PREFIX = "ema"

    def __init__(self, decay: float, field: str = "ema_decay"):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"{field} ({decay}) must lie in [0, 1]")
        self.decay = decay
        self.weights: List[EmaWeights] = []  # one per model chunk of this rank
        self._loaded = False

    def start(self, models: Sequence[nn.Module]) -> None:
        if not self._loaded:
            self.weights = [EmaWeights(trainable(model)) for model in models]

    def after_optimizer_step(self, models: Sequence[nn.Module]) -> None:
        for ema, model in zip(self.weights, models):
            ema.update(trainable(model), self.decay)

    def extra_weights(self) -> ExtraWeights:
        return {self.PREFIX: [ema.state_dict() for ema in self.weights]}

    def extra_weights_to_load(self, path: Path, models: Sequence[nn.Module]) -> ExtraWeights:
        # The shadows are receptacles the checkpoint fills in place; without an EMA there, `start` copies
        # the loaded weights.
        self._loaded = is_distributed_checkpoint(path) and checkpoint_has(path, self.PREFIX)
        if not self._loaded:
            return {}
        self.weights = [EmaWeights(trainable(model)) for model in models]
        return self.extra_weights()

    def swapped(self, model: nn.Module):
        """Run a block with the EMA in the weights of `model` (the run's single model chunk)."""
        if len(self.weights) != 1:
            raise ValueError(f"the EMA swap needs the whole model on one rank; this rank holds "
                             f"{len(self.weights)} model chunks")
        return self.weights[0].swapped(trainable(model))
