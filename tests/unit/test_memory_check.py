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
