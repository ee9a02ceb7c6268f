"""Request bodies -> job specs: every check a request can fail, as a 400 naming the field (and the config key
of the limit it exceeds), before anything is queued.

A job spec is plain JSON (what rank 0 broadcasts to the other ranks): mode, prompts, num_frames, seed,
num_steps, live, and `inputs`: the names of the files in the job's `inputs/` folder the pipeline reads
(image, prefix_video, prefix_latents).

Bodies come as multipart forms (the openai client: ints as strings, lists as `prompts[]`, objects as
`video[id]`) or as JSON; `normalize_form` turns a form into the JSON shape first.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from magi_infer.server.errors import bad_request

CREATE_FIELDS = ("prompt", "prompts", "input_reference", "model", "seconds", "size", "mode", "num_steps", "seed",
                 "num_frames")
EXTEND_FIELDS = ("prompt", "prompts", "video", "model", "seconds", "num_steps", "seed", "num_frames",
                 "prefix_frames")
LIVE_FIELDS = ("type", "prompt", "prompts", "num_frames", "seconds", "seed", "num_steps", "mode", "model", "size")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})


@dataclass
class Context:
    """What the checks need to know about this server."""
    server: Any  # ServerConfig
    generate: Any  # the pipeline's GenerateConfig
    model_name: str
    prefix_latents: bool  # the pipeline continues a video from its cached latents (no VAE encoder needed)

    @property
    def fps(self) -> int:
        return self.generate.video.fps

    @property
    def can_encode(self) -> bool:
        return self.generate.vae.kind != "preview"


@dataclass
class Upload:
    filename: str
    data: bytes


def normalize_form(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """Multipart (key, value) pairs -> the JSON body they encode (`a[]` lists, `a[b]` objects)."""
    out: Dict[str, Any] = {}
    for key, value in items:
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(\[([A-Za-z0-9_]*)\])?", key)
        if not m:
            raise bad_request(f"unknown field {key!r}", param=key, code="unknown_parameter")
        name, sub = m.group(1), m.group(3)
        if m.group(2) is None:
            if name in out:
                raise bad_request(f"field {name!r} given twice", param=name)
            out[name] = value
        elif sub == "":
            out.setdefault(name, [])
            if not isinstance(out[name], list):
                raise bad_request(f"field {name!r} given both as a value and as a list", param=name)
            out[name].append(value)
        else:
            out.setdefault(name, {})
            if not isinstance(out[name], dict):
                raise bad_request(f"field {name!r} given both as a value and as an object", param=name)
            out[name][sub] = value
    return out


def _check_fields(body: Dict[str, Any], allowed) -> None:
    for key in body:
        if key not in allowed:
            raise bad_request(f"unknown field {key!r}: this server takes {', '.join(allowed)}", param=key,
                              code="unknown_parameter")


def _int(body, name, lo=None, hi=None, hi_key=None) -> Optional[int]:
    value = body.get(name)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise bad_request(f"{name}={value!r} is not an integer", param=name) from None
    if lo is not None and number < lo:
        raise bad_request(f"{name}={number} must be >= {lo}", param=name)
    if hi is not None and number > hi:
        raise bad_request(f"{name}={number} exceeds this server's limit {hi_key}={hi}", param=name,
                          code="limit_exceeded")
    return number


def _prompts(body, ctx: Context, required: bool) -> Tuple[str, List[str]]:
    s = ctx.server
    prompt, prompts = body.get("prompt"), body.get("prompts")
    if prompt is not None and not isinstance(prompt, str):
        raise bad_request("prompt must be a string", param="prompt")
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise bad_request("prompts must be a non-empty list of strings (one per chunk; the last repeats)",
                              param="prompts")
        if len(prompts) > s.max_prompts:
            raise bad_request(f"prompts has {len(prompts)} entries, more than this server's limit "
                              f"server.max_prompts={s.max_prompts}", param="prompts", code="limit_exceeded")
    chunks = list(prompts) if prompts else ([prompt] if prompt is not None else [])
    if not chunks:
        if required:
            raise bad_request("prompt is required", param="prompt", code="missing_required_parameter")
        return "", []
    for i, p in enumerate(chunks):
        where = "prompt" if prompts is None else f"prompts[{i}]"
        if not p.strip():
            raise bad_request(f"{where} is empty", param="prompts" if prompts else "prompt")
        if len(p) > s.max_prompt_chars:
            raise bad_request(f"{where} has {len(p)} characters, more than this server's limit "
                              f"server.max_prompt_chars={s.max_prompt_chars}", param="prompts" if prompts else "prompt",
                              code="limit_exceeded")
    return (prompt if prompt is not None else chunks[0]), chunks


def _num_frames(body, ctx: Context) -> int:
    s = ctx.server
    frames = _int(body, "num_frames", lo=1, hi=s.max_frames, hi_key="server.max_frames")
    if frames is not None:
        return frames
    seconds = body.get("seconds")
    if seconds is None or seconds == "":
        value = s.default_seconds
    else:
        try:
            value = float(seconds)
        except (TypeError, ValueError):
            raise bad_request(f"seconds={seconds!r} is not a number", param="seconds") from None
        if not (math.isfinite(value) and value > 0):
            raise bad_request(f"seconds={seconds!r} must be positive", param="seconds")
    frames = max(1, round(value * ctx.fps))
    if frames > s.max_frames:
        raise bad_request(f"seconds={seconds} is {frames} frames at video.fps={ctx.fps}, more than this server's "
                          f"limit server.max_frames={s.max_frames}", param="seconds", code="limit_exceeded")
    return frames


def _num_steps(body, ctx: Context) -> Optional[int]:
    s = ctx.server
    steps = _int(body, "num_steps", lo=1, hi=s.max_steps, hi_key="server.max_steps")
    if steps is None:
        if ctx.generate.sampler.num_steps > s.max_steps:
            raise bad_request(f"this server's default sampler.num_steps={ctx.generate.sampler.num_steps} exceeds "
                              f"server.max_steps={s.max_steps}: give num_steps", param="num_steps",
                              code="limit_exceeded")
        return None
    from magi_infer.config import validate_generate
    from magi_train.config.validate import ConfigError

    g = ctx.generate
    try:  # the same rules as the config (a multiple of window_size, of len(noise2clean_kvrange), ...)
        validate_generate(dataclasses.replace(g, sampler=dataclasses.replace(g.sampler, num_steps=steps)))
    except ConfigError as e:
        problems = [line.strip() for line in str(e).splitlines() if "num_steps" in line]
        raise bad_request(f"num_steps={steps}: " + ("; ".join(problems) or str(e)), param="num_steps") from None
    return steps


def _seed(body) -> int:
    seed = _int(body, "seed", lo=0, hi=2**63 - 1, hi_key="the int64 range")
    return secrets.randbelow(2**31) if seed is None else seed


def _model(body, ctx: Context) -> None:
    model = body.get("model")
    if model not in (None, "", ctx.model_name):
        raise bad_request(f"model={model!r}: this server serves {ctx.model_name!r} only", param="model",
                          code="model_not_found")


def _size(body, ctx: Context) -> None:
    size = body.get("size")
    if size in (None, ""):
        return
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(size))
    if not m:
        raise bad_request(f"size={size!r} is not WIDTHxHEIGHT", param="size")
    w, h = int(m.group(1)), int(m.group(2))
    s, v = ctx.server, ctx.generate.video
    if w > s.max_width or h > s.max_height:
        raise bad_request(f"size={size} exceeds this server's limit server.max_width x server.max_height = "
                          f"{s.max_width}x{s.max_height}", param="size", code="limit_exceeded")
    if (w, h) != (v.width, v.height):
        raise bad_request(f"size={size}: this server generates {v.width}x{v.height} (video.width x video.height, "
                          "set when it starts)", param="size")


def _suffix(upload: Upload, allowed, param: str, what: str) -> str:
    import os

    suffix = os.path.splitext(upload.filename or "")[1].lower()
    if suffix and suffix not in allowed:
        raise bad_request(f"{param}: {upload.filename!r} is not {what} ({', '.join(sorted(allowed))})", param=param)
    if not upload.data:
        raise bad_request(f"{param} is empty", param=param)
    return suffix


def parse_create(body: Dict[str, Any], ctx: Context) -> Tuple[dict, Dict[str, bytes]]:
    """POST /v1/videos (and the WebSocket's `create`) -> (spec, input files by name)."""
    _check_fields(body, CREATE_FIELDS)
    _model(body, ctx)
    _size(body, ctx)
    prompt, prompts = _prompts(body, ctx, required=True)
    ref = body.get("input_reference")
    if ref is not None and not isinstance(ref, Upload):
        raise bad_request("input_reference must be an uploaded file (multipart); references by URL or id are not "
                          "supported", param="input_reference")
    mode = body.get("mode") or ("i2v" if ref is not None else "t2v")
    if mode not in ("t2v", "i2v", "v2v"):
        raise bad_request(f"mode={mode!r} is not one of t2v, i2v, v2v", param="mode")
    inputs: Dict[str, bytes] = {}
    if mode == "t2v" and ref is not None:
        raise bad_request("mode=t2v takes no input_reference (i2v: an image, v2v: a video)", param="input_reference")
    if mode in ("i2v", "v2v"):
        if ref is None:
            raise bad_request(f"mode={mode} needs input_reference ({'an image' if mode == 'i2v' else 'a video'})",
                              param="input_reference", code="missing_required_parameter")
        _need_encoder(ctx, mode, "input_reference")
        if mode == "i2v":
            inputs["image" + _suffix(ref, IMAGE_SUFFIXES, "input_reference", "an image")] = ref.data
        else:
            inputs["prefix_video" + _suffix(ref, VIDEO_SUFFIXES, "input_reference", "a video")] = ref.data
    spec = dict(mode=mode, prompt=prompt, prompts=prompts, num_frames=_num_frames(body, ctx), seed=_seed(body),
                num_steps=_num_steps(body, ctx), prefix_frames=None, live=False)
    return spec, inputs


def _need_encoder(ctx: Context, mode: str, param: str) -> None:
    if not ctx.can_encode:
        raise bad_request(f"mode={mode} needs a VAE encoder, and this server runs vae.kind=preview (decode only); "
                          "start it with vae.kind=vit vae.dir=PATH", param=param, code="unsupported")


def parse_extend(body: Dict[str, Any], ctx: Context) -> Tuple[dict, Optional[str], Optional[Upload]]:
    """POST /v1/videos/extensions -> (spec without inputs, the source video id or None, the uploaded video)."""
    _check_fields(body, EXTEND_FIELDS)
    _model(body, ctx)
    prompt, prompts = _prompts(body, ctx, required=True)
    video = body.get("video")
    source_id, upload = None, None
    if isinstance(video, dict):
        if set(video) != {"id"} or not isinstance(video["id"], str):
            raise bad_request("video must be an uploaded file or {\"id\": VIDEO_ID}", param="video")
        source_id = video["id"]
    elif isinstance(video, Upload):
        upload = video
        _suffix(upload, VIDEO_SUFFIXES, "video", "a video")  # the encoder check is the app's (it may be ours)
    else:
        raise bad_request("video is required: an uploaded file or {\"id\": VIDEO_ID} of a completed video",
                          param="video", code="missing_required_parameter")
    prefix_frames = _int(body, "prefix_frames", lo=1)
    spec = dict(mode="v2v", prompt=prompt, prompts=prompts, num_frames=_num_frames(body, ctx), seed=_seed(body),
                num_steps=_num_steps(body, ctx), prefix_frames=prefix_frames, live=False)
    return spec, source_id, upload


def parse_live(message: Dict[str, Any], ctx: Context) -> Tuple[dict, Dict[str, bytes]]:
    """The WebSocket's `create` message (t2v only: a WebSocket text message carries no file)."""
    _check_fields(message, LIVE_FIELDS)
    body = {k: v for k, v in message.items() if k != "type"}
    if body.get("mode", "t2v") != "t2v":
        raise bad_request(f"mode={body['mode']!r}: a live session makes t2v videos (use POST /v1/videos for i2v "
                          "and v2v)", param="mode")
    spec, inputs = parse_create(body, ctx)
    spec["live"] = True
    return spec, inputs
