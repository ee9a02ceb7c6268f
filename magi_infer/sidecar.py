"""The JSON sidecar written next to every generated video: what it takes to make the same video again.

`<video>.json` (e.g. `fox.mp4.json`) holds the prompt of each chunk, the seed, the request, the whole resolved
generate config, where the weights came from, the LoRA adapters applied (name, path, scale, sha256 of the
safetensors file: `lora=` of the config takes the same entries, and checks the sha256), and magi's version. It is written atomically after the video is
published, so a sidecar always describes a complete video.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List


def sidecar_path(video: Path) -> Path:
    return video.with_name(video.name + ".json")


def magi_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("magi")
    except PackageNotFoundError:
        return "unknown (not installed)"


def describe(video: Path, req, cfg, result, source: str) -> Dict[str, Any]:
    from magi_train.config.compose import config_to_dict

    generator = req.generator
    return {
        "video": video.name,
        "prompts": list(result.prompts),  # one per generated chunk, after any live update
        "prompt": list(req.prompts) if len(req.prompts) > 1 else req.prompts[0],
        "seed": None if generator is not None else req.seed,
        # A generator's state at the call cannot be written back as a seed; its initial seed is what it started as.
        "generator_initial_seed": None if generator is None else generator.initial_seed(),
        "mode": req.mode,
        "num_frames": result.frames,
        "num_steps": req.num_steps or cfg.sampler.num_steps,
        "image": req.image if isinstance(req.image, str) else (None if req.image is None else "<array>"),
        "prefix_video": req.prefix_video if isinstance(req.prefix_video, str) else
        (None if req.prefix_video is None else "<array>"),
        "weights": source,
        "lora": adapters_of(cfg),
        "seconds": round(result.seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": magi_version(),
        "config": config_to_dict(cfg),
    }


def adapters_of(cfg) -> List[Dict[str, Any]]:
    """[{name, path, scale, sha256}] of the adapters `cfg.lora` names (the engine's entries carry the sha256 it
    checked when loading; an entry without one is hashed now)."""
    from magi_infer.config import lora_entries

    out = []
    for entry in lora_entries(getattr(cfg, "lora", None)):
        if entry["sha256"] is None:
            from magi_train.checkpoint.adapters import adapter_digest

            entry["sha256"] = adapter_digest(entry["path"])
        out.append({k: entry[k] for k in ("name", "path", "scale", "sha256")})
    return out


def write_sidecar(video: Path, req, cfg, result, source: str) -> Path:
    """Write `<video>.json` atomically (beside the video) and return its path."""
    from magi_train.checkpoint.atomic import replace_text

    path = sidecar_path(Path(video))
    replace_text(path, json.dumps(describe(Path(video), req, cfg, result, source), indent=2, default=str) + "\n")
    return path
