"""A LoRA run (lora.rank > 0) in the trainer: adapters on a frozen base, checkpoints of the adapters alone.

    base        the model built from trainer.seed, then trainer.init_from's weights if given (a resume
                reloads the same base: its recorded sha256 must still match, and a fingerprint of the loaded
                weights must equal the one the adapters were trained on)
    adapters    parallel/lora.py `apply_train_lora`: every target of lora.targets, any parallel layout
    optimizer   ShardedAdamW over the parameters that train (the adapters): the base has no gradient and no
                optimizer state
    checkpoint  model.<adapter parameter>, their optimizer state and extra weights (an EMA of the adapters),
                trainer.json with "lora" (settings, modules, base fingerprint) and "init_from" (the base)
    export      <output_dir>/adapter/ (checkpoint/adapters.py) at every save, read back from the checkpoint
                just written (so any layout exports the whole adapter from rank 0 without a gather)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

from magi_train.config.schema import ModelConfig, TrainConfig
from magi_train.model.lora import DEFAULT_ADAPTER as ADAPTER  # the trainer's one adapter
from magi_train.parallel.groups import Parallel

RECORD_KEY = "lora"  # in a checkpoint's trainer state
ADAPTER_DIR = "adapter"  # under trainer.output_dir
# Relative difference allowed between two fingerprints of the same base: float64 sums in another order (another
# layout) differ by rounding only, any other base by far more.
FINGERPRINT_RTOL = 1e-9


class LoraRun:
    """What the trainer keeps of a LoRA run (build it with `start_lora` once the base weights are final)."""

    def __init__(self, cfg: TrainConfig, parallel: Parallel, modules: List[str], model_keys: List[str],
                 fingerprint: List[float], init_from: Optional[Dict[str, Any]]):
        self.cfg, self.parallel = cfg, parallel
        self.modules, self.model_keys = modules, model_keys  # adapted modules / adapter parameters (whole model)
        self.fingerprint, self.init_from = fingerprint, init_from

    def record(self) -> Dict[str, Any]:
        x = self.cfg.lora
        return {"rank": x.rank, "alpha": x.alpha, "dropout": x.dropout, "targets": list(x.targets),
                "base_dtype": str(x.base_dtype), "modules": self.modules, "base_fingerprint": self.fingerprint,
                "base": self.init_from["resolved"] if self.init_from else f"trainer.seed={self.cfg.trainer.seed}"}

    def check_resumed(self, saved: Mapping[str, Any], path: Path) -> None:
        """The checkpoint's LoRA record against this run's: same adapters, same base."""
        rec = saved.get(RECORD_KEY)
        if rec is None:
            raise ValueError(f"{path} is not a LoRA checkpoint (its trainer.json has no {RECORD_KEY!r} record): "
                             f"resume it with lora.rank=0, or start the LoRA run with trainer.init_from={path}")
        mine = self.record()
        for key in ("rank", "alpha", "modules"):
            if rec.get(key) != mine[key]:
                raise ValueError(f"{path} holds adapters with lora {key}={rec.get(key)!r}; this run has "
                                 f"{mine[key]!r} (lora.rank / lora.alpha / lora.targets must match to resume)")
        old, new = rec.get("base_fingerprint"), self.fingerprint
        if not (isinstance(old, list) and len(old) == 2
                and all(math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-12) for a, b in zip(old, new))):
            raise ValueError(f"{path}: the frozen base rebuilt now ({mine['base']}, fingerprint {new}) is not the "
                             f"base its adapters were trained on ({rec.get('base')}, fingerprint {old}): "
                             f"trainer.init_from / trainer.seed / the weights there changed")

    def export(self, checkpoint: Path, out_dir: Path, step: int) -> Optional[Path]:
        """Rank 0: the adapters of `checkpoint` (just written) as adapter files under <out_dir>/adapter/."""
        if not self.parallel.is_main:
            return None
        from magi_train.checkpoint.adapters import base_model_identity, write_adapter
        from magi_train.checkpoint.distributed import read_full_weights

        stored = read_full_weights(checkpoint, "model")
        tensors = {}
        for module in self.modules:
            for factor in ("lora_A", "lora_B"):
                tensors[f"{module}.{factor}.weight"] = stored[f"{module}.{factor}.{ADAPTER}.weight"]
        x = self.cfg.lora
        return write_adapter(out_dir / ADAPTER_DIR, tensors, rank=x.rank, alpha=x.alpha, dropout=x.dropout,
                             targets=list(x.targets), base_model=base_model_identity(self.cfg.model), step=step)


def check_checkpoint_kind(lora: Optional[LoraRun], path: Path) -> None:
    """Before loading checkpoint `path`: a LoRA run resumes a LoRA checkpoint with the same adapters and base,
    a full run a full one (each error says which setting fits)."""
    from magi_train.checkpoint.distributed import read_trainer_state

    saved = read_trainer_state(path)
    if lora is not None:
        lora.check_resumed(saved, path)
    elif saved.get(RECORD_KEY) is not None:
        rank = saved[RECORD_KEY].get("rank")
        raise ValueError(f"{path} is a LoRA checkpoint (adapters of rank {rank} only, no base weights): resume it "
                         f"with lora.rank={rank} (and the same lora settings), or export its adapter and merge it "
                         f"(tools/merge_lora.py) to train the whole model")


def check_base_identity(record: Optional[Mapping[str, Any]], model: ModelConfig) -> None:
    """On resume: trainer.init_from's recorded weights must still be there, unchanged (their sha256)."""
    if record is None:
        return
    from magi_train.training.init_from import InitSource, resolve_init_source

    recorded = InitSource(**record)
    try:
        now = resolve_init_source(recorded.path, model)
    except (OSError, ValueError) as e:
        raise ValueError(f"the LoRA run's base {recorded.describe()} (trainer.init_from={recorded.path}) cannot be "
                         f"read again to resume: {e}") from e
    if now.sha256 != recorded.sha256:
        raise ValueError(f"the LoRA run's base changed: trainer.init_from={recorded.path} now resolves to "
                         f"{now.resolved} (sha256 {now.sha256[:12]}), the adapters were trained on "
                         f"{recorded.resolved} (sha256 {recorded.sha256[:12]})")


def start_lora(cfg: TrainConfig, parallel: Parallel, models: Sequence[nn.Module],
               init_from: Optional[Dict[str, Any]]) -> LoraRun:
    """Adapters on this rank's model chunks, whose base weights are final (collective over tp and pp)."""
    from magi_train.model.lora import is_lora_parameter
    from magi_train.parallel.lora import apply_train_lora, frozen_fingerprint
    from magi_train.parallel.plan import plan_of

    fingerprint = frozen_fingerprint(models, parallel)
    modules = apply_train_lora(models, cfg.lora, cfg.trainer.seed, ADAPTER)
    plan = plan_of(models[0])
    keys = [n for n in plan.full_parameters if is_lora_parameter(n)]
    if parallel.is_main:
        count = lambda names: sum(math.prod(plan.full_state[n][0]) for n in names)  # noqa: E731
        trained, total = count(keys), count(plan.full_parameters)
        print(f"LoRA: rank {cfg.lora.rank} adapters on {len(modules)} linears, {trained:,} trainable parameters of "
              f"{total:,} ({100 * trained / total:.2f}%); the base is frozen", flush=True)
    return LoraRun(cfg, parallel, modules, keys, fingerprint, init_from)
