"""Validation videos during training: sampled with the inference sampler, written as mp4, logged to wandb.

A tiny random DiT (2 layers, 4x4 latents, 2 chunks of 6 latent frames, 4 sampler steps) keeps each test to a
few seconds on CPU; the preview decoder turns its latents into 32x32 frames (4 per latent frame)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from magi_train.config.schema import SamplerConfig
from magi_train.diffusion.sampler import Captions, StaircaseSampler
from magi_train.data.video_io import probe_video, read_video
from magi_train.config.schema import TrainerConfig, WandbConfig
from magi_train.training.evaluation.videos import make_decoder, sample_validation_videos, to_uint8_frames
from magi_train.observability.metrics import MetricsLogger, format_record
from magi_train.model.dit import build_dit
from tests.configs import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNKS, HW, CW = 2, (4, 4), 6
CAPTION_LEN = 10  # shorter than the model's caption_max_length: the function pads the rows
SAMPLER = dataclasses.replace(SamplerConfig(), num_steps=4, window_size=2, noise2clean_kvrange=[2])
FPS = 8


@pytest.fixture(scope="module")
def model(single_process_group):
    cfg = tiny_model(hidden_size=128, ffn_hidden_size=256, num_attention_heads=2, num_query_groups=1,
                     caption_channels=32, caption_max_length=16, null_caption_length=12, chunk_width=CW)
    torch.manual_seed(0)
    m = build_dit(cfg, tp_group=single_process_group)
    with torch.no_grad():  # the zero-initialised output layer would make every velocity 0
        m.final_linear.linear.weight.normal_(0, 0.5)
        m.y_embedder.null_caption_embedding.normal_(0, 1.0)
    return m


def training_captions(n: int, seed: int = 0):
    """Per-chunk caption rows as the training data gives them: (chunks, L, C) float, (chunks, L) bool."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        caption = torch.randn(CHUNKS, CAPTION_LEN, 32, generator=g)
        mask = torch.zeros(CHUNKS, CAPTION_LEN, dtype=torch.bool)
        mask[0, :3 + i], mask[1, :7] = True, True
        out.append((caption, mask))
    return out


def run(model, out_dir, seed=5, captions=None, decode=None, write=True, step=3):
    return sample_validation_videos(
        model, captions or training_captions(2), model.y_embedder.null_caption_embedding, latent_hw=HW,
        num_chunks=CHUNKS, sampler_cfg=SAMPLER, seed=seed, decode=decode or make_decoder("preview", None, "cpu"),
        out_dir=out_dir, step=step, fps=FPS, write=write)


def frames_of(path: Path) -> torch.Tensor:
    return read_video(path, FPS, 32, 32)


def test_videos_are_written_deterministic_and_seeded(model, tmp_path):
    model.train()
    paths = run(model, tmp_path / "a")
    assert model.training, "the model's training mode must be restored"
    assert [p.name for p in paths] == ["step0000003_0.mp4", "step0000003_1.mp4"]
    for p in paths:
        info = probe_video(p)
        assert (info.frames, info.width, info.height, info.codec) == (CHUNKS * CW * 4, 32, 32, "h264")
        assert info.fps == pytest.approx(FPS)
    assert not list((tmp_path / "a").glob("*.partial"))
    again = run(model, tmp_path / "b")
    other = run(model, tmp_path / "c", seed=6)
    for a, b, c in zip(paths, again, other):
        assert torch.equal(frames_of(a), frames_of(b)), "same seed, same video"
        assert not torch.equal(frames_of(a), frames_of(c)), "another seed, another video"
    # Video i is seeded with seed + i: with the same caption, seed 6's first video is seed 5's second.
    alone = run(model, tmp_path / "e", seed=6, captions=training_captions(2)[1:])
    assert torch.equal(frames_of(paths[1]), frames_of(alone[0]))
    model.eval()
    run(model, tmp_path / "d")
    assert not model.training, "eval mode is kept too"


def test_write_false_writes_nothing(model, tmp_path):
    calls = []
    paths = run(model, tmp_path / "none", write=False, decode=lambda z: calls.append(z))
    assert paths == [] and not (tmp_path / "none").exists() and calls == []


def test_latents_are_those_of_the_sampler_with_the_null_caption(model, tmp_path):
    """Latents handed to decode == a direct StaircaseSampler run with the same noise and inference-layout
    captions (row 0 the padded training caption, row 1 the null caption with its null_caption_length mask)."""
    recorded = []
    preview = make_decoder("preview", None, "cpu")

    def decode(latent):
        assert not model.training, "sampling runs in eval mode"
        recorded.append(latent.clone())
        return preview(latent)

    model.train()
    caption, mask = training_captions(1, seed=3)[0]
    run(model, tmp_path, seed=11, captions=[(caption, mask)], decode=decode)
    assert model.training
    assert len(recorded) == CHUNKS and recorded[0].shape == (1, 16, CW, *HW)

    mc, null = model.cfg, model.y_embedder.null_caption_embedding.detach()
    L = mc.caption_max_length
    y = torch.zeros(2, CHUNKS, L, 32)
    y[0, :, :CAPTION_LEN] = caption
    y[1] = null
    m = torch.zeros(2, CHUNKS, L, dtype=torch.bool)
    m[0, :, :CAPTION_LEN] = mask
    m[1, :, :mc.null_caption_length] = True
    noise = torch.randn(1, 16, CHUNKS * CW, *HW, generator=torch.Generator().manual_seed(11))
    model.eval()
    direct = [c.latent for c in StaircaseSampler(model, SAMPLER).sample(noise, Captions(y, m))]
    assert all(torch.equal(a, b) for a, b in zip(recorded, direct))

    # Not vacuous: another null row gives other latents.
    y[1] = 0
    changed = [c.latent for c in StaircaseSampler(model, SAMPLER).sample(noise, Captions(y, m))]
    assert not torch.allclose(changed[-1], direct[-1], atol=1e-4)
    model.train()


