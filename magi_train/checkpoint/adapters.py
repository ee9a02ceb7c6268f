"""LoRA adapter files: one directory, `adapter_model.safetensors` + `adapter_config.json`.

    runs/style/adapter/
        adapter_model.safetensors   <module>.lora_A.weight  (rank x in_features)
                                    <module>.lora_B.weight  (out_features x rank)
                                    for every adapted module, whole (TP=1) shapes, fp32 (or bf16 / fp16), nothing
                                    else; safetensors metadata {"format": "magi-lora"}
        adapter_config.json         {"format": "magi-lora", "version": 1, "rank": r, "alpha": a, "dropout": d,
                                     "targets": [fnmatch patterns], "modules": [module names],
                                     "base_model": {"name": preset, "num_layers": .., "hidden_size": .., "distill": ..},
                                     "created": ISO time, "magi_version": .., "step": training step or null}

`<module>` is the linear's name in the plain DiT (`videodit_blocks.layers.0.self_attention.linear_qkv.q`), the
names of the released checkpoint's keys without `.weight`; the tensor names are peft's saved-adapter names. An
adapter adds `scale * alpha / rank * B A` to its module's weight (magi_train/model/lora.py).

Writing is atomic (a temporary directory beside the target, renamed over it); an existing directory is replaced
only if it holds adapter files and nothing else. Reading validates everything before a tensor is used: the JSON
fields and their types, the metadata format, every module's two tensors (missing, extra and mis-shaped keys are
named), and the recorded base model against the model it is loaded into.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from magi_train.checkpoint.atomic import fsync_dir, replace_dir, write_json_durably
from magi_train.checkpoint.tensorfile import open_tensor_file, write_tensor_file

logger = logging.getLogger(__name__)

FORMAT = "magi-lora"
VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Fields of base_model that fix the adapter's shapes (a mismatch is an error) and those that do not (a warning:
# an adapter trained on the base model may be used on its distilled variant, which has the same linears).
ARCHITECTURE_FIELDS = ("num_layers", "hidden_size")
INFORMATIVE_FIELDS = ("name", "distill")


@dataclass
class Adapter:
    path: Path  # the adapter directory
    config: Dict[str, Any]  # adapter_config.json
    tensors: Dict[str, torch.Tensor]  # "<module>.lora_A.weight" / "<module>.lora_B.weight"
    modules: List[str]  # config["modules"], in file order

    @property
    def rank(self) -> int:
        return self.config["rank"]


def base_model_identity(cfg) -> Dict[str, Any]:
    """The base_model record of a ModelConfig (what an adapter's base is checked against)."""
    return {"name": cfg.name, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "distill": bool(cfg.distill)}


def _magi_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("magi")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _module_of(key: str) -> Optional[str]:
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return None


def _check_tensors(tensors: Mapping[str, Any], modules: Sequence[str], rank: int, where: str) -> None:
    """Every module has its A (rank x in) and B (out x rank), floating, and nothing else is there."""
    want = {f"{m}.{x}.weight" for m in modules for x in ("lora_A", "lora_B")}
    missing = sorted(want - set(tensors))
    extra = sorted(set(tensors) - want)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) (not the A/B of a listed module), e.g. {extra[:3]}")
    for m in modules:
        a, b = tensors.get(f"{m}.lora_A.weight"), tensors.get(f"{m}.lora_B.weight")
        if a is None or b is None:
            continue
        for key, t in ((f"{m}.lora_A.weight", a), (f"{m}.lora_B.weight", b)):
            if t.dtype not in FACTOR_DTYPES:
                problems.append(f"{key} has dtype {t.dtype}; adapters are stored as fp32, bf16 or fp16")
        if a.ndim != 2 or a.shape[0] != rank:
            problems.append(f"{m}.lora_A.weight has shape {tuple(a.shape)}, expected (rank={rank}, in_features)")
        if b.ndim != 2 or b.shape[1] != rank:
            problems.append(f"{m}.lora_B.weight has shape {tuple(b.shape)}, expected (out_features, rank={rank})")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def write_adapter(directory, tensors: Mapping[str, torch.Tensor], *, rank: int, alpha: float, dropout: float,
                  targets: Sequence[str], base_model: Mapping[str, Any], step: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None) -> Path:
    """Write an adapter directory atomically and return its path. `tensors`: `lora_state_dict` of a model;
    `dtype`: store the factors in this dtype (default: as given)."""
    directory = Path(directory)
    modules: List[str] = []
    for key in tensors:
        m = _module_of(key)
        if m is None:
            raise ValueError(f"adapter tensor {key!r} is not named <module>.lora_A.weight / <module>.lora_B.weight")
        if m not in modules:
            modules.append(m)
    if not modules:
        raise ValueError(f"refusing to write an adapter with no tensors to {directory}")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"adapter rank={rank!r} must be a positive integer")
    missing_fields = [f for f in ARCHITECTURE_FIELDS + INFORMATIVE_FIELDS if f not in base_model]
    if missing_fields:
        raise ValueError(f"base_model lacks {missing_fields} (see base_model_identity)")
    if dtype is not None and dtype not in FACTOR_DTYPES:
        raise ValueError(f"adapter dtype {dtype} is not one of fp32, bf16, fp16")
    _check_tensors(tensors, modules, rank, f"adapter for {directory}")
    config = {"format": FORMAT, "version": VERSION, "rank": rank, "alpha": float(alpha), "dropout": float(dropout),
              "targets": list(targets), "modules": modules,
              "base_model": {k: base_model[k] for k in ARCHITECTURE_FIELDS + INFORMATIVE_FIELDS},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "magi_version": _magi_version(),
              "step": step}
    if directory.exists():
        _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp_", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 -> the usual mode
    try:
        order = [(f"{m}.{x}.weight") for m in modules for x in ("lora_A", "lora_B")]
        write_tensor_file(tmp / WEIGHTS_NAME,
                          [(k, tensors[k] if dtype is None else tensors[k].to(dtype)) for k in order],
                          metadata={"format": FORMAT})
        write_json_durably(tmp / CONFIG_NAME, config)
        fsync_dir(tmp)
        replace_dir(tmp, directory, aside_prefix=f".{directory.name}.old_")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _check_replaceable(directory: Path) -> None:
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; not overwriting it with an adapter")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in (WEIGHTS_NAME, CONFIG_NAME))
    if foreign:
        raise FileExistsError(f"{directory} holds files other than an adapter's ({foreign[:3]}); not replacing it")


