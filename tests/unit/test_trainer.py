"""The single-process trainer: checkpoints, precision, non-finite steps, the EMA callback and objectives
(the learning signal and the exact resume of a 20-step run: tests/e2e/test_trainer_runs.py)."""

import math
from dataclasses import asdict, replace

import pytest
import torch

from magi_train.checkpoint.manager import CheckpointManager
from magi_train.config.schema import TrainConfig
from magi_train.parallel.groups import init_parallel
from magi_train.training.resume_config import ConfigChangeError
from magi_train.training.trainer import Trainer
from tests.configs import tiny_train_config as tiny_config


@pytest.fixture(scope="module")
def parallel():
    return init_parallel(TrainConfig().parallel)


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_checkpoints_keep_last_and_resume_from_path(tmp_path, parallel):
    cfg = tiny_config(tmp_path, save_every=4, keep_last=2)
    cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=12))
    Trainer(cfg, parallel).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000008", "step_00000012"]
    t = Trainer(replace(cfg, trainer=replace(cfg.trainer, resume=str(tmp_path / "checkpoints" / "step_00000008"))), parallel)
    assert t.step == 8
    t.close()  # a trainer holds its output_dir until fit returns or close()
    with pytest.raises((FileNotFoundError, ValueError), match="step_00000004"):
        Trainer(replace(cfg, trainer=replace(cfg.trainer, resume=str(tmp_path / "checkpoints" / "step_00000004"))), parallel)


def test_resume_from_a_model_only_checkpoint_takes_its_weights_and_step(tmp_path, parallel):
    """A model-only checkpoint (what tools/convert_checkpoint.py to-ours writes: weights and trainer.json, no
    optimizer state) starts a run at its step with its weights, bit for bit."""
    cfg = tiny_config(tmp_path / "run")
    with Trainer(cfg, parallel) as first:
        weights = {k: v.detach() + 0.01 for k, v in first.model.state_dict().items()}
    path = CheckpointManager(tmp_path / "ours", keep_last=0).save(7, {"model": weights,
                                                                      "trainer": {"step": 7, "config": asdict(cfg)}})
    with Trainer(replace(cfg, trainer=replace(cfg.trainer, resume=str(path))), parallel) as resumed:
        assert resumed.step == 7
        loaded = resumed.model.state_dict()
        assert sorted(loaded) == sorted(weights)
        assert all(torch.equal(loaded[k], w) for k, w in weights.items())


def test_bf16_autocast_trains_close_to_fp32(tmp_path, parallel):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path / precision)
        cfg = replace(cfg, trainer=replace(cfg.trainer, precision=precision, max_steps=4))
        runs[precision] = losses(Trainer(cfg, parallel).fit())
    assert all(math.isfinite(v) for v in runs["bf16"])
    assert runs["bf16"] != runs["fp32"], "bf16 autocast had no effect"
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=2e-2)


def test_resume_with_another_model_preset_names_the_mismatch(tmp_path, parallel):
    cfg = tiny_config(tmp_path, save_every=2)
    Trainer(replace(cfg, trainer=replace(cfg.trainer, max_steps=2)), parallel).fit()
    wider = replace(cfg, model=replace(cfg.model, ffn_hidden_size=256), trainer=replace(cfg.trainer, resume="auto"))
    # The config check names the field before any weight is read ...
    with pytest.raises(ConfigChangeError, match=r"model.ffn_hidden_size: checkpoint 512, now 256"):
        Trainer(wider, parallel)
    # ... and a change let through on purpose still fails at the weights, naming the tensors.
    allowed = replace(wider, trainer=replace(wider.trainer, allow_config_change=["model.ffn_hidden_size"]))
    with pytest.raises(ValueError, match=r"linear_fc1.weight"):
        Trainer(allowed, parallel)


def test_non_finite_steps_are_skipped_counted_and_bounded(tmp_path, parallel, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, max_bad_steps=1), parallel)
    trainer.train_step()
    real = trainer.forward_backward
    poisoned = {2, 4, 5}  # step 2 alone; then 4 and 5 in a row, one more than max_bad_steps allows

    def forward_backward(micro, backward=True):
        total = real(micro, backward)
        return total * float("nan") if trainer.step in poisoned else total

    monkeypatch.setattr(trainer, "forward_backward", forward_backward)
    trainer.train_step()  # step 1: fine
    before = {k: v.detach().clone() for k, v in trainer.named_parameters()}
    rec = trainer.train_step()  # step 2: NaN loss -> no update, counted
    assert math.isnan(rec["loss"]) and rec["skipped_steps"] == 1 and trainer.step == 3
    assert all(torch.equal(before[k], v) for k, v in trainer.named_parameters())
    rec = trainer.train_step()  # step 3: fine again, the count stays in the log
    assert math.isfinite(rec["loss"]) and rec["skipped_steps"] == 1
    assert any(not torch.equal(before[k], v) for k, v in trainer.named_parameters())
    trainer.train_step()  # step 4: skipped (1 in a row)
    with pytest.raises(FloatingPointError, match="trainer.max_bad_steps=1"):
        trainer.train_step()  # step 5: the second in a row


