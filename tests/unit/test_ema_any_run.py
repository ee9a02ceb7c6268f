"""An EMA for any run (trainer.ema_decay): updated after every optimizer step, saved as ema.<parameter> and
resumed exactly, sampled for the validation videos, loadable for inference; only trainable parameters."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from magi_train.checkpoint.distributed import checkpoint_has, read_full_weights
from magi_train.checkpoint.weights import load_weights
from magi_train.parallel.groups import init_parallel
from magi_train.training.ema import EmaCallback
from magi_train.training.objectives import build_callbacks
from magi_train.training.trainer import Trainer
from tests.configs import tiny_train_config

DECAY = 0.75  # far from 1, so that a few steps move the EMA measurably away from the weights


def _trainer(out, **trainer) -> Trainer:
    cfg = tiny_train_config(out, **trainer)
    return Trainer(cfg, init_parallel(cfg.parallel))


def _params(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def test_ema_follows_every_step_and_resumes_exactly(tmp_path):
    with _trainer(tmp_path / "straight", max_steps=4, ema_decay=DECAY, save_every=2) as straight:
        (ema,) = straight.callbacks
        assert isinstance(ema, EmaCallback) and ema.decay == DECAY
        expected = _params(straight.model)  # the EMA starts from the weights
        for _ in range(4):
            straight.train_step()
            for name, p in _params(straight.model).items():
                expected[name] = expected[name].mul_(DECAY).add_(p, alpha=1 - DECAY)
            if straight.step == 2:
                straight.save()
        shadow = ema.weights[0].state_dict()
        assert all(torch.equal(shadow[n], expected[n]) for n in expected)
        live = _params(straight.model)
        assert any(not torch.equal(shadow[n], live[n]) for n in live)  # the EMA is not the weights
        final = {n: t.clone() for n, t in shadow.items()}
    ckpt = tmp_path / "straight" / "checkpoints" / "step_00000002"
    assert checkpoint_has(ckpt, "ema")
    # Resumed from step 2 under the same config: the EMA at step 4 is the straight run's, bit for bit.
    resumed_dir = tmp_path / "resumed"
    with _trainer(resumed_dir, max_steps=4, ema_decay=DECAY, resume=str(ckpt)) as resumed:
        assert resumed.step == 2
        saved = read_full_weights(ckpt, "ema")
        assert all(torch.equal(resumed.callbacks[0].weights[0].state_dict()[n], saved[n]) for n in saved)
        resumed.train_step()
        resumed.train_step()
        got = resumed.callbacks[0].weights[0].state_dict()
        assert all(torch.equal(got[n], final[n]) for n in final)


def test_no_ema_by_default_and_distill_keeps_its_own():
    cfg = tiny_train_config("unused")
    assert build_callbacks(cfg) == []
    distill = replace(cfg, distill=replace(cfg.distill, enabled=True, ema_decay=0.99))
    (ema,) = build_callbacks(distill)
    assert ema.decay == 0.99
    both = replace(distill, trainer=replace(distill.trainer, ema_decay=0.9))
    with pytest.raises(ValueError, match=r"trainer\.ema_decay=0\.9 with distill\.enabled.*distill\.ema_decay"):
        build_callbacks(both)
    with pytest.raises(ValueError, match=r"trainer\.ema_decay \(1\.5\) must lie in \[0, 1\]"):
        build_callbacks(replace(cfg, trainer=replace(cfg.trainer, ema_decay=1.5)))


@pytest.mark.parametrize("sample_ema", [True, False])
def test_validation_videos_sample_the_ema(tmp_path, sample_ema):
    with _trainer(tmp_path / "run", max_steps=3, ema_decay=DECAY, sample_ema=sample_ema) as trainer:
        for _ in range(3):
            trainer.train_step()
        seen = {}
        trainer.held_out.videos = lambda model, out_dir, step: seen.update(_params(model)) or {}
        live = _params(trainer.model)
        trainer.validation_videos()
        shadow = trainer.callbacks[0].weights[0].state_dict()
        want = shadow if sample_ema else live
        assert all(torch.equal(seen[n], want[n]) for n in want)
        assert any(not torch.equal(shadow[n], live[n]) for n in live)
        after = _params(trainer.model)
        assert all(torch.equal(after[n], live[n]) for n in live)  # the live weights are back, exactly


def test_inference_loads_the_ema_of_a_checkpoint(tmp_path):
    with _trainer(tmp_path / "run", max_steps=2, ema_decay=DECAY) as trainer:
        trainer.fit()
        cfg = trainer.cfg.model
        shadow = {n: t.clone() for n, t in trainer.callbacks[0].weights[0].state_dict().items()}
    ckpt = tmp_path / "run" / "checkpoints"
    trained, _ = load_weights(ckpt, cfg, fp8=False)
    averaged, source = load_weights(ckpt, cfg, fp8=False, ema=True)
    assert "EMA" in source and set(averaged) == set(trained)
    for name, value in averaged.items():
        assert torch.equal(value, shadow[name] if name in shadow else trained[name]), name
    assert any(not torch.equal(averaged[n], trained[n]) for n in shadow)
    # The generate config's ckpt.ema makes the inference engine run on the EMA weights.
    from magi_infer import MagiPipeline

    pipe = MagiPipeline.from_pretrained(ckpt, overrides={"ckpt.ema": True, "progress": False})
    served = pipe.engine.model.state_dict()
    assert "EMA" in pipe.engine.source
    assert all(torch.equal(served[n].float(), averaged[n].float()) for n in shadow)
    # A run without an EMA says so.
    with _trainer(tmp_path / "plain", max_steps=1) as plain:
        plain.fit()
    with pytest.raises(ValueError, match="holds none"):
        load_weights(tmp_path / "plain" / "checkpoints", cfg, fp8=False, ema=True)


def test_only_trainable_parameters_are_averaged():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # e.g. a LoRA run's frozen base
    ema = EmaCallback(0.5)
    ema.start([model])
    assert ema.weights[0].names == ["1.weight", "1.bias"]
    frozen = model[0].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.after_optimizer_step([model])
    assert torch.equal(model[0].weight, frozen)
    with ema.swapped(model):
        assert torch.equal(model[1].weight, ema.weights[0].state_dict()["1.weight"])
    assert not torch.equal(model[1].weight, ema.weights[0].state_dict()["1.weight"])


def test_lora_run_averages_the_adapters_alone_and_resumes_them(tmp_path):
    from pathlib import Path

    from magi_train.config import validate

    base = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_base"

    def config(out, **trainer):
        cfg = tiny_train_config(out, init_from=str(base), ema_decay=DECAY, **trainer)
        return validate(replace(cfg, lora=replace(cfg.lora, rank=4)))

    cfg = config(tmp_path / "lora", max_steps=3, save_every=2)
    with Trainer(cfg, init_parallel(cfg.parallel)) as trainer:
        trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
        assert trainable and len(trainable) < len(list(trainer.model.named_parameters()))
        assert sorted(trainer.callbacks[0].weights[0].names) == trainable
        trainer.fit()
        final = {n: t.clone() for n, t in trainer.callbacks[0].weights[0].state_dict().items()}
    cfg = config(tmp_path / "lora", max_steps=3, save_every=2, resume=str(tmp_path / "lora" / "checkpoints"
                                                                           / "step_00000002"))
    with Trainer(cfg, init_parallel(cfg.parallel)) as resumed:
        assert resumed.step == 2
        resumed.train_step()
        got = resumed.callbacks[0].weights[0].state_dict()
        assert sorted(got) == sorted(final) and all(torch.equal(got[n], final[n]) for n in final)
