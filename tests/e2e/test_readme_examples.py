"""The README's "Three ways in" examples, run as written (tiny preset) from a fresh working directory.

The blocks are found by their `<!-- example: NAME -->` markers, so an edit of the README is what gets tested.
The training block is shortened by overrides appended to its command (2 steps instead of 400)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from magi_train.data.video_io import probe_video

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHORT = ("trainer.max_steps=2 trainer.save_every=2 trainer.eval_every=0 trainer.wandb.mode=disabled "
         "trainer.progress_bar=false")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PATH": f"{BIN}:{os.environ['PATH']}"}

pytestmark = pytest.mark.slow


def examples() -> dict:
    found = re.findall(r"<!-- example: (\w+) -->\n```(\w+)\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return {name: (lang, code) for name, lang, code in found}


def run(lang: str, code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"README example failed:\n{code}\n--- stdout\n{done.stdout[-3000:]}\n" \
                                 f"--- stderr\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("readme")
    lang, code = examples()["train"]
    command = re.sub(r"\s+#.*", "", code.strip())  # the command without its comment
    run(lang, f"{command} {SHORT}", cwd)
    assert (cwd / "runs" / "tiny" / "checkpoints").is_dir()
    return cwd


def test_the_readme_has_the_three_ways_in():
    assert {"train", "python", "cli", "serve", "client", "curl"} <= set(examples())


def test_python_example(workdir):
    out = run(*examples()["python"], workdir).stdout
    assert "(48, 64, 64, 3) uint8" in out
    assert probe_video(workdir / "blob.mp4").frames == 48 and (workdir / "blob.mp4.json").is_file()
    chunks = [line.split(" ", 1) for line in out.splitlines() if re.match(r"\d+ ", line)]
    assert [int(i) for i, _ in chunks] == list(range(6))
    assert [rest.startswith("the blue blob moves up") for _, rest in chunks] == [False] * 4 + [True] * 2
    assert "[(4, 'the blue blob moves up')]" in out


def test_cli_example(workdir):
    run(*examples()["cli"], workdir)
    info = probe_video(workdir / "cli.mp4")
    assert (info.frames, info.width, info.height) == (48, 64, 64)


def test_server_examples(workdir):
    """The serve block started as written (on a free port instead of 8000), then the client and curl blocks."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    blocks = {name: (lang, code.replace("8000", port)) for name, (lang, code) in examples().items()}
    command = re.sub(r"\s+#.*", "", blocks["serve"][1].strip())
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=workdir, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in server.stdout:  # start-up: the resolved config, then the address
            lines.append(line)
            if f"serving on http://127.0.0.1:{port}" in line:
                break
        else:
            pytest.fail("magi-serve exited before serving:\n" + "".join(lines[-50:]))
        out = run(*blocks["client"], workdir).stdout
        assert out.split() == ["completed", "64x64", "2"]
        assert probe_video(workdir / "served.mp4").frames == 48
        run(*blocks["curl"], workdir)
        assert probe_video(workdir / "live.mp4").frames == 48  # the stream ran until the job completed
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=120)
    assert server.returncode == 0
