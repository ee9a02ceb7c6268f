"""The trainer on webdataset shards: packed sequences, the loss mask and normalisation, exact resume with the
loader's position in the checkpoint, fixed-t validation on held-out shards."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from magi_train.config import validate
from magi_train.config.schema import DiffusionConfig, TrainConfig
from magi_train.data.loader import WebDatasetLoader
from magi_train.parallel.groups import init_parallel
from magi_train.training.trainer import Trainer
from tests.configs import WDS_CHUNK, webdataset_train_config
from tests.shard_helpers import write_dataset

CHUNK = WDS_CHUNK  # latent frames per chunk of the test model: short samples, many chunks


def config(shards: Path, out_dir: Path, val_shards: Path | None = None, diffusion=None, **trainer) -> TrainConfig:
    return webdataset_train_config(shards, out_dir, val_shards, diffusion, **trainer)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    train = write_dataset(root / "train", shards=4, per_shard=6, chunk_width=CHUNK, seed=1)
    val = write_dataset(root / "val", shards=2, per_shard=4, chunk_width=CHUNK, seed=2)
    return root, train, val


@pytest.fixture(scope="module")
def parallel():
    return init_parallel(TrainConfig().parallel)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def _recording(trainer: Trainer, seen: list) -> Trainer:
    """Record (epoch, sample key) of every sample the trainer trains on."""
    build = trainer.batches.packed_micro_batches

    def packed_micro_batches(sequences, stream, fixed_t=None):
        if fixed_t is None:
            seen.extend((seq.epoch, s.key) for seq in sequences for s in seq.samples)
        return build(sequences, stream, fixed_t)

    trainer.batches.packed_micro_batches = packed_micro_batches
    return trainer


def test_resume_continues_with_exactly_the_unseen_samples(shards, parallel, tmp_path):
    root, written, _ = shards
    full_seen, part_seen = [], []
    full = _recording(Trainer(config(root / "train", tmp_path / "a"), parallel), full_seen).fit()
    first = _recording(Trainer(config(root / "train", tmp_path / "b", save_every=3), parallel), part_seen).fit(until=3)
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step_00000003" / "trainer.json").read_text())
    assert saved["data_loader"]["format"] == "magi.webdataset_loader/1"
    assert losses(first) == losses(full)[:3]
    assert part_seen == full_seen[:len(part_seen)]
    before = len(part_seen)
    resumed = _recording(Trainer(config(root / "train", tmp_path / "b", save_every=3, resume="auto"), parallel), part_seen)
    assert resumed.step == 3
    rest = resumed.fit()
    assert len(rest) == 3 and all(h["loss"] > 0 for h in rest)
    # The resumed loader re-shuffles what is left of the epoch (the packing differs, so the losses do),
    # but the interrupted run and its resume together train on every sample of epoch 0 exactly once.
    assert len({e for e, _ in part_seen[before:]}) >= 1
    epoch0 = [key for epoch, key in part_seen if epoch == 0]
    assert max(e for e, _ in part_seen) >= 1, "the test must run past the first epoch"
    assert sorted(epoch0) == sorted(written)
    assert full[-1]["packing_util"] > 0.5 and full[-1]["data/delivered"] > 0


def _step_loss(trainer: Trainer, sequences) -> float:
    micro = trainer.batches.packed_micro_batches(sequences, stream=7)
    return trainer._sum_loss(trainer.forward_backward(micro, backward=False))


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_loss_is_the_mean_over_the_noisy_frames(shards, parallel, tmp_path, task, monkeypatch):
    """At initialisation the model predicts 0 (zero output layer); with zero noise the target is the latent,
    so the loss is sum(x^2) over the frames with loss / their element count: every t2v frame; i2v (all
    videos) drops the first latent frame of each video, images stay t2v."""
    root, _, _ = shards
    diffusion = DiffusionConfig(i2v_prob=1.0 if task == "i2v" else 0.0, clean_prefix_prob=0.0, caption_dropout=0.0)
    trainer = Trainer(config(root / "train", tmp_path, diffusion=diffusion), parallel)
    monkeypatch.setattr(trainer.batches, "noise", lambda stream, position, shape: torch.zeros(shape))
    sequences = []
    for seq in WebDatasetLoader(trainer.cfg.data, trainer.cfg.model, 0, 1):
        sequences.append(seq)
        if len(sequences) == 2:
            break
    num, den = 0.0, 0
    for seq in sequences:
        for s in seq.samples:
            x = s.latent.double()
            kept = x if (task == "t2v" or x.shape[1] == 1) else x[:, 1:]
            num += float(kept.square().sum())
            den += kept.numel()
    assert den > 0
    assert _step_loss(trainer, sequences) == pytest.approx(num / den, rel=1e-6)


def test_validation_loss_per_t_on_held_out_shards(shards, parallel, tmp_path):
    root, _, _ = shards
    ts = [0.2, 0.8]
    cfg = config(root / "train", tmp_path, val_shards=root / "val", max_steps=4, eval_every=2, eval_batches=2, eval_t=ts)
    trainer = Trainer(cfg, parallel)
    history = trainer.fit()
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    for h in evals:
        per_t = [h[f"eval_loss/t={t:g}"] for t in ts]
        assert h["eval_loss"] == pytest.approx(sum(per_t) / len(per_t))
    # Fixed samples and noise: evaluating twice gives the same numbers; the trained model's losses now differ by t.
    again = trainer.evaluate()
    assert again == {k: evals[-1][k] for k in again}
    assert again["eval_loss/t=0.2"] != again["eval_loss/t=0.8"]


def test_validation_without_val_shards_is_a_clear_error(shards, parallel, tmp_path):
    root, _, _ = shards
    trainer = Trainer(config(root / "train", tmp_path, eval_every=1), parallel)
    with pytest.raises(ValueError, match="data.val_shards"):
        trainer.evaluate()


def test_caption_length_must_hold_the_null_caption(shards, tmp_path):
    root, _, _ = shards
    cfg = config(root / "train", tmp_path)
    with pytest.raises(ValueError, match="data.caption_length"):
        validate(replace(cfg, data=replace(cfg.data, caption_length=3)))


def test_validation_videos_are_written_and_logged(shards, parallel, tmp_path):
    root, _, _ = shards
    cfg = config(root / "train", tmp_path, val_shards=root / "val", max_steps=2, sample_every=2, sample_count=2,
                 sample_steps=4, sample_chunks=2, log_every=1)
    Trainer(cfg, parallel).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    videos = [r for r in records if "videos" in r]
    assert [r["step"] for r in videos] == [2]
    from magi_train.data.video_io import probe_video

    assert len(videos[0]["videos"]) == 2
    for name, path in videos[0]["videos"].items():
        info = probe_video(path)
        # 2 chunks x CHUNK latent frames, 4 pixel frames each.
        assert info.frames == 2 * CHUNK * 4 and info.width > 0, (name, info)


def test_motion_weight_weighs_each_token_by_its_patch(shards, parallel, tmp_path, monkeypatch):
    """diffusion.motion_weight: the same zero-prediction loss with each token's squared error weighed by the
    mean motion weight of its patch, over the same element count (t2v: every frame has loss)."""
    from magi_train.data.packed_inputs import patchify
    from magi_train.diffusion.objective import motion_weight

    root, _, _ = shards
    diffusion = DiffusionConfig(i2v_prob=0.0, clean_prefix_prob=0.0, caption_dropout=0.0, motion_weight=3.0)
    trainer = Trainer(config(root / "train", tmp_path, diffusion=diffusion), parallel)
    monkeypatch.setattr(trainer.batches, "noise", lambda stream, position, shape: torch.zeros(shape))
    m = trainer.cfg.model
    sequences = []
    for seq in WebDatasetLoader(trainer.cfg.data, m, 0, 1):
        sequences.append(seq)
        if len(sequences) == 2:
            break
    num, plain, den = 0.0, 0.0, 0
    for seq in sequences:
        for s in seq.samples:
            x = s.latent.double()
            w = patchify(motion_weight(x, diffusion)[None], m.t_patch_size, m.patch_size).mean(dim=1)
            num += float((patchify(x.square(), m.t_patch_size, m.patch_size).sum(dim=1) * w).sum())
            plain += float(x.square().sum())
            den += x.numel()
    assert num > plain * 1.05, "the test shards must have moving content for the weight to change the loss"
    assert _step_loss(trainer, sequences) == pytest.approx(num / den, rel=1e-5)
