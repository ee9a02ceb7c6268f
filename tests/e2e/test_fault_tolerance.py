"""Kill tests: a 2-rank training run is SIGKILLed inside a checkpoint write and inside a step, or loses a
rank under torchrun --max-restarts; the run that follows resumes from the last complete checkpoint and its
losses equal, bit for bit, those of a run that was never interrupted. Faults are planted by
tests/e2e/fault_harness.py; the kills are real SIGKILLs of torchrun and all its workers at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magi_train.checkpoint.manager import CheckpointManager, verify_checkpoint

REPO = Path(__file__).resolve().parents[2]
# One sample per rank and step: what is tested is where the runs stop and resume, not what they learn (a step of
# the preset's 4 samples costs 4x the CPU).
RUN = ["experiment=tiny", "trainer.max_steps=12", "trainer.save_every=4", "trainer.log_every=1",
       "trainer.eval_every=0", "trainer.progress_bar=false", "trainer.wandb.mode=disabled", "trainer.keep_last=5",
       "data.micro_batch_size=1"]
# torchrun's workers share its rendezvous store by default, and a restarted attempt can then read the
# failed attempt's addresses (pytorch/pytorch#135712): slurm/common.sh sets this too.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun(entry: str, *args: str, restarts: int = 0) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max-restarts", str(restarts), entry, *args]


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def losses(out: Path) -> dict:
    """step -> loss; a step trained twice (before a kill and after the resume) keeps its last record."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def process_tree(root: int) -> list:
    """`root` and all its descendants (torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave the workers running)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def sigkill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker at once, as a node failure would."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_when_paused(cmd, ready: Path, timeout=300) -> None:
    """Start `cmd`, wait until both ranks sit at the planted pause, SIGKILL torchrun and its workers."""
    log = ready.parent / "killed_run.log"  # a file, not a pipe: nobody reads while it runs
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not all((ready / f"rank{r}").exists() for r in (0, 1)):
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before reaching the pause:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            sigkill_tree(proc)
            pytest.fail("the run did not reach the pause in time")
        time.sleep(0.2)
    workers = process_tree(proc.pid)[1:]
    assert len(workers) >= 2, workers
    sigkill_tree(proc)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers survived the SIGKILL"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run(torchrun("magi_train/train.py", *RUN, f"trainer.output_dir={out}"))
    # One log line per trainer.log_every (= 1) steps, from rank 0 only: both ranks share this stdout.
    lines = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("step ")]
    assert lines == [f"step {k}/12" for k in range(1, 13)], result.stdout[-3000:]
    got = losses(out)
    assert sorted(got) == list(range(1, 13))
    return got


def complete_steps(out: Path) -> list:
    ckpts = CheckpointManager(out / "checkpoints", keep_last=0, read_only=True).checkpoints()
    for path in ckpts:
        verify_checkpoint(path)  # every file's size and sha256 against the marker
    return [int(p.name.split("_")[-1]) for p in ckpts]


@pytest.mark.slow
@pytest.mark.parametrize("pause, at_step, last_complete",
                         [("checkpoint-data", 8, 4), ("checkpoint-marker", 8, 4), ("step", 10, 8)])
def test_sigkill_then_resume_repeats_the_uninterrupted_losses(tmp_path, reference, pause, at_step, last_complete):
    out, ready = tmp_path / "run", tmp_path / "ready"
    overrides = [*RUN, f"trainer.output_dir={out}", "trainer.resume=auto"]
    kill_when_paused(torchrun("tests/e2e/fault_harness.py", "--pause", pause, "--at-step", str(at_step),
                              "--ready", str(ready), "--", *overrides), ready)

    # What the kill left: complete checkpoints up to `last_complete`, all intact; a checkpoint write cut
    # short leaves only a temporary directory, which is never listed as a checkpoint.
    assert complete_steps(out) == list(range(4, last_complete + 1, 4))
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert bool(leftovers) == pause.startswith("checkpoint"), leftovers
    if pause == "checkpoint-data":  # a shard file cut short: data on disk, no marker
        assert any(f.stat().st_size > 0 for d in leftovers for f in (out / "checkpoints" / d).iterdir())

    resumed = run(torchrun("magi_train/train.py", *overrides))
    assert f"resumed from {out / 'checkpoints' / f'step_{last_complete:08d}'}" in resumed.stdout
    assert losses(out) == reference  # every step, bit for bit (the steps after the kill were re-trained)
    assert complete_steps(out) == [4, 8, 12]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]  # debris tidied


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_lost_rank(tmp_path, reference):
    out = tmp_path / "run"
    result = run(torchrun("tests/e2e/fault_harness.py", "--crash", "step", "--at-step", "9", "--",
                          *RUN, f"trainer.output_dir={out}", "trainer.resume=auto", restarts=1))
    # The second attempt started from the newest complete checkpoint (step 8) and finished the run.
    assert f"resumed from {out / 'checkpoints' / 'step_00000008'}" in result.stdout
    assert losses(out) == reference
    assert complete_steps(out) == [4, 8, 12]
