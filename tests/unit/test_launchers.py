"""The Slurm launchers' own defaults: the Hydra overrides each script passes compose into a valid training
config, its layout divides the GPUs its #SBATCH header asks for, and the memory planner says it fits an
80 GB GPU. (tests/e2e/test_slurm.py runs the launchers under a real Slurm.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from magi_train.config import config_dir, load_model_preset, register_configs, to_train_config
from magi_train.observability.memory_plan import Layout, MicroBatch, estimate
from magi_train.parallel.groups import check_world

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


def launcher_overrides(script: str, tmp_path: Path, *user_args: str) -> list:
    """The arguments the script hands to magi_train_job, read by running it with a stand-in common.sh."""
    root = tmp_path / "root"
    (root / "slurm").mkdir(parents=True)
    (root / "slurm" / "common.sh").write_text('magi_train_job() { printf "%s\\n" "$@"; }\n')
    out = subprocess.run(["bash", str(REPO / "slurm" / script), *user_args], env={"MAGI_ROOT": str(root), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def sbatch_header(script: str) -> dict:
    found = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", (REPO / "slurm" / script).read_text(), re.M))
    return found


@pytest.mark.parametrize("script, gpus_expected", [("train_24b.sh", 64), ("train_4.5b.sh", 16)])
def test_training_launchers_compose_validate_and_fit_80gb(script, gpus_expected, tmp_path):
    args = launcher_overrides(script, tmp_path, "data.shards=/data/shards", "trainer.max_steps=7")
    assert args[-2:] == ["data.shards=/data/shards", "trainer.max_steps=7"]  # user overrides come last and win
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = to_train_config(compose("config", overrides=args))  # validates: raises naming a bad field
    assert cfg.trainer.max_steps == 7 and cfg.data.kind == "webdataset"
    header = sbatch_header(script)
    gpus = int(header["nodes"]) * int(header["gpus-per-node"])
    assert gpus == gpus_expected
    p = cfg.parallel
    dp = check_world(p, gpus)
    est = estimate(load_model_preset(cfg.model.name),
                   Layout(tp=p.tp, cp=p.cp, pp=p.pp, dp=dp, sequence_parallel=p.sequence_parallel,
                          recompute=cfg.trainer.recompute, precision=cfg.trainer.precision),
                   MicroBatch(seq_length=cfg.data.seq_length, caption_length=cfg.data.caption_length))
    assert est.total < 76 * GIB, f"{script}: {est.total / GIB:.1f} GiB per GPU"
    # The preemption warning comes before the time limit, to the batch shell, and the job may requeue.
    assert header["signal"].startswith("B:USR1@") and "#SBATCH --requeue" in (REPO / "slurm" / script).read_text()


def test_every_launcher_sources_common_and_is_valid_bash():
    for script in sorted((REPO / "slurm").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        if script.name != "common.sh":
            assert 'slurm/common.sh"' in script.read_text(), script.name
            assert "#SBATCH --output=slurm/logs/%x-%j.out" in script.read_text(), script.name
    assert (REPO / "slurm" / "logs").is_dir()  # sbatch does not create the log directory


def test_override_lookup_takes_the_last_value():
    script = f'source {REPO}/slurm/common.sh; magi_override trainer.output_dir a=1 trainer.output_dir=x ++trainer.output_dir=y'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "y"
