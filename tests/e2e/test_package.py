"""The built wheel is a working installation: its programs run from any directory, with its own copy of magi.

The wheel is built from the working tree's source files (copied to a temporary folder, so the build leaves
nothing in the repository) and installed into a fresh venv. That venv sees the test venv's dependencies through
a `.pth` line appended to its path (no download): the wheel's magi comes first, and the editable install's
finder (run only by a `.pth` file *inside* a site directory) is never loaded, which the test checks. Everything
then runs from a temporary directory outside the repository, through the console scripts: `magi-train` trains
the tiny preset two steps, `magi-generate` makes a video from that checkpoint (directly, one process, and under
torchrun as `-m magi_infer.generate`), a tool's console script composes a config from the installed configs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from magi_train.data.video_io import probe_video

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from: the package folders and the files pyproject.toml / setup.py read.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "magi_train/", "magi_infer/", "conf/", "tools/")

pytestmark = pytest.mark.slow


def _run(cmd, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for name in listed:
        if name.startswith(SOURCES) and (REPO / name).is_file():  # tracked or new, not deleted
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # the build needs setuptools and wheel only, both installed
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src], src, env)
    (built,) = dist.glob("magi-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root], check=True, timeout=300)
    python = root / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # Appended after the venv's own site-packages: the installed wheel wins over anything of the same name.
    (site / "test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         root, {**os.environ})
    return root


@pytest.fixture(scope="module")
def env(venv) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**clean, "PATH": f"{venv / 'bin'}{os.pathsep}{clean.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def trained(venv, env, tmp_path_factory) -> Path:
    """The tiny preset trained two steps by the installed `magi-train`, from outside the repository."""
    work = tmp_path_factory.mktemp("train")
    _run(["magi-train", "experiment=tiny", f"trainer.output_dir={work / 'run'}", "trainer.progress_bar=false",
          "trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=0", "trainer.wandb.mode=disabled"],
         work, env)
    return work / "run" / "checkpoints"


def test_the_wheel_holds_the_configs_assets_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for conf in (REPO / "conf").rglob("*.yaml"):
        assert f"magi_conf/{conf.relative_to(REPO / 'conf')}" in names, f"{conf} is not in the wheel"
    assert "magi_infer/assets/special_tokens.npz" in names
    assert "magi-0.1.0.dist-info/licenses/LICENSE" in names
    for tool in ("convert_checkpoint", "prepare_dataset", "estimate_inference_memory"):
        assert f"magi_tools/{tool}.py" in names
    # Every module of the packages ships (setup.py finds sub-packages; nothing is listed by hand).
    for package in ("magi_train", "magi_infer"):
        for module in (REPO / package).rglob("*.py"):
            assert str(module.relative_to(REPO)) in names, f"{module} is not in the wheel"


def test_the_installed_copy_is_the_one_imported(venv, env, tmp_path):
    code = ("import magi_infer, magi_train, magi_conf, sys;"
            "print(magi_infer.__file__); print(magi_train.__file__); print(magi_conf.__file__);"
            "print(any('__editable__' in m for m in sys.modules))")
    out = _run([venv / "bin" / "python", "-c", code], tmp_path, env).stdout.split("\n")
    for path in out[:3]:
        assert Path(path).is_relative_to(venv), f"imported {path}, not the wheel's copy in {venv}"
    assert out[3] == "False", "the editable install's finder was loaded"


def test_help_and_tools_run_from_the_installed_configs(venv, env, tmp_path):
    done = _run(["magi-generate", "--help"], tmp_path, env)
    assert "model:" in done.stdout and "ckpt" in done.stdout and "Traceback" not in done.stderr
    # A tool's console script composes `generate` with a model preset from the installed magi_conf.
    done = _run(["magi-estimate-inference-memory", "--model", "tiny", "--frames", "24"], tmp_path, env)
    assert "| tiny |" in done.stdout
    assert not list(tmp_path.iterdir()), "a --help or an estimate wrote files"


def test_magi_serve_help(venv, env, wheel, tmp_path):
    if "magi_infer/server/cli.py" not in zipfile.ZipFile(wheel).namelist():
        pytest.skip("magi_infer/server/cli.py (the magi-serve entry point) is not written yet")
    done = _run(["magi-serve", "--help"], tmp_path, env)
    assert "== Config ==" in done.stdout and "Traceback" not in done.stderr  # Hydra's help of conf/serve.yaml


def test_generate_from_the_wheel_one_process_and_under_torchrun(venv, env, trained, tmp_path):
    args = ["model=tiny", f"ckpt.dir={trained}", "num_frames=24", "prompt=a red blob moves right", "progress=false",
            "video.fps=12"]
    # The console script alone: no torchrun, one process.
    done = _run(["magi-generate", *args, f"output={tmp_path / 'direct.mp4'}"], tmp_path, env)
    assert "wrote" in done.stdout and "1 chunks" in done.stdout
    # Under torchrun, the installed module.
    _run([venv / "bin" / "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
          "-m", "magi_infer.generate", *args, f"output={tmp_path / 'torchrun.mp4'}"], tmp_path, env)
    for name in ("direct.mp4", "torchrun.mp4"):
        info = probe_video(tmp_path / name)
        assert (info.frames, info.width, info.height, info.fps, info.codec) == (24, 64, 64, 12.0, "h264"), name
