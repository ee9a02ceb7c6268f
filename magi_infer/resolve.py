"""What a model directory says about itself: the generate overrides `MagiPipeline.from_pretrained` starts from.

* **A checkpoint of our trainer** (a run's checkpoint folder, or one checkpoint): its trainer state holds the
  model config it was trained with; its preset name selects conf/model + conf/variant, and a distilled run
  (model.distill) gets one-pass guidance.
* **A released model directory** (`inference_weight[.fp8][.distill]/`, magi_train/checkpoint/variants.py):
  - with the released `config.json` (the `example/*/..._config.json` of the release, copied beside the weights, or
    given as `config=`): its model_config picks the preset whose architecture it is, engine_config the variant
    (distill, fp8_quant), and its runtime_config and engine_config fields become the sampler's, video's and text
    encoder's settings. They are read from the file, never retyped: a config.json with other scales or steps
    gives those.
  - without it: the variant comes from the weight directories present (one, or the caller's `model=`), the
    architecture from the weights' shapes (layers, width), matched against the presets.
* **Text encoder and VAE**: given, or the released Hugging Face layout's `ckpt/t5` and `ckpt/vae` beside
  `ckpt/magi/<model>` when they are there.

Values are Hydra override strings (JSON literals), applied after the preset and before the caller's overrides.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

# released runtime_config / engine_config field -> our generate key
RUNTIME_KEYS = {
    "cfg_number": "sampler.cfg_number", "cfg_t_range": "sampler.cfg_t_range",
    "prev_chunk_scales": "sampler.prev_chunk_scales", "text_scales": "sampler.text_scales",
    "noise2clean_kvrange": "sampler.noise2clean_kvrange", "clean_chunk_kvrange": "sampler.clean_chunk_kvrange",
    "clean_t": "sampler.clean_t", "num_steps": "sampler.num_steps", "window_size": "sampler.window_size",
    "seed": "seed", "num_frames": "num_frames", "video_size_h": "video.height", "video_size_w": "video.width",
    "fps": "video.fps", "t5_device": "text.device", "scale_factor": "vae.scale_factor",
}
ENGINE_KEYS = {
    "fp8_quant": "sampler.fp8", "distill_nearly_clean_chunk_threshold": "sampler.nearly_clean_threshold",
    "shortcut_mode": "sampler.shortcut_mode", "kv_offload": "sampler.kv_offload",
}
# Architecture fields that tell the presets apart (compared against the weights or config.json).
ARCH = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
        "in_channels", "out_channels", "caption_channels", "gated_linear_unit", "half_channel_vae", "x_rescale_factor")
# Further fields that fix the shapes or the numerics of a trained model (a checkpoint of ours records them).
SHAPE = ("caption_max_length", "null_caption_length", "patch_size", "t_patch_size", "cond_hidden_ratio",
         "xattn_cond_hidden_ratio", "cond_gating_ratio", "proj_interleave_groups", "chunk_width", "layernorm_epsilon",
         "apply_layernorm_1p", "rope_temperature", "rope_reference_tokens", "timestep_rescale_factor")


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value (JSON literal; Hydra parses double-quoted strings and lists)."""
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def user_overrides(overrides: Union[Mapping[str, Any], Sequence[str], None]) -> Dict[str, str]:
    """A mapping (key -> Python value) or Hydra "key=value" strings -> key -> override value string."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return {str(k): hydra_value(v) for k, v in overrides.items()}
    if isinstance(overrides, str):
        raise ValueError(f"overrides must be a mapping or a list of 'key=value' strings, got the string {overrides!r}")
    out = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        out[key] = value
    return out


def released_overrides(path: Path, *, model: Optional[str] = None, config: Union[str, Path, None] = None,
                       t5_dir: Union[str, Path, None] = None, vae_dir: Union[str, Path, None] = None) -> Dict[str, str]:
    """The generate overrides that describe model directory `path` (see the module docstring)."""
    from magi_train.checkpoint.manager import find_checkpoint

    if not path.exists():
        raise FileNotFoundError(f"from_pretrained: {path} does not exist (a released MAGI-1 model directory or a "
                                "checkpoint of ours)")
    out: Dict[str, Any] = {"ckpt.dir": str(path)}
    ours = find_checkpoint(path)
    if ours is not None:
        out.update(_from_our_checkpoint(ours, model))
    else:
        out.update(_from_released(path, model, config))
    out.update(_companions(path, t5_dir, vae_dir, out))
    return {k: v if isinstance(v, str) and k == "model" else hydra_value(v) for k, v in out.items()}


def _from_our_checkpoint(ckpt: Path, model: Optional[str]) -> Dict[str, Any]:
    from magi_train.checkpoint.weights import read_our_trainer_state
    from magi_train.config.compose import model_preset_names

    stored = read_our_trainer_state(ckpt).get("config", {}).get("model", {})
    name = model or stored.get("name")
    if name not in model_preset_names():
        raise ValueError(f"from_pretrained: checkpoint {ckpt} was trained with model.name={stored.get('name')!r}, "
                         f"which is not a preset of conf/model ({', '.join(model_preset_names())}); pass model=PRESET")
    out: Dict[str, Any] = {"model": name}
    if not model:
        # A run may change the preset's architecture on the command line (e.g. model.num_layers=4): the weights
        # then have the trained shape, not the preset's, and the overrides that made it travel with them.
        from magi_train.config.compose import load_model_preset

        preset = load_model_preset(name)
        for key in ARCH + SHAPE:
            if key in stored and stored[key] != getattr(preset, key):
                out[f"model.{key}"] = stored[key]
    if stored.get("distill") and not model:
        out.update({"model.distill": True, "sampler.cfg_number": 1})  # guidance was distilled in (released rule)
    return out


def find_released_config(path: Path) -> Optional[Path]:
    """`path/config.json`, or the one `*config.json` in `path`, if it is a released MAGI-1 config."""
    candidates = [path / "config.json"] + sorted(p for p in path.glob("*config.json") if p.name != "config.json")
    for candidate in candidates:
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "model_config" in data:
                return candidate
    return None


def _preset_for(arch: Dict[str, Any], distill: bool, fp8: bool, where: str) -> Tuple[str, Dict[str, Any]]:
    """(preset name, extra overrides) for an architecture and variant."""
    from magi_train.config.compose import load_model_preset, model_preset_names

    names = model_preset_names()
    bases = [n for n in names if not n.endswith(("_distill", "_fp8"))]
    for base in bases:
        preset = load_model_preset(base)
        if all(getattr(preset, k) == arch[k] for k in arch):
            break
    else:
        raise ValueError(f"from_pretrained: {where} has an architecture ({', '.join(f'{k}={v}' for k, v in arch.items())}) "
                         f"that matches none of the presets {bases}; add a conf/model preset or pass model=PRESET")
    wanted = base + ("_distill" if distill else "") + ("_fp8" if fp8 else "")
    if wanted in names:
        return wanted, {}
    extra: Dict[str, Any] = {}
    if distill:
        extra.update({"model.distill": True, "sampler.cfg_number": 1})
    if fp8:
        extra.update({"sampler.fp8": True, "sampler.cfg_number": 1})
    return base, extra


def _from_released(path: Path, model: Optional[str], config: Union[str, Path, None]) -> Dict[str, Any]:
    from magi_train.config.released import model_config_from_released

    config_path = Path(config) if config is not None else find_released_config(path)
    if config_path is not None:
        try:
            data = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"from_pretrained: config={config_path}: {e}") from e
        engine, runtime = data.get("engine_config", {}), data.get("runtime_config", {})
        distill, fp8 = bool(engine.get("distill")), bool(engine.get("fp8_quant"))
        out: Dict[str, Any] = {}
        if model is None:
            released = model_config_from_released(data, distill=distill)
            name, out = _preset_for({k: getattr(released, k) for k in ARCH}, distill, fp8, str(config_path))
            out["model"] = name
        else:
            out["model"] = model
        for src, key in RUNTIME_KEYS.items():
            if src in runtime and runtime[src] is not None:
                out[key] = runtime[src]
        for src, key in ENGINE_KEYS.items():
            if src in engine and engine[src] is not None:
                out[key] = engine[src]
        if runtime.get("temporal_downsample_factor", 4) != 4:
            raise ValueError(f"{config_path}: runtime_config.temporal_downsample_factor="
                             f"{runtime['temporal_downsample_factor']}; the released VAE (and this code) use 4")
        if "chunk_width" in runtime:
            out["model.chunk_width"] = runtime["chunk_width"]
        for src, key in (("t5_pretrained", "text.t5_dir"), ("vae_pretrained", "vae.dir")):
            given = runtime.get(src)
            if given and (config_path.parent / given).is_dir():
                out[key] = str((config_path.parent / given).resolve())
        logger.info("from_pretrained: sampler and video defaults from %s", config_path)
        return out
    if model is not None:
        return {"model": model}
    return _from_weights(path)


def _from_weights(path: Path) -> Dict[str, Any]:
    """No config.json: the variant from the weight directories, the architecture from the weights' shapes."""
    from magi_train.checkpoint.variants import Variant, is_weight_dir, weight_dirs

    if is_weight_dir(path):
        variant = Variant.from_dirname(path.name)
        if variant is None:
            raise ValueError(f"from_pretrained: the name of weight directory {path} does not say which variant it "
                             "holds (inference_weight[.fp8][.distill]); pass model=PRESET")
        found = {variant: path}
    else:
        found = weight_dirs(path)
    if not found:
        raise ValueError(f"from_pretrained: {path} holds no released weights (inference_weight[.fp8][.distill]/) "
                         "and is not a checkpoint of ours (no complete.json)")
    if len(found) > 1:
        raise ValueError(f"from_pretrained: {path} holds several variants ({', '.join(v.name for v in found)}); "
                         "pass model=PRESET to say which one to load")
    (variant, weight_dir), = found.items()
    name, out = _preset_for(_arch_of_weights(weight_dir), variant.distill, variant.fp8, str(weight_dir))
    out["model"] = name
    return out


