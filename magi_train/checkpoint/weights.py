"""Find and load the DiT weights for inference: a released MAGI-1 model directory or a checkpoint of ours.

Released layout (spec §9): `<dir>/inference_weight[.fp8][.distill]/` holding sharded safetensors with
`model.safetensors.index.json` or one `model.safetensors` (shards may be `.zst`). The subdirectory is chosen
by the preset (`model.distill`, `sampler.fp8`); a directory holding another variant is an error that names
what it holds and which preset fits, so a base checkpoint is never sampled as a distilled one.

Our trainer's checkpoints (`complete.json` + `model.pt`) are accepted too: a step directory, or a run's
checkpoint root (its newest complete checkpoint). Their saved model config must equal the preset's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from magi_train.checkpoint.magi1 import check_state_dict, load_magi1_state_dict
from magi_train.checkpoint.distributed import is_distributed_checkpoint, read_full_model_state, read_trainer_state
from magi_train.checkpoint.manager import MARKER_NAME, CheckpointManager, find_checkpoint
from magi_train.config.schema import ModelConfig
from magi_train.parallel.sharding import shard_state_dict

WEIGHT_PREFIX = "inference_weight"
# Fields that only steer how we run a model, never what its weights are.
_RUNTIME_ONLY_FIELDS = {"name", "layer_spec", "attention_backend", "init_std", "params_dtype"}


def weight_subdir(distill: bool, fp8: bool) -> str:
    return WEIGHT_PREFIX + (".fp8" if fp8 else "") + (".distill" if distill else "")


def _variant_of(name: str) -> Tuple[bool, bool]:
    parts = name.split(".")[1:]
    return "distill" in parts, "fp8" in parts


def _suggest(distill: bool, fp8: bool) -> str:
    return ("model=<size>" + ("_distill" if distill else "") + ("_fp8" if fp8 else ""))


def resolve_weight_dir(directory: str | Path, distill: bool, fp8: bool) -> Path:
    """The released weight directory for this preset inside `directory` (or `directory` itself)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"ckpt.dir={path} is not a directory")
    wanted = weight_subdir(distill, fp8)
    if path.name.startswith(WEIGHT_PREFIX):
        if path.name != wanted:
            d, f = _variant_of(path.name)
            raise ValueError(f"ckpt.dir={path} holds the {path.name} weights, but the preset expects {wanted} "
                             f"(model.distill={distill}, sampler.fp8={fp8}); use {_suggest(d, f)}")
        return path
    if (path / wanted).is_dir():
        return path / wanted
    present = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith(WEIGHT_PREFIX))
    if present:
        hints = ", ".join(f"{p} -> {_suggest(*_variant_of(p))}" for p in present)
        raise ValueError(f"ckpt.dir={path} has no {wanted}/ (model.distill={distill}, sampler.fp8={fp8}); "
                         f"it holds {present}: {hints}")
    raise FileNotFoundError(f"ckpt.dir={path} has no {wanted}/ and is not a checkpoint of ours (no {MARKER_NAME})")


def _check_model_config(saved: Dict, cfg: ModelConfig, source: Path) -> None:
    ours = dataclasses.asdict(cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, preset {v!r}" for k, v in ours.items()
             if k not in _RUNTIME_ONLY_FIELDS and k in saved and saved[k] != v]
    if diffs:
        raise ValueError(f"checkpoint {source} was trained with another model config than model={cfg.name}:\n  "
                         + "\n  ".join(diffs))


def load_weights(directory: str | Path, cfg: ModelConfig, fp8: bool) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict with dtypes as stored, a description of the source) for this preset."""
    path = Path(directory)
    ours = find_checkpoint(path)
    if ours is not None:
        if fp8:
            raise ValueError(f"ckpt.dir={path} is a checkpoint of our trainer; sampler.fp8=true needs released "
                             "fp8 weights (tools/convert_checkpoint.py to-released --fp8 makes them)")
        if is_distributed_checkpoint(ours):  # written by the trainer, under any parallel layout
            model_state, trainer = read_full_model_state(ours), read_trainer_state(ours)
        else:  # model-only (tools/convert_checkpoint.py to-ours)
            state = CheckpointManager(ours.parent, keep_last=0, read_only=True).load(ours)
            model_state, trainer = state["model"], state.get("trainer", {})
        _check_model_config(trainer.get("config", {}).get("model", {}), cfg, ours)
        return model_state, f"checkpoint {ours}"
    weight_dir = resolve_weight_dir(path, cfg.distill, fp8)
    return load_magi1_state_dict(weight_dir), f"released weights {weight_dir}"


def load_into(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str,
              full_shapes: Optional[Dict[str, Tuple[int, ...]]] = None, tp_rank: int = 0, tp: int = 1) -> None:
    """Strict load of a full (released-layout) state dict that names every missing / unexpected / mis-shaped
    key. Values are copied into the model's parameters, whose dtypes follow the released run-time plan
    (model dtype + fp32 promotions).

    The model may be one tensor-parallel rank and/or one pipeline stage of the DiT: `full_shapes` then holds
    the whole TP=1 model's key -> shape. The checkpoint is checked against the whole model first (so errors
    read the same on any layout), then this rank's slices of its own keys are cut (`shard_state_dict`:
    SwiGLU halves, KV-head replication) and loaded strictly."""
    local_keys = list(model.state_dict())
    if full_shapes is None:
        if tp != 1:
            raise ValueError("load_into: a tensor-parallel model needs the whole model's full_shapes")
        full_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict({k: (tuple(s), None) for k, s in full_shapes.items()}, state_dict, source)
    model.load_state_dict(shard_state_dict(state_dict, model.cfg, tp_rank, tp, keys=local_keys), strict=True)