def _require(config: Mapping[str, Any], key: str, kinds, where: str):
    if key not in config:
        raise ValueError(f"{where}: field {key!r} is missing")
    value = config[key]
    if not isinstance(value, kinds) or isinstance(value, bool):  # JSON true is not a number here
        raise ValueError(f"{where}: field {key!r} = {value!r} has the wrong type")
    return value


def read_config(directory) -> Dict[str, Any]:
    """adapter_config.json of an adapter directory, validated."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an adapter directory: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {config.get('format')!r}, not {FORMAT!r} (a peft adapter must be "
                         f"converted: module names and this config differ)")
    if config.get("version") != VERSION:
        raise ValueError(f"{path}: version {config.get('version')!r} is not supported (this magi reads version "
                         f"{VERSION})")
    rank = _require(config, "rank", int, str(path))
    if rank < 1:
        raise ValueError(f"{path}: rank={rank} must be positive")
    _require(config, "alpha", (int, float), str(path))
    dropout = _require(config, "dropout", (int, float), str(path))
    if not 0 <= dropout < 1:
        raise ValueError(f"{path}: dropout={dropout} must lie in [0, 1)")
    for key in ("targets", "modules"):
        value = _require(config, key, list, str(path))
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path}: field {key!r} must be a list of strings")
    if not config["modules"] or len(set(config["modules"])) != len(config["modules"]):
        raise ValueError(f"{path}: 'modules' must list each adapted module once (got {len(config['modules'])})")
    base = _require(config, "base_model", dict, str(path))
    for key in ARCHITECTURE_FIELDS:
        _require(base, key, int, f"{path} base_model")
    return config


def check_base_model(recorded: Mapping[str, Any], model: Mapping[str, Any], where: str) -> None:
    """An adapter's recorded base against the model's identity: shapes-defining fields must agree (error), the
    others are reported (an adapter of the base model on its distilled variant is a legitimate use)."""
    wrong = [f"{k}: adapter {recorded.get(k)!r}, model {model.get(k)!r}" for k in ARCHITECTURE_FIELDS
             if k in model and recorded.get(k) != model.get(k)]
    if wrong:
        raise ValueError(f"{where} was trained for another base model ({'; '.join(wrong)})")
    differs = [f"{k}: adapter {recorded.get(k)!r}, model {model.get(k)!r}" for k in INFORMATIVE_FIELDS
               if k in model and recorded.get(k) != model.get(k)]
    if differs:
        logger.warning("%s was trained on another variant of this architecture (%s); applying it anyway",
                       where, "; ".join(differs))


def read_adapter(path, base_model: Optional[Mapping[str, Any]] = None) -> Adapter:
    """Read and validate an adapter directory (or its adapter_model.safetensors). `base_model`: the identity
    (`base_model_identity`) of the model it is for."""
    directory = Path(path)
    if directory.is_file() and directory.name == WEIGHTS_NAME:
        directory = directory.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter {path} does not exist (an adapter is a directory holding {WEIGHTS_NAME} "
                                f"and {CONFIG_NAME})")
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a complete adapter: {WEIGHTS_NAME} is missing")
    with open_tensor_file(weights) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{weights}: safetensors metadata format is {meta.get('format')!r}, not {FORMAT!r}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _check_tensors(tensors, config["modules"], config["rank"], str(weights))
    if base_model is not None:
        check_base_model(config["base_model"], base_model, f"adapter {directory}")
    return Adapter(directory, config, tensors, list(config["modules"]))


def adapter_digest(path) -> str:
    """sha256 of an adapter's safetensors file (what a video's sidecar records)."""
    from magi_train.checkpoint.magi1 import sha256_of

    directory = Path(path)
    return sha256_of(directory if directory.is_file() else directory / WEIGHTS_NAME)
