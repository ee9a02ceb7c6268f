"""Everything generate can check before its expensive work (building the DiT, reading weights, T5, the VAE).

`preflight(cfg, parallel, request)` runs, in this order, and raises one `PreflightError` listing every problem:

* the config's cross-field checks (`validate_generate`: sizes, crf, modes, layouts), for configs built in Python;
* the inputs of the model: ckpt.dir (and ckpt.sha256), text.t5_dir, vae.dir, text.special_tokens, the device;
* with a request (`request_problems`): the output path (on rank 0, the only writer: extension, directory,
  existing file without overwrite=true), the prompts (empty ones need allow_empty_prompt=true; more prompts
  than generated chunks), the i2v image and the v2v prefix video (present and decodable; a truncated prefix or
  prefix_frames beyond it is a warning);
* the memory estimate of magi_infer/memory.py against what the device and the host have free (check_memory).

magi_infer/generate.py calls it before the engine is built; `InferenceEngine.__init__` runs the config part for
API users, and `InferenceEngine.generate` the request part before sampling. Nothing here reads weights.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import torch

from magi_infer.config import SPATIAL, TEMPORAL, GenerateConfig, validate_generate
from magi_infer.request import Request

if TYPE_CHECKING:
    from magi_train.parallel.groups import Parallel

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """A generation that cannot start as configured; raised before any model is built or weights are read."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def engine_device(cfg: GenerateConfig, parallel: Optional[Parallel] = None) -> torch.device:
    """The device this rank's engine runs on: multi-process, `auto` is the rank's device (torchrun's LOCAL_RANK
    GPU with nccl, the CPU with gloo)."""
    if parallel is not None and parallel.world_size > 1 and cfg.device == "auto":
        return parallel.device
    return resolve_device(cfg.device)


def preflight(cfg: GenerateConfig, parallel: Optional[Parallel] = None, request: Optional[Request] = None) -> None:
    """Raise `PreflightError` if `cfg` (and `request`) cannot be generated on this rank; see the module docstring."""
    validate_generate(cfg)
    is_main = parallel is None or parallel.is_main
    errors = config_problems(cfg, parallel)
    if request is not None:
        errors += request_problems(cfg, request, is_main)
    if errors:
        raise PreflightError("cannot generate:\n  " + "\n  ".join(errors))
    if cfg.check_memory:
        from magi_infer.memory import memory_problem

        device = engine_device(cfg, parallel)
        problem = memory_problem(cfg, device, is_main, ranks_on_host(parallel, device))
        if problem is not None:
            raise PreflightError(problem)


def ranks_on_host(parallel: Optional[Parallel], device: torch.device) -> int:
    """Processes of the job drawing on this host's memory: one per local GPU in use with CUDA; every rank of a
    CPU (gloo) job, which runs on one host."""
    if parallel is None or parallel.world_size == 1:
        return 1
    if device.type == "cuda":
        return max(1, min(parallel.world_size, torch.cuda.device_count()))
    return parallel.world_size


# ---------------------------------------------------------------------------- the model's inputs


def config_problems(cfg: GenerateConfig, parallel: Optional[Parallel] = None) -> List[str]:
    errors = _checkpoint_problems(cfg) + _text_problems(cfg) + _vae_problems(cfg)
    try:
        device = engine_device(cfg, parallel)
    except RuntimeError as e:  # a device string torch cannot parse
        return errors + [f"device={cfg.device!r}: {e}"]
    if device.type == "cuda" and not torch.cuda.is_available():
        errors.append(f"device={cfg.device}: no CUDA device is available here (use device=cpu or auto)")
    return errors


def _checkpoint_problems(cfg: GenerateConfig) -> List[str]:
    """ckpt.dir is a checkpoint of ours or holds the released variant the preset wants (names only, nothing read
    but directory listings and markers); ckpt.sha256 is a readable manifest and applies."""
    from magi_train.checkpoint.magi1 import Manifest
    from magi_train.checkpoint.manager import MARKER_NAME, find_checkpoint
    from magi_train.checkpoint.variants import Variant, resolve_weight_dir

    ckpt, mc, fp8 = cfg.ckpt, cfg.model, cfg.sampler.fp8
    if ckpt.dir is None:
        return ["ckpt.dir is required: a released MAGI-1 model directory or a checkpoint of ours"]
    if not Path(ckpt.dir).is_dir():
        return [f"ckpt.dir={ckpt.dir} is not a directory" + ("" if Path(ckpt.dir).exists() else " (it does not exist)")]
    if find_checkpoint(ckpt.dir) is not None:
        if ckpt.sha256 is not None:
            return [f"ckpt.sha256={ckpt.sha256}: manifests check released weight directories; ckpt.dir={ckpt.dir} is "
                    "a checkpoint of our trainer (its complete.json carries its own checks); unset ckpt.sha256"]
        return []  # its model config is compared with the preset when it is opened (checkpoint/weights.py)
    # The same resolution load_weights makes, so a wrong variant is named now rather than after T5 and the VAE.
    wanted = Variant(distill=mc.distill, fp8=fp8)
    try:
        _, held = resolve_weight_dir(ckpt.dir, wanted, wanted_by=f"model.distill={mc.distill}, sampler.fp8={fp8}",
                                     missing_note=f", and it is not a checkpoint of ours (no {MARKER_NAME})")
    except (OSError, ValueError) as e:
        return [str(e)]
    errors = []
    if held is None:
        errors.append(f"ckpt.dir={ckpt.dir}: the weight directory's name does not say which variant it holds; "
                      f"released weights for model={mc.name} live in {wanted.dirname}/")
    if ckpt.sha256 is not None:
        try:
            Manifest.read(ckpt.sha256)
        except (OSError, ValueError) as e:
            errors.append(f"ckpt.sha256: {e}")
    return errors


