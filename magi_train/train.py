"""Training entry point.

    torchrun --nproc_per_node 1 magi_train/train.py experiment=tiny
    torchrun --nproc_per_node 1 magi_train/train.py model=tiny trainer.max_steps=50 optimizer.lr=3e-4
    python magi_train/train.py -m experiment=tiny trainer.seed=1,2   # jobs in runs/tiny/0 and runs/tiny/1

Any config value can be overridden on the command line (Hydra syntax, see conf/config.yaml).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

# Run as a script, Python puts magi_train/ first on sys.path, where our sub-packages (config, data, model)
# could shadow same-named top-level modules; the installed package is what we import.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from magi_train.config import config_dir, register_configs, to_train_config  # noqa: E402
from magi_train.observability.loss_curve import summarize  # noqa: E402
from magi_train.parallel.groups import init_parallel, shutdown  # noqa: E402
from magi_train.training.trainer import Trainer  # noqa: E402


def job_output_dir(output_dir: str) -> str:
    """trainer.output_dir of this Hydra job: under a multirun (-m) each job trains in <output_dir>/<job number>,
    as Hydra's own sweep directory does (conf/config.yaml), since one directory holds one run."""
    if not HydraConfig.initialized():
        return output_dir  # called as a function, not through @hydra.main
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return output_dir
    return str(Path(output_dir) / str(hydra_cfg.job.num))


def run(cfg: DictConfig) -> dict:
    train_cfg = to_train_config(cfg)
    output_dir = job_output_dir(train_cfg.trainer.output_dir)
    if output_dir != train_cfg.trainer.output_dir:
        train_cfg = replace(train_cfg, trainer=replace(train_cfg.trainer, output_dir=output_dir))
    parallel = init_parallel(train_cfg.parallel)
    try:
        # The objective (flow matching, or distillation with experiment=distill) comes from the config.
        trainer = Trainer(train_cfg, parallel)
        history = trainer.fit()
        report = summarize(history) if any("loss" in h for h in history) else {}
        if parallel.is_main and report:
            line = (f"loss curve: {report['first_loss']:.4f} -> {report['last_loss']:.4f} "
                    f"({100 * report['loss_drop']:.1f}% lower, mean of first vs last 10% of steps)")
            if "eval_loss_drop" in report:
                line += (f"; held-out loss {report['first_eval_loss']:.4f} -> {report['last_eval_loss']:.4f} "
                         f"({100 * report['eval_loss_drop']:.1f}% lower)")
            print(line, flush=True)
        return report
    finally:
        shutdown()


register_configs()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
