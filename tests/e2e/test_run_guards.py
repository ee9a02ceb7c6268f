"""One run per output directory, with real processes: a second trainer on a running trainer's directory fails at
once naming the first; a worker whose torchrun agent was SIGKILLed exits by itself and the relaunch resumes; a
corrupt newest checkpoint is skipped for the older one; a new run refuses the used directory; Hydra multirun
jobs each get a directory of their own (magi_train/training/run_dir.py, magi_train/train.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magi_train.checkpoint.manager import CheckpointManager, read_marker
from magi_train.checkpoint.weights import read_our_trainer_state

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
QUIET = ["experiment=tiny", "trainer.progress_bar=false", "trainer.wandb.mode=disabled", "trainer.eval_every=0",
         "trainer.log_every=1"]
# Generous: only a hung program should reach it, not a loaded machine.
LIMIT = 600


def python_train(out: Path, *overrides: str) -> list:
    return [sys.executable, "magi_train/train.py", *QUIET, f"trainer.output_dir={out}", *overrides]


def torchrun_train(out: Path, *overrides: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "magi_train/train.py", *QUIET, f"trainer.output_dir={out}", *overrides]


def run(cmd: list) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=LIMIT)


def start(cmd: list, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: nobody reads while it runs, and it outlives its writer
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def wait_for(condition, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {LIMIT} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def holder(out: Path) -> dict:
    text = (out / ".lock").read_text() if (out / ".lock").exists() else ""
    return json.loads(text) if text.strip() else {}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its new parent's wait is missing


def steps(out: Path) -> list:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def latest_step(out: Path) -> int:
    latest = CheckpointManager(out / "checkpoints", keep_last=0, read_only=True).latest()
    return int(latest.name.split("_")[-1]) if latest else 0


def test_a_second_trainer_fails_at_once_naming_the_running_one(tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    first = start(python_train(out, "trainer.max_steps=100000"), log)
    try:
        wait_for(lambda: holder(out).get("pid") == first.pid and "step 1/" in log.read_text(), "training", first, log)
        second = run(python_train(out, "trainer.resume=auto", "trainer.max_steps=2"))
        text = second.stdout + second.stderr
        assert second.returncode != 0
        assert f"trainer.output_dir {out} is in use by another trainer: pid {first.pid}" in text, text[-3000:]
        assert "step 1/2" not in text  # it trained nothing
        (out / "STOP").touch()  # the first run saves and ends by itself
        assert first.wait(timeout=LIMIT) == 0, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / ".lock").read_text() == ""  # released on a clean exit: the next run finds no stale holder
    assert steps(out) == list(range(1, len(steps(out)) + 1))  # the second trainer wrote no record


def test_a_worker_exits_when_its_torchrun_agent_is_killed_and_the_relaunch_resumes(tmp_path):
    out, log = tmp_path / "run", tmp_path / "killed.log"
    agent = start(torchrun_train(out, "trainer.max_steps=100000", "trainer.save_every=2"), log)
    worker = None
    try:
        wait_for(lambda: latest_step(out) >= 2 and holder(out).get("pid"), "a checkpoint", agent, log)
        worker = holder(out)["pid"]
        assert worker != agent.pid and alive(worker)
        os.kill(agent.pid, signal.SIGKILL)  # the agent alone: its worker is orphaned
        agent.wait(timeout=60)
        deadline = time.monotonic() + LIMIT
        while alive(worker):
            assert time.monotonic() < deadline, f"worker {worker} trained on for {LIMIT} s after its agent died"
            time.sleep(0.5)
    finally:
        if agent.poll() is None:
            agent.kill()
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)  # the test failed: leave no orphan training behind
    assert f"torchrun agent, pid {agent.pid}) is gone" in log.read_text(), log.read_text()[-3000:]

    last = latest_step(out)
    relaunch = run(torchrun_train(out, "trainer.resume=auto", f"trainer.max_steps={last + 2}",
                                  "trainer.save_every=2"))
    assert relaunch.returncode == 0, relaunch.stdout[-2000:] + relaunch.stderr[-3000:]
    assert "taking over from pid" in relaunch.stdout  # the killed run's record, named as stale
    assert f"resumed from {out / 'checkpoints' / f'step_{last:08d}'} at step {last}" in relaunch.stdout
    assert steps(out) == list(range(1, last + 3))  # every step logged once: the re-run ones replaced


def test_resume_auto_skips_a_corrupt_newest_checkpoint_and_a_new_run_refuses_the_directory(tmp_path):
    out = tmp_path / "run"
    first = run(python_train(out, "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=5"))
    assert first.returncode == 0, first.stderr[-3000:]
    newest = out / "checkpoints" / "step_00000004"
    victim = newest / sorted(read_marker(newest)["files"])[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the size stays, the sha256 does not
    victim.write_bytes(bytes(data))

    resumed = run(python_train(out, "trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=5",
                               "trainer.resume=auto"))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"warning: trainer.resume=auto skips {newest}" in resumed.stdout and "sha256" in resumed.stdout
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in resumed.stdout
    assert "trainer.max_steps: checkpoint 4, now 6" in resumed.stdout  # a change it accepts, printed
    assert steps(out) == [1, 2, 3, 4, 5, 6]

    again = run(python_train(out, "trainer.max_steps=2"))
    text = again.stdout + again.stderr
    assert again.returncode != 0 and f"trainer.output_dir {out} holds another run" in text, text[-3000:]
    assert "trainer.resume=auto" in text and "trainer.overwrite=true" in text
    assert steps(out) == [1, 2, 3, 4, 5, 6]  # untouched


def test_hydra_multirun_jobs_train_in_a_directory_each(tmp_path):
    out = tmp_path / "sweep"
    result = run([sys.executable, "magi_train/train.py", "-m", *QUIET, f"trainer.output_dir={out}",
                  "trainer.max_steps=1", "trainer.seed=1,2"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for job, seed in ((0, 1), (1, 2)):
        ckpt = out / str(job) / "checkpoints" / "step_00000001"
        assert read_our_trainer_state(ckpt)["config"]["trainer"]["seed"] == seed
        assert steps(out / str(job)) == [1]
        assert list((out / str(job) / "hydra").glob("*/.hydra/config.yaml")), "Hydra's job log is not beside its run"
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
