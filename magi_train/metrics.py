"""Training metrics: one record per logged step, to stdout, a JSON-lines file and wandb (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from tqdm.auto import tqdm

from magi_train.config.schema import TrainerConfig


def format_record(rec: Dict[str, Any], max_steps: int) -> str:
    parts = [f"step {rec['step']}/{max_steps}"]
    for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("grad_norm", ".3f"), ("lr", ".2e"), ("tokens_per_s", ".0f")):
        if key in rec:
            parts.append(f"{key} {rec[key]:{fmt}}")
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, cfg: TrainerConfig, out_dir: Path, run_config: Dict[str, Any], start_step: int, enabled: bool):
        self.enabled = enabled
        self.max_steps = cfg.max_steps
        self.path = out_dir / "metrics.jsonl"
        self.bar: Optional[tqdm] = None
        self.wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.progress_bar:
            self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode, dir=str(out_dir),
                config=run_config, resume="allow", settings=wandb.Settings(silent=True),
            )

    def log(self, rec: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = format_record(rec, self.max_steps)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def advance(self, steps: int = 1, loss: Optional[float] = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
