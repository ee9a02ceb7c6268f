"""`trainer.init_from`: a new run starts from existing weights (fine-tuning), nothing else of them.

    trainer.init_from=<released model dir>   inference_weight[.fp8][.distill]/ (or one of those directories)
    trainer.init_from=<run dir of ours>      its newest complete checkpoint (<dir>/checkpoints/step_*)
    trainer.init_from=<one checkpoint>       a step directory (trainer-written, or model-only from
                                             tools/convert_checkpoint.py to-ours), or a checkpoints/ root
    trainer.init_from_ema=true               a checkpoint's EMA weights (ema.*) instead of its trained ones

Only the model weights are taken: the run starts at step 0 with a fresh optimizer, its own data order and
learning-rate schedule, under any parallel layout (every rank reads the whole state dict and keeps its slices,
through `load_into`, as the inference loader and the distillation teacher do). An EMA starts from the loaded
weights.

Which released variant: the preset's (model.distill), in bf16/fp32 if the directory holds it, else its fp8
variant dequantised (checkpoint/weights.py `dequantize_fp8_state_dict`: the linear map the released fp8 kernels
apply, in fp32); a distilled preset may also start from base weights (as a distillation student does from its
teacher), a base preset never from distilled ones (only the directory name tells them apart, and a base
fine-tune of a step-size-conditioned model is not what anyone means).

The architecture is checked against the preset before anything is loaded: a checkpoint of ours by its saved
model config, released weights by the fields their shapes tell (layers, widths, heads, channels); every
mismatch is named as model.<field>, then any remaining key / shape difference by `load_into`.

Identity: `InitSource.record()` ({path, resolved, kind, variant, sha256}) goes into every checkpoint's
trainer state under "init_from"; sha256 is that of the released index file (or single weight file) or of our
checkpoint's marker (complete.json, which lists every file's sha256), so a resume (and a LoRA base rebuilt on
resume) can tell whether trainer.init_from still names the same weights (`identity_problem`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from magi_train.checkpoint.magi1 import INDEX_NAME, SINGLE_NAME, load_magi1_state_dict
from magi_train.checkpoint.manager import MARKER_NAME, find_checkpoint
from magi_train.checkpoint.variants import Variant, is_weight_dir, weight_dirs
from magi_train.checkpoint.distributed import checkpoint_has, is_distributed_checkpoint, read_full_weights
from magi_train.checkpoint.weights import (EMA_PREFIX, dequantize_fp8_state_dict, read_our_model_state,
                                           read_our_trainer_state)
from magi_train.config.compose import config_to_dict
from magi_train.config.schema import ModelConfig
from magi_train.training.resume_config import MODEL_RUNTIME_ONLY
from magi_train.training.run_dir import CHECKPOINTS_DIR

RECORD_KEY = "init_from"  # in a checkpoint's trainer state
FIELD = "trainer.init_from"


@dataclass(frozen=True)
class InitSource:
    """Where trainer.init_from's weights are, resolved (nothing but the identity file read)."""

    path: str  # as given
    resolved: str  # the weight directory or the checkpoint directory
    kind: str  # "released" | "checkpoint"
    variant: Optional[str]  # released: base | distill | fp8.distill | fp8; checkpoint: None
    sha256: str
    ema: bool = False  # a checkpoint's EMA weights (trainer.init_from_ema)

    def record(self) -> Dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        what = f"released {self.variant} weights" if self.kind == "released" else "checkpoint"
        return f"{what} {self.resolved}" + (" (its EMA weights)" if self.ema else "")


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def resolve_init_source(spec: str, cfg: ModelConfig, ema: bool = False) -> InitSource:
    """trainer.init_from -> the weights it names for preset `cfg` (checked, not read); `ema`: the EMA weights
    of a checkpoint of ours (trainer.init_from_ema)."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{FIELD}={spec} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{FIELD}={spec} is not a directory (a released model directory, a run directory "
                                 f"of ours or one checkpoint directory)")
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() and not (path / MARKER_NAME).is_file() else path
    checkpoint = find_checkpoint(root)
    if checkpoint is not None:
        if ema and not (is_distributed_checkpoint(checkpoint) and checkpoint_has(checkpoint, EMA_PREFIX)):
            raise ValueError(f"trainer.init_from_ema=true, but checkpoint {checkpoint} holds no EMA weights (its run "
                             f"had trainer.ema_decay=0 and was no distillation run)")
        return InitSource(spec, str(checkpoint), "checkpoint", None, _sha256(checkpoint / MARKER_NAME), ema)
    if ema:
        raise ValueError(f"trainer.init_from_ema=true needs a checkpoint of ours; {FIELD}={spec} is not one "
                         f"(released weights hold one set)")
    if root is not path:
        raise FileNotFoundError(f"{FIELD}={spec} is a run directory, but {root} holds no complete checkpoint "
                                f"(no step_* directory with a {MARKER_NAME})")
    weight_dir, variant = _released_weight_dir(path, cfg)
    ident = next((weight_dir / n for n in (INDEX_NAME, SINGLE_NAME, SINGLE_NAME + ".zst")
                  if (weight_dir / n).is_file()), None)
    if ident is None:
        raise FileNotFoundError(f"{FIELD}={spec}: {weight_dir} holds neither {INDEX_NAME} nor {SINGLE_NAME}")
    return InitSource(spec, str(weight_dir), "released", variant.name, _sha256(ident))


def _released_weight_dir(path: Path, cfg: ModelConfig) -> Tuple[Path, Variant]:
    by = f"model={cfg.name} has model.distill={cfg.distill}"
    if is_weight_dir(path):
        held = Variant.from_dirname(path.name)
        if held is None:
            raise ValueError(f"{FIELD}={path}: the weight directory's name does not say which variant it holds "
                             f"(base or distilled: distillation adds no keys); released weights live in "
                             f"inference_weight[.fp8][.distill]/")
        candidates = {held: path}
    else:
        candidates = weight_dirs(path)
        if not candidates:
            raise FileNotFoundError(f"{FIELD}={path} is neither a checkpoint of ours (no {MARKER_NAME}, no "
                                    f"{CHECKPOINTS_DIR}/) nor a released model directory (no inference_weight*/)")
    # bf16 before fp8 (dequantised), the preset's own variant before the base one for a distilled preset.
    order = [Variant(cfg.distill), Variant(cfg.distill, True)] + ([Variant(False)] if cfg.distill else [])
    for variant in order:
        if variant in candidates:
            return candidates[variant], variant
    held = ", ".join(f"{v.dirname} ({v.preset})" for v in candidates)
    raise ValueError(f"{FIELD}={path} holds {held}, none of which fits: {by}; choose the model preset that "
                     f"matches the weights")


def architecture_of(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """The ModelConfig fields that a DiT state dict's shapes tell (those whose keys are present)."""
    out: Dict[str, Any] = {}
    shape = lambda key: tuple(state[key].shape) if key in state else None  # noqa: E731
    layers = {int(k.split(".")[2]) for k in state if k.startswith("videodit_blocks.layers.")}
    if layers:
        out["num_layers"] = max(layers) + 1
    layer = "videodit_blocks.layers.0."
    hidden = shape("videodit_blocks.final_layernorm.weight")
    if hidden:
        out["hidden_size"] = hidden[0]
    fc1, fc2 = shape(layer + "mlp.linear_fc1.weight"), shape(layer + "mlp.linear_fc2.weight")
    if fc1 and fc2:
        out["ffn_hidden_size"] = fc2[-1]
        out["gated_linear_unit"] = fc1[-2] == 2 * fc2[-1]
    head = shape(layer + "self_attention.q_layernorm.weight")
    q, k = shape(layer + "self_attention.linear_qkv.q.weight"), shape(layer + "self_attention.linear_qkv.k.weight")
    if head:
        out["kv_channels"] = head[0]
        if q:
            out["num_attention_heads"] = q[-2] // head[0]
        if k:
            out["num_query_groups"] = k[-2] // head[0]
    x = shape("x_embedder.weight")
    if x:
        out["in_channels"], out["t_patch_size"], out["patch_size"] = x[1], x[2], x[3]
    null = shape("y_embedder.null_caption_embedding")
    if null:
        out["caption_max_length"], out["caption_channels"] = null
    return out


