#!/usr/bin/env python
"""Convert MAGI-1 DiT weights between the released layout and our trainer's checkpoints, both ways.

    python tools/convert_checkpoint.py to-ours --src downloads/4.5B_base --model magi1_4.5b --out runs/ft/checkpoints
    python tools/convert_checkpoint.py to-released --src runs/ft/checkpoints --out exported/4.5B_ft [--fp8] [--zst]

Released layout (magi_train/model/README.md §9, magi_train/checkpoint/variants.py):
MODEL_DIR/inference_weight[.fp8][.distill]/ holding model.safetensors.index.json and shards (optionally .zst).
Stored dtypes: fp32 for x_embedder.*, t_embedder.*, final_linear.* and rope.bands, bf16 for everything else; fp8
checkpoints replace the linears of layers 1 .. L-2 (magi_train/model/README.md §8).

Ours: CheckpointManager's step_XXXXXXXX/{model.safetensors, trainer.json, complete.json}, or a checkpoint the
trainer wrote (index.json + rank_*.safetensors). Nothing is pickled or unpickled: an older checkpoint holding
.pt files (or DCP's .metadata) is refused, naming the file. A converted checkpoint has no optimizer state: it is
meant for inference (`ckpt.dir=ROOT`) and as the starting weights of a fine-tuning run (`trainer.resume` from it
starts the optimizer afresh). Keys are the same on both sides; only dtypes (and, for fp8, the quantised linears)
change.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

try:
    import magi_train  # noqa: F401  (installed editable in the venv)
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from magi_train.checkpoint.atomic import fsync_dir, replace_dir
from magi_train.checkpoint.distributed import is_distributed_checkpoint
from magi_train.checkpoint.magi1 import INDEX_NAME, SINGLE_NAME, cast_like_released, load_magi1_state_dict, save_magi1_checkpoint
from magi_train.checkpoint.manager import MARKER_NAME, CheckpointManager
from magi_train.checkpoint.manager import find_checkpoint as find_our_checkpoint  # read-only lookup
from magi_train.checkpoint.variants import RELEASED_VARIANTS, Variant
from magi_train.checkpoint.variants import resolve_weight_dir as resolve_released_dir
from magi_train.checkpoint.weights import (MODEL_FILE, check_full_state_dict, read_our_model_state,
                                           read_our_trainer_state)
from magi_train.config.compose import CONF_DIR, config_to_dict, load_model_preset, model_preset_names
from magi_train.config.released import load_released_config
from magi_train.config.schema import ModelConfig
from magi_train.model.dit import FP32_MODULES, full_shapes

# --variant names: the three the release ships.
VARIANTS = {v.name: v for v in RELEASED_VARIANTS}
# Entries of a released fp8 linear besides its weight (magi_train/model/README.md §8).
FP8_SCALE_NAMES = ("weight_scale", "input_scale", "smooth_scale")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
NO_OPTIMIZER_NOTE = ("no optimizer state: use it for inference (ckpt.dir) or as fine-tuning weights; "
                     "trainer.resume from it starts the optimizer afresh")


class ConversionError(ValueError):
    """A conversion refused up front (wrong input, wrong preset, unsafe output); the message says what to do."""


@dataclass
class Summary:
    direction: str
    source: Path
    output: Path
    keys: int
    parameters: int
    bytes: int
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"{self.direction}: {self.source} -> {self.output}",
                 f"  keys: {self.keys}, parameters: {self.parameters:,}, tensor bytes: {self.bytes:,}",
                 "  files written:"]
        lines += [f"    {f} ({f.stat().st_size:,} bytes)" for f in self.files]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- shared helpers
def load_model_config(spec: str) -> ModelConfig:
    """A conf/model/<spec>.yaml preset name, or the path of a released config.json."""
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise ConversionError(f"--model {spec}: no such released config.json")
        return load_released_config(spec)
    presets = model_preset_names()
    if spec not in presets:
        raise ConversionError(f"--model {spec!r} is neither a preset in {CONF_DIR / 'model'} ({', '.join(presets)}) "
                              "nor a released config.json path")
    return load_model_preset(spec)  # composed by Hydra (the *_distill presets extend the base) and validated


def check_against_model(state: Mapping[str, torch.Tensor], cfg: ModelConfig, source: Path, what: str) -> None:
    """Every key and shape of the whole model `cfg` describes (the check `load_into` makes before loading)."""
    try:
        check_full_state_dict(state, full_shapes(cfg), source)
    except ValueError as e:
        raise ConversionError(f"{e}\n(model: {what}, config name {cfg.name!r})") from e


def promote_like_ours(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored dtypes, with the modules our model (and the released loader) keep in fp32 cast to fp32.

    Same rule as `module_dtype_plan`: a key is promoted when one of its dotted parts names an FP32_MODULES entry
    (so `q_layernorm` is promoted, `q_layernorm_xattn` is not). bf16 -> fp32 is exact, so nothing is lost.
    """
    def promoted(key: str) -> bool:
        return any(part in FP32_MODULES for part in key.split("."))

    return {k: t.float() if promoted(k) and t.is_floating_point() else t for k, t in state.items()}