def test_ema_callback_on_flow_matching_follows_the_formula_and_resumes_exactly(tmp_path, parallel):
    """Any run can keep an EMA: ema_0 = the initial weights, ema_k = d ema_(k-1) + (1 - d) w_k after each
    optimizer step (fp32), saved as `ema.*` and reloaded exactly on resume; a checkpoint without one starts
    the EMA from its weights."""
    from magi_train.checkpoint.distributed import checkpoint_has
    from magi_train.training.ema import EmaCallback

    decay = 0.75
    cfg = tiny_config(tmp_path / "ema", save_every=2)
    cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=3))
    trainer = Trainer(cfg, parallel, callbacks=[EmaCallback(decay)])
    expected = {k: v.detach().float().clone() for k, v in trainer.named_parameters()}
    for _ in range(2):
        trainer.train_step()
        expected = {k: decay * expected[k] + (1 - decay) * v.detach().float() for k, v in trainer.named_parameters()}
    (ema,) = trainer.callbacks[0].weights
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(expected[k], v) for k, v in trainer.named_parameters())  # it trails the weights
    path = trainer.save()
    trainer.close()
    assert checkpoint_has(path, "ema")
    resumed = Trainer(replace(cfg, trainer=replace(cfg.trainer, resume=str(path))), parallel,
                      callbacks=[EmaCallback(decay)])
    (back,) = resumed.callbacks[0].weights
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ema.state_dict().items())
    # A plain checkpoint (no EMA in it): the EMA starts as the resumed weights.
    Trainer(replace(cfg, trainer=replace(cfg.trainer, output_dir=str(tmp_path / "plain"))), parallel).fit(until=2)
    plain = Trainer(replace(cfg, trainer=replace(cfg.trainer, output_dir=str(tmp_path / "plain"), resume="auto")),
                    parallel, callbacks=[EmaCallback(decay)])
    (fresh,) = plain.callbacks[0].weights
    assert all(torch.equal(fresh.state_dict()[k], v.float()) for k, v in plain.named_parameters())


def test_an_objective_sets_per_step_state_flops_and_metrics(tmp_path, parallel):
    """The objective interface: begin_step before each step's batch, begin_eval before validation, its FLOP
    scale in the step's count and its metrics in the step's record."""
    from magi_train.training.objectives.flow_matching import FlowMatching

    class Recording(FlowMatching):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.calls = []

        def begin_step(self, step):
            self.calls.append(("step", step))

        def begin_eval(self):
            self.calls.append(("eval",))

        def scale_flops(self, flops):
            return 2 * flops

        def metrics(self):
            return {"seen": float(len(self.calls))}

    cfg = tiny_config(tmp_path / "plain")
    cfg = replace(cfg, trainer=replace(cfg.trainer, max_steps=2, eval_every=2, eval_t=[0.5], eval_batches=1))
    plain = Trainer(cfg, parallel)
    plain_history = plain.fit()
    objective = Recording(cfg.diffusion)
    trainer = Trainer(replace(cfg, trainer=replace(cfg.trainer, output_dir=str(tmp_path / "custom"))), parallel,
                      objective=objective)
    history = trainer.fit()
    assert objective.calls == [("eval",), ("step", 0), ("step", 1), ("eval",)]
    assert [h.get("seen") for h in history] == [None, 2.0, 3.0]
    assert trainer.last_flops == 2 * plain.last_flops
    # The same draws and targets as the built-in flow matching: the same losses.
    assert losses(history) == losses(plain_history)


# ---------------------------------------------------------------- one run per output directory
def test_a_second_trainer_on_a_held_output_dir_fails_naming_the_first(tmp_path, parallel):
    import os

    from magi_train.training.run_dir import RunDirError

    cfg = tiny_config(tmp_path, max_steps=2)
    first = Trainer(cfg, parallel)
    with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by another trainer: pid {os.getpid()}"):
        Trainer(replace(cfg, trainer=replace(cfg.trainer, resume="auto")), parallel)
    first.fit()  # the run is over: the directory is free
    assert Trainer(replace(cfg, trainer=replace(cfg.trainer, resume="auto")), parallel).step == 2


def test_a_new_run_refuses_another_runs_directory_unless_told_to_overwrite(tmp_path, parallel, capsys):
    import json

    from magi_train.training.run_dir import RunDirError

    cfg = tiny_config(tmp_path, max_steps=3, save_every=2)
    Trainer(cfg, parallel).fit()
    with pytest.raises(RunDirError) as info:
        Trainer(cfg, parallel)
    message = str(info.value)
    assert "step_00000003" in message and "metrics" in message
    for way_out in ("trainer.resume=auto", "another trainer.output_dir", "trainer.overwrite=true"):
        assert way_out in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]

    capsys.readouterr()
    again = Trainer(replace(cfg, trainer=replace(cfg.trainer, overwrite=True, max_steps=1)), parallel)
    assert "trainer.overwrite=true: removed the previous run" in capsys.readouterr().out
    assert again.step == 0 and list((tmp_path / "checkpoints").iterdir()) == []
    again.fit()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