def _arch_of_weights(weight_dir: Path) -> Dict[str, Any]:
    """Layers and the widths a weight directory's tensor shapes tell (headers only; no tensor is read)."""
    from safetensors import safe_open

    from magi_train.checkpoint.magi1 import INDEX_NAME, SINGLE_NAME

    index = weight_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (weight_dir / SINGLE_NAME).is_file():
        weight_map = None
    else:
        raise ValueError(f"from_pretrained: {weight_dir} has no {INDEX_NAME} or {SINGLE_NAME} whose header can be "
                         "read (compressed .zst weights: pass model=PRESET)")
    shapes: Dict[str, Tuple[int, ...]] = {}
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE_NAME]
    for name in files:
        with safe_open(str(weight_dir / name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"videodit_blocks\.layers\.(\d+)\.", k))}
    try:
        hidden, in_channels = shapes["x_embedder.weight"][:2]
        return {"num_layers": max(layers) + 1, "hidden_size": hidden, "in_channels": in_channels}
    except (KeyError, ValueError) as e:
        raise ValueError(f"from_pretrained: {weight_dir} does not look like MAGI-1 DiT weights (no x_embedder.weight "
                         f"or videodit_blocks.layers.*); pass model=PRESET") from e


def _companions(path: Path, t5_dir, vae_dir, found: Dict[str, Any]) -> Dict[str, Any]:
    """text.t5_dir / vae.dir: given, or the Hugging Face layout's ckpt/t5 and ckpt/vae (path = ckpt/magi/X)."""
    out: Dict[str, Any] = {}
    root = path.resolve().parent.parent
    for given, key, sibling in ((t5_dir, "text.t5_dir", "t5"), (vae_dir, "vae.dir", "vae")):
        if given is not None:
            out[key] = str(given)
        elif key not in found and (root / sibling).is_dir() and path.resolve().parent.name == "magi":
            out[key] = str(root / sibling)
            logger.info("from_pretrained: %s=%s (the released layout)", key, out[key])
    return out
