"""A checkpoint saved under TP2 x PP2 resumes under TP1 x PP1 and under DP2 and continues the same loss
curve (tiny SwiGLU preset, fp32, gloo ranks)."""

from __future__ import annotations

from dataclasses import replace

from tests.distributed.common import single_process_parallel, train_config
from tests.distributed.launch import run_ranks

STEPS_BEFORE, STEPS_AFTER = 3, 3


def _train_and_save(out_dir: str):
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    layout = {"tp": 2, "pp": 2, "sequence_parallel": True}
    trainer = Trainer(train_config(f"{out_dir}/tp2pp2", layout, max_steps=6, gated_linear_unit=True),
                      init_parallel(ParallelConfig(**layout)))
    before = [trainer.train_step()["loss"] for _ in range(STEPS_BEFORE)]
    path = trainer.save()
    after = [trainer.train_step()["loss"] for _ in range(STEPS_AFTER)]
    return {"before": before, "after": after, "path": str(path)}


def _resume(out_dir: str, path: str):
    import torch.distributed as dist

    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    runs = {}
    for name, layout, parallel in (
        ("dp2", {}, lambda: init_parallel(ParallelConfig())),
        ("tp1pp1", None, single_process_parallel),
    ):
        out = f"{out_dir}/{name}" if layout is not None else f"{out_dir}/{name}_{dist.get_rank()}"
        cfg = train_config(out, layout or {}, max_steps=6, gated_linear_unit=True)
        cfg = replace(cfg, trainer=replace(cfg.trainer, resume=path))
        trainer = Trainer(cfg, parallel())
        runs[name] = {"start": trainer.step, "after": [trainer.train_step()["loss"] for _ in range(STEPS_AFTER)]}
    return runs


def test_tp2_pp2_checkpoint_resumes_under_other_layouts(tmp_path):
    saved = run_ranks(4, _train_and_save, str(tmp_path))[0]
    assert saved["before"][0] != saved["after"][-1]
    for rank, runs in enumerate(run_ranks(2, _resume, str(tmp_path), saved["path"])):
        for name, run in runs.items():
            assert run["start"] == STEPS_BEFORE, (rank, name, run)
            for got, want in zip(run["after"], saved["after"]):
                assert abs(got - want) <= 1e-5 * abs(want), (rank, name, run["after"], saved["after"])
