"""magi_train/train.py with one fault planted, for the kill tests (tests/e2e/test_fault_tolerance.py).

    torchrun --nproc_per_node 2 tests/e2e/fault_harness.py --pause checkpoint --at-step 8 --ready DIR -- OVERRIDES...

--pause checkpoint-data    every rank stops inside the save of step N while writing its shard file: a
                           few tensors are on disk (flushed), the rest of the file is not;
--pause checkpoint-marker  every rank stops inside the save of step N after its shard files are complete,
                           before the marker that makes the directory a checkpoint (in the sha256 pass);
--pause step        every rank stops inside step N+1, after its forward and backward, before the update;
--crash step        rank 1 kills itself with SIGKILL inside step N+1, on torchrun's first attempt only
                    (TORCHELASTIC_RESTART_COUNT=0), so that torchrun --max-restarts starts a second one.

A paused rank creates DIR/rank<k> and sleeps; the test then SIGKILLs the whole process group. Nothing here
changes what the trainer computes: the patches only wrap functions and wait.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _hold(ready: Path) -> None:
    rank = os.environ.get("RANK", "0")
    ready.mkdir(parents=True, exist_ok=True)
    (ready / f"rank{rank}").touch()
    while True:  # until the SIGKILL
        time.sleep(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pause", choices=["checkpoint-data", "checkpoint-marker", "step"])
    parser.add_argument("--crash", choices=["step"])
    parser.add_argument("--at-step", type=int, required=True)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    import magi_train.checkpoint.distributed as distributed
    import magi_train.training.trainer as trainer_mod

    N = args.at_step
    if args.pause in ("checkpoint-data", "checkpoint-marker"):
        import magi_train.checkpoint.tensorfile as tensorfile

        saving = {"step": None, "items": 0}
        original_save, original_digest, original_data = (trainer_mod.save_train_state, distributed.file_digest,
                                                         tensorfile._data)

        def save(manager, step, *a, **kw):
            saving["step"] = step
            return original_save(manager, step, *a, **kw)

        def digest(path):
            if saving["step"] == N and args.pause == "checkpoint-marker":
                _hold(args.ready)
            return original_digest(path)

        def tensor_bytes(tensor):
            # Asked for a tensor's bytes while writing a piece file: its header and the tensors before
            # were written (os.write, unbuffered); the rest never will be.
            saving["items"] += 1
            if saving["step"] == N and args.pause == "checkpoint-data" and saving["items"] >= 3:
                _hold(args.ready)
            return original_data(tensor)

        trainer_mod.save_train_state, distributed.file_digest, tensorfile._data = save, digest, tensor_bytes
    elif args.pause == "step" or args.crash == "step":
        original_fb = trainer_mod.Trainer.forward_backward

        def forward_backward(self, micro, backward=True):
            out = original_fb(self, micro, backward)
            if backward and self.step == N:
                if args.pause:
                    _hold(args.ready)
                elif os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        trainer_mod.Trainer.forward_backward = forward_backward
    # As a script, as torchrun runs it (Hydra finds conf/ relative to the script).
    sys.argv = [str(REPO / "magi_train" / "train.py"), *args.overrides]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
