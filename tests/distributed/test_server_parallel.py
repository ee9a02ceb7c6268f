"""magi-serve under torchrun with 2 gloo ranks (parallel.cp=2 on the tiny model): rank 0 serves HTTP and
broadcasts each job to rank 1; the videos are the one-process pipeline's, byte for byte.

One server run checks: a job created through HTTP; a running job cancelled by DELETE (both ranks leave the
sampler at the same step, the next job still runs); an extension (its prefix latents travel to rank 1 as bytes);
then SIGTERM: rank 0 drains and sends the followers the shutdown message, and every rank exits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.multirank]

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_base"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300  # hang guard only
STEPS = 4


def _start(root: Path):
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "magi_infer.server", "model=tiny",
           f"ckpt.dir={TINY}", "parallel.cp=2", "server.port=0", f"server.output_root={root}",
           "server.shutdown_grace_s=20"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, ready, found = [], threading.Event(), []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving on (http://\S+)", line)
            if m:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(TIMEOUT) or not found:
        proc.kill()
        raise AssertionError("magi-serve under torchrun did not start:\n" + "".join(lines[-60:]))
    return proc, found[0], lines


def _wait(http: httpx.Client, base: str, video_id: str, status=("completed", "failed")) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        video = http.get(f"{base}/v1/videos/{video_id}").json()
        if video["status"] in status:
            return video
        assert time.monotonic() < deadline, f"{video_id} still {video['status']}"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_ranks_serve_the_one_process_videos(tmp_path):
    from magi_infer import MagiPipeline

    torch.set_num_threads(1)
    proc, base, lines = _start(tmp_path / "served")
    try:
        with httpx.Client(timeout=TIMEOUT) as http:
            prompts = ["a red blob moves right", "the red blob moves down"]
            job = http.post(f"{base}/v1/videos", json={"prompt": prompts[0], "prompts": prompts, "num_frames": 30,
                                                        "num_steps": STEPS, "seed": 3}).json()
            assert _wait(http, base, job["id"])["status"] == "completed"
            served = http.get(f"{base}/v1/videos/{job['id']}/content").content
            # Cancelled mid-run on rank 0: rank 1 must leave at the same step, or the next job would hang.
            long = http.post(f"{base}/v1/videos", json={"prompt": "a blob", "num_frames": 240, "num_steps": 8}).json()
            _wait(http, base, long["id"], status=("in_progress",))
            assert http.delete(f"{base}/v1/videos/{long['id']}").json()["deleted"]
            ext = http.post(f"{base}/v1/videos/extensions", json={"prompt": "the blob turns blue",
                                                                  "video": {"id": job["id"]}, "num_frames": 24,
                                                                  "num_steps": STEPS, "seed": 4}).json()
            assert _wait(http, base, ext["id"])["status"] == "completed"
            extended = http.get(f"{base}/v1/videos/{ext['id']}/content").content
        proc.send_signal(signal.SIGTERM)
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert f"shutdown complete: finished: none; cancelled: none" in log, log[-3000:]
    assert log.count("serving on") == 1  # only rank 0 serves
    assert f"job {long['id']} failed (cancelled)" in log

    pipe = MagiPipeline.from_pretrained(TINY, overrides={"progress": False})
    one = tmp_path / "one.mp4"
    pipe(prompts, num_frames=30, num_steps=STEPS, seed=3, output=one)
    assert served == one.read_bytes()
    latents = pipe(prompts, num_frames=30, num_steps=STEPS, seed=3, output_type="latent").latents
    one_ext = tmp_path / "one_ext.mp4"
    pipe("the blob turns blue", mode="v2v", prefix_latents=latents[:, :, :8], num_frames=24, num_steps=STEPS,
         seed=4, output=one_ext)
    assert extended == one_ext.read_bytes()
