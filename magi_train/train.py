"""Training entry point.

    torchrun --nproc_per_node 1 magi_train/train.py experiment=tiny
    torchrun --nproc_per_node 1 magi_train/train.py model=tiny trainer.max_steps=50 optimizer.lr=3e-4

Any config value can be overridden on the command line (Hydra syntax, see conf/config.yaml).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts magi_train/ first on sys.path, where our sub-packages (config, data, model)
# could shadow same-named top-level modules; the installed package is what we import.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from magi_train.config import register_configs, to_train_config  # noqa: E402
from magi_train.parallel.groups import init_parallel, shutdown  # noqa: E402
from magi_train.training.trainer import Trainer, summarize  # noqa: E402


def run(cfg: DictConfig) -> dict:
    train_cfg = to_train_config(cfg)
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


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
