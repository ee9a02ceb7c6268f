"""Training metrics: one record per logged step, to stdout, a JSON-lines file and wandb (rank 0 only)."""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any, Dict, Optional

from tqdm.auto import tqdm

from magi_train.config.schema import TrainerConfig, WandbConfig

_LINE_KEYS = (("loss", ".4f"), ("eval_loss", ".4f"), ("grad_norm", ".3f"), ("lr", ".2e"), ("tokens_per_s", ".0f"),
              ("samples_per_s", ".2f"), ("mfu", ".3f"), ("time/step", ".3f"), ("skipped_steps", "d"))


def format_record(rec: Dict[str, Any], max_steps: int) -> str:
    parts = [f"step {rec['step']}/{max_steps}"]
    for key, fmt in _LINE_KEYS:
        if key in rec:
            parts.append(f"{key} {rec[key]:{fmt}}")
    return " | ".join(parts)


def wandb_key_configured() -> bool:
    """An API key as wandb itself finds one: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(cfg: WandbConfig) -> str:
    """trainer.wandb.mode with `auto` resolved: online with a key, else offline."""
    if cfg.mode == "auto":
        return "online" if wandb_key_configured() else "offline"
    if cfg.mode == "online" and not wandb_key_configured():
        raise ValueError("trainer.wandb.mode=online needs a wandb API key (WANDB_API_KEY or `wandb login`); "
                         "use trainer.wandb.mode=offline (or auto) to log to files without one")
    return cfg.mode


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
        mode = resolve_wandb_mode(cfg.wandb)
        if mode != "disabled":
            import wandb

            print(f"wandb: {mode}" + (" (no API key configured)" if cfg.wandb.mode == "auto" and mode == "offline"
                                      else ""), flush=True)
            self.wandb = wandb.init(
                project=cfg.wandb.project, name=cfg.wandb.name, mode=mode, dir=str(out_dir),
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

    def log_videos(self, step: int, videos: Dict[str, Path], fps: int) -> None:
        """Record validation videos (name -> mp4 path): a JSON line with their paths, and wandb media.

        The line has no "loss", so readers of metrics.jsonl tell the kinds of record apart by their keys."""
        if not self.enabled:
            return
        paths = {name: str(path) for name, path in videos.items()}
        line = f"step {step}/{self.max_steps} | videos " + ", ".join(f"{k} {v}" for k, v in paths.items())
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "videos": paths, "fps": fps}) + "\n")
        if self.wandb is not None:
            import wandb

            # From a file wandb copies the mp4 as it is (no moviepy, no re-encode); its frame rate is the
            # file's own, so `fps` is not passed (wandb warns that it would be ignored).
            self.wandb.log({name: wandb.Video(path, format="mp4") for name, path in paths.items()}, step=step)

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
