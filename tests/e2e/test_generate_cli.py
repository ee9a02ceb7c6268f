"""The real inference program, launched as users launch it: torchrun + Hydra overrides, on a model our
trainer just saved (the tiny preset, as in `make demo`).

A launch costs about 10 s of start-up (torch and megatron-core imports) before the first check, so the checks of
the request that come before any model (bad keys and values, missing input directories, a distilled preset on base
weights) run in-process in tests/unit/test_generate_guards.py through the same `generate.run`; here the program
shows that such a failure reaches the user as a non-zero exit with the message, and nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magi_train.data.video_io import probe_video

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def launch(script: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "1", script, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run = launch("magi_train/train.py", "experiment=tiny", f"trainer.output_dir={out}", "trainer.progress_bar=false",
                 "trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=0", "trainer.wandb.mode=disabled")
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "checkpoints"


@pytest.mark.slow
def test_generate_writes_the_requested_video(trained, tmp_path):
    out = tmp_path / "demo.mp4"
    run = launch("magi_infer/generate.py", "model=tiny", f"ckpt.dir={trained}", "num_frames=30", f"output={out}",
                 "prompt=[a red blob moves right, the red blob moves down]", "progress=false", "video.fps=12")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote" in run.stdout and "2 chunks" in run.stdout
    info = probe_video(out)
    assert (info.frames, info.width, info.height, info.fps, info.codec) == (30, 64, 64, 12.0, "h264")
    assert f"writing {tmp_path}/.demo.mp4." in run.stdout  # the live preview's name is said
    # No temporary file left; the sidecar says how to make the same video again.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.mp4", "demo.mp4.json"]
    side = json.loads((tmp_path / "demo.mp4.json").read_text())
    assert side["prompts"] == ["a red blob moves right", "the red blob moves down"] and side["seed"] == 1234
    assert side["config"]["video"]["fps"] == 12 and side["num_frames"] == 30
    # Start-up says the resolved configuration once and nothing else: no group chatter, no absl warning.
    assert run.stdout.count("loaded ") == 1 and "sampler: 8 steps/chunk" in run.stdout
    assert "absl" not in run.stderr and "parallel_state" not in run.stderr + run.stdout


@pytest.mark.slow
def test_an_existing_output_is_kept_unless_overwrite_is_set(trained, tmp_path):
    out = tmp_path / "taken.mp4"
    out.write_bytes(b"an earlier video")
    args = ("model=tiny", f"ckpt.dir={trained}", "num_frames=8", f"output={out}", "prompt=a red blob", "progress=false")
    run = launch("magi_infer/generate.py", *args, "prompt=' '")
    assert run.returncode != 0
    # Every problem of the request at once, before any model is built: nothing was loaded, nothing written.
    assert f"output={out}: {out} already exists" in run.stderr and "overwrite=true" in run.stderr
    assert "prompt=' ' is empty" in run.stderr
    assert "loaded" not in run.stdout and out.read_bytes() == b"an earlier video"
    run = launch("magi_infer/generate.py", *args, "overwrite=true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert probe_video(out).frames == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4", "taken.mp4.json"]


@pytest.mark.slow
def test_preset_that_does_not_fit_the_checkpoint_fails_at_startup(trained, tmp_path):
    out = tmp_path / "never.mp4"
    # T5 and VAE directories that pass the start-up checks but hold nothing loadable: the mismatch must be found
    # before either is loaded. (check_memory=false: a 4.5B model may not fit this machine, which is not the point.)
    t5, vae = tmp_path / "t5", tmp_path / "vae"
    for d, names in ((t5, ["config.json"]), (vae, ["config.json", "diffusion_pytorch_model.safetensors"])):
        d.mkdir()
        for name in names:
            (d / name).write_text("not loadable")
    run = launch("magi_infer/generate.py", "model=magi1_4.5b", f"ckpt.dir={trained}", f"output={out}", "prompt=x",
                 f"text.t5_dir={t5}", f"vae.dir={vae}", "check_memory=false")
    assert run.returncode != 0
    assert "another model config than model=magi1_4.5b" in run.stderr and "hidden_size" in run.stderr
    assert not out.exists()
