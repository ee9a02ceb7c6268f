"""trainer.init_from under tensor (and sequence) parallelism: each TP2 rank holds exactly its slices of the
released weights (bit for bit what a TP1 run loads), and the first step's loss is the single-process one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tests.distributed.launch import run_ranks

TINY_BASE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_base"


def _config(out_dir: str, layout: dict):
    from magi_train.config import validate
    from magi_train.config.schema import ParallelConfig
    from tests.configs import tiny_train_config

    cfg = tiny_train_config(out_dir, max_steps=2, init_from=str(TINY_BASE))
    return validate(replace(cfg, parallel=ParallelConfig(**layout)))


def _run(out_dir: str):
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from magi_train.parallel.groups import init_parallel
    from magi_train.parallel.plan import shard_spec
    from magi_train.parallel.sharding import local_from_full
    from magi_train.training.trainer import Trainer
    from tests.distributed.common import single_process_parallel

    released = load_file(str(TINY_BASE / "inference_weight" / "model.safetensors"))
    layout = {"tp": 2, "sequence_parallel": True}
    cfg = _config(f"{out_dir}/tp2", layout)
    trainer = Trainer(cfg, init_parallel(cfg.parallel))
    mismatched, sharded = [], 0
    for name, p in trainer.model.state_dict().items():
        expected = local_from_full(released[name], shard_spec(trainer.model, name, released[name].shape))
        sharded += tuple(p.shape) != tuple(released[name].shape)
        if not torch.equal(p, expected.to(p.dtype)):
            mismatched.append(name)
    tp_loss = trainer.train_step()["loss"]
    trainer.close()
    oracle_cfg = _config(f"{out_dir}/tp1_{dist.get_rank()}", {})
    with Trainer(oracle_cfg, single_process_parallel()) as oracle:
        oracle_loss = oracle.train_step()["loss"]
    return {"mismatched": mismatched, "sharded": sharded, "step": trainer.step, "tp_loss": tp_loss,
            "oracle_loss": oracle_loss}


def test_tp2_init_from_holds_the_released_slices_and_steps_like_tp1(tmp_path):
    for result in run_ranks(2, _run, str(tmp_path)):
        assert result["mismatched"] == []
        assert result["sharded"] > 0  # some parameters really are split over the two ranks
        assert result["step"] == 1
        assert abs(result["tp_loss"] - result["oracle_loss"]) <= 1e-5 * abs(result["oracle_loss"])
