"""Validation videos as one captioned grid per evaluation: the tiling, the drawn captions, the PNG, and a
training run with wandb offline logging exactly one grid video per evaluation (the per-prompt files kept)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magi_train.training.evaluation.grid import (CELL_H, caption_overlay, read_frames, text_mask,
                                                 tile_videos, wrap, write_png)


def _video(frames, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def test_wrap_fits_the_columns_and_marks_a_cut():
    lines = wrap("a red circle moves slowly to the left while a blue square grows " * 3, 20)
    assert len(lines) == 3 and all(len(line) <= 20 for line in lines) and lines[-1].endswith("...")
    assert wrap("short caption", 20) == ["short caption"]
    assert wrap("x" * 45, 20, max_lines=5) == ["x" * 20, "x" * 20, "x" * 5]


def test_glyphs_are_drawn():
    mask = text_mask(["HI"])
    assert mask.shape == (CELL_H, 12)
    # H: both outer columns lit on all 7 rows, the middle row full; I: its centre column lit.
    h = mask[1:8, 0:5]
    assert h[:, 0].all() and h[:, 4].all() and h[3].all() and not h[0, 1:4].any()
    assert mask[1:8, 8].all()
    assert not text_mask([" "]).any()
    assert text_mask(["\u00e9"]).any()  # outside ASCII: drawn as '?', not dropped


def test_caption_pixels_differ_only_in_the_band():
    video = _video(4, 64, 320, 0)
    captioned = caption_overlay(video, "a red blob moves left")
    band = CELL_H + 2
    assert not np.array_equal(captioned[:, :band], video[:, :band])
    assert (captioned[:, :band] == 255).all(axis=-1).sum() > 4 * 50  # white glyph pixels in every frame
    assert np.array_equal(captioned[:, band:], video[:, band:])
    assert np.array_equal(caption_overlay(video, ""), video)


def test_tiles_are_laid_out_enlarged_and_padded():
    videos = [_video(3, 8, 16, 1), _video(2, 8, 16, 2), _video(3, 6, 8, 3)]
    grid = tile_videos(videos, ["one", None, "three"], min_tile_width=64)
    scale = 4  # 64 / the widest (16)
    h, w = 8 * scale, 16 * scale
    assert grid.shape == (3, 2 * h, 2 * w, 3)  # 3 tiles on a 2 x 2 grid, the longest video's frames
    plain = tile_videos(videos, [None, None, None], min_tile_width=64)
    enlarged = videos[0].repeat(scale, axis=1).repeat(scale, axis=2)
    assert np.array_equal(plain[:, :h, :w], enlarged)
    band = CELL_H + 2
    assert not np.array_equal(grid[:, :band, :w], plain[:, :band, :w])  # the caption is there
    assert np.array_equal(grid[:, band:h, :w], plain[:, band:h, :w])
    assert np.array_equal(grid[:, :h, w:], plain[:, :h, w:])  # no caption on tile 1
    assert np.array_equal(grid[2, :h, w:], grid[1, :h, w:])  # a shorter video holds its last frame
    assert not grid[:, h + 6 * scale:, :].any()  # tile 2 is 6 rows high: black padding below, and no tile 3
    with pytest.raises(ValueError, match="one caption per video"):
        tile_videos(videos, ["x"])


def test_png_round_trips(tmp_path):
    from magi_train.data.video_io import read_image

    image = _video(1, 10, 14, 4)[0]
    write_png(tmp_path / "x.png", image)
    back = read_image(tmp_path / "x.png", 10, 14)[0].numpy()
    assert np.array_equal(back, image)


def test_training_logs_one_grid_per_evaluation(tmp_path, monkeypatch):
    from magi_train.config.schema import WandbConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer
    from tests.configs import tiny_train_config

    monkeypatch.chdir(tmp_path)  # wandb may write next to the working directory
    out = tmp_path / "run"
    cfg = tiny_train_config(out, max_steps=2, sample_every=1, sample_steps=4, sample_count=3,
                            wandb=WandbConfig(mode="offline", project="test"))
    with Trainer(cfg, init_parallel(cfg.parallel)) as trainer:
        captions = trainer.held_out.batches.held_out[0]["text"]
        trainer.fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "videos" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for step, record in zip((1, 2), logged):
        assert sorted(record["videos"]) == ["video/0", "video/1", "video/2"]  # per-prompt files, as before
        assert record["grid"] == str(out / "videos" / f"step{step:07d}_grid.mp4")
        assert (out / "videos" / f"step{step:07d}_grid.png").is_file()
        assert all((out / "videos" / f"step{step:07d}_{i}.mp4").is_file() for i in range(3))
    # wandb stores the media it was given: one grid per evaluation, no per-prompt videos.
    stored = sorted(p.name for p in (out / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))
    assert len(stored) == 2 and all(name.startswith("grid_") for name in stored), stored
    # The caption is drawn over the top of tile 0: there the grid differs from the enlarged per-prompt video,
    # below the band it is the same picture (up to H.264).
    grid = read_frames(out / "videos" / "step0000002_grid.mp4").astype(np.int16)
    tile = read_frames(out / "videos" / "step0000002_0.mp4")
    scale = -(-256 // tile.shape[2])
    enlarged = tile.repeat(scale, axis=1).repeat(scale, axis=2).astype(np.int16)
    h, w = enlarged.shape[1:3]
    band = CELL_H + 2
    inside = np.abs(grid[:, :band, :w] - enlarged[:, :band]).mean()
    below = np.abs(grid[:, h // 2:h, :w] - enlarged[:, h // 2:]).mean()  # captions cover at most a third
    assert below < 6 and inside > 4 * below + 20, (inside, below)
    assert captions and isinstance(captions[0], str)
