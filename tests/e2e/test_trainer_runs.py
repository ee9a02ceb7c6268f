"""Whole single-process training runs of the tiny model: it learns (held-out loss falls), and a run stopped
at step 10 and resumed reproduces the uninterrupted 20-step run exactly (20 steps == 10 + resume + 10 on CPU)."""

from dataclasses import replace

import pytest
import torch

from magi_train.config.schema import TrainConfig
from magi_train.parallel.groups import init_parallel
from magi_train.observability.loss_curve import summarize
from magi_train.training.trainer import Trainer
from tests.configs import tiny_train_config as tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parallel():
    return init_parallel(TrainConfig().parallel)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path, parallel):
    straight = Trainer(tiny_config(tmp_path / "a"), parallel).fit()

    part1 = Trainer(tiny_config(tmp_path / "b", save_every=10), parallel).fit(until=10)  # "interrupted"
    resumed = Trainer(tiny_config(tmp_path / "b", save_every=10, resume="auto"), parallel)
    assert resumed.step == 10
    part2 = resumed.fit()

    assert len(losses(straight)) == 20
    assert losses(part1) + losses(part2) == losses(straight)  # bit-identical floats
    a = Trainer(tiny_config(tmp_path / "a", resume="auto"), parallel)
    b = Trainer(tiny_config(tmp_path / "b", resume="auto"), parallel)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_tiny_model_learns(tmp_path, parallel):
    cfg = tiny_config(tmp_path, eval_every=30)
    cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=60))
    report = summarize(Trainer(cfg, parallel).fit())
    assert report["eval_loss_drop"] > 0.15, report
