"""One training step under each layout gives the single-process loss and gradients; DP2 trains like one
process with the doubled batch (tiny preset, fp32, gloo ranks)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.distributed.common import rel_err, single_process_parallel, train_config
from tests.distributed.launch import run_ranks


def _step_errors(out_dir: str, cases):
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.grads import finalize_model_grads
    from magi_train.parallel.groups import init_parallel
    from magi_train.parallel.sharding import local_from_full
    from magi_train.trainer import Trainer

    import torch.distributed as dist
    results = {}
    for name, layout, model in cases:
        par = init_parallel(ParallelConfig(**layout))
        cfg = train_config(f"{out_dir}/{name}", layout, global_batch=16 if layout.get("pp", 1) * layout.get("dp", 1) > 2 else 8, **model)
        trainers = {
            "parallel": Trainer(cfg, par),
            "oracle": Trainer(replace(cfg, parallel=ParallelConfig(),
                                      trainer=replace(cfg.trainer, output_dir=f"{out_dir}/{name}/oracle{dist.get_rank()}")),
                              single_process_parallel()),
        }
        out = {}
        for key, trainer in trainers.items():
            trainer.optimizer.zero_grad()
            loss = trainer._sum_loss(trainer.forward_backward(trainer.step_micro_batches(0)))
            finalize_model_grads(trainer.models, trainer.parallel.groups.dp_cp)
            out[key] = (loss, trainer.grad_norm())
        full = dict(trainers["oracle"].named_parameters())
        worst, seen = 0.0, 0
        for model in trainers["parallel"].models:
            for pname, p in model.named_parameters():
                expected = local_from_full(full[pname].grad, model.shard_spec(pname, full[pname].shape))
                worst = max(worst, rel_err(p.grad, expected))
                seen += 1
        results[name] = {"loss": abs(out["parallel"][0] - out["oracle"][0]) / abs(out["oracle"][0]),
                         "grad_norm": abs(out["parallel"][1] - out["oracle"][1]) / out["oracle"][1],
                         "grad": worst, "params_checked": seen}
    return results


CASES_2 = [
    ("tp2", {"tp": 2}, {}),
    ("tp2_sp_swiglu", {"tp": 2, "sequence_parallel": True}, {"gated_linear_unit": True}),
    ("cp2", {"cp": 2}, {}),
    ("pp2_1f1b", {"pp": 2}, {}),
    ("pp2_interleaved", {"pp": 2, "vpp": 2, "pp_schedule": "interleaved_1f1b"}, {"num_layers": 4}),
    ("dp2", {}, {}),
]
CASES_4 = [
    ("tp2_cp2_sp", {"tp": 2, "cp": 2, "sequence_parallel": True}, {}),
    ("pp2_dp2", {"pp": 2}, {}),
]


@pytest.mark.parametrize("world,cases", [(2, CASES_2), (4, CASES_4)], ids=["2ranks", "4ranks"])
def test_one_step_matches_single_process(tmp_path, world, cases):
    per_rank = run_ranks(world, _step_errors, str(tmp_path), cases)
    for rank, results in enumerate(per_rank):
        for name, err in results.items():
            assert err["params_checked"] > 0, (rank, name)
            assert err["loss"] < 1e-5 and err["grad_norm"] < 1e-5 and err["grad"] < 1e-5, (rank, name, err)
