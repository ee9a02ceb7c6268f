"""tools/convert_checkpoint.py: released MAGI-1 weights <-> our trainer checkpoints, both ways."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from magi_train.checkpoint.magi1 import INDEX_NAME, load_magi1_state_dict
from magi_train.checkpoint.manager import CheckpointManager
from magi_train.config.released import load_released_config
from magi_train.config.schema import ModelConfig, TrainConfig
from magi_train.model.dit import build_dit

REPO = Path(__file__).resolve().parents[2]
TOOL_PATH = REPO / "tools" / "convert_checkpoint.py"
GELU = REPO / "tests" / "fixtures" / "magi1_gelu"
FIXTURE_WEIGHTS = GELU / "inference_weight"
GELU_CONFIG = GELU / "config.json"
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd CLI is not installed")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", TOOL_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny(tool) -> ModelConfig:
    return tool.load_model_config("tiny")


@pytest.fixture(scope="module")
def fixture_state() -> dict[str, torch.Tensor]:
    return load_magi1_state_dict(FIXTURE_WEIGHTS)


@pytest.fixture(scope="module")
def fixture_ours(tool, tmp_path_factory) -> Path:
    """The fixture's weights as our checkpoint (a root), shared by the tests that only export it."""
    root = tmp_path_factory.mktemp("fixture_ours")
    tool.released_to_ours(FIXTURE_WEIGHTS, str(GELU_CONFIG), root, force=True)
    return root


# ------------------------------------------------------------------ helpers
def raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(raw_bits(got[key]), raw_bits(tensor)), key


def released_dtype(key: str) -> torch.dtype:
    # The released files (and the fixture): fp32 for these, bf16 for everything else.
    fp32 = key.startswith(("x_embedder.", "t_embedder.", "final_linear.")) or key == "rope.bands"
    return torch.float32 if fp32 else torch.bfloat16


