"""Operations inside the trainer: graceful stop (stop file, signals), throughput and MFU figures, the
step-time breakdown, wandb's mode, and the run config kept with every checkpoint."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from magi_train.config import validate
from magi_train.config.validate import ConfigError
from magi_train.config.schema import TrainerConfig, WandbConfig
from magi_train.observability.flops import SampleShape, train_flops
from magi_train.observability.metrics import format_record, resolve_wandb_mode
from magi_train.parallel.groups import init_parallel
from magi_train.training.stop import StopRequest, parse_signal
from magi_train.observability.throughput import peak_flops_per_device, throughput_record
from magi_train.training.trainer import Trainer
from tests.configs import tiny_train_config


def tiny_config(out_dir, max_steps=20, **trainer):
    return tiny_train_config(out_dir, max_steps=max_steps, **trainer)


@pytest.fixture(scope="module")
def parallel():
    from magi_train.config.schema import TrainConfig

    return init_parallel(TrainConfig().parallel)


# ---------------------------------------------------------------- stop requests
def test_stop_file_is_seen_and_removed_after_the_stop(tmp_path):
    stop = StopRequest(tmp_path / "STOP", ["SIGUSR1"], torch.device("cpu"), is_main=True)
    assert not stop.poll() and stop.reason is None
    (tmp_path / "STOP").touch()
    assert stop.poll() and stop.reason == f"stop file {tmp_path / 'STOP'}"
    stop.close()
    assert not (tmp_path / "STOP").exists()  # the resumed run must not stop at once


def test_signal_sets_a_flag_and_close_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGUSR2)
    stop = StopRequest(None, ["usr2"], torch.device("cpu"), is_main=True)
    stop.install()
    os.kill(os.getpid(), signal.SIGUSR2)  # handled: the test process lives on
    assert stop.poll() and stop.reason == "signal SIGUSR2"
    stop.close()
    assert signal.getsignal(signal.SIGUSR2) is before


def test_bad_stop_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="trainer.stop_signals: unknown signal 'SIGFOO'"):
        parse_signal("SIGFOO")
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        parse_signal("SIGKILL")
    cfg = tiny_config(tmp_path)
    for field, value, message in (("stop_signals", ["SIGFOO"], "trainer.stop_signals"),
                                  ("stop_file", "a/STOP", "trainer.stop_file"),
                                  ("peak_tflops", -1.0, "trainer.peak_tflops")):
        with pytest.raises(ConfigError, match=message):
            validate(replace(cfg, trainer=replace(cfg.trainer, **{field: value})))


def test_fit_stops_at_the_step_boundary_with_a_checkpoint_and_resumes(tmp_path, parallel):
    cfg = tiny_config(tmp_path, max_steps=8)
    trainer = Trainer(cfg, parallel)
    (tmp_path / "STOP").touch()  # asked before the first step: the step in flight finishes, then it saves
    history = trainer.fit()
    assert [h["step"] for h in history] == [1] and trainer.stop.reason.startswith("stop file")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert not (tmp_path / "STOP").exists()

    resumed = Trainer(replace(cfg, trainer=replace(cfg.trainer, resume="auto")), parallel)
    assert resumed.step == 1
    assert [h["step"] for h in resumed.fit()] == list(range(2, 9))
    # A run resumed at its last step has nothing to train and writes no second copy of that checkpoint.
    done = Trainer(replace(cfg, trainer=replace(cfg.trainer, resume="auto")), parallel)
    assert done.fit() == [] and done.saved_step == 8


def test_checkpoint_keeps_the_run_config(tmp_path, parallel):
    cfg = tiny_config(tmp_path, max_steps=1)
    Trainer(cfg, parallel).fit()
    kept = json.loads((tmp_path / "checkpoints" / "step_00000001" / "trainer.json").read_text())["config"]
    assert kept["trainer"]["max_steps"] == 1 and kept["model"]["num_layers"] == cfg.model.num_layers
    assert kept["data"] == json.loads(json.dumps(vars(cfg.data)))


# ---------------------------------------------------------------- throughput
def test_throughput_figures_by_hand():
    rec = throughput_record(seconds=2.0, tokens=1000, samples=4, flops=8e12, devices=2, peak_flops=4e12)
    assert rec == {"time/step": 2.0, "tokens_per_s": 500.0, "samples_per_s": 2.0, "tflops_per_device": 2.0,
                   "mfu": 0.5}
    assert "mfu" not in throughput_record(2.0, 1000, 4, 8e12, 2, None)
    assert peak_flops_per_device(0.0, torch.device("cpu")) is None  # CPU: no peak unless configured
    assert peak_flops_per_device(989.4, torch.device("cpu")) == 989.4e12


def test_trainer_logs_step_phases_and_flops_of_its_batch(tmp_path, parallel):
    cfg = tiny_config(tmp_path, max_steps=2, peak_tflops=1.0)
    trainer = Trainer(cfg, parallel)
    rec = trainer.train_step()
    d, m = cfg.data, cfg.model
    # Tokens of one chunk counted from the data config, independently of the trainer's bookkeeping.
    chunk = d.latent_frames_per_chunk // m.t_patch_size * (d.latent_height // m.patch_size) * (d.latent_width // m.patch_size)
    batch = d.micro_batch_size  # global batch: one micro-batch on one rank
    assert trainer.last_flops == batch * train_flops(m, [SampleShape((chunk,) * d.chunks_per_sample, d.caption_length)])
    assert rec["tokens_per_s"] == pytest.approx(batch * d.chunks_per_sample * chunk / rec["time/step"])
    assert rec["samples_per_s"] == pytest.approx(batch / rec["time/step"])
    assert rec["mfu"] == pytest.approx(trainer.last_flops / rec["time/step"] / 1e12)
    phases = ["data", "forward", "backward", "comm", "optimizer"]
    assert all(rec[f"time/{p}"] > 0 for p in phases)
    assert sum(rec[f"time/{p}"] for p in phases) <= rec["time/step"]
    line = format_record(rec, cfg.trainer.max_steps)
    assert "samples_per_s" in line and "mfu" in line and "time/step" in line


# ---------------------------------------------------------------- wandb
def test_wandb_auto_is_online_only_with_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode(WandbConfig(mode="auto")) == "offline"
    with pytest.raises(ValueError, match="trainer.wandb.mode=online needs a wandb API key"):
        resolve_wandb_mode(WandbConfig(mode="online"))
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_wandb_mode(WandbConfig(mode="auto")) == "online"
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert resolve_wandb_mode(WandbConfig(mode="auto")) == "online"
    assert resolve_wandb_mode(WandbConfig(mode="disabled")) == "disabled"
    assert TrainerConfig().wandb.mode == "auto"
