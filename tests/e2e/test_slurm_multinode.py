"""The Slurm launchers across two nodes: a real Slurm (tests/e2e/slurm_cluster.py) whose two compute nodes are
slurmds in network namespaces of this machine, each with its own name and address (tests/e2e/netns.py),
sharing the file system. What only happens across nodes runs here: the rendezvous at the first node's
address, `srun` starting one torchrun per node, gloo between the hosts, checkpoints written into one directory
by ranks on two nodes, the USR1 save and requeue of a two-node job, context-parallel generation over two nodes.
The two-node job's losses equal, bit for bit, those of the same data-parallel size (2) on one node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from magi_train.checkpoint.manager import CheckpointManager, verify_checkpoint
from magi_train.data.video_io import probe_video
from tests.e2e.netns import NodeNetwork, unavailable
from tests.e2e.slurm_cluster import SlurmCluster, install

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
RUN = [f"trainer.max_steps={STEPS}", f"trainer.save_every={STEPS // 2}", "trainer.log_every=1", "trainer.eval_every=0",
       "trainer.wandb.mode=disabled"]
# One process per node on two nodes: the same two CPUs and one CPU per process as the one-node reference
# (train_tiny.sh's 2 CPUs for its 2 processes), so both run one thread per process.
TWO_NODES = ["--nodes=2", "--cpus-per-task=1"]
ONE_PER_NODE = {"NPROC_PER_NODE": "1"}
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install() or unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm2")
    with NodeNetwork(2, root) as network:
        with SlurmCluster(root, network) as slurm:
            yield slurm
    assert not network.leftovers(), f"namespaces or interfaces left behind: {network.leftovers()}"


def done(info):
    return info["JobState"] in FINISHED


def losses(out: Path):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def finished(slurm: SlurmCluster, job: int, log: Path, what: str):
    """Wait for the job; it must have completed. Failures name the job and show its log and the daemons' logs."""
    info = slurm.wait(job, done, timeout=900, what=f"finished ({what})")
    text = log.read_text() if log.exists() else f"(no job log at {log})"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{what}: job {job} {info['JobState']} {info['ExitCode']}\n--- job log\n{text[-6000:]}\n{slurm.logs()}"
    return info, text


def train(slurm, out: Path, log: Path, *sbatch_args: str, env=None) -> int:
    return slurm.sbatch(f"--output={log}", *sbatch_args, "slurm/train_tiny.sh", *RUN, f"trainer.output_dir={out}",
                        cwd=REPO, env=env)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The one-node run with dp=2: train_tiny.sh as it is (2 processes on one node)."""
    out = tmp_path_factory.mktemp("one_node") / "run"
    log = out.parent / "job.out"
    job = train(cluster, out, log, "--nodes=1")
    _, text = finished(cluster, job, log, "one-node reference")
    assert f"on 1 node(s)" in text and "2 process(es) per node" in text, text[-3000:]
    return losses(out)


@pytest.fixture(scope="module")
def two_nodes(cluster, reference, tmp_path_factory):
    """`sbatch --nodes=2` of train_tiny.sh with one process per node, sent what Slurm sends before the time
    limit (USR1 to the batch shell) after a few steps: it saves, requeues itself and resumes to the end."""
    out = tmp_path_factory.mktemp("two_nodes") / "run"
    log = out.parent / "job.out"
    job = train(cluster, out, log, *TWO_NODES, env=ONE_PER_NODE)
    metrics = out / "metrics.jsonl"

    def training(info):
        assert not done(info), f"two-node job {job} ended before the signal: {info}\n{log.read_text()[-4000:]}"
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 2

    cluster.wait(job, training, timeout=600, what="training on two nodes")
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    cluster.wait(job, lambda i: int(i.get("Restarts", 0)) >= 1 or done(i), timeout=300, what="requeued")
    info, text = finished(cluster, job, log, "two-node job")
    return job, info, out, text


@pytest.mark.slow
def test_two_node_job_meets_at_the_first_node_and_trains_as_one_node_does(cluster, reference, two_nodes):
    job, info, out, text = two_nodes
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", info
    head = cluster.addresses[0]
    # srun starts one torchrun per node; they meet at node1's NodeAddr (an address only node1 has).
    assert f"magi: job {job} (restart 0) on 2 node(s) [node[1-2]], 1 process(es) per node, rendezvous {head}:" in text, text[-4000:]
    # Both ranks wrote their shares of every checkpoint into the one shared directory, and each verifies.
    ckpts = CheckpointManager(out / "checkpoints", keep_last=0, read_only=True).checkpoints()
    assert ckpts and ckpts[-1].name == f"step_{STEPS:08d}", [p.name for p in ckpts]
    for path in ckpts:
        verify_checkpoint(path)
        assert sorted(p.name for p in path.glob("rank_*")) == ["rank_00000.safetensors", "rank_00001.safetensors"]
    # Every step's loss (before and after the requeue) is the one-node dp=2 run's, bit for bit.
    assert list(reference) == list(range(1, STEPS + 1))
    assert losses(out) == reference


@pytest.mark.slow
def test_usr1_saves_requeues_and_resumes_the_two_node_job(two_nodes):
    job, info, out, text = two_nodes
    assert info["Restarts"] == "1", info
    assert "stop requested (stop file" in text and f"requeueing job {job}" in text, text[-4000:]
    assert f"magi: job {job} (restart 1) on 2 node(s)" in text, text[-4000:]
    assert not (out / "STOP").exists()
    stopped_at = int(text.split("saving at step ")[1].split()[0])
    assert 2 <= stopped_at < STEPS
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in text, text[-4000:]


@pytest.mark.slow
def test_generate_launcher_runs_context_parallel_over_two_nodes(cluster, two_nodes, tmp_path):
    """slurm/generate_24b.sh, tiny preset, one CPU process on each node (the GPU request lifted on the command
    line): parallel.cp is the job's process count, 2, so one video is split over the two hosts."""
    _, _, run_dir, _ = two_nodes
    video, log = tmp_path / "blob.mp4", tmp_path / "gen.out"
    job = cluster.sbatch(f"--output={log}", *TWO_NODES, "--gpus-per-node=0", "slurm/generate_24b.sh", "model=tiny",
                         f"ckpt.dir={run_dir / 'checkpoints'}", "num_frames=30", f"output={video}",
                         "prompt=[a red blob moves right, the red blob moves down]", "progress=false", "video.fps=12",
                         cwd=REPO, env=ONE_PER_NODE)
    _, text = finished(cluster, job, log, "two-node generation")
    assert f"on 2 node(s) [node[1-2]], 1 process(es) per node, rendezvous {cluster.addresses[0]}:" in text, text[-4000:]
    assert "parallel.cp=2" in text and "wrote" in text, text[-4000:]
    probe = probe_video(video)
    assert (probe.frames, probe.width, probe.height, probe.fps) == (30, 64, 64, 12.0)
