"""slurm/train_tiny.sh submitted with sbatch to a real single-node Slurm (tests/e2e/slurm_cluster.py):
the job trains, checkpoints and logs; a warning signal before the time limit makes it save, requeue itself
and resume, and the requeued run's losses equal those of the uninterrupted job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magi_train.data.video_io import probe_video
from magi_train.checkpoint.manager import CheckpointManager, verify_checkpoint
from tests.e2e.slurm_cluster import SlurmCluster, install

REPO = Path(__file__).resolve().parents[2]
# 2 processes (dp=2) of the tiny preset; log and checkpoint often enough to see every step.
RUN = ["trainer.max_steps=16", "trainer.save_every=8", "trainer.log_every=1", "trainer.eval_every=0",
       "trainer.wandb.mode=offline"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = install()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:  # stops the daemons if start-up fails too
        yield cluster


def records(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def done(info):
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def submit(slurm: SlurmCluster, out: Path, *sbatch_args: str, overrides=()) -> int:
    return slurm.sbatch(*sbatch_args, "slurm/train_tiny.sh", *RUN, f"trainer.output_dir={out}", *overrides, cwd=REPO)


def check_finished(slurm, job, out, log):
    info = slurm.wait(job, done, timeout=600, what="finished")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    ckpts = CheckpointManager(out / "checkpoints", keep_last=0, read_only=True).checkpoints()
    assert [p.name for p in ckpts] == ["step_00000008", "step_00000016"]
    for path in ckpts:
        verify_checkpoint(path)
    config = json.loads((ckpts[-1] / "trainer.json").read_text())["config"]  # the run config travels along
    assert config["trainer"]["output_dir"] == str(out) and config["trainer"]["resume"] == "auto"
    return info, text


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """The job as a user submits it: `sbatch slurm/train_tiny.sh OVERRIDES`, log in slurm/logs/."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    job = submit(slurm, out)
    log = REPO / "slurm" / "logs" / f"magi-tiny-{job}.out"
    try:
        info, text = check_finished(slurm, job, out, log)
    finally:
        log.unlink(missing_ok=True)
    return job, out, text


@pytest.mark.slow
def test_sbatch_train_tiny_trains_checkpoints_and_logs(uninterrupted):
    job, out, text = uninterrupted
    assert f"magi: job {job} (restart 0) on 1 node(s)" in text and "2 process(es) per node" in text
    assert "step 16/16" in text and "loss curve:" in text
    recs = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 17))
    for key in ("tokens_per_s", "samples_per_s", "tflops_per_device", "time/data", "time/forward", "time/backward",
                "time/comm", "time/optimizer", "time/step"):
        assert all(r[key] > 0 for r in recs), key
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run missing"


@pytest.mark.slow
def test_time_limit_signal_saves_requeues_and_resumes_exactly(slurm, uninterrupted, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    # wandb's offline run is checked by the test above; here it would only add its start-up to each attempt.
    job = submit(slurm, out, f"--output={log}", overrides=["trainer.wandb.mode=disabled"])
    # Wait for a few steps, then send what Slurm sends before the time limit (#SBATCH --signal=B:USR1@...).
    metrics = out / "metrics.jsonl"
    slurm.wait(job, lambda info: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
               timeout=300, what="training")
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    slurm.wait(job, lambda i: int(i.get("Restarts", 0)) >= 1, timeout=300, what="requeued")
    info, text = check_finished(slurm, job, out, log)
    assert info["Restarts"] == "1"
    assert "stop requested (stop file" in text and f"requeueing job {job}" in text
    assert f"magi: job {job} (restart 1)" in text
    assert not (out / "STOP").exists()

    # The save at the stop was a complete checkpoint and the requeued run started from it ...
    stopped_at = int(text.split("saving at step ")[1].split()[0])
    assert 2 <= stopped_at < 16
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in text
    # ... so the losses of all 16 steps are, bit for bit, those of the uninterrupted job.
    losses = {r["step"]: r["loss"] for r in records(out) if "loss" in r}
    reference = {r["step"]: r["loss"] for r in records(uninterrupted[1]) if "loss" in r}
    assert losses == reference


@pytest.mark.slow
def test_generate_launcher_runs_context_parallel_on_the_trained_checkpoint(slurm, uninterrupted, tmp_path):
    """slurm/generate_24b.sh with the tiny preset on 2 CPU processes (its GPU request lifted on the command
    line): torchrun under srun, parallel.cp = processes per node, the video written by rank 0."""
    _, run_dir, _ = uninterrupted
    video, log = tmp_path / "blob.mp4", tmp_path / "gen.out"
    job = slurm.sbatch(f"--output={log}", "--gpus-per-node=0", "--cpus-per-task=2", "slurm/generate_24b.sh",
                       "model=tiny", f"ckpt.dir={run_dir / 'checkpoints'}", "num_frames=30", f"output={video}",
                       "prompt=[a red blob moves right, the red blob moves down]", "progress=false", "video.fps=12",
                       cwd=REPO, env={"NPROC_PER_NODE": "2"})
    info = slurm.wait(job, done, timeout=600, what="finished")
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert "2 process(es) per node" in text and "wrote" in text
    probe = probe_video(video)
    assert (probe.frames, probe.width, probe.height, probe.fps) == (30, 64, 64, 12.0)
