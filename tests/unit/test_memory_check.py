"""The training memory check: a run whose estimate exceeds what the device has free is refused up front, naming
the estimate's rows and the knobs; the tiny preset on this machine passes."""

from __future__ import annotations

import torch

from magi_train.config.compose import load_model_preset
from magi_train.observability.memory_check import Available, available_memory, check_train_memory
from tests.configs import tiny_train_config

CPU = torch.device("cpu")


def test_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       25000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory(CPU, meminfo) == Available(20000000 * 1024, f"MemAvailable of this host ({meminfo})")
    assert available_memory(CPU, tmp_path / "absent") is None  # unknown: the check is skipped, not guessed
    real = available_memory(CPU)
    assert real is not None and real.bytes > 0


def test_the_tiny_run_fits_this_machine(tmp_path):
    assert check_train_memory(tiny_train_config(tmp_path), 1, 1, 1, 1, CPU) is None


def test_a_24b_model_on_one_cpu_rank_is_refused_naming_the_rows_and_knobs(tmp_path):
    cfg = tiny_train_config(tmp_path)
    cfg.model = load_model_preset("magi1_24b")
    message = check_train_memory(cfg, 1, 1, 1, 1, CPU, available=Available(64 * 2**30, "test budget"))
    assert message is not None
    assert "GiB per rank" in message and "but the test budget is 64.00 GiB" in message
    for row in ("parameters", "gradients", "optimizer state", "activations"):
        assert row in message
    for knob in ("parallel.tp", "trainer.recompute", "data.micro_batch_size", "trainer.check_memory=false"):
        assert knob in message


def test_ranks_sharing_one_host_add_up(tmp_path):
    cfg = tiny_train_config(tmp_path)
    one = check_train_memory(cfg, 1, 1, 1, 1, CPU, available=Available(2**40, "x"))
    assert one is None
    # The same per-rank need times many ranks on one host no longer fits a small budget.
    from magi_train.observability.memory_check import train_estimate

    est, extra = train_estimate(cfg, 1, 1, 1, 1, "torch")
    per_rank = est.total + sum(v for _, v in extra)
    budget = Available(int(per_rank * 3.5), "budget")
    assert check_train_memory(cfg, 1, 1, 1, 1, CPU, ranks_sharing_device=3, available=budget) is None
    assert "x 4 ranks on this host" in check_train_memory(cfg, 1, 1, 1, 1, CPU, ranks_sharing_device=4, available=budget)


def test_the_trainer_refuses_before_building_the_model(tmp_path, monkeypatch):
    import pytest

    from magi_train.config.schema import TrainConfig
    from magi_train.observability import memory_check
    from magi_train.parallel.groups import init_parallel
    from magi_train.training import trainer as trainer_module

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model must not be built when the memory check fails")

    monkeypatch.setattr(memory_check, "available_memory", lambda device: Available(2**20, "test budget"))
    monkeypatch.setattr(trainer_module, "build_train_stages", must_not_build)
    parallel = init_parallel(TrainConfig().parallel)
    cfg = tiny_train_config(tmp_path)
    with pytest.raises(MemoryError, match=r"but the test budget is 0.00 GiB"):
        trainer_module.Trainer(cfg, parallel)
    # trainer.check_memory=false skips it (and then the model is built)
    cfg.trainer.check_memory = False
    with pytest.raises(AssertionError, match="must not be built"):
        trainer_module.Trainer(cfg, parallel)


def test_a_lora_run_is_planned_with_a_frozen_base_and_its_ema_counted(tmp_path):
    """The start-up check plans what the run trains: a LoRA run's frozen base has no gradients, optimizer state or
    masters (so it is far below full training), and an EMA of any run is counted for its trainable parameters."""
    from magi_train.observability.memory_check import train_estimate

    cfg = tiny_train_config(tmp_path)
    cfg.model = load_model_preset("magi1_4.5b")
    full, _ = train_estimate(cfg, 1, 1, 1, 1, "torch")
    cfg.lora.rank = 16
    lora, extra = train_estimate(cfg, 1, 1, 1, 1, "torch")
    assert lora.optimizer < full.optimizer / 100 and lora.grads < full.grads / 100
    assert extra == []
    cfg.trainer.ema_decay = 0.999
    _, extra = train_estimate(cfg, 1, 1, 1, 1, "torch")
    (name, ema), = extra
    assert name.startswith("EMA") and ema == 4 * 32_866_304  # fp32 copies of the rank-16 adapters only
