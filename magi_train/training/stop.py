"""Graceful stop on request: a signal or a stop file ends training at the next step boundary, with a checkpoint.

Slurm warns a job before its time limit (`#SBATCH --signal=B:USR1@300` in slurm/common.sh). The batch
shell catches the signal and creates the stop file, `trainer.output_dir/trainer.stop_file`; the trainer sees
it after the step in flight, saves, and returns, and the launcher requeues the job, which resumes with
`trainer.resume=auto`. A signal of `trainer.stop_signals` (default SIGUSR1) sent to the training
processes does the same; add SIGTERM there to save on a preemption with a long enough grace time (torchrun
kills its workers some seconds after it is itself terminated, so a long save may not finish; the run then
resumes from the last periodic checkpoint).

Every rank must leave the loop at the same step (the save is collective), so each step ends with one
all-reduce (MAX) of a one-element flag over all ranks: a request seen by any rank stops them all.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist


def parse_signal(name: str) -> signal.Signals:
    """'SIGUSR1', 'USR1' or 'usr1' -> signal.SIGUSR1; a clear error naming trainer.stop_signals otherwise."""
    key = name.upper()
    key = key if key.startswith("SIG") else "SIG" + key
    if key not in signal.Signals.__members__:
        raise ValueError(f"trainer.stop_signals: unknown signal {name!r} (e.g. SIGUSR1, SIGUSR2, SIGTERM)")
    if key in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"trainer.stop_signals: {name} cannot be caught")
    return signal.Signals[key]


class StopRequest:
    """Watches for a stop request. `install()` sets the signal handlers (main thread only), `poll()` is the
    collective check at a step boundary, `close()` restores the previous handlers and removes the stop file
    this run answered, so that the resumed run does not stop at once."""

    def __init__(self, stop_file: Optional[Path], signals: List[str], device: torch.device, is_main: bool):
        self.stop_file = stop_file
        self.signals = [parse_signal(s) for s in signals]
        self.device = device
        self.is_main = is_main
        self.received: Optional[str] = None  # name of the signal caught, if any
        self.reason: Optional[str] = None  # why the run stopped (set by poll)
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> None:
        # Python only delivers signals to the main thread; a trainer built elsewhere (a test's thread) just
        # watches the stop file.
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, and the save happens where all ranks agree to stop.
        self.received = signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self.reason is not None and self.is_main and self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def poll(self) -> bool:
        """Collective: True on every rank when any rank caught a signal or rank 0 found the stop file."""
        local = 0
        if self.received is not None:
            local = 1
        elif self.is_main and self.stop_file is not None and self.stop_file.exists():
            local = 2
        flag = torch.tensor([local], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        if value and self.reason is None:
            # 2 (the stop file) wins the MAX over 1 (a signal): either way every rank stops.
            if value == 2:
                self.reason = f"stop file {self.stop_file}"
            else:
                self.reason = f"signal {self.received}" if self.received else "a signal caught by another rank"
        return bool(value)
