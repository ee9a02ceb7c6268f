"""Distillation in the trainer (the distillation objective and the EMA callback): the student starts as the
teacher, step sizes cycle, the m = 1 target is the teacher's three-pass guided velocity and the m > 1 target
the Δt-weighted shortcut on the 64-step grid (both recomputed here from model calls and the formulas), and a
resumed run (EMA included) repeats the uninterrupted one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from magi_train.config import validate
from magi_train.config.schema import (DataConfig, DiffusionConfig, DistillConfig, OptimizerConfig, TrainConfig,
                                      TrainerConfig, WandbConfig)
from magi_train.observability.flops import SampleShape, forward_flops
from magi_train.model.attention import block_causal_ranges
from magi_train.parallel.groups import init_parallel
from magi_train.training.trainer import Trainer
from tests.configs import tiny_model

# Guidance scales chosen here (not the released ones) so that both buckets and all three passes matter.
T_RANGE, PREV, TEXT = [0.0, 0.5], [2.0, 1.25], [3.0, 0.5]


def base_config(out_dir, **trainer) -> TrainConfig:
    fields = dict(max_steps=2, output_dir=str(out_dir), progress_bar=False, num_threads=1,
                  wandb=WandbConfig(mode="disabled"))
    fields.update(trainer)
    return validate(TrainConfig(
        model=tiny_model(),
        data=DataConfig(num_samples=32, chunks_per_sample=2, latent_height=8, latent_width=8, caption_length=16,
                        micro_batch_size=2),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=0), trainer=TrainerConfig(**fields)))


def distill_config(teacher, out_dir, diffusion=None, **distill) -> TrainConfig:
    cfg = base_config(out_dir, max_steps=6)
    fields = dict(enabled=True, teacher=str(teacher), ema_decay=0.9, cfg_t_range=T_RANGE, prev_chunk_scales=PREV,
                  text_scales=TEXT)
    fields.update(distill)
    return validate(replace(cfg, model=replace(cfg.model, distill=True), distill=DistillConfig(**fields),
                            diffusion=diffusion or DiffusionConfig(caption_dropout=0.0)))


@pytest.fixture(scope="module")
def parallel():
    return init_parallel(TrainConfig().parallel)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, parallel):
    """A base model trained for two steps (its output layer is no longer zero)."""
    out = tmp_path_factory.mktemp("teacher")
    Trainer(base_config(out), parallel).fit()
    return out / "checkpoints"


def grid(k: int) -> float:
    """t of grid index k of the 64-step inference grid: s = (k/64)^2, shifted by 1/3: t = s / (3 - 2 s)."""
    s = (k / 64) ** 2
    return s / (3 - 2 * s)


def test_student_starts_as_the_teacher_and_step_sizes_cycle(teacher, parallel, tmp_path):
    trainer = Trainer(distill_config(teacher, tmp_path, step_cycle=[1, 1, 2, 4]), parallel)
    for (name, s), (_, t) in zip(trainer.model.named_parameters(), trainer.objective.teacher.named_parameters()):
        assert torch.equal(s, t), name
    history = trainer.fit()
    assert [h["step_size"] for h in history] == [1 / 64, 1 / 64, 2 / 64, 4 / 64, 1 / 64, 1 / 64]
    # Target passes are model FLOPs too: on top of the student's forward + backward (3 forwards), the
    # teacher's 3 forwards at m = 1 (the last step) or the 2 half steps at m > 1.
    d, m = trainer.cfg.data, trainer.cfg.model
    chunk = d.latent_frames_per_chunk * (d.latent_height // m.patch_size) * (d.latent_width // m.patch_size)
    forward = forward_flops(m, SampleShape((chunk,) * d.chunks_per_sample, d.caption_length)) * trainer.global_batch
    assert trainer.last_flops == 6 * forward
    trainer.step_micro_batches(2)  # m = 2
    assert trainer.last_flops == 5 * forward
    assert not torch.equal(trainer.model.final_linear.linear.weight, trainer.objective.teacher.final_linear.linear.weight)


def _one_micro_batch(trainer, m):
    trainer.objective.m = m
    (inputs, target), = trainer.batches.micro_batches(trainer.batches.dataset, [0, 1], stream=11)
    return inputs, target[:, :-1]


def test_finest_step_target_is_the_guided_teacher(teacher, parallel, tmp_path):
    t2v = DiffusionConfig(caption_dropout=0.0, i2v_prob=0.0, clean_prefix_prob=0.0)
    trainer = Trainer(distill_config(teacher, tmp_path, diffusion=t2v), parallel)
    (x_t, t, caption, mask, null_rows, _, dt), target = _one_micro_batch(trainer, 1)
    assert not null_rows.any() and torch.all(dt == 32.0)  # 64 steps: the released embedding input 32
    model = trainer.objective.teacher
    N, n = t.shape
    tokens = 16 * 6  # (8 / 2)^2 patches x 6 frames per chunk
    null = model.y_embedder.null_caption_embedding[:caption.shape[1]].expand(N * n, -1, -1)
    null_mask = (torch.arange(caption.shape[1]) < model.cfg.null_caption_length).expand(N * n, -1)
    with torch.no_grad():
        v_text = model(x_t, t, caption, mask, block_causal_ranges(N, n, tokens))
        v_ctx = model(x_t, t, null, null_mask, block_causal_ranges(N, n, tokens), adaln_uncond=torch.ones(N, dtype=torch.bool))
        v_alone = torch.cat([model(x_t[:, :, c * 6:(c + 1) * 6], t[:, c:c + 1], null[:N], null_mask[:N],
                                   block_causal_ranges(N, 1, tokens), adaln_uncond=torch.ones(N, dtype=torch.bool))
                             for c in range(n)], dim=2)
    for b in range(N):
        for c in range(n):
            bucket = 0 if t[b, c] < 0.5 else 1
            wp, wt = PREV[bucket], TEXT[bucket]
            f = slice(c * 6, (c + 1) * 6)
            expected = (1 - wp) * v_alone[b, :, f] + (wp - wt) * v_ctx[b, :, f] + wt * v_text[b, :, f]
            torch.testing.assert_close(target[b, :, f], expected, rtol=1e-5, atol=1e-5)
    # Times are on the 64-step grid.
    grid_t = torch.tensor([grid(k) for k in range(65)])
    assert all(bool((grid_t - v).abs().min() < 1e-7) for v in t.flatten())


def test_shortcut_target_is_the_dt_weighted_two_half_steps(teacher, parallel, tmp_path):
    t2v = DiffusionConfig(caption_dropout=0.0, i2v_prob=0.0, clean_prefix_prob=0.0)
    trainer = Trainer(distill_config(teacher, tmp_path, diffusion=t2v, shortcut_model="student"), parallel)
    with torch.no_grad():  # a student that differs from the teacher
        trainer.model.final_linear.linear.weight.mul_(1.5)
    m = 4
    (x_t, t, caption, mask, _, _, dt), target = _one_micro_batch(trainer, m)
    assert torch.all(dt == 8.0)  # a 16-step sampler's embedding input
    N, n = t.shape
    # Recover each chunk's grid index and take the half steps t -> G[k + 2] -> G[k + 4].
    ks = [[min(range(0, 65, m), key=lambda k: abs(grid(k) - float(t[b, c]))) for c in range(n)] for b in range(N)]
    assert all(k % m == 0 and abs(grid(k) - float(t[b, c])) < 1e-7 for b, row in enumerate(ks) for c, k in enumerate(row))
    t_mid = torch.tensor([[grid(k + m // 2) for k in row] for row in ks])
    t_end = torch.tensor([[grid(k + m) for k in row] for row in ks])
    dt1, dt2 = t_mid - t, t_end - t_mid
    per_frame = lambda v: v.repeat_interleave(6, dim=1)[:, None, :, None, None]  # noqa: E731
    ranges = block_causal_ranges(N, n, 16 * 6)
    student = trainer.model.eval()
    with torch.no_grad():
        v1 = student(x_t, t, caption, mask, ranges, distill_dt=16.0)  # the half step: a 32-step embedding
        v2 = student(x_t + per_frame(dt1) * v1, t_mid, caption, mask, ranges, distill_dt=16.0)
    expected = (per_frame(dt1) * v1 + per_frame(dt2) * v2) / per_frame(dt1 + dt2)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(target, (v1 + v2) / 2, atol=1e-4)  # the non-uniform grid matters


def test_resume_repeats_the_uninterrupted_run_with_its_ema(teacher, parallel, tmp_path):
    straight = Trainer(distill_config(teacher, tmp_path / "a"), parallel)
    full = straight.fit()
    part = Trainer(distill_config(teacher, tmp_path / "b"), parallel)
    part.cfg.trainer.save_every = 3
    first = part.fit(until=3)
    resumed = Trainer(replace(distill_config(teacher, tmp_path / "b"),
                                     trainer=replace(part.cfg.trainer, resume="auto")), parallel)
    assert resumed.step == 3
    rest = resumed.fit()
    assert [h["loss"] for h in first + rest] == [h["loss"] for h in full]
    (ema_a,), (ema_b,) = ([ema.state_dict() for ema in t.callbacks[0].weights] for t in (straight, resumed))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # The EMA trails the student.
    assert any(not torch.equal(ema_a[k], p) for k, p in straight.model.named_parameters())


def test_distill_settings_are_checked(teacher, tmp_path):
    cfg = distill_config(teacher, tmp_path)
    with pytest.raises(ValueError, match="diffusion.caption_dropout"):
        validate(replace(cfg, diffusion=DiffusionConfig(caption_dropout=0.1)))
    with pytest.raises(ValueError, match="model.distill=true"):
        validate(replace(cfg, model=replace(cfg.model, distill=False)))
    with pytest.raises(ValueError, match="distill.teacher"):
        validate(replace(cfg, distill=replace(cfg.distill, teacher="")))


# --- packed sequences (data=webdataset) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_setup(tmp_path_factory, parallel):
    """Shards, a base model trained on them for two steps, and the matching distillation config."""
    from tests.configs import webdataset_train_config as webdataset_config
    from tests.shard_helpers import write_dataset

    root = tmp_path_factory.mktemp("packed_distill")
    write_dataset(root / "train", shards=2, per_shard=6, chunk_width=2, seed=4)
    base = webdataset_config(root / "train", root / "base", max_steps=2)
    Trainer(base, parallel).fit()
    cfg = replace(base, model=replace(base.model, distill=True),
                  diffusion=DiffusionConfig(caption_dropout=0.0, i2v_prob=0.0, clean_prefix_prob=0.0),
                  distill=DistillConfig(enabled=True, teacher=str(root / "base" / "checkpoints"), cfg_t_range=T_RANGE,
                                        prev_chunk_scales=PREV, text_scales=TEXT, shortcut_model="student"),
                  trainer=replace(base.trainer, output_dir=str(root / "distill")))
    return validate(cfg)


def _dense_pieces(inputs, samples, cfg):
    """Per sample of a packed sequence: (x_t (1, C, T, H, W), t (1, n), caption rows, mask rows, token slice)."""
    from einops import rearrange

    patches, t, caption, mask = inputs[:4]
    pos = row = 0
    for s in samples:
        C, T, H, W = s.latent.shape
        n = 1 if T == 1 else T // cfg.model.chunk_width
        tokens = T * (H // 2) * (W // 2)
        x = rearrange(patches[0, pos:pos + tokens], "(t h w) (c ph pw) -> 1 c t (h ph) (w pw)", t=T, h=H // 2,
                      w=W // 2, ph=2, pw=2)
        yield x, t[:, row:row + n], caption[row:row + n], mask[row:row + n], slice(pos, pos + tokens)
        pos, row = pos + tokens, row + n


def _per_sample_velocity(dense_out, sl, target):
    from einops import rearrange

    return rearrange(dense_out[0], "c t (h ph) (w pw) -> (t h w) (c ph pw)", ph=2, pw=2), target[0, :-1, sl].t()


def test_packed_targets_equal_the_per_sample_formulas(packed_setup, parallel):
    from magi_train.data.loader import WebDatasetLoader

    trainer = Trainer(packed_setup, parallel)
    trainer.close()  # no training: the run directory is released for the next test's trainer
    seq = next(iter(WebDatasetLoader(trainer.cfg.data, trainer.cfg.model, 0, 1)))
    assert len(seq.samples) >= 2
    teacher, student = trainer.objective.teacher, trainer.model
    with torch.no_grad():
        student.final_linear.linear.weight.mul_(1.5)
    # m = 1: three teacher passes per sample, combined by the formula with the scales of each chunk's t.
    trainer.objective.m = 1
    (inputs, target), = trainer.batches.packed_micro_batches([seq], stream=5)
    assert float(inputs[6]) == 32.0
    L = inputs[2].shape[1]
    for x, t, caption, mask, sl in _dense_pieces(inputs, seq.samples, trainer.cfg):
        n, cw = t.shape[1], x.shape[2] // t.shape[1]
        tokens = x.shape[2] // n * x.shape[3] * x.shape[4] // 4
        null = teacher.y_embedder.null_caption_embedding[:L].expand(n, -1, -1)
        null_mask = (torch.arange(L) < teacher.cfg.null_caption_length).expand(n, -1)
        yes = torch.ones(1, dtype=torch.bool)
        with torch.no_grad():
            v_text = teacher(x, t, caption, mask, block_causal_ranges(1, n, tokens))
            v_ctx = teacher(x, t, null, null_mask, block_causal_ranges(1, n, tokens), adaln_uncond=yes)
            v_alone = torch.cat([teacher(x[:, :, c * cw:(c + 1) * cw], t[:, c:c + 1], null[:1], null_mask[:1],
                                         block_causal_ranges(1, 1, tokens), adaln_uncond=yes) for c in range(n)], dim=2)
        expected = torch.zeros_like(v_text)
        for c in range(n):
            bucket = 0 if t[0, c] < 0.5 else 1
            wp, wt = PREV[bucket], TEXT[bucket]
            f = slice(c * cw, (c + 1) * cw)
            expected[:, :, f] = (1 - wp) * v_alone[:, :, f] + (wp - wt) * v_ctx[:, :, f] + wt * v_text[:, :, f]
        want, got = _per_sample_velocity(expected, sl, target)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # m = 2: two student half steps (m = 1, embedding 32) on the grid, Δt-weighted, per sample.
    trainer.objective.m = 2
    (inputs, target), = trainer.batches.packed_micro_batches([seq], stream=5)
    assert float(inputs[6]) == 16.0
    student.eval()
    for x, t, caption, mask, sl in _dense_pieces(inputs, seq.samples, trainer.cfg):
        n, cw = t.shape[1], x.shape[2] // t.shape[1]
        tokens = x.shape[2] // n * x.shape[3] * x.shape[4] // 4
        ks = [min(range(0, 65, 2), key=lambda k: abs(grid(k) - float(v))) for v in t[0]]
        assert all(abs(grid(k) - float(v)) < 1e-7 for k, v in zip(ks, t[0]))
        t_mid = torch.tensor([[grid(k + 1) for k in ks]])
        d1 = (t_mid - t).repeat_interleave(cw, dim=1)[:, None, :, None, None]
        d2 = (torch.tensor([[grid(k + 2) for k in ks]]) - t_mid).repeat_interleave(cw, dim=1)[:, None, :, None, None]
        ranges = block_causal_ranges(1, n, tokens)
        with torch.no_grad():
            v1 = student(x, t, caption, mask, ranges, distill_dt=32.0)
            v2 = student(x + d1 * v1, t_mid, caption, mask, ranges, distill_dt=32.0)
        want, got = _per_sample_velocity((d1 * v1 + d2 * v2) / (d1 + d2), sl, target)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_distillation_trains_on_shards(packed_setup, parallel):
    cfg = replace(packed_setup, distill=replace(packed_setup.distill, step_cycle=[1, 2]),
                  trainer=replace(packed_setup.trainer, max_steps=4))
    history = Trainer(cfg, parallel).fit()
    assert [h["step_size"] for h in history] == [1 / 64, 2 / 64] * 2
    assert all(h["loss"] > 0 and h["packing_util"] > 0 for h in history)
