"""trainer.init_from under tensor (+ sequence), pipeline and context parallelism: each rank holds exactly its
slices of the released weights (bit for bit what a TP1 run loads), and the first step's loss is the
single-process one."""

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
    # Two micro-batches per step (a pipeline needs at least pp), the same global batch for every layout.
    return validate(replace(cfg, parallel=ParallelConfig(**layout), data=replace(cfg.data, global_batch_size=4)))


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
    results = {}
    for name, layout in (("tp2", {"tp": 2, "sequence_parallel": True}), ("pp2", {"pp": 2}), ("cp2", {"cp": 2})):
        cfg = _config(f"{out_dir}/{name}", layout)
        trainer = Trainer(cfg, init_parallel(cfg.parallel))
        mismatched, sharded, held = [], 0, 0
        for model in trainer.models:
            for key, p in model.state_dict().items():
                expected = local_from_full(released[key], shard_spec(model, key, released[key].shape))
                sharded += tuple(p.shape) != tuple(released[key].shape)
                held += 1
                if not torch.equal(p, expected.to(p.dtype)):
                    mismatched.append(key)
        results[name] = {"mismatched": mismatched, "sharded": sharded, "held": held,
                         "loss": trainer.train_step()["loss"], "step": trainer.step}
        trainer.close()
    oracle_cfg = _config(f"{out_dir}/tp1_{dist.get_rank()}", {})
    with Trainer(oracle_cfg, single_process_parallel()) as oracle:
        results["oracle_loss"] = oracle.train_step()["loss"]
    return results


def test_init_from_under_tp_pp_cp_holds_the_released_slices_and_steps_like_tp1(tmp_path):
    per_rank = run_ranks(2, _run, str(tmp_path))
    for result in per_rank:
        oracle = result["oracle_loss"]
        for name in ("tp2", "pp2", "cp2"):
            run = result[name]
            assert run["mismatched"] == [] and run["step"] == 1, (name, run)
            assert abs(run["loss"] - oracle) <= 1e-5 * abs(oracle), (name, run["loss"], oracle)
        assert result["tp2"]["sharded"] > 0  # some parameters really are split over the two ranks
        assert result["pp2"]["held"] < 66  # each pipeline stage holds only its layers
