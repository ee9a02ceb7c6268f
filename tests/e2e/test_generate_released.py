"""Released-layout checkpoints (tiny, random, written by the test in the official on-disk format) load and
generate t2v / i2v / v2v videos through the whole stack: T5 directory, special tokens, DiT with guidance and
KV cache, ViT VAE, streaming mp4. Each video is decoded again to check frames, size and fps."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from magi_infer.config import CheckpointConfig, GenerateConfig, SamplerConfig, TextConfig, VaeConfig, VideoConfig
from magi_infer.engine import InferenceEngine, Request
from magi_train.data.video_io import StreamingMp4Writer, probe_video, read_video
from magi_train.checkpoint.magi1 import load_magi1_state_dict, save_magi1_checkpoint
from magi_train.config.released import load_released_config

import tiny_assets

GELU = Path(__file__).resolve().parents[1] / "fixtures" / "magi1_gelu"
H, W = 64, 96


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    base_cfg = load_released_config(GELU / "config.json")  # 2 layers, bf16, caption length 64, 4096 wide
    distill_cfg = dataclasses.replace(base_cfg, num_layers=3, distill=True)  # 3 layers: layer 1 goes fp8
    base = root / "4.5B_base"
    shutil.copytree(GELU / "inference_weight", base / "inference_weight")  # the conformance weights
    distill = tiny_assets.make_released_dit(root / "4.5B_distill", distill_cfg)
    quant = tiny_assets.make_released_dit(root / "4.5B_distill_quant", distill_cfg, fp8=True)
    return dict(t5=tiny_assets.make_t5(root / "t5" / "t5-v1_1-xxl", 4096).parent, vae=tiny_assets.make_vae(root / "vae"),
                base=(base_cfg, base), distill=(distill_cfg, distill), quant=(distill_cfg, quant), root=root)


def config(assets, variant: str, **sampler) -> GenerateConfig:
    model_cfg, model_dir = assets[variant]
    fp8 = variant == "quant"
    return GenerateConfig(
        model=dataclasses.replace(model_cfg), ckpt=CheckpointConfig(str(model_dir)),
        sampler=SamplerConfig(cfg_number=1 if model_cfg.distill else 3, num_steps=8, fp8=fp8, **sampler),
        video=VideoConfig(height=H, width=W, fps=24), text=TextConfig(t5_dir=str(assets["t5"]), max_length=64),
        vae=VaeConfig(dir=str(assets["vae"])), progress=False)


def write_png(path: Path) -> Path:
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[:, :25] = (200, 30, 30)
    rgb[:, 25:] = (30, 30, 200)
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 50, 40, "rgb24"
        c.mux(s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        c.mux(s.encode(None))
    return path


def write_clip(path: Path, frames: int) -> Path:
    g = torch.Generator().manual_seed(3)
    with StreamingMp4Writer(path, W, H, 24) as writer:
        writer.write(torch.randint(0, 255, (frames, H, W, 3), generator=g, dtype=torch.uint8))
    return path


@pytest.mark.slow
def test_base_t2v_and_i2v_with_one_engine(assets, tmp_path):
    engine = InferenceEngine(config(assets, "base"))  # built once, serves several requests
    t2v = engine.generate(Request(["a red fox runs through the snow"], "t2v", num_frames=30, seed=1),
                          output=str(tmp_path / "t2v.mp4"))
    info = probe_video(t2v.output)
    assert (info.frames, info.width, info.height, info.fps, info.codec, info.pix_fmt) == (30, W, H, 24.0, "h264", "yuv420p")
    assert t2v.chunks == 2 and len(t2v.chunk_seconds) == 2 and t2v.chunk_seconds[0] < t2v.seconds

    image = write_png(tmp_path / "first.png")
    i2v = engine.generate(Request(["a cat sleeps", "the cat wakes up"], "i2v", num_frames=40, seed=1, image=str(image)),
                          output=str(tmp_path / "i2v.mp4"))
    assert probe_video(i2v.output).frames == 40 and i2v.chunks == 2

    again = engine.generate(Request(["a red fox runs through the snow"], "t2v", num_frames=30, seed=1),
                            output=str(tmp_path / "again.mp4"))
    a = read_video(t2v.output, 24, H, W)
    b = read_video(again.output, 24, H, W)
    assert torch.equal(a, b), "same request, same seed: the engine must reproduce its own video"


@pytest.mark.slow
def test_distill_v2v_continues_a_prefix_of_any_length(assets, tmp_path):
    engine = InferenceEngine(config(assets, "distill"))
    clip = write_clip(tmp_path / "prefix.mp4", 30)  # 30 frames -> 28 used -> 7 latents: 1 full chunk + 1 frame
    out = engine.generate(Request(["waves crash on a rocky shore"], "v2v", num_frames=24, seed=2,
                                  prefix_video=str(clip)), output=str(tmp_path / "v2v.mp4"))
    info = probe_video(out.output)
    assert (info.frames, info.width, info.height, info.fps) == (24, W, H, 24.0)
    assert out.chunks == 3  # ceil((7 + 6) / 6)


@pytest.mark.slow
def test_fp8_distill_t2v(assets, tmp_path):
    engine = InferenceEngine(config(assets, "quant"))
    fp8_layers = [m for m in engine.model.modules() if type(m).__name__.startswith("Fp8")]
    assert len(fp8_layers) == 7  # q, qx, k, v, fc1, fc2, proj of layer 1 (layers 0 and 2 stay bf16)
    out = engine.generate(Request(["city lights at night"], "t2v", num_frames=24, seed=0), output=str(tmp_path / "q.mp4"))
    assert probe_video(out.output).frames == 24


@pytest.mark.slow
def test_variant_mismatch_and_missing_keys_are_start_up_errors(assets, tmp_path):
    with pytest.raises(ValueError, match=r"no inference_weight\.distill/.*inference_weight -> model=<size>"):
        cfg = config(assets, "base")
        cfg.model = dataclasses.replace(cfg.model, distill=True)
        cfg.sampler.cfg_number = 1
        InferenceEngine(cfg)
    state = load_magi1_state_dict(assets["base"][1] / "inference_weight")
    state.pop("final_linear.linear.weight")
    state["videodit_blocks.layers.9.mlp.linear_fc1.weight"] = torch.zeros(1)
    save_magi1_checkpoint(state, tmp_path / "broken" / "inference_weight")
    cfg = config(assets, "base")
    cfg.ckpt.dir = str(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"missing keys:\n\s+final_linear.linear.weight(.|\n)*unexpected keys:\n\s+"
                                         r"videodit_blocks.layers.9"):
        InferenceEngine(cfg)