def test_bad_captions_are_named(model, tmp_path):
    caption, mask = training_captions(1)[0]
    with pytest.raises(ValueError, match="3 chunks are sampled"):
        sample_validation_videos(model, [(caption, mask)], model.y_embedder.null_caption_embedding, latent_hw=HW,
                                 num_chunks=3, sampler_cfg=SAMPLER, seed=0, decode=None, out_dir=tmp_path, step=0,
                                 fps=FPS)
    long = torch.zeros(CHUNKS, 17, 32)
    with pytest.raises(ValueError, match="caption_max_length 16"):
        run(model, tmp_path, captions=[(long, torch.ones(CHUNKS, 17, dtype=torch.bool))])


def test_float_frames_are_on_the_uint8_scale():
    f = torch.tensor([-3.0, 0.4, 0.6, 254.6, 300.0]).reshape(1, 1, 5, 1).expand(1, 1, 5, 3)
    assert to_uint8_frames(f)[0, 0, :, 0].tolist() == [0, 0, 1, 255, 255]
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        to_uint8_frames(torch.zeros(2, 4, 4))


def test_make_decoder_errors_name_the_problem():
    with pytest.raises(ValueError, match="trainer.sample_vae_dir"):
        make_decoder("vit", None, "cpu")
    with pytest.raises(ValueError, match=r"trainer.sample_vae\) 'gif' is not one of \['preview', 'vit'\]"):
        make_decoder("gif", None, "cpu")


def test_vit_decoder_decodes_a_chunk(tmp_path):
    from magi_train.model.vae import ViTVAE

    tiny = dict(video_size=32, video_length=8, patch_size=8, patch_length=4, z_chans=16, embed_dim=256, depth=1,
                num_heads=4, mlp_ratio=2.0, qkv_bias=True, ln_in_attn=True, conv_last_layer=True)
    ViTVAE(tiny).save_pretrained(tmp_path / "vae")
    decode = make_decoder("vit", str(tmp_path / "vae"), "cpu", fps=24)
    frames = decode(torch.randn(1, 16, CW, *HW))
    assert frames.dtype == torch.uint8 and frames.shape == (CW * 4, 32, 32, 3)  # 2 temporal tiles of 12 frames


# ------------------------------------------------------------------ metrics


def test_format_record_and_log_without_loss(tmp_path, capsys):
    assert format_record({"step": 4, "eval_loss": 0.5}, 10) == "step 4/10 | eval_loss 0.5000"
    assert format_record({"step": 4}, 10) == "step 4/10"
    cfg = TrainerConfig(max_steps=10, progress_bar=False, wandb=WandbConfig(mode="disabled"))
    logger = MetricsLogger(cfg, tmp_path, {}, 0, enabled=True)
    logger.log({"step": 4, "eval_loss": 0.5})
    logger.log_videos(4, {"val/0": tmp_path / "a.mp4"}, FPS)
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 4, "eval_loss": 0.5},
                     {"step": 4, "videos": {"val/0": str(tmp_path / "a.mp4")}, "fps": FPS}]
    assert "step 4/10 | videos val/0" in capsys.readouterr().out


def test_disabled_logger_writes_nothing(tmp_path):
    cfg = TrainerConfig(max_steps=10, progress_bar=False, wandb=WandbConfig(mode="offline"))
    logger = MetricsLogger(cfg, tmp_path / "off", {}, 0, enabled=False)
    logger.log_videos(1, {"val/0": tmp_path / "a.mp4"}, FPS)
    assert not (tmp_path / "off").exists()


def test_log_videos_to_wandb_offline(model, tmp_path, monkeypatch):
    """wandb.Video takes the mp4 path as it is (no moviepy): the offline run stores a byte copy in media/videos."""
    monkeypatch.chdir(tmp_path)  # wandb may write next to the working directory
    paths = run(model, tmp_path / "videos", captions=training_captions(1), step=7)
    cfg = TrainerConfig(max_steps=10, progress_bar=False, wandb=WandbConfig(mode="offline", project="test"))
    logger = MetricsLogger(cfg, tmp_path / "run", {"model": "tiny"}, 0, enabled=True)
    try:
        logger.log({"step": 7, "loss": 1.0})
        logger.log_videos(7, {"val/video_0": paths[0]}, FPS)
    finally:
        logger.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record == {"step": 7, "videos": {"val/video_0": str(paths[0])}, "fps": FPS}
    stored = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/videos/val/video_0_*.mp4"))
    assert len(stored) == 1, list((tmp_path / "run" / "wandb").rglob("*"))
    assert stored[0].read_bytes() == paths[0].read_bytes()
