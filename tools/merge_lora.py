#!/usr/bin/env python
"""Fold LoRA adapters into a model's weights and write the result in the released layout.

    python tools/merge_lora.py --base ckpt/magi/4.5B --lora runs/style/adapter --out ckpt/magi/4.5B_style
    magi-merge-lora --base ckpt/magi/4.5B_distill --variant distill --lora a:0.8 --lora b:0.5 --out merged

`--base`: a released model directory (inference_weight[.distill]/ inside), one weight directory, or a checkpoint
of our trainer. `--lora PATH[:SCALE]` (repeatable): an adapter directory (magi_train/checkpoint/adapters.py) and
its multiplier (default 1). Every adapted weight becomes

    W + sum over adapters of  scale * alpha / rank * B A

summed in fp32 and rounded once to W's dtype (as `merge_lora` does on a model), so the merged model generates
what the base with the same adapters unmerged (`lora=[{path, scale}]`) does, to rounding. `--out` gets
`inference_weight[.distill]/` (sharded safetensors + index, magi_train/checkpoint/magi1.py) and
`merged_lora.json` (base, adapters, scales, sha256 of each adapter file); a released `config.json` of the base is
copied beside them, so `MagiPipeline.from_pretrained(OUT)` / `generate ckpt.dir=OUT` read the same settings.

fp8 bases are refused: their linears hold e4m3 weights with per-tensor / smoothing scales, and adding B A to
them would mean requantising with new scales (not the released recipe). Merge into the bf16 base or distill
weights, and quantise the result if fp8 is wanted.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

try:
    import magi_train  # noqa: F401  (installed editable in the venv)
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")
RECORD_NAME = "merged_lora.json"


def parse_lora(text: str) -> Tuple[Path, float]:
    """PATH[:SCALE] -> (path, scale); a tail after the last ':' that is not a number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def read_base(base: Path, variant: Optional[str]):
    """(state dict, Variant, description) of the base weights."""
    from magi_train.checkpoint.manager import find_checkpoint
    from magi_train.checkpoint.magi1 import load_magi1_state_dict
    from magi_train.checkpoint.variants import Variant, resolve_weight_dir
    from magi_train.checkpoint.weights import read_our_model_state, read_our_trainer_state

    if not base.exists():
        raise FileNotFoundError(f"--base {base} does not exist")
    wanted = None if variant is None else Variant.from_name(variant)
    if wanted is not None and wanted.fp8:
        raise ValueError(_fp8_refusal(f"--variant {variant}"))
    ours = find_checkpoint(base)
    if ours is not None:
        stored = read_our_trainer_state(ours).get("config", {}).get("model", {})
        held = Variant(distill=bool(stored.get("distill")))
        if wanted is not None and wanted != held:
            raise ValueError(f"--base {base} is a checkpoint of a {'distilled' if held.distill else 'base'} model "
                             f"(model.distill={held.distill}); --variant {variant} does not fit it")
        return read_our_model_state(ours), held, f"checkpoint {ours}"
    weight_dir, held = resolve_weight_dir(base, wanted, where=f"--base {base}", choose=lambda v: f"--variant {v.name}")
    if held is None:
        if wanted is None:
            raise ValueError(f"--base {base}: the directory's name does not say which variant it holds; pass "
                             "--variant base|distill")
        held = wanted
    if held.fp8:
        raise ValueError(_fp8_refusal(f"--base {weight_dir}"))
    state = load_magi1_state_dict(weight_dir)
    return state, held, f"released weights {weight_dir}"


def _fp8_refusal(what: str) -> str:
    return (f"{what}: fp8 weights cannot take a LoRA merge (their e4m3 weights and scales would have to be "
            "requantised); merge into the bf16 base or distill weights (--variant base|distill) and quantise "
            "the merged model afterwards")


