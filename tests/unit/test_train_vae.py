"""tools/train_vae.py and magi_train/training/vae_training.py: a few steps at a tiny size lower the loss and write
a directory every loader reads; the shipped data/tiny_vae reproduces the PSNR its README and record state; bad
arguments are refused with the field named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magi_train.model.vae import ViTVAE
from magi_train.training.vae_training import (RECORD_NAME, VaeTrainConfig, evaluate, held_out_clips, psnr, run,
                                               train_vae)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "tiny_vae"


def small_config(**overrides) -> VaeTrainConfig:
    fields = dict(steps=12, batch_size=2, warmup=2, sizes=((32, 32),), frames=12, embed_dim=32, depth=1,
                  num_heads=2, eval_clips=1, eval_size=(32, 32), stats_clips=2, log_every=4)
    fields.update(overrides)
    return VaeTrainConfig(**fields)


def test_a_few_steps_lower_the_loss_and_the_directory_loads(tmp_path):
    torch.manual_seed(0)
    result = train_vae(small_config(steps=40, lr=3e-3), log=lambda _: None)
    assert result.last_loss < 0.7 * result.first_window_loss, (result.first_window_loss, result.last_loss)

    out = tmp_path / "vae"
    record = run(small_config(), out, ["test"], threads=1, log=lambda _: None)
    assert {p.name for p in out.iterdir()} >= {"config.json", "diffusion_pytorch_model.safetensors", RECORD_NAME}
    assert not list(tmp_path.glob(".vae.*")), "the temporary directory was left behind"
    on_disk = json.loads((out / RECORD_NAME).read_text())
    assert on_disk["psnr_db"] == record["psnr_db"] and np.isfinite(record["psnr_db"])
    # The record's PSNR is what the written weights give when loaded as users load them.
    vae = ViTVAE.from_pretrained(out, dtype=torch.float32)
    clips = held_out_clips(1, 1, (32, 32), 24, 24)
    assert evaluate(vae, clips, 24).psnr == pytest.approx(record["psnr_db"], abs=1e-3)


def test_shape_masks_mark_exactly_the_painted_pixels_and_the_shape_weight_trains():
    from magi_train.training.vae_training import synthetic_clips

    clips, masks = synthetic_clips(0, 0, 5, 3, (48, 32), 12, 24, masks=True)
    assert np.array_equal(clips, synthetic_clips(0, 0, 5, 3, (48, 32), 12, 24))  # the same clips with or without
    assert masks.shape == clips.shape[:-1] and 0.002 < masks.mean() < 0.5
    # Off the masks every pixel of a frame is the background: in each frame, off-mask colours repeat those of
    # the first frame at the same place (the background never moves).
    off = ~masks
    both = off & off[:, :1]
    assert np.array_equal(clips[both], np.broadcast_to(clips[:, :1], clips.shape)[both])
    torch.manual_seed(0)
    result = train_vae(small_config(steps=40, lr=3e-3, shape_weight=4.0), log=lambda _: None)
    assert result.last_loss < 0.7 * result.first_window_loss, (result.first_window_loss, result.last_loss)


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    b = a.copy()
    b[...] = 255
    assert psnr(a, b) == pytest.approx(0.0)


@pytest.mark.parametrize("overrides, field", [
    (dict(steps=0), "steps"),
    (dict(seed=3, eval_seed=3), "eval_seed"),
    (dict(frames=10), "frames"),
    (dict(sizes=((36, 32),)), "36x32"),
    (dict(embed_dim=30, num_heads=4), "num_heads"),
    (dict(weights_dtype="float16"), "weights_dtype"),
    (dict(shape_weight=-1.0), "shape_weight"),
])
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides).validate()


def test_the_tool_refuses_a_bad_argument_before_training(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "train_vae.py"), "--out", str(tmp_path / "v"),
                           "--sizes", "160x96"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "square" in done.stderr, done.stderr
    assert not (tmp_path / "v").exists()


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="data/tiny_vae is not in this checkout")
def test_the_shipped_vae_reproduces_its_recorded_psnr():
    record = json.loads((SHIPPED / RECORD_NAME).read_text())
    vae = ViTVAE.from_pretrained(SHIPPED, dtype=torch.float32)
    cfg = record["config"]
    clips = held_out_clips(cfg["eval_seed"], cfg["eval_clips"], tuple(cfg["eval_size"]), cfg["eval_frames"],
                           cfg["fps"])
    measured = evaluate(vae, clips, cfg["fps"])
    assert measured.psnr == pytest.approx(record["psnr_db"], abs=0.5)
    readme = (SHIPPED / "README.md").read_text()
    assert f"{record['psnr_db']:.1f} dB" in readme, "the README's PSNR is not the record's"
    # The baked normalisation: the released scale factor gives latents of about unit spread.
    assert 0.7 < measured.latent["std"] < 1.4, measured.latent
