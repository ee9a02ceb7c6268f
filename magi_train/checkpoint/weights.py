"""Find, read and load whole-model DiT weights: a released MAGI-1 model directory or a checkpoint of ours.

Released layout (`variants.py`): `<dir>/inference_weight[.fp8][.distill]/` holding sharded safetensors. The
subdirectory is chosen by the preset (`model.distill`, `sampler.fp8`); a directory holding another variant is an
error that names what it holds and which preset fits, so a base checkpoint is never sampled as a distilled one.

Our trainer's checkpoints are accepted too: a step directory, or a run's checkpoint root (its newest complete
checkpoint), written by the trainer under any parallel layout or model-only by tools/convert_checkpoint.py
(`model.safetensors` + `trainer.json`). Their saved model config must equal the preset's. Nothing is unpickled:
a checkpoint holding a pickle-based file (older versions' `.pt`, DCP's `.metadata`) is refused, naming it.

`load_into` is the one "check against the whole model, shard for this rank, strict load" routine; every
whole-model state dict (released weights, a teacher, a model-only checkpoint) enters a model through it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from magi_train.checkpoint.magi1 import check_state_dict, load_magi1_state_dict
from magi_train.checkpoint.distributed import (checkpoint_has, is_distributed_checkpoint, read_full_model_state,
                                               read_full_weights, read_trainer_state)
from magi_train.checkpoint.manager import (MARKER_NAME, CheckpointManager, CorruptCheckpointError, find_checkpoint,
                                           read_marker, read_state_file, refuse_pickles)
from magi_train.checkpoint.variants import Variant, resolve_weight_dir
from magi_train.config.compose import config_to_dict
from magi_train.config.schema import ModelConfig
from magi_train.parallel.sharding import shard_state_dict

# The files of a model-only checkpoint (CheckpointManager.save of {"model": tensors, "trainer": JSON}).
MODEL_FILE, TRAINER_FILE = "model.safetensors", "trainer.json"
EMA_PREFIX = "ema"  # the EMA's weights in a checkpoint (training/ema.py EmaCallback.PREFIX)
# Fields that only steer how we run a model, never what its weights are.
_RUNTIME_ONLY_FIELDS = {"name", "layer_spec", "attention_backend", "init_std", "params_dtype", "fused_norms"}


def _check_model_config(saved: Dict, cfg: ModelConfig, source: Path) -> None:
    ours = config_to_dict(cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, preset {v!r}" for k, v in ours.items()
             if k not in _RUNTIME_ONLY_FIELDS and k in saved and saved[k] != v]
    if diffs:
        raise ValueError(f"checkpoint {source} was trained with another model config than model={cfg.name}:\n  "
                         + "\n  ".join(diffs))


def read_our_trainer_state(path: Path) -> Dict[str, Any]:
    """The trainer state (step, config, ...) of checkpoint `path` of ours: written by the trainer under any
    parallel layout, or model-only (tools/convert_checkpoint.py to-ours); {} when a model-only one has none."""
    if is_distributed_checkpoint(path):
        return read_trainer_state(path)
    files = read_marker(path)["files"]
    refuse_pickles(path, files)
    if TRAINER_FILE not in files:
        return {}
    trainer = read_checkpoint_file(path, TRAINER_FILE)
    if not isinstance(trainer, Mapping):
        raise ValueError(f"{path / TRAINER_FILE} holds a {type(trainer).__name__}, not the trainer's state dict")
    return dict(trainer)


def read_our_model_state(path: Path) -> Dict[str, torch.Tensor]:
    """The whole model's state dict of checkpoint `path` of ours (never its optimizer state)."""
    if is_distributed_checkpoint(path):
        return read_full_model_state(path)
    refuse_pickles(path, read_marker(path)["files"])
    return read_checkpoint_file(path, MODEL_FILE)


