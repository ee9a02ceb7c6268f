"""The DiT's state dict is the released MAGI-1 checkpoint layout (model/README.md §1.8), and its run-time dtypes follow the
released fp32 promotion list (model/README.md §1.9).

The expected layout is written here from the released conventions as a function of the hyper-parameters; it is cross-checked
against literal rows of the released table, so a slip in the formula cannot hide a slip in the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import hydra
import pytest
import torch

from magi_train.checkpoint.magi1 import load_magi1_state_dict
from magi_train.config import register_configs, to_train_config
from magi_train.config.released import load_released_config
from magi_train.config.paths import config_dir
from magi_train.config.schema import ModelConfig
from tests.configs import tiny_model
from magi_train.model.dit import build_dit, module_dtype_plan

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = config_dir()
GELU = REPO / "tests" / "fixtures" / "magi1_gelu"

Shape = Tuple[int, ...]


def expected_layout(L: int, H: int, F: int, nq: int, nkv: int, hd: int, Dc: int, C_in: int, C_out: int, gated: bool,
                    caption_channels: int = 4096, caption_length: int = 800, patch: int = 2, t_patch: int = 1
                    ) -> Dict[str, Shape]:
    """Every key of the released checkpoint and its shape (model/README.md §1.8)."""
    Cc = caption_channels
    top = {
        "x_embedder.weight": (H, C_in, t_patch, patch, patch),
        "t_embedder.mlp.0.weight": (Dc, 256),
        "t_embedder.mlp.0.bias": (Dc,),
        "t_embedder.mlp.2.weight": (Dc, Dc),
        "t_embedder.mlp.2.bias": (Dc,),
        "y_embedder.y_proj_xattn.0.weight": (H, Cc),
        "y_embedder.y_proj_xattn.0.bias": (H,),
        "y_embedder.y_proj_adaln.0.weight": (Dc, Cc),
        "y_embedder.y_proj_adaln.0.bias": (Dc,),
        "y_embedder.null_caption_embedding": (caption_length, Cc),
        "rope.bands": (hd // 8,),
        "videodit_blocks.final_layernorm.weight": (H,),
        "videodit_blocks.final_layernorm.bias": (H,),
        "final_linear.linear.weight": (t_patch * patch * patch * C_out, H),
    }
    per_layer = {
        "ada_modulate_layer.proj.0.weight": (2 * H, Dc),
        "ada_modulate_layer.proj.0.bias": (2 * H,),
        "self_attention.linear_qkv.layer_norm.weight": (H,),
        "self_attention.linear_qkv.layer_norm.bias": (H,),
        "self_attention.linear_qkv.q.weight": (nq * hd, H),
        "self_attention.linear_qkv.qx.weight": (nq * hd, H),
        "self_attention.linear_qkv.k.weight": (nkv * hd, H),
        "self_attention.linear_qkv.v.weight": (nkv * hd, H),
        "self_attention.linear_kv_xattn.weight": (2 * nkv * hd, H),
        "self_attention.linear_proj.weight": (H, 2 * nq * hd),
        "self_attn_post_norm.weight": (H,),
        "self_attn_post_norm.bias": (H,),
        "mlp.layer_norm.weight": (H,),
        "mlp.layer_norm.bias": (H,),
        "mlp.linear_fc1.weight": ((2 if gated else 1) * F, H),
        "mlp.linear_fc2.weight": (H, F),
        "mlp_post_norm.weight": (H,),
        "mlp_post_norm.bias": (H,),
    }
    for norm in ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn"):
        per_layer[f"self_attention.{norm}.weight"] = (hd,)
        per_layer[f"self_attention.{norm}.bias"] = (hd,)
    layout = dict(top)
    for i in range(L):
        layout.update({f"videodit_blocks.layers.{i}.{k}": v for k, v in per_layer.items()})
    return layout


def layout_of(cfg: ModelConfig) -> Dict[str, Shape]:
    return expected_layout(
        L=cfg.num_layers, H=cfg.hidden_size, F=cfg.ffn_hidden_size, nq=cfg.num_attention_heads,
        nkv=cfg.num_query_groups, hd=cfg.kv_channels, Dc=int(cfg.hidden_size * cfg.cond_hidden_ratio),
        C_in=cfg.in_channels, C_out=cfg.out_channels, gated=cfg.gated_linear_unit,
        caption_channels=cfg.caption_channels, caption_length=cfg.caption_max_length,
        patch=cfg.patch_size, t_patch=cfg.t_patch_size,
    )


# Released hyper-parameters (model/README.md §1.1) and literal rows of the released §1.8 table (magi_train/model/README.md).
RELEASED = {
    "magi1_4.5b": dict(L=34, H=3072, F=12288, nq=24, nkv=8, hd=128, Dc=768, C_in=16, C_out=16, gated=False),
    "magi1_24b": dict(L=48, H=6144, F=16384, nq=48, nkv=8, hd=128, Dc=1536, C_in=32, C_out=32, gated=True),
}
SPEC_TABLE_ROWS = {
    "magi1_4.5b": {
        "x_embedder.weight": (3072, 16, 1, 2, 2),
        "t_embedder.mlp.0.weight": (768, 256),
        "t_embedder.mlp.2.weight": (768, 768),
        "y_embedder.y_proj_xattn.0.weight": (3072, 4096),
        "y_embedder.y_proj_adaln.0.weight": (768, 4096),
        "y_embedder.null_caption_embedding": (800, 4096),
        "rope.bands": (16,),
        "final_linear.linear.weight": (64, 3072),
        "videodit_blocks.layers.33.ada_modulate_layer.proj.0.weight": (6144, 768),
        "videodit_blocks.layers.33.self_attention.linear_qkv.q.weight": (3072, 3072),
        "videodit_blocks.layers.33.self_attention.linear_qkv.k.weight": (1024, 3072),
        "videodit_blocks.layers.33.self_attention.linear_kv_xattn.weight": (2048, 3072),
        "videodit_blocks.layers.33.self_attention.linear_proj.weight": (3072, 6144),
        "videodit_blocks.layers.33.self_attention.k_layernorm_xattn.bias": (128,),
        "videodit_blocks.layers.33.mlp.linear_fc1.weight": (12288, 3072),
        "videodit_blocks.layers.33.mlp.linear_fc2.weight": (3072, 12288),
    },
    "magi1_24b": {
        "x_embedder.weight": (6144, 32, 1, 2, 2),
        "t_embedder.mlp.0.weight": (1536, 256),
        "t_embedder.mlp.2.weight": (1536, 1536),
        "y_embedder.y_proj_xattn.0.weight": (6144, 4096),
        "y_embedder.y_proj_adaln.0.weight": (1536, 4096),
        "y_embedder.null_caption_embedding": (800, 4096),
        "rope.bands": (16,),
        "final_linear.linear.weight": (128, 6144),
        "videodit_blocks.layers.47.ada_modulate_layer.proj.0.weight": (12288, 1536),
        "videodit_blocks.layers.47.self_attention.linear_qkv.qx.weight": (6144, 6144),
        "videodit_blocks.layers.47.self_attention.linear_qkv.v.weight": (1024, 6144),
        "videodit_blocks.layers.47.self_attention.linear_kv_xattn.weight": (2048, 6144),
        "videodit_blocks.layers.47.self_attention.linear_proj.weight": (6144, 12288),
        "videodit_blocks.layers.47.self_attention.q_layernorm.weight": (128,),
        "videodit_blocks.layers.47.mlp.linear_fc1.weight": (32768, 6144),
        "videodit_blocks.layers.47.mlp.linear_fc2.weight": (6144, 16384),
    },
}
# Spec §1.8: "about 4.44 B" and "about 23.9 B" parameters.
APPROX_PARAMS = {"magi1_4.5b": 4.44e9, "magi1_24b": 23.9e9}


def compose_model(preset: str) -> ModelConfig:
    register_configs()
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra.compose("config", overrides=[f"model={preset}"])
    return to_train_config(cfg).model


@pytest.fixture(scope="module", params=sorted(RELEASED))
def released_meta(request):
    cfg = compose_model(request.param)
    return request.param, cfg, build_dit(cfg, tp_group=None, device="meta")


def shapes(state_dict) -> Dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def diff_report(got: Dict[str, Shape], want: Dict[str, Shape]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(f"{k}: {got[k]} != {want[k]}" for k in set(got) & set(want) if got[k] != want[k])
    return f"missing={missing[:8]} extra={extra[:8]} wrong_shape={wrong[:8]}"


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_expected_layout_formula_agrees_with_spec_table(preset):
    layout = expected_layout(**RELEASED[preset])
    for key, shape in SPEC_TABLE_ROWS[preset].items():
        assert layout[key] == shape, key


def test_presets_carry_the_released_hyper_parameters(released_meta):
    preset, cfg, _ = released_meta
    r = RELEASED[preset]
    got = dict(L=cfg.num_layers, H=cfg.hidden_size, F=cfg.ffn_hidden_size, nq=cfg.num_attention_heads,
               nkv=cfg.num_query_groups, hd=cfg.kv_channels, Dc=int(cfg.hidden_size * cfg.cond_hidden_ratio),
               C_in=cfg.in_channels, C_out=cfg.out_channels, gated=cfg.gated_linear_unit)
    assert got == r
    assert cfg.caption_channels == 4096 and cfg.caption_max_length == 800
    assert cfg.params_dtype == "bfloat16"


def test_released_presets_state_dict_keys_and_shapes_match_spec_table(released_meta):
    preset, _, model = released_meta
    sd = model.state_dict()
    assert not [k for k in sd if "_extra_state" in k], "megatron _extra_state entries leak into the state dict"
    got, want = shapes(sd), expected_layout(**RELEASED[preset])
    assert got == want, diff_report(got, want)
    # No buffers or other state beyond the parameters: the checkpoint is exactly the parameter set.
    assert set(sd) == {n for n, _ in model.named_parameters()}


def test_released_presets_parameter_counts(released_meta):
    preset, _, model = released_meta
    n = sum(p.numel() for p in model.parameters())
    from_table = sum(int(torch.Size(s).numel()) for s in expected_layout(**RELEASED[preset]).values())
    assert n == from_table
    assert abs(n - APPROX_PARAMS[preset]) / APPROX_PARAMS[preset] < 0.01, n
    # The exact counts of the released layouts (sum of the products of the §1.8 shapes).
    assert n == {"magi1_4.5b": 4_459_898_128, "magi1_24b": 23_899_281_936}[preset]


def test_materialised_model_has_no_extra_state_and_matches_layout():
    cfg = tiny_model(num_attention_heads=2, num_query_groups=1, kv_channels=128, caption_channels=32)
    model = build_dit(cfg, tp_group=None)
    sd = model.state_dict()
    assert not [k for k in sd if "_extra_state" in k]
    assert shapes(sd) == layout_of(cfg), diff_report(shapes(sd), layout_of(cfg))


# ------------------------------------------------------------------ the conformance model's checkpoint and dtypes

@pytest.fixture(scope="module")
def gelu_cfg() -> ModelConfig:
    return load_released_config(GELU / "config.json")


@pytest.fixture(scope="module")
def runtime_dtypes() -> Dict[str, str]:
    return json.loads((GELU / "forward.json").read_text())["runtime_param_dtypes"]


def test_released_checkpoint_file_matches_expected_layout(gelu_cfg):
    sd = load_magi1_state_dict(GELU / "inference_weight")
    want = layout_of(gelu_cfg)
    assert shapes(sd) == want, diff_report(shapes(sd), want)


def test_dtype_plan_matches_released_runtime_dtypes(gelu_cfg, runtime_dtypes):
    model = build_dit(gelu_cfg, tp_group=None, device="meta")
    plan = {k: str(v) for k, v in module_dtype_plan(model).items()}
    assert plan == runtime_dtypes


def test_built_and_loaded_parameter_dtypes_match_released_runtime_dtypes(gelu_cfg, runtime_dtypes):
    model = build_dit(gelu_cfg, tp_group=None)
    built = {n: str(p.dtype) for n, p in model.named_parameters()}
    assert built == runtime_dtypes
    # Loading keeps the model's dtypes even where the file stores another one (y_embedder is bf16 on disk,
    # fp32 at run time after the released promotion).
    model.load_state_dict(load_magi1_state_dict(GELU / "inference_weight"), strict=True)
    loaded = {n: str(p.dtype) for n, p in model.named_parameters()}
    assert loaded == runtime_dtypes
