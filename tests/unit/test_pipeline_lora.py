"""LoRA adapters at inference, unmerged (magi_infer: the `lora` key, MagiPipeline.load_lora / set_lora_scale /
unload_lora, the sidecar's record): a fresh adapter (B = 0) leaves the video bit for bit, a trained-like one
changes it, scale 0 and unloading restore it. The model is tests/fixtures/tiny_base."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from magi_infer import MagiPipeline
from magi_train.checkpoint.adapters import base_model_identity
from magi_train.config.validate import ConfigError
from magi_train.model.dit import build_dit
from magi_train.model.lora import apply_lora, lora_modules, save_adapter

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_base"
STEPS = 4
TARGETS = ["*.self_attention.linear_qkv.q", "*.self_attention.linear_qkv.v", "*.self_attention.linear_proj",
           "*.mlp.linear_fc1", "*.mlp.linear_fc2"]


def make_adapter(path: Path, model_cfg, b_std: float, seed: int = 1) -> Path:
    """An adapter for the tiny preset: A as initialised, B zero (b_std=0) or random (as after training)."""
    model = build_dit(model_cfg, device="cpu")
    apply_lora(model, TARGETS, rank=4, alpha=4.0, seed=seed)
    if b_std:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B["default"].weight.normal_(0.0, b_std, generator=g)
    return save_adapter(model, path, targets=TARGETS, step=0, base_model=base_model_identity(model_cfg))


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return MagiPipeline.from_pretrained(TINY, overrides={"progress": False})


@pytest.fixture(scope="module")
def adapters(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    cfg = pipe.config.model
    return {"zero": make_adapter(root / "zero", cfg, 0.0), "style": make_adapter(root / "style", cfg, 0.2, seed=2),
            "other": make_adapter(root / "other", cfg, 0.2, seed=3)}


def generate(pipe, **kw):
    return pipe(["a red blob moves right", "a blue blob"], num_frames=30, seed=3, num_steps=STEPS, **kw)


def test_a_fresh_adapter_changes_nothing_bit_for_bit(pipe, adapters):
    plain = generate(pipe)
    plain_latents = generate(pipe, output_type="latent").latents
    name = pipe.load_lora(adapters["zero"])
    try:
        assert name == "zero" and list(pipe.loras) == ["zero"]
        assert any(True for _ in lora_modules(pipe.engine.model))  # the linears are wrapped ...
        assert np.array_equal(generate(pipe).frames, plain.frames)  # ... and the video is the same
        assert torch.equal(generate(pipe, output_type="latent").latents, plain_latents)
    finally:
        pipe.unload_lora(name)
    assert not lora_modules(pipe.engine.model) and pipe.loras == {}


def test_an_adapter_changes_the_video_and_scale_zero_or_unloading_restores_it(pipe, adapters):
    plain = generate(pipe, output_type="latent").latents
    name = pipe.load_lora(adapters["style"], scale=1.0)
    try:
        styled = generate(pipe, output_type="latent").latents
        change = (styled - plain).abs().mean().item()
        assert change > 1e-2, change
        pipe.set_lora_scale(name, 0.5)
        half = generate(pipe, output_type="latent").latents
        assert 0 < (half - plain).abs().mean().item() < change  # a smaller scale moves it less
        pipe.set_lora_scale(name, 0.0)
        assert torch.equal(generate(pipe, output_type="latent").latents, plain)
        pipe.set_lora_scale(name, 1.0)
        assert torch.equal(generate(pipe, output_type="latent").latents, styled)  # deterministic
    finally:
        pipe.unload_lora(name)
    assert torch.equal(generate(pipe, output_type="latent").latents, plain)
    with pytest.raises(KeyError, match="style"):
        pipe.set_lora_scale("style", 1.0)


def test_from_pretrained_with_two_adapters_records_them_in_the_sidecar(adapters, tmp_path):
    torch.set_num_threads(1)
    entries = [{"path": str(adapters["style"]), "scale": 0.8}, str(adapters["other"])]
    pipe = MagiPipeline.from_pretrained(TINY, overrides={"progress": False}, lora=entries)
    assert [(e["name"], e["scale"]) for e in pipe.config.lora] == [("style", 0.8), ("other", 1.0)]
    out = tmp_path / "v.mp4"
    video = generate(pipe, output=out)
    side = json.loads((tmp_path / "v.mp4.json").read_text())
    from magi_train.checkpoint.magi1 import sha256_of

    assert side["lora"] == [
        {"name": "style", "path": str(adapters["style"].resolve()), "scale": 0.8,
         "sha256": sha256_of(adapters["style"] / "adapter_model.safetensors")},
        {"name": "other", "path": str(adapters["other"].resolve()), "scale": 1.0,
         "sha256": sha256_of(adapters["other"] / "adapter_model.safetensors")}]
    assert side["config"]["lora"] == side["lora"]
    # The sidecar's entries rebuild the same video (and their sha256 is checked).
    again = MagiPipeline.from_pretrained(TINY, overrides={"progress": False}, lora=side["lora"])
    assert np.array_equal(generate(again).frames, video.frames)
    wrong = [dict(side["lora"][0], sha256="0" * 64)]
    with pytest.raises(ValueError, match="sha256"):
        MagiPipeline.from_pretrained(TINY, overrides={"progress": False}, lora=wrong)


def test_the_lora_key_is_checked(pipe, adapters):
    from magi_infer.config import lora_entries, validate_generate

    assert lora_entries("a/b") == [{"path": "a/b", "scale": 1.0, "name": None, "sha256": None}]
    for bad, message in (([{"path": "a", "weight": 1}], r"lora\[0\] has unknown key"), ([{"scale": 1}], "needs path"),
                         ([{"path": "a", "scale": "x"}], r"lora\[0\]\.scale"), ([3], r"lora\[0\]=3"),
                         ([{"path": "a", "name": "n"}, {"path": "b", "name": "n"}], "names repeat")):
        with pytest.raises(ConfigError, match=message):
            validate_generate(dataclasses.replace(pipe.config, lora=bad))
    tp2 = dataclasses.replace(pipe.config, lora=[str(adapters["zero"])],
                              parallel=dataclasses.replace(pipe.config.parallel, tp=2))
    validate_generate(tp2)  # the local spec's tensor-parallel linears take adapters (magi_train/parallel/lora.py)
    te = dataclasses.replace(tp2, model=dataclasses.replace(tp2.model, layer_spec="te"))
    with pytest.raises(ConfigError, match=r"lora with parallel.tp=2 and model.layer_spec=te: .*magi-merge-lora"):
        validate_generate(te)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.load_lora(adapters["zero"].parent / "missing")
    assert pipe.loras == {}


def _generate_cli(out: Path, lora: str, nproc: int = 1, *extra: str):
    import os
    import subprocess
    import sys

    launcher = [sys.executable] if nproc == 1 else [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    cmd = launcher + ["magi_infer/generate.py", "model=tiny", f"ckpt.dir={TINY}", "text.encoder=hash",
                      "vae.kind=preview", "video.height=64", "video.width=64", "num_frames=30",
                      f"sampler.num_steps={STEPS}", "prompt=[a red blob moves right, a blue blob]", f"output={out}",
                      "seed=3", "progress=false", "parallel.backend=gloo", "device=cpu", f"lora={lora}", *extra]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_generate_cli_takes_lora(adapters, tmp_path):
    """`magi_infer/generate.py ... lora=[...]` through Hydra's parser: the summary names the adapter."""
    done = _generate_cli(tmp_path / "cli.mp4", f"[{{path: '{adapters['style']}', scale: 0.5}}]")
    side = json.loads((tmp_path / "cli.mp4.json").read_text())
    assert [(e["name"], e["scale"]) for e in side["lora"]] == [("style", 0.5)]
    assert f"lora: {adapters['style'].resolve()} (scale 0.5)" in done.stdout