def architecture_problems(found: Mapping[str, Any], cfg: ModelConfig, source: str, allow_base_for_distill: bool
                          ) -> List[str]:
    """One line per model field where the weights' architecture differs from the preset's."""
    preset = config_to_dict(cfg)
    lines = []
    for key, value in found.items():
        if key in MODEL_RUNTIME_ONLY or key not in preset or preset[key] == value:
            continue
        if key == "distill" and allow_base_for_distill and value is False and preset[key] is True:
            continue
        lines.append(f"model.{key}: {source} {value!r}, model={cfg.name} {preset[key]!r}")
    return lines


def read_init_weights(source: InitSource, cfg: ModelConfig) -> Tuple[Dict[str, torch.Tensor], str, List[str]]:
    """(whole-model state dict, description for errors, notes to print) of `source`, checked against preset
    `cfg` (a mismatch raises naming every model.<field> that differs)."""
    notes: List[str] = []
    if source.kind == "checkpoint":
        path = Path(source.resolved)
        trainer_state = read_our_trainer_state(path)
        if trainer_state.get("lora"):  # training/lora.py's record: the checkpoint holds adapters, not a model
            raise ValueError(f"{FIELD}={source.path}: checkpoint {path} is a LoRA run's: it holds adapters only, not "
                             f"the model's weights; merge them into their base first (tools/merge_lora.py --base "
                             f"<its base> --lora {path.parent.parent / 'adapter'} --out DIR) and start from DIR, or "
                             f"load the adapters at inference with lora=")
        saved = trainer_state.get("config", {}).get("model", {})
        problems = architecture_problems(saved, cfg, "checkpoint", allow_base_for_distill=True)
        if problems:
            raise ValueError(f"{FIELD}={source.path}: checkpoint {path} has another architecture than "
                             f"model={cfg.name}:\n  " + "\n  ".join(problems))
        if saved.get("distill") is False and cfg.distill:
            notes.append(f"{FIELD}: a base checkpoint starts the distilled model={cfg.name}")
        state = read_our_model_state(path)
        if source.ema:
            averaged = read_full_weights(path, EMA_PREFIX)  # the averaged parameters; buffers as trained
            state = {k: averaged.get(k, v) for k, v in state.items()}
    else:
        state = load_magi1_state_dict(source.resolved)
        if any(t.dtype == torch.float8_e4m3fn for t in state.values()):
            state, count = dequantize_fp8_state_dict(state)
            notes.append(f"{FIELD}: {count} fp8 linears of {source.resolved} dequantised to fp32 (the linear maps "
                         f"the released fp8 kernels apply)")
        if source.variant == "base" and cfg.distill:
            notes.append(f"{FIELD}: base weights start the distilled model={cfg.name}")
    problems = architecture_problems(architecture_of(state), cfg, "weights", allow_base_for_distill=True)
    if problems:
        raise ValueError(f"{FIELD}={source.path}: {source.describe()} has another architecture than "
                         f"model={cfg.name}:\n  " + "\n  ".join(problems))
    return state, f"{FIELD}={source.path} ({source.describe()})", notes


def identity_problem(recorded: Mapping[str, Any], source: InitSource) -> Optional[str]:
    """None when `source` is the weights a checkpoint recorded (`record()`), else why not."""
    if recorded.get("sha256") == source.sha256:
        return None
    return (f"{FIELD}={source.path} is not the weights the run started from: it was initialised from "
            f"{recorded.get('resolved')} (sha256 {recorded.get('sha256')}), {source.resolved} has sha256 "
            f"{source.sha256}")
