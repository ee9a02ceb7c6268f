"""tools/convert_checkpoint.py as users run it: released -> ours through `main`, refusing to overwrite without
--force, then ours -> released as a real process from the repository root; the round trip is bit-exact."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magi_train.checkpoint.magi1 import load_magi1_state_dict

REPO = Path(__file__).resolve().parents[2]
GELU = REPO / "tests" / "fixtures" / "magi1_gelu"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def assert_bitwise(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(bits(got[key]), bits(tensor)), key


@pytest.mark.slow
def test_cli_end_to_end(tool, tmp_path, capsys):
    fixture_state = load_magi1_state_dict(GELU / "inference_weight")
    config = GELU / "config.json"
    assert tool.main(["to-ours", "--src", str(GELU), "--model", str(config), "--out", str(tmp_path / "ours"),
                      "--step", "12"]) == 0
    printed = capsys.readouterr().out
    assert "step_00000012" in printed and "keys: 66" in printed and "no optimizer state" in printed
    assert tool.main(["to-ours", "--src", str(GELU), "--model", str(config), "--out", str(tmp_path / "ours")]) == 1
    assert "pass --force" in capsys.readouterr().err

    # Once as a real process with the venv's python, from the repo root as documented.
    out = tmp_path / "exported"
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "to-released", "--src",
                             str(tmp_path / "ours"), "--out", str(out), "--shard-size", "2MB"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "ours -> released" in result.stdout and "model-00001-of-" in result.stdout
    assert_bitwise(load_magi1_state_dict(out / "inference_weight"), fixture_state)
