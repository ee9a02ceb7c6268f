"""Training metrics: one record per logged step, to stdout, a JSON-lines file and wandb (rank 0 only).

A resumed run continues the same records: metrics.jsonl is cut back to the steps the run does not train again
(`rewind_metrics`), and wandb goes on with the run id kept in the output directory (`wandb_run.json`), so a
run interrupted and resumed any number of times reads as one run in both.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from tqdm.auto import tqdm

from magi_train.checkpoint.atomic import replace_text
from magi_train.config.schema import TrainerConfig, WandbConfig

METRICS_FILE = "metrics.jsonl"
WANDB_RUN_FILE = "wandb_run.json"  # {"id": ...}: the wandb run a resumed run continues
GRID_VIDEO = "video/grid"  # the validation videos' grid (training/evaluation/grid.py): one per evaluation in wandb

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


def rewind_metrics(path: Path, step: int) -> Tuple[int, bool]:
    """Cut metrics file `path` back to the records a run starting at `step` does not log again: those of steps
    <= `step` (none when `step` is 0: a run from step 0 logs its step-0 evaluation again). Rewritten atomically
    when anything goes; returns (records dropped, whether one of them was a partial last line, the trace of an
    interrupted write). Any other line that is not a record is an error naming the line."""
    if not path.is_file():
        return 0, False
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept, dropped, partial = [], 0, False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            dropped += 1
            continue
        try:
            rec = json.loads(line)
            record_step = rec["step"]
            if not isinstance(record_step, int):
                raise TypeError(record_step)
        except (ValueError, KeyError, TypeError) as e:
            if number == len(lines) and not line.endswith("\n"):
                dropped, partial = dropped + 1, True
                continue
            raise ValueError(f"{path} line {number} is not a metrics record (a JSON object with an integer "
                             f"'step'): {line[:200]!r} ({type(e).__name__}); fix or remove that line, then resume "
                             f"again") from None
        if 0 < step and record_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        replace_text(path, "".join(kept))
    return dropped, partial


def _new_wandb_id() -> str:
    # wandb's own form: 8 characters of [a-z0-9].
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_run_id(out_dir: Path, continuing: bool) -> Tuple[str, bool]:
    """(run id, whether it continues a run): the id kept in out_dir/wandb_run.json when `continuing` (a
    resumed run), else a new one, written there for the runs that resume this one."""
    path = out_dir / WANDB_RUN_FILE
    if continuing and path.is_file():
        try:
            run_id = json.loads(path.read_text(encoding="utf-8"))["id"]
            if not (isinstance(run_id, str) and run_id):
                raise TypeError(run_id)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} does not hold a wandb run id ({{\"id\": \"...\"}}): {e!r}; delete it to "
                             f"log the resumed run as a new wandb run") from None
        return run_id, True
    run_id = _new_wandb_id()
    replace_text(path, json.dumps({"id": run_id}) + "\n")
    return run_id, False


class MetricsLogger:
    """Rank 0's records of a run that starts (or resumes) at `start_step` into `out_dir`."""

    def __init__(self, cfg: TrainerConfig, out_dir: Path, run_config: Dict[str, Any], start_step: int, enabled: bool):
        self.enabled = enabled
        self.max_steps = cfg.max_steps
        self.path = out_dir / METRICS_FILE
        self.bar: Optional[tqdm] = None
        self.wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # Records of steps this run trains again (logged before an interruption, after its last checkpoint).
        dropped, partial = rewind_metrics(self.path, start_step)
        if dropped:
            which = f"after step {start_step}" if start_step else "from step 0"
            print(f"{self.path}: dropped {dropped} record(s) {which}, which this run trains again"
                  + (" (one a partial last line of an interrupted write)" if partial else ""), flush=True)
        if cfg.progress_bar:
            self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        mode = resolve_wandb_mode(cfg.wandb)
        if mode != "disabled":
            import wandb

            print(f"wandb: {mode}" + (" (no API key configured)" if cfg.wandb.mode == "auto" and mode == "offline"
                                      else ""), flush=True)
            run_id, continuing = wandb_run_id(out_dir, continuing=start_step > 0)
            if continuing:
                print(f"wandb: continuing run {run_id} ({out_dir / WANDB_RUN_FILE})", flush=True)
            self.wandb = wandb.init(
                project=cfg.wandb.project, name=cfg.wandb.name, mode=mode, dir=str(out_dir), id=run_id,
                config=run_config, resume="allow" if continuing else None, settings=wandb.Settings(silent=True),
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
        """Record validation videos (name -> mp4 path): a JSON line with their paths, and wandb media: the
        evaluation's grid alone (the entry GRID_VIDEO, every prompt in one video) when there is one, else each
        video. The line holds the per-prompt videos under "videos" and the grid, if any, under "grid".

        The line has no "loss", so readers of metrics.jsonl tell the kinds of record apart by their keys."""
        if not self.enabled:
            return
        paths = {name: str(path) for name, path in videos.items()}
        grid = paths.pop(GRID_VIDEO, None)
        line = f"step {step}/{self.max_steps} | videos " + ", ".join(f"{k} {v}" for k, v in paths.items())
        if self.bar is not None:
            self.bar.write(line + (f" | grid {grid}" if grid else ""))
        else:
            print(line + (f" | grid {grid}" if grid else ""), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "videos": paths, **({"grid": grid} if grid else {}), "fps": fps}) + "\n")
        if self.wandb is not None:
            import wandb

            # From a file wandb copies the mp4 as it is (no moviepy, no re-encode); its frame rate is the
            # file's own, so `fps` is not passed (wandb warns that it would be ignored).
            shown = {GRID_VIDEO: grid} if grid else paths
            self.wandb.log({name: wandb.Video(path, format="mp4") for name, path in shown.items()}, step=step)

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
