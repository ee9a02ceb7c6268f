"""fp8 training without Transformer Engine: torchao's float8 linears (`trainer.fp8_backend=torchao`).

`trainer.fp8_recipe` names the recipe and `trainer.fp8_backend` the implementation (`resolve_fp8_backend`):
- te: Transformer Engine's fp8 autocast over its own linears (model.layer_spec=te; magi_train/model/te_spec.py).
- torchao: the local spec's linears become torchao `Float8Linear`s (dynamic scaling, no context manager): recipes
  tensorwise | rowwise | rowwise_with_gw_hp (torchao's `Float8LinearConfig.from_recipe_name`).
- auto: te with model.layer_spec=te, torchao otherwise: the torch-native fp8 path where TE's layers are absent.

Which linears: the column/row linears of each layer (q, qx, k, v, fc1, fc2), the bulk of the FLOPs. Left in
their precision, as the released model computes them: `linear_proj` (fp32 compute from bf16 weights,
`compute_dtype`), the caption KV projection (its 8 row-block products reproduce the released rounding), the
embedders, the adaLN projections and the final linear; a linear whose sizes are not multiples of 16 (fp8 GEMMs,
`torch._scaled_mm`, need them) stays too.

How: our linears are not `nn.Linear`s (they run megatron's linear function), so each chosen one is first
replaced by an `nn.Linear` that holds the same `weight` Parameter (no bias, like ours), and torchao's
`convert_to_float8_training` swaps exactly those (its `module_filter_fn`) for `Float8Linear`s holding that
Parameter. Names and state-dict keys are unchanged (checked: a torchao that added state would fail loudly here),
so checkpoints load into either path, and the conversion runs on the meta device before the weights are drawn
by name. Tensor parallel is refused: torchao's TP runs through DTensor, our TP linears are megatron-style.

torchao is optional (the `gpu` extra): imported only by `convert_dit_to_float8`; its fp8 GEMMs need CUDA
compute capability 8.9+ (Ada, Hopper, Blackwell), which `check_float8_device` says before anything is built.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

FP8_BACKENDS = ("auto", "te", "torchao")
TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# The slots converted, relative to a TransformerLayer.
FLOAT8_SLOTS = ("self_attention.linear_qkv.q", "self_attention.linear_qkv.qx", "self_attention.linear_qkv.k",
                "self_attention.linear_qkv.v", "mlp.linear_fc1", "mlp.linear_fc2")
# torch._scaled_mm needs both matrix sizes divisible by 16.
FP8_GEMM_MULTIPLE = 16
MIN_CAPABILITY = (8, 9)


def resolve_fp8_backend(fp8_backend: str, fp8_recipe: str, layer_spec: str) -> str:
    """"none" (trainer.fp8_recipe=none), "te" or "torchao": what runs the recipe (see the module docstring)."""
    if fp8_backend not in FP8_BACKENDS:
        raise ValueError(f"trainer.fp8_backend={fp8_backend!r} is not one of {list(FP8_BACKENDS)}")
    if fp8_recipe == "none":
        return "none"
    if fp8_backend == "auto":
        return "te" if str(layer_spec) == "te" else "torchao"
    return fp8_backend


def fp8_config_problems(fp8_backend: str, fp8_recipe: str, layer_spec: str, tp: int) -> List[str]:
    """What is wrong with this fp8 combination, each naming its config fields (validate.py reports them)."""
    if fp8_backend not in FP8_BACKENDS:
        return []  # validate.py reports the unknown name itself
    backend = resolve_fp8_backend(fp8_backend, fp8_recipe, layer_spec)
    spec = str(layer_spec)
    if backend == "te" and spec != "te":
        return [f"trainer.fp8_recipe ({fp8_recipe!r}) needs model.layer_spec=te (Transformer Engine, GPU) with "
                f"trainer.fp8_backend=te"]
    if backend != "torchao":
        return []
    problems = []
    if fp8_recipe not in TORCHAO_RECIPES:
        problems.append(f"trainer.fp8_recipe ({fp8_recipe!r}) needs model.layer_spec=te (Transformer Engine, GPU): "
                        f"torchao's float8 (trainer.fp8_backend={fp8_backend}, model.layer_spec={spec}) runs "
                        f"{', '.join(TORCHAO_RECIPES)}")
    if spec != "local":
        problems.append(f"trainer.fp8_backend=torchao converts the local spec's linears: model.layer_spec={spec} "
                        f"must be local")
    if tp > 1:
        problems.append(f"trainer.fp8_backend=torchao runs without tensor parallel (parallel.tp={tp} must be 1)")
    return problems


def check_float8_device(device) -> None:
    """torchao's fp8 GEMMs run on CUDA GPUs of compute capability 8.9 or newer; an error naming the fields else."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"trainer.fp8_backend=torchao (trainer.fp8_recipe) needs a CUDA GPU; this run is on "
                           f"{device.type}. Use trainer.fp8_recipe=none here.")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        raise RuntimeError(f"trainer.fp8_backend=torchao needs compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                           f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")


