"""Typed configuration of `magi-serve` (stored in Hydra's ConfigStore as `serve_schema`).

`ServeConfig` is the generate schema (magi_infer/config.py: model, ckpt, sampler, video, text, vae, parallel,
device, ...: what the pipeline is built from) plus a `server` group. The per-request fields of the generate
schema (prompt, mode, num_frames, seed, image, output, ...) are not used by the server: each HTTP request brings
its own, within the `server.max_*` limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from magi_infer.config import GenerateConfig


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed in `serving on http://HOST:PORT`)
    max_queue: int = 8  # jobs waiting behind the running one; a create beyond it gets 429
    max_frames: int = 480  # output frames per request (num_frames, or seconds x video.fps)
    max_width: int = 1280  # the largest `size` a request may name (the engine makes video.width x video.height)
    max_height: int = 1280
    max_steps: int = 64  # sampler steps per chunk a request may ask for (num_steps)
    max_prompts: int = 256  # entries of a request's `prompts` list
    max_prompt_chars: int = 4000  # characters of one prompt
    max_upload_mb: float = 64.0  # an input_reference / video upload
    api_key: Optional[str] = None  # null: no key; else `Authorization: Bearer KEY` (or ?api_key=KEY on the WebSocket)
    output_root: str = "outputs/serve"  # every file the server writes or serves is under <output_root>/<video id>/
    # SIGTERM/SIGINT: the running job may finish for this long, then it is cancelled. Under torchrun keep it well
    # below 30 s: torchrun SIGKILLs its ranks 30 s after passing them a SIGTERM.
    shutdown_grace_s: float = 20.0
    retain_jobs: int = 100  # finished jobs kept (files and listing); the oldest finished one beyond is deleted
    model_name: Optional[str] = None  # the `model` of video objects and the only one requests may name; null: model.name
    default_seconds: float = 4.0  # a request with neither seconds nor num_frames (the OpenAI default, 4 s)
    keepalive_s: float = 60.0  # multi-rank: an idle rank 0 pings the followers this often (collective timeouts)
    static: bool = True  # serve the web page (magi_infer/server/static) at / and /static


@dataclass
class ServeConfig(GenerateConfig):
    server: ServerConfig = field(default_factory=ServerConfig)


SCHEMA_NAME = "serve_schema"


def register_serve_config() -> None:
    """Store `ServeConfig` in Hydra's ConfigStore as `serve_schema`. Safe to call more than once."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=ServeConfig)


def to_serve_config(cfg) -> ServeConfig:
    """A composed config -> validated `ServeConfig`; unknown keys and bad values raise ConfigError."""
    from magi_train.config.compose import to_typed
    from magi_train.config.validate import ConfigError, validate_model

    from magi_infer.config import validate_generate

    obj = to_typed(ServeConfig, cfg, "magi_infer/server/config.py")
    validate_model(obj.model)
    validate_generate(obj)
    errors = server_problems(obj.server)
    if errors:
        raise ConfigError("invalid server config:\n  " + "\n  ".join(errors))
    return obj


def server_problems(s: ServerConfig) -> List[str]:
    errors = []
    if not 0 <= s.port <= 65535:
        errors.append(f"server.port={s.port} must lie in [0, 65535] (0: any free port)")
    for name in ("max_frames", "max_width", "max_height", "max_steps", "max_prompts", "max_prompt_chars"):
        if getattr(s, name) < 1:
            errors.append(f"server.{name}={getattr(s, name)} must be >= 1")
    if s.max_queue < 0:
        errors.append(f"server.max_queue={s.max_queue} must be >= 0 (0: only the running job, none waiting)")
    if s.retain_jobs < 1:
        errors.append(f"server.retain_jobs={s.retain_jobs} must be >= 1")
    for name in ("shutdown_grace_s", "keepalive_s", "max_upload_mb", "default_seconds"):
        if not getattr(s, name) > 0:
            errors.append(f"server.{name}={getattr(s, name)} must be > 0")
    if s.api_key is not None and not str(s.api_key).strip():
        errors.append("server.api_key is empty: give a key or null (no key)")
    if not s.output_root:
        errors.append("server.output_root must name a directory")
    return errors
