"""The README's full fine-tuning commands on the tiny preset, launched as users launch them: trainer.init_from
a run directory of ours (made here by a 2-step tiny training) and the released-layout tiny model
tests/fixtures/tiny_base, with an EMA and one validation grid. (A resume of a fine-tuned run, which keeps its
own checkpoint, is tested in-process: tests/unit/test_init_from.py.)"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY_BASE = REPO / "tests" / "fixtures" / "tiny_base"


def train(out_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "1", "magi_train/train.py", "experiment=tiny",
           f"trainer.output_dir={out_dir}", "trainer.progress_bar=false", "trainer.eval_every=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def losses(out_dir: Path):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def trainer_state(out_dir: Path, step: int):
    return json.loads((out_dir / "checkpoints" / f"step_{step:08d}" / "trainer.json").read_text())


@pytest.mark.slow
def test_finetune_from_a_run_dir_and_from_released_weights(tmp_path):
    base = tmp_path / "base"
    first = train(base, "trainer.max_steps=2", "trainer.log_every=1", "trainer.wandb.mode=disabled")
    assert first.returncode == 0, first.stderr[-3000:]

    # From our run directory: its newest checkpoint's weights, the run itself at step 0 with its own schedule.
    tuned = tmp_path / "from_run"
    run = train(tuned, f"trainer.init_from={base}", "trainer.max_steps=3", "trainer.log_every=1",
                "trainer.ema_decay=0.9", "trainer.wandb.mode=disabled")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"initialised from checkpoint {base / 'checkpoints' / 'step_00000002'}" in run.stdout
    assert [s for s, _ in losses(tuned)] == [1, 2, 3]
    state = trainer_state(tuned, 3)
    marker = (base / "checkpoints" / "step_00000002" / "complete.json").read_bytes()
    assert state["init_from"]["sha256"] == hashlib.sha256(marker).hexdigest()
    assert state["config"]["trainer"]["init_from"] == str(base)
    index = json.loads((tuned / "checkpoints" / "step_00000003" / "index.json").read_text())
    assert any(key.startswith("ema.") for key in index["tensors"]), "the EMA is saved with the checkpoint"

    # From the released-layout tiny model (trained 400 steps): its first loss is the trained model's, far
    # below the first loss of the run from scratch above; one captioned grid is logged to wandb offline.
    released = tmp_path / "from_released"
    run = train(released, f"trainer.init_from={TINY_BASE}", "trainer.max_steps=2", "trainer.log_every=1",
                "optimizer.lr=3e-4", "optimizer.min_lr=3e-5", "optimizer.warmup_steps=0", "trainer.sample_every=2",
                "trainer.sample_steps=4", "trainer.wandb.mode=offline")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "initialised from released base weights" in run.stdout
    scratch_first, tuned_first = losses(base)[0][1], losses(released)[0][1]
    assert tuned_first < 0.6 * scratch_first, (tuned_first, scratch_first)
    assert trainer_state(released, 2)["init_from"]["kind"] == "released"
    assert (released / "videos" / "step0000002_grid.mp4").is_file()
    assert (released / "videos" / "step0000002_grid.png").is_file()
    media = list((released / "wandb").glob("offline-run-*/files/media/videos/**/*.mp4"))
    assert len(media) == 1, media

