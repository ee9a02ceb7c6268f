"""magi-serve as users run it (`python -m magi_infer.server ...`, a subprocess) shut down by SIGTERM: it stops
taking jobs (503) while the running one finishes within server.shutdown_grace_s (or is cancelled after it),
cancels the queued ones (status failed, code cancelled_shutdown), says which finished and which were cancelled,
and exits with status 0."""

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

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_base"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 180  # hang guard only
LONG = {"prompt": "a red blob moves right", "num_frames": 480, "num_steps": 8}  # 20 chunks: many seconds


class Served:
    """A magi-serve subprocess; its output lines are collected as they come."""

    def __init__(self, root: Path, *overrides: str) -> None:
        cmd = [sys.executable, "-m", "magi_infer.server", "model=tiny", f"ckpt.dir={TINY}", "server.port=0",
               f"server.output_root={root}", "sampler.window_size=1", *overrides]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines = []
        self._ready = threading.Event()
        self.base = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(TIMEOUT) or self.base is None:
            self.proc.kill()
            raise AssertionError("magi-serve did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.match(r"serving on (http://\S+)", line)
            if m:
                self.base = m.group(1)
                self._ready.set()
        self._ready.set()

    def post(self, body: dict) -> httpx.Response:
        return httpx.post(self.base + "/v1/videos", json=body, timeout=TIMEOUT)

    def get(self, video_id: str) -> dict:
        return httpx.get(f"{self.base}/v1/videos/{video_id}", timeout=TIMEOUT).json()

    def wait_status(self, video_id: str, status: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.get(video_id)["status"] != status:
            assert time.monotonic() < deadline, f"{video_id} never became {status}"
            time.sleep(0.05)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        while httpx.get(self.base + "/health", timeout=TIMEOUT).json()["status"] != "shutting_down":
            assert time.monotonic() < deadline, "the server did not start shutting down"
            time.sleep(0.02)

    def exit_code(self) -> int:
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def log(self) -> str:
        return "".join(self.lines)


def test_sigterm_lets_the_running_job_finish_and_cancels_the_queued_ones(tmp_path):
    served = Served(tmp_path, "server.shutdown_grace_s=120")
    try:
        running = served.post({**LONG, "num_frames": 192}).json()["id"]  # a few seconds: the checks take ms
        queued = [served.post({**LONG, "num_frames": 24}).json()["id"] for _ in range(2)]
        served.wait_status(running, "in_progress")
        served.terminate()
        # Draining: no new jobs, the queued ones failed as cancelled, the running one still going.
        refused = served.post({**LONG, "num_frames": 24})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        for video_id in queued:
            job = served.get(video_id)
            assert job["status"] == "failed" and job["error"]["code"] == "cancelled_shutdown"
        assert served.get(running)["status"] == "in_progress"
        assert served.exit_code() == 0, served.log()[-3000:]
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
    log = served.log()
    assert f"shutdown complete: finished: {running}; cancelled: {', '.join(queued)}" in log, log[-3000:]
    assert (tmp_path / running / "video.mp4").is_file()  # it finished and was published
    assert "Traceback" not in log


def test_sigterm_cancels_the_running_job_after_the_grace_period(tmp_path):
    served = Served(tmp_path, "server.shutdown_grace_s=0.5")
    try:
        running = served.post(LONG).json()["id"]
        served.wait_status(running, "in_progress")
        started = time.monotonic()
        served.terminate()
        assert served.exit_code() == 0, served.log()[-3000:]
        assert time.monotonic() - started < TIMEOUT
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
    log = served.log()
    assert "did not finish within server.shutdown_grace_s=0.5; cancelling it" in log, log[-3000:]
    assert f"shutdown complete: finished: none; cancelled: {running}" in log, log[-3000:]
    assert f"job {running} failed (cancelled_shutdown)" in log
    # Nothing half-written is left behind: no published video, no temporary file.
    assert not any(p.name.endswith((".mp4", ".partial")) for p in (tmp_path / running).iterdir())