def _text_problems(cfg: GenerateConfig) -> List[str]:
    from magi_infer.conditioning import CaptionOptions

    tc, errors = cfg.text, []
    if tc.encoder == "t5":
        if tc.t5_dir is None:
            errors.append("text.t5_dir is required for text.encoder=t5 (the t5-v1_1-xxl directory or its parent)")
        else:
            from magi_train.model.text.t5 import resolve_t5_directory

            try:
                resolve_t5_directory(tc.t5_dir)
            except FileNotFoundError as e:
                errors.append(f"text.t5_dir={tc.t5_dir}: {e}")
    options = CaptionOptions(hq=tc.hq, duration=tc.duration, negative_tokens=tc.negative_tokens,
                             static_first_frames=tc.static_first_frames, dynamic_first_frames=tc.dynamic_first_frames,
                             borderness=tc.borderness, three_d_model=tc.three_d_model, two_d_anime=tc.two_d_anime)
    wanted = options.keys() or options.negative_keys()
    if wanted and tc.special_tokens is not None and not Path(tc.special_tokens).is_file():
        errors.append(f"text.special_tokens={tc.special_tokens} is not a file (needed for {wanted})")
    return errors


def _vae_problems(cfg: GenerateConfig) -> List[str]:
    vc = cfg.vae
    if vc.kind != "vit":
        return []
    if vc.dir is None:
        return ["vae.dir is required for vae.kind=vit (diffusers-style directory of the released VAE)"]
    files = ("config.json", "diffusion_pytorch_model.safetensors")
    missing = [name for name in files if not (Path(vc.dir) / name).is_file()]
    if missing:
        where = "" if Path(vc.dir).is_dir() else " (no such directory)"
        return [f"vae.dir={vc.dir} lacks {' and '.join(missing)}{where}"]
    return []


# ---------------------------------------------------------------------------- one request


def check_one_replica(parallel) -> None:
    """Inference (the CLI and the server) runs each request on all ranks: the world must be tp x cp x pp."""
    if parallel.dp > 1:
        raise ValueError(f"{parallel.world_size} processes with parallel.tp x parallel.cp x parallel.pp = "
                         f"{parallel.tp} x {parallel.cp} x {parallel.pp} leave parallel.dp={parallel.dp}: inference "
                         "runs one request on all ranks; start exactly tp x cp x pp processes")


def request_problems(cfg: GenerateConfig, req: Request, is_main: bool = True, output: Optional[str] = None) -> List[str]:
    """What stops `req` (written to `output`, default req.output) from being generated; warns about what only
    degrades it. Every rank reads the conditioning inputs; only rank 0 writes, so only it checks the output."""
    from magi_infer.config import MODES

    errors: List[str] = []
    if req.mode not in MODES:
        return [f"mode={req.mode!r} is not one of {list(MODES)}"]
    if req.num_frames < 1:
        errors.append(f"num_frames={req.num_frames} must be >= 1")
    if is_main:
        errors += _output_problems(output or req.output, req.overwrite)
    prefix_latents, more = _conditioning(cfg, req, is_main)
    errors += more
    errors += _prompt_problems(cfg, req, prefix_latents)
    return errors


def _output_problems(output: str, overwrite: bool) -> List[str]:
    from magi_train.data.video_io import output_path_problems

    return [f"output={output}: {message}" for _, message in output_path_problems(output, overwrite)]


