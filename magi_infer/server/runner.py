"""Running a job spec on the pipeline (the same call on every rank) and the rank-0 -> followers messages.

Under torchrun every rank of the tp x cp x pp group must call the pipeline with identical arguments. Rank 0
serves HTTP; for each job it broadcasts a message `{"type": "job", "spec": ...}` plus the job's input files as
bytes, and the followers run `run_spec` with them. `{"type": "ping"}` keeps an idle group's collectives from
timing out; `{"type": "shutdown"}` ends the followers' loop.

A message is JSON we produce ourselves, encoded to bytes and broadcast as a uint8 tensor after its length (an
int64 tensor): nothing is pickled, nothing that comes from outside is unpickled. The input files travel after
the JSON in the same tensor; the JSON header names them and their sizes.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

logger = logging.getLogger("magi_infer.server")

INPUT_NAME = re.compile(r"(image|prefix_video|prefix_latents)(\.[a-z0-9]{1,5})?")


def supports_prefix_latents(pipe) -> bool:
    return "prefix_latents" in inspect.signature(pipe.stream).parameters


def pipeline_arguments(pipe, spec: dict, inputs: Dict[str, Path]) -> dict:
    """The keyword arguments of `pipe.stream` for a job spec, with the input files at `inputs` (name -> path)."""
    kwargs = dict(prompt=spec["prompts"], mode=spec["mode"], num_frames=spec["num_frames"], seed=spec["seed"],
                  num_steps=spec["num_steps"])
    for name, path in inputs.items():
        kind = INPUT_NAME.fullmatch(name).group(1)
        if kind == "prefix_latents":
            from safetensors.torch import load_file

            kwargs["prefix_latents"] = load_file(str(path))["latents"]
        else:
            kwargs[kind] = str(path)
    if spec.get("prefix_frames") is not None:
        kwargs["prefix_frames"] = spec["prefix_frames"]
    return kwargs


def run_spec(pipe, spec: dict, inputs: Dict[str, Path], *, live=None, cancel: threading.Event,
             callback: Optional[Callable[[int, int], None]] = None, on_chunk: Optional[Callable] = None) -> None:
    """Generate one job (every rank). `on_chunk(chunk)` gets each ChunkOutput (rank 0 writes and reports)."""
    for chunk in pipe.stream(**pipeline_arguments(pipe, spec, inputs), live=live, callback=callback, cancel=cancel):
        if on_chunk is not None:
            on_chunk(chunk)


def video_latents(pipe, spec: dict, inputs: Dict[str, Path], chunk_latents: list):
    """The clean latents of exactly the job's video (what its mp4 shows), from the generated chunks' latents:
    what an extension continues. The chunks cover whole chunks from the first one after the clean prefix
    chunks; t2v / i2v keep the first ceil(num_frames / 4) latent frames, v2v those after the prefix."""
    import math

    import torch

    from magi_infer.config import TEMPORAL

    cw = pipe.config.model.chunk_width
    P = prefix_latent_count(pipe, spec, inputs)
    lo = P - (P // cw) * cw
    return torch.cat(chunk_latents, dim=2)[:, :, lo:lo + math.ceil(spec["num_frames"] / TEMPORAL)].contiguous()


def prefix_latent_count(pipe, spec: dict, inputs: Dict[str, Path]) -> int:
    """Latent frames of a v2v job's prefix (the engine's rule: whole latent frames of the prefix used)."""
    import math

    from magi_infer.config import TEMPORAL

    if spec["mode"] != "v2v":
        return 0
    limit = spec.get("prefix_frames")
    for name, path in inputs.items():
        kind = INPUT_NAME.fullmatch(name).group(1)
        if kind == "prefix_latents":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                frames = f.get_slice("latents").get_shape()[2]
            return frames if limit is None else min(frames, math.ceil(limit / TEMPORAL))
        if kind == "prefix_video":
            from magi_train.data.video_io import probe_video

            frames = probe_video(path).frames_at(pipe.config.video.fps)
            return (frames if limit is None else min(frames, limit)) // TEMPORAL
    return 0


# ------------------------------------------------------------------ messages between ranks


def _device(pipe):
    import torch

    return pipe.parallel.device if pipe.parallel is not None else torch.device("cpu")


def send(pipe, message: dict, files: Optional[Dict[str, bytes]] = None) -> None:
    """Rank 0: broadcast `message` (JSON) and `files` (name -> bytes) to every rank."""
    import torch
    import torch.distributed as dist

    files = files or {}
    header = json.dumps({"message": message, "files": [[n, len(b)] for n, b in files.items()]}).encode()
    payload = header + b"".join(files.values())
    device = _device(pipe)
    dist.broadcast(torch.tensor([len(header), len(payload)], dtype=torch.int64, device=device), src=0)
    dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device), src=0)


def receive(pipe) -> Tuple[dict, Dict[str, bytes]]:
    """A follower: the next message of rank 0 and its files."""
    import torch
    import torch.distributed as dist

    device = _device(pipe)
    sizes = torch.empty(2, dtype=torch.int64, device=device)
    dist.broadcast(sizes, src=0)
    n_header, n_payload = (int(v) for v in sizes.cpu())
    payload = torch.empty(n_payload, dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=0)
    data = payload.cpu().numpy().tobytes()
    header = json.loads(data[:n_header].decode())
    files, at = {}, n_header
    for name, size in header["files"]:
        if not INPUT_NAME.fullmatch(name):
            raise ValueError(f"rank 0 sent an input file named {name!r}, not one of image / prefix_video / "
                             "prefix_latents")
        files[name] = data[at:at + size]
        at += size
    return header["message"], files


def follow(pipe) -> None:
    """A follower rank's loop: run every job rank 0 sends, until it sends shutdown."""
    from magi_infer.live import LivePrompts

    while True:
        message, files = receive(pipe)
        kind = message.get("type")
        if kind == "shutdown":
            return
        if kind != "job":
            continue
        spec = message["spec"]
        with tempfile.TemporaryDirectory(prefix="magi-serve-inputs-") as tmp:
            inputs = {}
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
                inputs[name] = Path(tmp) / name
            # Rank 0 passes a cancel event and (live jobs) live prompts: the engine broadcasts its decisions, and
            # takes part in that only on ranks that pass them too.
            try:
                run_spec(pipe, spec, inputs, live=LivePrompts() if spec.get("live") else None,
                         cancel=threading.Event())
            except Exception as e:  # noqa: BLE001 - rank 0 reports the job's failure; this rank waits for the next
                logger.info("job %s ended on this rank: %s", message.get("id"), e)