@pytest.mark.slow
@pytest.mark.multirank
def test_tensor_parallel_ranks_apply_the_adapter_like_one_process(pipe, tmp_path):
    """TP2 with sequence parallel (the column adapters gather, the row adapters reduce-scatter their rank-r
    intermediate; magi_train/parallel/lora.py) writes the one-process video byte for byte, with an adapter on
    every default target and the caption KV linear."""
    from magi_train.model.lora import DEFAULT_LORA_TARGETS

    model = build_dit(pipe.config.model)
    apply_lora(model, list(DEFAULT_LORA_TARGETS) + ["*.linear_kv_xattn"], rank=4, alpha=4.0, seed=5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B["default"].weight.normal_(0.0, 0.2, generator=g)
    adapter = save_adapter(model, tmp_path / "all")
    lora = f"[{{path: '{adapter}', scale: 0.6}}]"
    _generate_cli(tmp_path / "one.mp4", lora)
    _generate_cli(tmp_path / "tp2.mp4", lora, 2, "parallel.tp=2", "parallel.sequence_parallel=true")
    assert (tmp_path / "tp2.mp4").read_bytes() == (tmp_path / "one.mp4").read_bytes()
    plain = generate(pipe).frames  # the same request without the adapter (seed 3, 30 frames, the two prompts)
    from magi_train.data.video_io import read_video

    styled = read_video(tmp_path / "one.mp4", 24, 64, 64).numpy().astype(np.int16)
    assert np.abs(styled - plain.astype(np.int16)).mean() > 10


def test_serve_takes_lora_at_start_up(adapters):
    """magi-serve composes the generate schema: `lora=` on its command line reaches the pipeline it builds
    (magi_infer/server/cli.py run(), up to uvicorn)."""
    from magi_infer.server.cli import generate_part
    from magi_infer.server.config import register_serve_config, to_serve_config
    from magi_train.config.compose import compose

    register_serve_config()
    cfg = to_serve_config(compose("serve", ["model=tiny", f"ckpt.dir={TINY}", "text.encoder=hash", "vae.kind=preview",
                                            "video.height=64", "video.width=64",
                                            f"lora=[{{path: '{adapters['style']}', scale: 0.25}}]"]))
    served = MagiPipeline(generate_part(cfg))
    assert {n: e["scale"] for n, e in served.loras.items()} == {"style": 0.25}
    assert served.engine.cfg.lora[0]["sha256"] and served.config.lora == served.engine.cfg.lora