def base_identity(state: Dict, variant) -> Dict:
    layers = {int(m.group(1)) for k in state if (m := re.match(r"videodit_blocks\.layers\.(\d+)\.", k))}
    if "x_embedder.weight" not in state or not layers:
        raise ValueError("the base does not look like MAGI-1 DiT weights (no x_embedder.weight / videodit_blocks)")
    return {"num_layers": max(layers) + 1, "hidden_size": int(state["x_embedder.weight"].shape[0]),
            "distill": variant.distill}


def merge_into(state: Dict, adapters: List[Tuple[object, float]]) -> List[str]:
    """Add every adapter's scaled B A to `state`'s weights in place (fp32 sum, one rounding); returns the keys."""
    import torch

    deltas: Dict[str, torch.Tensor] = {}
    for adapter, scale in adapters:
        cfg = adapter.config
        s = scale * cfg["alpha"] / cfg["rank"]
        for module in adapter.modules:
            key = f"{module}.weight"
            a = adapter.tensors[f"{module}.lora_A.weight"].float()
            b = adapter.tensors[f"{module}.lora_B.weight"].float()
            if key not in state:
                raise ValueError(f"adapter {adapter.path}: the base has no weight {key!r}")
            weight = state[key]
            if str(weight.dtype).removeprefix("torch.") in FP8_DTYPES:
                raise ValueError(_fp8_refusal(f"weight {key}"))
            if tuple(weight.shape) != (b.shape[0], a.shape[1]):
                raise ValueError(f"adapter {adapter.path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                                 f"which do not fit the base weight {key} {tuple(weight.shape)}")
            delta = (b @ a) * s
            deltas[key] = delta if key not in deltas else deltas[key] + delta
    for key, delta in deltas.items():
        state[key] = (state[key].float() + delta).to(state[key].dtype)
    return list(deltas)


def merge(base: Path, loras: List[Tuple[Path, float]], out: Path, variant: Optional[str] = None,
          overwrite: bool = False) -> Path:
    """Write the merged model to `out` (see the module docstring); returns its weight directory."""
    from magi_infer.resolve import find_released_config
    from magi_train.checkpoint.adapters import adapter_digest, read_adapter
    from magi_train.checkpoint.atomic import replace_text
    from magi_train.checkpoint.magi1 import save_magi1_checkpoint

    if not loras:
        raise ValueError("no --lora given: nothing to merge")
    state, held, source = read_base(base, variant)
    identity = base_identity(state, held)
    adapters = [(read_adapter(path, base_model=identity), scale) for path, scale in loras]
    target = out / held.dirname
    if target.exists() and not overwrite:
        raise FileExistsError(f"--out {out}: {target} exists; pass --overwrite to replace it")
    merged = merge_into(state, adapters)
    save_magi1_checkpoint(state, target)
    config = find_released_config(base) if base.is_dir() else None
    if config is not None and config.resolve() != (out / "config.json").resolve():
        shutil.copyfile(config, out / "config.json")
    record = {"base": str(base.resolve()), "source": source, "variant": held.name,
              "adapters": [{"path": str(a.path.resolve()), "scale": scale, "rank": a.config["rank"],
                            "alpha": a.config["alpha"], "sha256": adapter_digest(a.path)} for a, scale in adapters],
              "merged_weights": len(merged), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    replace_text(out / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    return target


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, metavar="DIR")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", type=parse_lora,
                        help="an adapter directory and its multiplier (repeatable)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--variant", choices=("base", "distill"),
                        help="which weights of --base (default: the only ones it holds)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing merged weight directory")
    args = parser.parse_args(argv)
    try:
        target = merge(args.base, args.lora, args.out, args.variant, args.overwrite)
    except (OSError, ValueError, KeyError) as e:
        print(f"merge_lora.py: error: {e}", file=sys.stderr)
        return 1
    names = ", ".join(f"{p} x {s:g}" for p, s in args.lora)
    print(f"wrote {target}: {args.base} + {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