# ---------------------------------------------------------------- resume=auto over broken checkpoints
def _damage(path, how):
    """Flip one byte of a checkpoint file (its size stays) or cut its last byte; files from its marker."""
    from magi_train.checkpoint.manager import read_marker

    name = sorted(read_marker(path)["files"])[0]
    file = path / name
    data = bytearray(file.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-1]
    file.write_bytes(bytes(data))


def test_resume_auto_takes_the_newest_checkpoint_that_verifies_and_says_why_it_skipped_others(tmp_path, parallel,
                                                                                             capsys):
    from magi_train.checkpoint.manager import CorruptCheckpointError

    cfg = tiny_config(tmp_path, max_steps=6, save_every=2, keep_last=5)
    Trainer(cfg, parallel).fit()
    root = tmp_path / "checkpoints"
    _damage(root / "step_00000006", "flip")
    _damage(root / "step_00000004", "cut")
    auto = replace(cfg, trainer=replace(cfg.trainer, resume="auto"))
    capsys.readouterr()
    trainer = Trainer(auto, parallel)
    out = capsys.readouterr().out
    assert trainer.step == 2 and f"resumed from {root / 'step_00000002'} at step 2" in out
    assert f"warning: trainer.resume=auto skips {root / 'step_00000006'}" in out and "sha256" in out
    assert f"warning: trainer.resume=auto skips {root / 'step_00000004'}" in out and "truncated" in out
    trainer.close()
    # An explicit path that fails still raises.
    with pytest.raises(CorruptCheckpointError, match="step_00000006.*sha256"):
        Trainer(replace(cfg, trainer=replace(cfg.trainer, resume=str(root / "step_00000006"))), parallel)
    # None verifies: the run stops naming each, rather than starting from scratch over them.
    _damage(root / "step_00000002", "flip")
    with pytest.raises(CorruptCheckpointError) as info:
        Trainer(auto, parallel)
    message = str(info.value)
    assert all(f"step_0000000{s}:" in message for s in (2, 4, 6)) and "from scratch" in message


# ---------------------------------------------------------------- resume with another config
def test_resume_refuses_a_changed_seed_or_data_and_prints_other_changes(tmp_path, parallel, capsys):
    from magi_train.training.resume_config import ConfigChangeError

    cfg = tiny_config(tmp_path, max_steps=2, save_every=2)
    Trainer(cfg, parallel).fit()
    auto = replace(cfg, trainer=replace(cfg.trainer, resume="auto", max_steps=4))
    changed = replace(auto, data=replace(cfg.data, seed=7, global_batch_size=4),
                      trainer=replace(auto.trainer, seed=99))
    with pytest.raises(ConfigChangeError) as info:
        Trainer(changed, parallel)
    message = str(info.value)
    assert "data.seed: checkpoint 0, now 7" in message and "trainer.seed: checkpoint 1234, now 99" in message
    assert "checkpoint 2 samples per step, now 4" in message and "trainer.allow_config_change=[" in message
    capsys.readouterr()
    allowed = replace(changed, trainer=replace(changed.trainer, allow_config_change=["data", "trainer.seed"]))
    Trainer(allowed, parallel).close()
    assert "(allowed by trainer.allow_config_change)" in capsys.readouterr().out
    # The learning rate and the t shift may change: printed, then resumed.
    other = replace(auto, optimizer=replace(cfg.optimizer, lr=1e-3), diffusion=replace(cfg.diffusion, t_shift=0.5))
    trainer = Trainer(other, parallel)
    out = capsys.readouterr().out
    assert trainer.step == 2 and "optimizer.lr: checkpoint 0.002, now 0.001" in out and "diffusion.t_shift" in out
    assert "trainer.max_steps: checkpoint 2, now 4" in out
    trainer.close()


# ---------------------------------------------------------------- metrics that continue
def test_resume_rewrites_metrics_to_the_resumed_step_so_every_step_is_logged_once(tmp_path, parallel):
    import json

    cfg = tiny_config(tmp_path, max_steps=6, save_every=2)
    Trainer(cfg, parallel).fit(until=3)  # checkpoint at 2; step 3 logged after it
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:  # as if the run had gone on to step 4 and died writing step 5
        f.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    resumed = Trainer(replace(cfg, trainer=replace(cfg.trainer, resume="auto")), parallel)
    assert resumed.step == 3  # fit(until=3) saved its final step
    resumed.fit()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
