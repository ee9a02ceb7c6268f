"""The shape of a run's loss curve, as the training program prints it at the end ("loss curve: a -> b")."""

from __future__ import annotations

import math
from typing import Dict, List, Optional


def summarize(history: List[Dict[str, float]], window: Optional[int] = None) -> Dict[str, float]:
    """First/last-window means of the training loss and of the held-out loss, and the relative drop."""
    losses = [h["loss"] for h in history if "loss" in h and math.isfinite(h["loss"])]
    w = window or max(1, math.ceil(len(losses) / 10))
    out = {"first_loss": sum(losses[:w]) / w, "last_loss": sum(losses[-w:]) / w}
    out["loss_drop"] = 1 - out["last_loss"] / out["first_loss"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    if len(evals) >= 2:
        out["first_eval_loss"], out["last_eval_loss"] = evals[0], evals[-1]
        out["eval_loss_drop"] = 1 - evals[-1] / evals[0]
    return out
