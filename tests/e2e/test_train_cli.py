"""The real training program, launched as users launch it (torchrun + Hydra overrides)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def train(out_dir: Path, *overrides: str, timeout: int = 300, ranks: int = 1) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks), "magi_train/train.py", "experiment=tiny",
           f"trainer.output_dir={out_dir}", "trainer.progress_bar=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def records(out_dir: Path):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_trains_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = train(out, "trainer.max_steps=12", "trainer.save_every=6", "trainer.log_every=3", "trainer.wandb.mode=offline")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 12/12" in first.stdout and "loss curve:" in first.stdout
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [3, 6, 9, 12]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000006", "step_00000012"]
    assert (out / "wandb").is_dir(), "wandb offline run directory missing"

    more = train(out, "trainer.max_steps=15", "trainer.save_every=6", "trainer.log_every=3", "trainer.resume=auto",
                 "trainer.wandb.mode=disabled")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stdout and "step_00000012" in more.stdout
    assert [r["step"] for r in records(out) if "loss" in r][-1] == 15


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        # One of each kind of failure (each launch costs ~10 s of imports; the other unknown keys and wrong
        # types are composed in-process in tests/unit/test_config.py): Hydra refuses a key while composing ...
        ("model.hiden_size=3", "hiden_size"),
        # ... validate() refuses a value that composed ...
        ("model.hidden_size=300", "model.hidden_size"),
        # ... and the trainer refuses a resume path at start-up.
        ("trainer.resume=/nonexistent/ckpt", "/nonexistent/ckpt"),
    ],
)
def test_bad_config_fails_at_startup_naming_the_field(tmp_path, override, message):
    result = train(tmp_path / "bad", override, "trainer.wandb.mode=disabled", timeout=120)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


@pytest.mark.slow
def test_multi_rank_training_resumes_under_another_layout(tmp_path):
    """TP2 + sequence parallel for 4 steps, then resumed under PP2 with 4 micro-batches; one rank logs."""
    out = tmp_path / "run"
    common = ("trainer.save_every=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.wandb.mode=disabled",
              "data.micro_batch_size=2", "data.global_batch_size=8")
    first = train(out, "trainer.max_steps=4", "parallel.tp=2", "parallel.sequence_parallel=true", *common, ranks=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("step 4/4") == 1, "only rank 0 logs"
    more = train(out, "trainer.max_steps=6", "parallel.pp=2", "trainer.resume=auto", *common, ranks=2)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stdout and "step_00000004" in more.stdout
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


@pytest.mark.slow
def test_world_size_that_does_not_fit_fails_at_startup(tmp_path):
    result = train(tmp_path / "bad", "parallel.tp=2", "parallel.pp=2", "trainer.wandb.mode=disabled", ranks=2, timeout=120)
    assert result.returncode != 0
    assert "world size 2 is not divisible by parallel.tp x parallel.cp x parallel.pp = 2 x 1 x 2 = 4" in result.stdout + result.stderr
