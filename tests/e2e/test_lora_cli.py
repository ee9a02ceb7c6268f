"""The README's LoRA commands on the tiny preset, launched as users launch them: `experiment=lora_tiny` on the
released-layout tiny model (tests/fixtures/tiny_base) trains adapters only and exports them, `magi-generate`
generates with the adapter unmerged, and `tools/merge_lora.py` merges it into a released-layout directory that
generate loads like any other."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magi_train.data.video_io import probe_video

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY_BASE = REPO / "tests" / "fixtures" / "tiny_base"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}

pytestmark = pytest.mark.slow


def launch(*cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_lora_train_generate_and_merge(tmp_path):
    out = tmp_path / "lora"
    run = launch(TORCHRUN, "--standalone", "--nproc_per_node", "1", "magi_train/train.py", "experiment=lora_tiny",
                 f"trainer.init_from={TINY_BASE}", f"trainer.output_dir={out}", "trainer.max_steps=3",
                 "trainer.save_every=3", "trainer.log_every=1", "trainer.progress_bar=false",
                 "trainer.wandb.mode=disabled")
    assert "trainable parameters" in run.stdout
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["format"], config["rank"], config["step"]) == ("magi-lora", 8, 3)
    # The checkpoint holds the adapters only (the frozen base is named by trainer.init_from).
    index = json.loads((out / "checkpoints" / "step_00000003" / "index.json").read_text())
    model_keys = [k for k in index["tensors"] if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)

    video = tmp_path / "styled.mp4"
    launch(TORCHRUN, "--standalone", "--nproc_per_node", "1", "magi_infer/generate.py", "model=tiny",
           f"ckpt.dir={TINY_BASE}", f"lora=[{adapter}]", "num_frames=24", f"output={video}", "prompt=a red blob",
           "progress=false", "sampler.num_steps=4")
    assert probe_video(video).frames == 24
    assert json.loads((tmp_path / "styled.mp4.json").read_text())["lora"][0]["path"] == str(adapter)

    merged = tmp_path / "merged"
    launch(sys.executable, "tools/merge_lora.py", "--base", str(TINY_BASE), "--lora", f"{adapter}:0.8",
           "--out", str(merged))
    launch(TORCHRUN, "--standalone", "--nproc_per_node", "1", "magi_infer/generate.py", "model=tiny",
           f"ckpt.dir={merged}", "num_frames=24", f"output={tmp_path / 'merged.mp4'}", "prompt=a red blob",
           "progress=false", "sampler.num_steps=4")
    assert probe_video(tmp_path / "merged.mp4").frames == 24