def _conditioning(cfg: GenerateConfig, req: Request, is_main: bool) -> tuple[int, List[str]]:
    """(latent frames of the clean prefix, errors) for the i2v image or v2v prefix video."""
    from magi_train.data.video_io import probe_video, read_image

    from magi_infer.inputs import as_uint8_frames, is_path

    v = cfg.video
    if req.mode == "v2v" and req.prefix_latents is not None:
        return _prefix_latent_problems(cfg, req)
    if req.mode == "i2v" and req.image is not None and not is_path(req.image):
        try:
            as_uint8_frames(req.image, "image", 3)
        except ValueError as e:
            return 0, [str(e)]
        return 1, []
    if req.mode == "v2v" and req.prefix_video is not None and not is_path(req.prefix_video):
        try:
            frames = as_uint8_frames(req.prefix_video, "prefix_video", 4)
        except ValueError as e:
            return 0, [str(e)]
        usable = min(len(frames), req.prefix_frames or len(frames)) // TEMPORAL * TEMPORAL
        if usable == 0:
            return 0, [f"prefix_video has {len(frames)} frames; v2v needs at least {TEMPORAL}"]
        return usable // TEMPORAL, []
    if req.mode == "i2v":
        if not req.image:
            return 0, ["mode=i2v needs image=PATH"]
        try:
            read_image(req.image, v.height, v.width)
        except (OSError, ValueError) as e:
            return 0, [f"image={req.image}: {e}"]
        return 1, []  # the image latent is latent frame 0
    if req.mode != "v2v":
        return 0, []
    if not req.prefix_video:
        return 0, ["mode=v2v needs prefix_video=PATH"]
    try:
        info = probe_video(req.prefix_video)
    except (OSError, ValueError) as e:
        return 0, [f"prefix_video={req.prefix_video}: {e}"]
    available = info.frames_at(v.fps)
    if is_main and info.truncated:
        why = info.decode_error or f"its container states {info.header_frames} frames"
        logger.warning("prefix_video=%s looks truncated: %d frames decode (%s); the prefix is what decodes",
                       req.prefix_video, info.frames, why)
    if is_main and req.prefix_frames is not None and req.prefix_frames > available:
        logger.warning("prefix_frames=%d, but prefix_video=%s yields only %d frames at video.fps=%d; using %d",
                       req.prefix_frames, req.prefix_video, available, v.fps, available // TEMPORAL * TEMPORAL)
    usable = min(available, req.prefix_frames or available) // TEMPORAL * TEMPORAL
    if usable == 0:
        return 0, [f"prefix_video={req.prefix_video} has {available} frames at video.fps={v.fps}"
                   f"{f' (prefix_frames={req.prefix_frames})' if req.prefix_frames else ''}; v2v needs at least "
                   f"{TEMPORAL}"]
    return usable // TEMPORAL, []


def prefix_latent_frames(req: Request):
    """The v2v prefix latents of `req` that are used (the first ceil(prefix_frames / 4) with prefix_frames)."""
    lat = req.prefix_latents
    return lat if req.prefix_frames is None else lat[:, :, :math.ceil(req.prefix_frames / TEMPORAL)]


def _prefix_latent_problems(cfg: GenerateConfig, req: Request) -> tuple[int, List[str]]:
    lat, m = req.prefix_latents, cfg.model
    if req.prefix_video is not None:
        return 0, ["give prefix_video or prefix_latents, not both"]
    channels = m.in_channels // (2 if m.half_channel_vae else 1)
    h, w = cfg.video.height // SPATIAL, cfg.video.width // SPATIAL
    if not isinstance(lat, torch.Tensor) or lat.ndim != 5 or lat.shape[0] != 1 or \
            (lat.shape[1], lat.shape[3], lat.shape[4]) != (channels, h, w) or lat.shape[2] < 1:
        shape = tuple(lat.shape) if isinstance(lat, torch.Tensor) else type(lat).__name__
        return 0, [f"prefix_latents must be a float tensor of shape (1, {channels}, T >= 1, {h}, {w}) (the latents of "
                   f"a {cfg.video.width}x{cfg.video.height} video), got {shape}"]
    if not torch.isfinite(lat).all():
        return 0, ["prefix_latents holds NaN or infinite values"]
    return prefix_latent_frames(req).shape[2], []


def _prompt_problems(cfg: GenerateConfig, req: Request, prefix_latents: int) -> List[str]:
    prompts = list(req.prompts)
    if not prompts:
        return ["prompt is empty: give a string or a list of strings (one per chunk)"]
    errors = []
    if not req.allow_empty_prompt:
        for i, prompt in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if _is_empty(cfg, prompt):
                cleaned = "" if not str(prompt).strip() else " after cleaning (no words are left)"
                errors.append(f"{name}={prompt!r} is empty{cleaned}: give a prompt, or set allow_empty_prompt=true "
                              "for unconditional generation")
    cw = cfg.model.chunk_width
    new_latents = math.ceil(req.num_frames / TEMPORAL)
    total = new_latents if req.mode == "i2v" else prefix_latents + new_latents
    generated = math.ceil(total / cw) - prefix_latents // cw  # clean prefix chunks get no prompt
    if req.num_frames >= 1 and len(prompts) > generated:
        errors.append(f"{len(prompts)} prompts for {generated} generated chunk{'s' if generated > 1 else ''} "
                      f"(num_frames={req.num_frames}, model.chunk_width={cw} latent frames of {TEMPORAL}): one prompt "
                      "per chunk at most")
    return errors


def _is_empty(cfg: GenerateConfig, prompt: str) -> bool:
    """Empty as the text encoder sees it: blank, or nothing left after T5's caption cleaning / the hash
    encoder's word split."""
    if not str(prompt).strip():
        return True
    if cfg.text.encoder in ("hash", "hash_bigram"):
        from magi_train.model.text.hash import tokenize

        return not tokenize(str(prompt))
    from magi_train.model.text.clean import prepare_prompt

    return not prepare_prompt(str(prompt)).strip()
