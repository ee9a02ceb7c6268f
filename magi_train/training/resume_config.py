"""What a resumed run may change: the checkpoint's saved config against the one it resumes with.

A resume continues one run. Fields that change what the weights are or which samples come in which order would
make the continuation another run that only looks like the first one, so they are errors, each listed:

    model.*     every field except the run-time ones (name, layer_spec, attention_backend, params_dtype,
                init_std: how the model runs or was first initialised, not what its weights mean)
    data.*      every field that picks or orders samples (all but micro_batch_size, num_workers, val_shards)
    the global batch (data.global_batch_size, or micro_batch_size x data-parallel size when it is 0)
    trainer.seed

`trainer.allow_config_change` (dotted keys or prefixes) accepts a guarded change knowingly, e.g. [data.shards]
to continue on another dataset. Every other difference (learning rate, t shift, max_steps, parallel layout: the
checkpoint reshards) is accepted and printed, so a resumed run always says how it differs from its start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# Run-time fields of the model (magi_train/checkpoint/weights.py compares a checkpoint for inference the same way).
MODEL_RUNTIME_ONLY = ("name", "layer_spec", "attention_backend", "params_dtype", "init_std", "fused_norms")
# Data fields that neither pick nor order samples: the per-forward split of the global batch, the loader's
# processes (streams, not workers, own the data position), the held-out shards. The global batch is compared as
# the number of samples per step, whichever field sets it.
DATA_FREE = ("micro_batch_size", "num_workers", "val_shards", "global_batch_size")
GLOBAL_BATCH_KEY = "data.global_batch_size"
# How a launch starts (a new run over an old one, or a resume), not what it trains: they differ by nature.
NOT_COMPARED = ("trainer.resume", "trainer.overwrite")


class ConfigChangeError(ValueError):
    """A resume that changes the model, the data order, the seed or the global batch."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"model": {"hidden_size": 256}} -> {"model.hidden_size": 256}; lists stay values."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def guarded(key: str) -> bool:
    section, _, name = key.partition(".")
    if section == "model":
        return name.split(".")[0] not in MODEL_RUNTIME_ONLY
    if section == "data":
        return name not in DATA_FREE
    return key == "trainer.seed"


def allowed(key: str, allow: Sequence[str]) -> bool:
    return any(key == a.rstrip(".") or key.startswith(a.rstrip(".") + ".") for a in allow)


_ABSENT = object()  # a key that one side's config does not have


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], saved_batch: Optional[int], batch: int,
                   allow: Sequence[str]) -> Tuple[Dict[str, str], List[str]]:
    """(errors {key: line}, notes): one line per changed field; errors for guarded fields not in `allow`.
    `saved` and `current` are plain (JSON) config dicts; `saved_batch` the checkpoint's global batch if known."""
    old, new = flatten(saved), flatten(current)
    errors: Dict[str, str] = {}
    notes: List[str] = []

    def report(key: str, line: str, guard: bool) -> None:
        if not guard:
            notes.append(line)
        elif allowed(key, allow):
            notes.append(line + " (allowed by trainer.allow_config_change)")
        else:
            errors[key] = line

    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b and key not in NOT_COMPARED:
            # A field that one side's schema does not have cannot be compared: only noted.
            report(key, f"{key}: checkpoint {_show(a)}, now {_show(b)}",
                   guarded(key) and a is not _ABSENT and b is not _ABSENT)
    if saved_batch is not None and saved_batch != batch:
        report(GLOBAL_BATCH_KEY, f"the global batch ({GLOBAL_BATCH_KEY}): checkpoint {saved_batch} samples per "
                                 f"step, now {batch}", True)
    return errors, notes


def saved_global_batch(state: Mapping[str, Any]) -> Optional[int]:
    """The global batch a checkpoint was trained with: recorded by the trainer, else its config's explicit
    data.global_batch_size; None when neither says (0 depended on the data-parallel size of that run)."""
    if isinstance(state.get("global_batch"), int):
        return state["global_batch"]
    size = state.get("config", {}).get("data", {}).get("global_batch_size")
    return size if isinstance(size, int) and size > 0 else None


def check_resume_config(path: Path, state: Mapping[str, Any], current: Mapping[str, Any], batch: int,
                        allow: Sequence[str]) -> List[str]:
    """The lines to print about resuming from checkpoint `path` (trainer state `state`) with config `current`
    (a plain dict) and global batch `batch`; raises `ConfigChangeError` listing every guarded change."""
    saved = state.get("config")
    if not isinstance(saved, Mapping) or not saved:
        return [f"{path} holds no training config (a model-only checkpoint): the resumed config is not compared"]
    # JSON both sides: the saved config went through JSON; enums, tuples and floats compare as they were written.
    current = json.loads(json.dumps(current))
    errors, notes = config_changes(saved, current, saved_global_batch(state), batch, allow)
    if errors:
        raise ConfigChangeError(
            f"resuming from {path} with another model, data order, seed or global batch than it was trained with "
            f"would continue a different run:\n  " + "\n  ".join(errors.values()) + "\nResume with the "
            f"checkpoint's values, start a new run (trainer.resume=none in another trainer.output_dir), or, if the "
            f"change is intended (e.g. another dataset), accept it with "
            f"trainer.allow_config_change=[{','.join(errors)}]")
    if not notes:
        return []
    return [f"resuming from {path} with config changes:\n  " + "\n  ".join(notes)]