def dequantize_fp8(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every released fp8 linear by the bf16 (out, in) weight that its forward applies.

    The fp8 forward computes y = (x / divisor)_fp8 @ W_q^T * a_scale * weight_scale, with divisor = smooth_scale
    (per-channel layers) or input_scale (per-tensor layers) and a_scale = input_scale[0]. Ignoring the activation
    rounding this is x @ W^T with W[:, j] = W_q[:, j] * weight_scale * a_scale / divisor[j], which also undoes
    SmoothQuant smoothing. Lossy: the fp8 rounding of W_q stays.
    """
    out = dict(state)
    modules = [k[: -len(".weight_scale")] for k in state if k.endswith(".weight_scale")]
    for module in modules:
        wq = out.pop(f"{module}.weight")
        weight_scale = out.pop(f"{module}.weight_scale").float().reshape(())
        input_scale = out.pop(f"{module}.input_scale").float().flatten()
        smooth = out.pop(f"{module}.smooth_scale", None)
        divisor = (smooth if smooth is not None else input_scale).float().reshape(1, -1)
        weight = wq.reshape(wq.shape[-2:]).float() * (weight_scale * input_scale[0]) / divisor
        out[f"{module}.weight"] = weight.to(torch.bfloat16)
    # Keep the model's key order: put each dequantised weight back where the fp8 entries were.
    order = [k for k in state if not k.endswith(tuple(f".{n}" for n in FP8_SCALE_NAMES))]
    return {k: out[k] for k in order}


def in_model_order(state: Mapping[str, torch.Tensor], order: Sequence[str]) -> dict[str, torch.Tensor]:
    """`state` with keys in `order`, each fp8 linear's scales right after its weight, anything else last."""
    ordered: dict[str, torch.Tensor] = {}
    for key in order:
        module = key.removesuffix(".weight")
        for k in (key, *(f"{module}.{name}" for name in FP8_SCALE_NAMES)):
            if k in state and k not in ordered:
                ordered[k] = state[k]
    ordered.update({k: t for k, t in state.items() if k not in ordered})
    return ordered


def guard_output(path: Path, force: bool, allowed: Optional[re.Pattern[str]] = None) -> None:
    """Refuse a non-empty output unless --force; with --force still refuse one holding foreign files."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ConversionError(f"output {path} exists and is not a directory")
    present = sorted(p.name for p in path.iterdir())
    if not present:
        return
    if not force:
        raise ConversionError(f"output {path} already exists and is not empty ({', '.join(present[:5])}"
                              f"{', ...' if len(present) > 5 else ''}); pass --force to replace it")
    foreign = [name for name in present if allowed is not None and not allowed.match(name)]
    if foreign:
        raise ConversionError(f"output {path} holds files that a conversion did not write ({', '.join(foreign[:5])}); "
                              "not replacing it even with --force")


def tensor_totals(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    return sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values())


def parse_size(text: str) -> int:
    """'5GB' (10^9), '512MiB' (2^20), '1000000' bytes -> int."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB, 2GiB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


# ---------------------------------------------------------------------------------------------- released -> ours
def resolve_weight_dir(src: Path, variant: Optional[str]) -> Tuple[Path, Optional[Variant]]:
    """(weight dir, variant) for a model dir or a weight dir. The variant is None when the name does not tell."""
    wanted = VARIANTS[variant] if variant is not None else None
    try:
        weight_dir, held = resolve_released_dir(src, wanted, where=f"--src {src}",
                                                wanted_by=f"--variant {variant}", choose=lambda v: f"--variant {v.name}")
    except (ValueError, FileNotFoundError) as e:
        raise ConversionError(str(e)) from e
    return weight_dir, held or wanted


def released_to_ours(src: Path, model: str, out: Path, step: int = 0, variant: Optional[str] = None,
                     dequantize: bool = False, force: bool = False) -> Summary:
    weight_dir, held = resolve_weight_dir(Path(src), variant)
    cfg = load_model_config(model)
    if held is not None and cfg.distill != held.distill:
        # Distillation adds no keys, so a wrong preset would pass the shape check and generate garbage.
        raise ConversionError(f"{weight_dir} holds {'distilled' if held.distill else 'base'} weights "
                              f"but --model {model} has distill={cfg.distill}; use the matching "
                              f"{'*_distill preset' if held.distill else 'base preset'} or config.json")
    guard_output(Path(out), force)

    state = load_magi1_state_dict(weight_dir)
    fp8_keys = [k for k, t in state.items() if t.dtype == torch.float8_e4m3fn]
    notes = [NO_OPTIMIZER_NOTE]
    if fp8_keys:
        if not dequantize:
            raise ConversionError(f"{weight_dir} is an fp8 checkpoint ({fp8_keys[0]} is float8_e4m3fn): our trainer "
                                  "works on bf16/fp32 weights and dequantising is lossy (the fp8 rounding stays). "
                                  "Convert the bf16 distill weights instead, or pass --dequantize to accept the loss")
        state = dequantize_fp8(state)
        notes.append(f"dequantised {len(fp8_keys)} fp8 linears to bf16 (lossy)")
    files = [weight_dir / n for n in (INDEX_NAME, SINGLE_NAME, SINGLE_NAME + ".zst") if (weight_dir / n).is_file()]
    check_against_model(state, cfg, files[0], f"--model {model}")
    state = promote_like_ours(state)  # the file's key order, so a round trip writes the same index

    source = {"format": "magi1-released", "path": str(weight_dir.resolve()), "variant": held and held.name}
    trainer = {"step": step, "config": {"model": config_to_dict(cfg)}, "source": source}
    # keep_last=0: a forced conversion into an existing run must not prune that run's checkpoints.
    manager = CheckpointManager(out, keep_last=0)
    path = manager.save(step, {"model": state, "trainer": trainer})
    newest = manager.latest()
    if newest is not None and newest != path:
        notes.append(f"{out} also holds {newest.name}, which is newer: ckpt.dir={out} would load that one")
    parameters, nbytes = tensor_totals(state)
    return Summary("released -> ours", weight_dir, path, len(state), parameters, nbytes,
                   sorted(path.iterdir()), notes)


# ---------------------------------------------------------------------------------------------- ours -> released
def find_checkpoint(src: Path) -> Path:
    """A step directory with complete.json, or the newest complete one under a checkpoint root (read-only)."""
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a directory")
    found = find_our_checkpoint(src)
    if found is None:
        raise ConversionError(f"--src {src} is neither a checkpoint (no {MARKER_NAME}) nor a root holding a complete "
                              "step_XXXXXXXX checkpoint")
    return found


def model_config_of(trainer: Mapping[str, Any], path: Path) -> ModelConfig:
    model = trainer.get("config", {}).get("model") if isinstance(trainer, Mapping) else None
    if not isinstance(model, Mapping):
        raise ConversionError(f"{path / 'trainer.json'} has no config['model']: cannot tell which model this is")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise ConversionError(f"{path / 'trainer.json'}: config['model'] has fields our ModelConfig lacks: {unknown}")
    return ModelConfig(**model)


def ours_to_released(src: Path, out: Path, distill: str = "auto", fp8: bool = False, shard_bytes: int = 5 * 10**9,
                     zst: bool = False, force: bool = False) -> Summary:
    ckpt = find_checkpoint(Path(src))
    try:
        cfg = model_config_of(read_our_trainer_state(ckpt), ckpt)
    except (ValueError, FileNotFoundError) as e:  # a corrupt or incomplete checkpoint
        raise ConversionError(str(e)) from e
    is_distill = cfg.distill if distill == "auto" else distill == "true"
    notes = []
    if is_distill != cfg.distill:
        notes.append(f"--distill {distill} overrides the checkpoint's model.distill={cfg.distill}")
    if fp8 and not is_distill:
        raise ConversionError("--fp8 needs a distilled model: MAGI-1 ships fp8 only as inference_weight.fp8.distill "
                              "and its fp8 runs force cfg_number=1, which only distilled models support. "
                              f"{ckpt} has model.distill=false (--distill true overrides, if you know better)")
    zstd = shutil.which("zstd") if zst else None
    if zst and zstd is None:
        raise ConversionError("--zst needs the zstd command-line tool (e.g. apt-get install zstd)")
    target = Path(out) / Variant(distill=is_distill, fp8=fp8).dirname
    guard_output(target, force, allowed=re.compile(r"^model.*\.safetensors"))

    # Only now: everything cheap to refuse has been checked.
    try:
        state = read_our_model_state(ckpt)
    except (ValueError, FileNotFoundError) as e:
        raise ConversionError(str(e)) from e
    source = ckpt / ("model" if is_distributed_checkpoint(ckpt) else MODEL_FILE)  # the trainer's shards / model-only
    check_against_model(state, cfg, source, "the checkpoint's own config")
    released = cast_like_released(state)
    if fp8:
        from magi_train.model.fp8 import quantize_dit_state_dict  # only --fp8 needs the fp8 linears

        # Quantise from the checkpoint's own precision (fp32 training weights round once, straight to fp8).
        quantized = quantize_dit_state_dict(state, cfg.num_layers)
        # Entries passed through unchanged are the very tensors of `state`; those take the released dtype.
        quantized = {k: released[k] if t is state.get(k) else t for k, t in quantized.items()}
        released = in_model_order(quantized, list(state))
        notes.append("fp8 scales are uncalibrated defaults (activations assumed within +-448); "
                     "see magi_train.model.fp8.calibrate_input_absmax for a calibrated export")

    target.parent.mkdir(parents=True, exist_ok=True)
    if zstd is None:
        save_magi1_checkpoint(released, target, shard_bytes)  # atomic; refuses to replace foreign files
    else:
        write_compressed(released, target, shard_bytes, zstd)
    parameters, nbytes = tensor_totals(released)
    return Summary("ours -> released", ckpt, target, len(released), parameters, nbytes, sorted(target.iterdir()), notes)


def write_compressed(state: Mapping[str, torch.Tensor], target: Path, shard_bytes: int, zstd: str) -> None:
    """Shards compressed to X.zst (the index keeps naming X, as released), installed in one rename."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging_", dir=target.parent))
    try:
        staged = staging / target.name
        save_magi1_checkpoint(dict(state), staged, shard_bytes)
        for shard in sorted(staged.glob("*.safetensors")):
            mode = shard.stat().st_mode & 0o777
            result = subprocess.run([zstd, "-q", "--rm", "-T0", str(shard)], capture_output=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"zstd failed on {shard}: {result.stderr.decode(errors='replace').strip()}")
            compressed = shard.with_name(shard.name + ".zst")
            compressed.chmod(mode)  # zstd leaves 0600; keep the shard's own permissions
            with open(compressed, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(staged)
        replace_dir(staged, target, aside_prefix=f".{target.name}.old_")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert MAGI-1 DiT weights between the released layout (inference_weight*/ safetensors) "
                    "and our trainer's checkpoints (step_XXXXXXXX/ with complete.json).",
        epilog="Both directions check every key and shape against the model, print a summary, write atomically "
               "and refuse a non-empty output unless --force.")
    sub = parser.add_subparsers(dest="command", required=True)

    ours = sub.add_parser(
        "to-ours", help="released weights -> a checkpoint of our trainer",
        description="Read released weights and write CheckpointManager(OUT).save(STEP, ...): model.safetensors "
                    "(stored dtypes, fp32 promotion list applied) and trainer.json (step, model config, source). "
                    + NO_OPTIMIZER_NOTE + ".")
    ours.add_argument("--src", type=Path, required=True,
                      help="a released model directory (holding inference_weight[.fp8][.distill]/) "
                           "or a weight directory")
    ours.add_argument("--model", required=True,
                      help="a preset name from conf/model/ (tiny, magi1_4.5b, magi1_24b_distill, ...) "
                           "or a released config.json")
    ours.add_argument("--out", type=Path, required=True, help="checkpoint root to write step_XXXXXXXX/ into")
    ours.add_argument("--step", type=int, default=0, help="step number of the checkpoint (default 0)")
    ours.add_argument("--variant", choices=sorted(VARIANTS), help="which weight directory, when --src holds several")
    ours.add_argument("--dequantize", action="store_true",
                      help="accept an fp8 checkpoint: turn its fp8 linears into bf16 weights (lossy)")
    ours.add_argument("--force", action="store_true",
                      help="write into a non-empty --out (other checkpoints there are kept; not while a trainer "
                           "is saving into it)")

    rel = sub.add_parser(
        "to-released", help="a checkpoint of our trainer -> released weights",
        description="Write OUT/inference_weight[.fp8][.distill]/ in the released layout: fp32 for x_embedder, "
                    "t_embedder, final_linear and rope.bands, bf16 for the rest, whatever the training dtype.")
    rel.add_argument("--src", type=Path, required=True,
                     help="a checkpoint directory (with complete.json) or a checkpoint root (its newest complete one)")
    rel.add_argument("--out", type=Path, required=True, help="model directory to create the weight directory in")
    rel.add_argument("--distill", choices=("auto", "true", "false"), default="auto",
                     help="name the weights as distilled (.distill); auto = the checkpoint's model.distill")
    rel.add_argument("--fp8", action="store_true",
                     help="quantise layers 1..L-2 to fp8 as in inference_weight.fp8.distill (distilled models only)")
    rel.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"),
                     help="largest shard, e.g. 5GB (default), 500MB, 2GiB")
    rel.add_argument("--zst", action="store_true", help="compress each shard with the zstd CLI (X.safetensors.zst)")
    rel.add_argument("--force", action="store_true", help="replace an existing non-empty weight directory")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "to-ours":
            if args.step < 0:
                parser.error(f"--step must be >= 0, got {args.step}")
            summary = released_to_ours(args.src, args.model, args.out, args.step, args.variant, args.dequantize,
                                       args.force)
        else:
            summary = ours_to_released(args.src, args.out, args.distill, args.fp8, args.shard_size, args.zst,
                                       args.force)
    except (ConversionError, OSError) as e:  # OSError: a missing path, a full disk (the message says which)
        print(f"convert_checkpoint.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