def _import_torchao():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except Exception as e:  # a torchao built for another torch raises more than ImportError
        raise RuntimeError(f"trainer.fp8_backend=torchao needs torchao (`pip install torchao`, the project's gpu "
                           f"extra), which does not import here ({type(e).__name__}: {e}). Use "
                           f"trainer.fp8_recipe=none, or model.layer_spec=te with Transformer Engine.") from e
    return Float8LinearConfig, convert_to_float8_training


def float8_config(recipe: str):
    """torchao's `Float8LinearConfig` of `trainer.fp8_recipe`."""
    if recipe not in TORCHAO_RECIPES:
        raise ValueError(f"trainer.fp8_recipe={recipe!r} is not a torchao recipe ({list(TORCHAO_RECIPES)})")
    config_class, _ = _import_torchao()
    from_recipe_name = getattr(config_class, "from_recipe_name", None)
    if from_recipe_name is None:
        import torchao

        raise RuntimeError(f"trainer.fp8_recipe={recipe!r} needs torchao >= 0.9 (Float8LinearConfig.from_recipe_name); "
                           f"found {getattr(torchao, '__version__', 'unknown')}")
    return from_recipe_name(recipe)


def _eligible(linear: nn.Module) -> Optional[str]:
    """Why `linear` stays as it is, or None when it converts."""
    from magi_train.model.linear import CaptionKVLinear, Linear

    if type(linear) is not Linear or isinstance(linear, CaptionKVLinear):
        group = getattr(linear, "tp_group", None)
        if group is not None and group.size() > 1:
            raise NotImplementedError("trainer.fp8_backend=torchao runs without tensor parallel (parallel.tp must be 1)")
        return f"{type(linear).__name__} is not the local spec's Linear"
    if linear.compute_dtype is not None:
        return f"computes in {linear.compute_dtype}"
    out_features, in_features = linear.weight.shape
    if out_features % FP8_GEMM_MULTIPLE or in_features % FP8_GEMM_MULTIPLE:
        return f"sizes {in_features} x {out_features} are not multiples of {FP8_GEMM_MULTIPLE}"
    return None


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def convert_dit_to_float8(model: nn.Module, recipe: str) -> List[str]:
    """Swap the eligible linears of every layer of `model` (a VideoDiT or a pipeline stage) for torchao
    `Float8Linear`s of `trainer.fp8_recipe=recipe`, in place; returns the converted module names."""
    config = float8_config(recipe)
    _, convert_to_float8_training = _import_torchao()
    keys_before = list(model.state_dict(keep_vars=True))
    chosen = []
    for layer_name, layer in model.videodit_blocks.layers.named_children():
        for slot in FLOAT8_SLOTS:
            linear = layer.get_submodule(slot)
            if _eligible(linear) is not None:
                continue
            out_features, in_features = linear.weight.shape
            with torch.device("meta"):  # a shell: its own weight is replaced by ours at once
                shell = nn.Linear(in_features, out_features, bias=False, dtype=linear.weight.dtype)
            shell.weight = linear.weight
            _set(layer, slot, shell)
            chosen.append(f"videodit_blocks.layers.{layer_name}.{slot}")
    if not chosen:
        raise RuntimeError(f"trainer.fp8_backend=torchao found no linear to convert (the layers' q/qx/k/v/fc1/fc2 of the "
                           f"local spec, sizes multiples of {FP8_GEMM_MULTIPLE})")
    names = set(chosen)
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn in names, config=config)
    left = [name for name in chosen if type(model.get_submodule(name)) is nn.Linear]
    if left:
        raise RuntimeError(f"torchao's convert_to_float8_training left {left} unconverted")
    if list(model.state_dict(keep_vars=True)) != keys_before:
        raise RuntimeError("torchao's Float8Linear changed the model's state-dict keys; checkpoints would not load "
                           "into the local spec (this torchao version is not supported)")
    return chosen


def float8_linears(model: nn.Module) -> List[str]:
    """Names of the modules that run torchao's float8 (for logs and tests)."""
    return [name for name, module in model.named_modules() if type(module).__name__ == "Float8Linear"]