def read_checkpoint_file(path: Path, name: str) -> Any:
    """One file of model-only checkpoint `path` (`<key>.safetensors`: its tensors; `<key>.json`: its value),
    checked against the sha256 in its marker. A pickle-based file (`.pt`) is refused, never read."""
    marker = read_marker(path)
    info = marker["files"].get(name)
    if info is None:
        raise FileNotFoundError(f"checkpoint {path} has no {name} ({MARKER_NAME} lists {', '.join(marker['files'])})")
    refuse_pickles(path, [name])
    with open(path / name, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != info["sha256"]:
            raise CorruptCheckpointError(f"{path / name} does not match its sha256 in {MARKER_NAME} (corrupt?)")
    return read_state_file(path / name)


def load_weights(directory: str | Path, cfg: ModelConfig, fp8: bool, ema: bool = False
                 ) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict with dtypes as stored, a description of the source) for this preset. `ema`: a checkpoint
    of ours gives its EMA weights (`ema.<parameter>`, kept by a run with trainer.ema_decay > 0 or by
    distillation) instead of the trained ones; buffers come from the model weights."""
    path = Path(directory)
    ours = find_checkpoint(path)
    if ours is not None:
        if fp8:
            raise ValueError(f"ckpt.dir={path} is a checkpoint of our trainer; sampler.fp8=true needs released "
                             "fp8 weights (tools/convert_checkpoint.py to-released --fp8 makes them)")
        _check_model_config(read_our_trainer_state(ours).get("config", {}).get("model", {}), cfg, ours)
        state = read_our_model_state(ours)
        if not ema:
            return state, f"checkpoint {ours}"
        if not (is_distributed_checkpoint(ours) and checkpoint_has(ours, EMA_PREFIX)):
            raise ValueError(f"EMA weights asked for, but checkpoint {ours} holds none (its run kept no EMA: "
                             f"trainer.ema_decay=0 and not a distillation run)")
        averaged = read_full_weights(ours, EMA_PREFIX)
        return {k: averaged.get(k, v) for k, v in state.items()}, f"checkpoint {ours} (EMA weights)"
    if ema:
        raise ValueError(f"EMA weights asked for, but ckpt.dir={path} is not a checkpoint of our trainer "
                         "(released weights hold one set)")
    wanted = Variant(distill=cfg.distill, fp8=fp8)
    weight_dir, held = resolve_weight_dir(path, wanted, wanted_by=f"model.distill={cfg.distill}, sampler.fp8={fp8}",
                                          missing_note=f", and it is not a checkpoint of ours (no {MARKER_NAME})")
    if held is None:
        # Only the name tells a distilled model from a base one (distillation adds no keys).
        raise ValueError(f"ckpt.dir={path}: the weight directory's name does not say which variant it holds; "
                         f"released weights for model={cfg.name} live in {wanted.dirname}/")
    return load_magi1_state_dict(weight_dir), f"released weights {weight_dir}"


def check_full_state_dict(state_dict: Mapping[str, torch.Tensor], full_shapes: Mapping[str, Tuple[int, ...]],
                          source: str | Path) -> None:
    """Every key of the whole model present with its shape (any dtype), nothing else; a ValueError lists
    every missing / unexpected / mis-shaped key otherwise."""
    check_state_dict({k: (tuple(s), None) for k, s in full_shapes.items()}, dict(state_dict), source)


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
    check_full_state_dict(state_dict, full_shapes, source)
    model.load_state_dict(shard_state_dict(state_dict, model.cfg, tp_rank, tp, keys=local_keys), strict=True)


def load_model_only(path: Path, models, full_shapes: Dict[str, Tuple[int, ...]], tp_rank: int, tp: int) -> int:
    """A model-only checkpoint of ours (tools/convert_checkpoint.py to-ours) into this rank's model chunks, each
    taking its tensor-parallel slice of the layers it holds; returns its step. No optimizer state is read."""
    state = CheckpointManager(path.parent, keep_last=0, read_only=True).load(path)
    for model in models:
        # A checkpoint of another model preset fails here, naming the keys and shapes that differ.
        load_into(model, state["model"], f"{path} (model weights)", full_shapes, tp_rank, tp)
    return int(state["trainer"]["step"])


# The per-linear tensors of a released fp8 layer besides its weight (magi_train/model/fp8.py).
FP8_SCALE_NAMES = ("weight_scale", "input_scale", "smooth_scale")


def dequantize_fp8_state_dict(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], int]:
    """(state dict, number of linears dequantised): every released fp8 linear replaced by the fp32 (out, in)
    weight its forward applies, in the key order of `state`; everything else as stored.

    The fp8 forward (magi_train/model/fp8.py, `_Fp8Linear.forward` + `fp8_matmul`'s exact CPU path) is
        y = bf16(fp8(x / divisor) @ W_q^T * (a_scale * weight_scale))
    with divisor = smooth_scale (per-channel linears) or the input_scale vector (per-tensor ones) and a_scale =
    input_scale[0]. The weight of that linear map is W[:, j] = W_q[:, j] * (a_scale * weight_scale) / divisor[j]
    (scales multiplied first, as the GEMM's one alpha), computed in fp32 from the exact fp8 values: the released
    weights as the released kernels use them. What it leaves out is not a weight but a forward-time rounding
    (the fp8 cast of each activation), which a model trained in bf16/fp32 does not have."""
    modules = [k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale")]
    replaced: Dict[str, torch.Tensor] = {}
    for module in modules:
        wq = state[f"{module}.weight"]
        if wq.dtype != torch.float8_e4m3fn or wq.ndim != 3 or wq.shape[0] != 1:
            raise ValueError(f"{module}.weight: a released fp8 linear holds a (1, out, in) float8_e4m3fn weight, "
                             f"got {tuple(wq.shape)} {wq.dtype}")
        input_scale = state[f"{module}.input_scale"].float().flatten()
        smooth = state.get(f"{module}.smooth_scale")
        divisor = (input_scale if smooth is None else smooth.float()).reshape(1, -1)
        alpha = input_scale[0] * state[f"{module}.weight_scale"].float().reshape(())
        replaced[f"{module}.weight"] = wq[0].float() * alpha / divisor
    scale_keys = {f"{m}.{n}" for m in modules for n in FP8_SCALE_NAMES}
    leftover = [k for k, t in state.items() if t.dtype == torch.float8_e4m3fn and k not in replaced]
    if leftover:
        raise ValueError(f"fp8 tensors without the released scales (weight_scale, input_scale): {leftover[:5]}")
    return {k: replaced.get(k, t) for k, t in state.items() if k not in scale_keys}, len(modules)