def promoted_at_load(key: str) -> bool:
    """magi_train/model/README.md §1.9, the released `_high_precision_promoter`: the modules the released loader casts to fp32."""
    parts = key.split(".")
    always = {"x_embedder", "y_embedder", "t_embedder", "final_linear", "rope", "q_layernorm", "k_layernorm",
              "self_attn_post_norm", "mlp_post_norm", "final_layernorm"}
    return bool(always & set(parts))  # q_layernorm_xattn / k_layernorm_xattn are other names: not promoted


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 tensors of every key of the model, full mantissas (as after fp32 training)."""
    gen = torch.Generator().manual_seed(seed)
    meta = build_dit(cfg, device="meta").state_dict()
    return {k: 0.05 * torch.randn(t.shape, generator=gen) for k, t in meta.items()}


def save_ours(root: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], step: int = 3) -> Path:
    """A checkpoint as the trainer writes it (Trainer.state(): model, optimizer, trainer with the full config)."""
    trainer = {"step": step, "config": asdict(TrainConfig(model=cfg))}
    optimizer = {"state": {}, "param_groups": []}
    return CheckpointManager(root, keep_last=0).save(step, {"model": state, "optimizer": optimizer, "trainer": trainer})


def fp8_layout(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """magi_train/model/README.md §8: the layout a released fp8 checkpoint has, derived from the bf16 one."""
    layout = {k: (tuple(t.shape), released_dtype(k)) for k, t in state.items()}
    per_tensor = ["self_attention.linear_qkv.q", "self_attention.linear_qkv.qx", "self_attention.linear_qkv.k",
                  "self_attention.linear_qkv.v", "mlp.linear_fc1"]
    per_channel = ["self_attention.linear_proj", "mlp.linear_fc2"]
    for i in range(1, num_layers - 1):
        for name in per_tensor + per_channel:
            p = f"videodit_blocks.layers.{i}.{name}"
            out_f, in_f = state[f"{p}.weight"].shape
            layout[f"{p}.weight"] = ((1, out_f, in_f), torch.float8_e4m3fn)
            layout[f"{p}.weight_scale"] = ((1,), torch.float32)
            if name in per_tensor:
                layout[f"{p}.input_scale"] = ((in_f,), torch.float32)
            else:
                layout[f"{p}.input_scale"] = ((1,), torch.float32)
                layout[f"{p}.smooth_scale"] = ((1, in_f), torch.float32)
    return layout


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


# ------------------------------------------------------------------ released -> ours -> released
def test_fixture_round_trip_is_bitwise(tool, fixture_state, tmp_path, single_process_group):
    summary = tool.released_to_ours(GELU, str(GELU_CONFIG), tmp_path / "ours")  # the model dir: one variant inside
    assert summary.source == FIXTURE_WEIGHTS and summary.output.name == "step_00000000"
    assert any("no optimizer state" in note for note in summary.notes)

    manager = CheckpointManager(tmp_path / "ours", keep_last=0)
    ckpt = manager.load(manager.latest())
    assert sorted(ckpt) == ["model", "trainer"]  # no optimizer: fine-tuning initialisation / inference only
    cfg = load_released_config(GELU_CONFIG)
    assert ckpt["trainer"]["step"] == 0
    assert ckpt["trainer"]["config"]["model"] == asdict(cfg)
    assert ckpt["trainer"]["source"]["variant"] == "base"
    model_sd = ckpt["model"]
    assert list(model_sd) == list(fixture_state)
    for key, stored in fixture_state.items():
        want = torch.float32 if promoted_at_load(key) else stored.dtype
        assert model_sd[key].dtype == want, key
        assert torch.equal(model_sd[key].to(stored.dtype), stored), key
    # What our inference does with it: a strict load into the model of that config.
    build_dit(cfg, tp_group=single_process_group).load_state_dict(model_sd, strict=True)

    summary = tool.ours_to_released(tmp_path / "ours", tmp_path / "released")
    assert summary.output == tmp_path / "released" / "inference_weight"
    assert_bitwise(load_magi1_state_dict(summary.output), fixture_state)


def test_fp32_training_checkpoint_exports_released_dtypes(tool, tiny, tmp_path):
    old, new = random_state(tiny, seed=1), random_state(tiny, seed=2)
    save_ours(tmp_path / "run", tiny, old, step=3)
    save_ours(tmp_path / "run", tiny, new, step=7)
    (tmp_path / "run" / "step_00000009").mkdir()  # an interrupted save: no complete.json, must be skipped

    summary = tool.ours_to_released(tmp_path / "run", tmp_path / "out")
    assert summary.source.name == "step_00000007"  # a root means its newest complete checkpoint
    got = load_magi1_state_dict(tmp_path / "out" / "inference_weight")
    assert list(got) == list(new)
    assert {t.dtype for t in new.values()} == {torch.float32}
    for key, tensor in new.items():
        assert got[key].dtype == released_dtype(key), key
        assert torch.equal(got[key], tensor.to(released_dtype(key))), key
    assert {got[k].dtype for k in got} == {torch.float32, torch.bfloat16}


@pytest.mark.parametrize(("trained_distill", "flag", "subdir"), [
    (False, "auto", "inference_weight"),
    (True, "auto", "inference_weight.distill"),
    (True, "false", "inference_weight"),
    (False, "true", "inference_weight.distill"),
])
def test_distill_decides_the_weight_directory(tool, tiny, tmp_path, trained_distill, flag, subdir):
    cfg = replace(tiny, distill=trained_distill)
    save_ours(tmp_path / "run", cfg, random_state(cfg))
    summary = tool.ours_to_released(tmp_path / "run", tmp_path / "out", distill=flag)
    assert summary.output == tmp_path / "out" / subdir
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [subdir]


def test_sharded_output_has_an_index_and_loads(tool, fixture_state, fixture_ours, tmp_path):
    limit = tool.parse_size("1MB")
    assert limit == 10**6 and tool.parse_size("2GiB") == 2 * 2**30
    summary = tool.ours_to_released(fixture_ours, tmp_path / "out", shard_bytes=limit)
    index = json.loads((summary.output / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards == sorted(p.name for p in summary.output.glob("*.safetensors"))
    assert set(index["weight_map"]) == set(fixture_state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in fixture_state.values())
    assert_bitwise(load_magi1_state_dict(summary.output), fixture_state)


@needs_zstd
def test_zst_output_loads(tool, fixture_state, fixture_ours, tmp_path):
    summary = tool.ours_to_released(fixture_ours, tmp_path / "out", shard_bytes=2 * 10**6, zst=True)
    names = sorted(p.name for p in summary.output.iterdir())
    assert INDEX_NAME in names
    shards = [n for n in names if n != INDEX_NAME]
    assert shards and all(n.endswith(".safetensors.zst") for n in shards)
    assert_bitwise(load_magi1_state_dict(summary.output), fixture_state)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no staging left behind


# ------------------------------------------------------------------ refusals
def test_wrong_preset_names_the_key_and_both_shapes(tool, tmp_path):
    with pytest.raises(tool.ConversionError) as err:
        tool.released_to_ours(GELU, "magi1_4.5b", tmp_path / "ours")
    message = str(err.value)
    assert str(FIXTURE_WEIGHTS / INDEX_NAME) in message
    assert "x_embedder.weight: expected (3072, 16, 1, 2, 2), checkpoint has (256, 16, 1, 2, 2)" in message
    assert "magi1_4.5b" in message
    assert not (tmp_path / "ours").exists()


def test_checkpoint_not_matching_its_own_config_is_refused(tool, tiny, tmp_path):
    save_ours(tmp_path / "run", replace(tiny, caption_channels=128), random_state(tiny))
    with pytest.raises(tool.ConversionError, match=r"y_embedder\.y_proj_xattn\.0\.weight: expected \(256, 128\), "
                                                   r"checkpoint has \(256, 64\)") as err:
        tool.ours_to_released(tmp_path / "run", tmp_path / "out")
    assert "model.safetensors" in str(err.value)


def test_refuses_to_overwrite_without_force(tool, tiny, tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "notes.txt").write_text("keep me")
    with pytest.raises(tool.ConversionError, match="--force"):
        tool.released_to_ours(FIXTURE_WEIGHTS, str(GELU_CONFIG), ours)
    tool.released_to_ours(FIXTURE_WEIGHTS, str(GELU_CONFIG), ours, step=5, force=True)
    assert (ours / "notes.txt").read_text() == "keep me" and (ours / "step_00000005").is_dir()

    save_ours(tmp_path / "run", tiny, random_state(tiny))
    tool.ours_to_released(tmp_path / "run", tmp_path / "out")
    with pytest.raises(tool.ConversionError, match="--force"):
        tool.ours_to_released(tmp_path / "run", tmp_path / "out")
    tool.ours_to_released(tmp_path / "run", tmp_path / "out", force=True)
    (tmp_path / "out" / "inference_weight" / "README").write_text("not ours")
    with pytest.raises(tool.ConversionError, match="README"):  # --force never deletes foreign files
        tool.ours_to_released(tmp_path / "run", tmp_path / "out", force=True)


def test_several_variants_need_a_choice_and_the_matching_preset(tool, tmp_path):
    model_dir = tmp_path / "model"
    for sub in ("inference_weight", "inference_weight.distill"):
        shutil.copytree(FIXTURE_WEIGHTS, model_dir / sub)
    with pytest.raises(tool.ConversionError, match=r"inference_weight, inference_weight\.distill.*--variant"):
        tool.released_to_ours(model_dir, str(GELU_CONFIG), tmp_path / "a")
    # Distillation adds no keys, so only the directory name tells: a base config must be refused.
    with pytest.raises(tool.ConversionError, match="distill"):
        tool.released_to_ours(model_dir, str(GELU_CONFIG), tmp_path / "b", variant="distill")

    released = json.loads(GELU_CONFIG.read_text())
    released["engine_config"]["distill"] = True
    distill_config = tmp_path / "distill" / "config.json"
    distill_config.parent.mkdir()
    distill_config.write_text(json.dumps(released))
    tool.released_to_ours(model_dir, str(distill_config), tmp_path / "c", variant="distill")
    ckpt = CheckpointManager(tmp_path / "c", keep_last=0).load(tmp_path / "c" / "step_00000000")
    assert ckpt["trainer"]["config"]["model"]["distill"] is True
    assert ckpt["trainer"]["source"]["variant"] == "distill"


# The command line end to end: tests/e2e/test_convert_checkpoint_cli.py.


# ------------------------------------------------------------------ fp8
@pytest.fixture(scope="module")
def fp8():
    try:
        import magi_train.model.fp8 as fp8
    except ImportError as e:
        pytest.skip(f"magi_train.model.fp8 cannot be imported ({e}); the --fp8 / --dequantize paths need it")
    return fp8


def test_fp8_export_has_the_released_layout_and_dequantizes_back(tool, tiny, fp8, tmp_path):
    cfg = replace(tiny, num_layers=4, distill=True)  # layers 1 .. L-2 = 1, 2 are quantised
    state = random_state(cfg)
    save_ours(tmp_path / "run", cfg, state)
    summary = tool.ours_to_released(tmp_path / "run", tmp_path / "out", fp8=True)
    assert summary.output == tmp_path / "out" / "inference_weight.fp8.distill"
    got = load_magi1_state_dict(summary.output)
    assert {k: (tuple(t.shape), t.dtype) for k, t in got.items()} == fp8_layout(state, cfg.num_layers)
    for key in got:  # what was not quantised is exactly the released-dtype copy
        if key in state and got[key].dtype != torch.float8_e4m3fn:
            assert torch.equal(got[key], state[key].to(released_dtype(key))), key

    custom = tmp_path / "cfg.json"  # a released config.json of this 4-layer model, to name it on the command line
    released_cfg = asdict(cfg)
    released_cfg["params_dtype"] = "torch.float32"
    custom.write_text(json.dumps({"model_config": released_cfg, "engine_config": {"distill": True}}))
    with pytest.raises(tool.ConversionError, match="lossy"):
        tool.released_to_ours(tmp_path / "out", str(custom), tmp_path / "back")
    tool.released_to_ours(tmp_path / "out", str(custom), tmp_path / "back", dequantize=True)
    back = CheckpointManager(tmp_path / "back", keep_last=0).load(tmp_path / "back" / "step_00000000")["model"]
    assert list(back) == list(state)
    quantised = {k for k, t in got.items() if t.dtype == torch.float8_e4m3fn}
    assert len(quantised) == 2 * 7
    for key in quantised:
        assert back[key].dtype == torch.bfloat16 and back[key].shape == state[key].shape
        assert relative_error(back[key], state[key]) < 0.05, key  # e4m3: 3 mantissa bits


def test_fp8_needs_a_distilled_model(tool, tiny, fp8, tmp_path):
    cfg = replace(tiny, num_layers=4)
    save_ours(tmp_path / "run", cfg, random_state(cfg))
    with pytest.raises(tool.ConversionError, match="distill"):
        tool.ours_to_released(tmp_path / "run", tmp_path / "out", fp8=True)
    assert not (tmp_path / "out").exists()


def test_dequantize_undoes_smoothquant_scales(tool, tiny, fp8):
    cfg = replace(tiny, num_layers=4)
    state = random_state(cfg, seed=3)
    gen = torch.Generator().manual_seed(4)
    modules = fp8.fp8_module_names(cfg.num_layers)
    absmax = {m: 0.5 + 3.5 * torch.rand(state[f"{m}.weight"].shape[1], generator=gen) for m in modules}
    back = tool.dequantize_fp8(fp8.quantize_dit_state_dict(state, cfg.num_layers, input_absmax=absmax))
    assert sorted(back) == sorted(state)
    for m in modules:
        assert relative_error(back[f"{m}.weight"], state[f"{m}.weight"]) < 0.05, m
