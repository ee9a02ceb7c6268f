"""tools/merge_lora.py: the merged checkpoint (released layout) generates what the base with the same adapters
unmerged does, to 1e-5 on the latents; fp8 bases and mismatched adapters are refused with the reason."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from magi_infer import MagiPipeline
from magi_train.checkpoint.adapters import base_model_identity
from magi_train.checkpoint.magi1 import load_magi1_state_dict, sha256_of
from magi_train.model.dit import build_dit
from magi_train.model.lora import apply_lora, lora_modules, merge_lora, save_adapter
from tests.configs import tiny_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny_base"
STEPS = 4


def tool():
    spec = importlib.util.spec_from_file_location("merge_lora", ROOT / "tools" / "merge_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_adapter(path: Path, targets, seed: int, cfg=None) -> Path:
    cfg = cfg or tiny_model()
    model = build_dit(cfg)
    apply_lora(model, targets, rank=4, alpha=8.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B["default"].weight.normal_(0.0, 0.1, generator=g)
    return save_adapter(model, path, targets=targets, base_model=base_model_identity(cfg))


def dit_inputs(cfg):
    from magi_train.model.attention import block_causal_ranges

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8)
    mask[1, 3:] = 0
    return dict(x=torch.randn(1, cfg.in_channels, 2 * cfg.chunk_width, 8, 8, generator=g),
                t=torch.rand(1, 2, generator=g), caption=torch.randn(2, 8, cfg.caption_channels, generator=g),
                caption_mask=mask, self_ranges=block_causal_ranges(1, 2, cfg.chunk_width // cfg.t_patch_size * (8 // cfg.patch_size) ** 2))


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return (make_adapter(root / "a", ["*.linear_qkv.q", "*.mlp.linear_fc1", "*.linear_proj"], seed=1),
            make_adapter(root / "b", ["*.mlp.linear_fc1", "*.mlp.linear_fc2", "*.linear_kv_xattn"], seed=2))


def test_merged_checkpoint_generates_what_the_unmerged_adapters_do(two_adapters, tmp_path, capsys):
    torch.set_num_threads(1)
    a, b = two_adapters
    out = tmp_path / "merged"
    assert tool().main(["--base", str(TINY), "--lora", f"{a}:0.7", "--lora", str(b), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    weights = out / "inference_weight"
    assert (weights / "model.safetensors.index.json").is_file()
    record = json.loads((out / "merged_lora.json").read_text())
    assert [(x["scale"], x["sha256"]) for x in record["adapters"]] == [
        (0.7, sha256_of(a / "adapter_model.safetensors")), (1.0, sha256_of(b / "adapter_model.safetensors"))]
    # Only the adapted weights moved (fc1 by both adapters), dtypes as stored.
    base, merged = load_magi1_state_dict(TINY / "inference_weight"), load_magi1_state_dict(weights)
    assert base.keys() == merged.keys() and all(base[k].dtype == merged[k].dtype for k in base)
    moved = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    want = sorted(f"videodit_blocks.layers.{i}.{m}.weight" for i in range(2) for m in
                  ("self_attention.linear_qkv.q", "mlp.linear_fc1", "self_attention.linear_proj", "mlp.linear_fc2",
                   "self_attention.linear_kv_xattn"))
    assert moved == want
    # The same adapters merged by the tool and by merge_lora on a model agree.
    model = build_dit(tiny_model(), init_weights=False)
    model.load_state_dict(base)
    from magi_train.model.lora import load_adapter

    load_adapter(model, a, scale=0.7)
    load_adapter(model, b)
    merge_lora(model)
    for k in want:
        torch.testing.assert_close(model.state_dict()[k], merged[k], atol=1e-6, rtol=1e-6)

    prompts = ["a red blob moves right", "a blue blob"]
    kw = dict(num_frames=30, seed=3, num_steps=STEPS, output_type="latent")
    unmerged = MagiPipeline.from_pretrained(TINY, overrides={"progress": False},
                                            lora=[{"path": str(a), "scale": 0.7}, str(b)])
    from_merged = MagiPipeline.from_pretrained(out, overrides={"progress": False})
    plain = MagiPipeline.from_pretrained(TINY, overrides={"progress": False})
    # One DiT call of the two engines' models: merged equals unmerged to 1e-5.
    batch = dit_inputs(unmerged.engine.model.cfg)
    with torch.no_grad():
        v_unmerged, v_merged, v_plain = (p.engine.model(**batch) for p in (unmerged, from_merged, plain))
    assert (v_unmerged - v_plain).abs().max() > 1e-2  # the adapters matter ...
    torch.testing.assert_close(v_merged, v_unmerged, atol=1e-5, rtol=1e-5)  # ... and merge to the same model
    # The whole video: 8 sampler steps per chunk with text guidance 7.5 (the base model's cfg_number=3) amplify
    # fp32 rounding (measured: max 2.4e-4 on latents of magnitude 6.6, mean 1.9e-6, against an adapter effect of
    # mean 0.41); the latents agree to 1e-5 on average and 1e-4 of their range everywhere.
    want_latents = unmerged(prompts, **kw).latents
    got = from_merged(prompts, **kw).latents
    effect = (want_latents - plain(prompts, **kw).latents).abs().mean()
    gap = (got - want_latents).abs()
    assert effect > 0.1 and gap.mean() < 1e-5 and gap.max() < 1e-4 * want_latents.abs().max(), (effect, gap.max())


def test_refusals(two_adapters, tmp_path, capsys):
    a, _ = two_adapters
    merge = tool()
    # An fp8 base: the weight directory's name says so.
    fp8 = tmp_path / "fp8"
    (fp8 / "inference_weight.fp8.distill").mkdir(parents=True)
    shutil.copy(TINY / "inference_weight" / "model.safetensors", fp8 / "inference_weight.fp8.distill")
    assert merge.main(["--base", str(fp8), "--lora", str(a), "--out", str(tmp_path / "o")]) == 1
    assert "fp8 weights cannot take a LoRA merge" in capsys.readouterr().err
    assert merge.main(["--base", str(TINY), "--variant", "distill", "--lora", str(a), "--out",
                       str(tmp_path / "o")]) == 1
    assert "no inference_weight.distill/" in capsys.readouterr().err
    # An adapter for another architecture.
    three = make_adapter(tmp_path / "three", ["*.mlp.linear_fc1"], seed=1, cfg=tiny_model(num_layers=3))
    assert merge.main(["--base", str(TINY), "--lora", str(three), "--out", str(tmp_path / "o")]) == 1
    assert "num_layers: adapter 3, model 2" in capsys.readouterr().err
    # An existing output is kept unless --overwrite.
    out = tmp_path / "o"
    assert merge.main(["--base", str(TINY), "--lora", str(a), "--out", str(out)]) == 0
    assert merge.main(["--base", str(TINY), "--lora", str(a), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert merge.main(["--base", str(TINY), "--lora", f"{a}:0", "--out", str(out), "--overwrite"]) == 0
    # Scale 0 merges nothing: the weights are the base's.
    base = load_magi1_state_dict(TINY / "inference_weight")
    again = load_magi1_state_dict(out / "inference_weight")
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert merge.parse_lora("runs/x:y/adapter") == (Path("runs/x:y/adapter"), 1.0)
    assert merge.parse_lora("runs/a:0.25") == (Path("runs/a"), 0.25)
