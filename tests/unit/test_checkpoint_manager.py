"""CheckpointManager: atomic saves, pruning, crash recovery, integrity checks, resume resolution."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from magi_train.checkpoint.manager import (MARKER_NAME, CheckpointManager, CorruptCheckpointError, file_digest,
                                          verify_checkpoint)


def make_state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=gen))
        model.bias.copy_(torch.randn(3, generator=gen))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, generator=gen)).sum().backward()
    optimizer.step()
    rng = random.Random(seed)
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "extra": {
            "step": seed,
            "data_position": {"shard": 3, "sample": 17 + seed},
            "python_rng": rng.getstate(),
            "numpy_rng": np.random.default_rng(seed).bit_generator.state,
            "torch_rng": gen.get_state(),
            "bf16": torch.randn(5, generator=gen).to(torch.bfloat16),
            "config": {"model": {"hidden": 64}, "lr": 1e-3},
        },
    }


def assert_same(a, b) -> None:
    """Deep equality that treats tensors bit-exactly (and dtype-exactly)."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def dir_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_round_trip(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    assert mgr.latest() is None
    state = make_state(1)
    path = mgr.save(100, state)

    assert path == tmp_path / "step_00000100"
    assert sorted(p.name for p in path.iterdir()) == ["complete.json", "extra.pt", "model.pt", "optimizer.pt"]
    marker = json.loads((path / MARKER_NAME).read_text())
    assert marker["step"] == 100
    assert set(marker["files"]) == {"model.pt", "optimizer.pt", "extra.pt"}
    assert marker["files"]["model.pt"]["size"] == (path / "model.pt").stat().st_size
    assert len(marker["files"]["model.pt"]["sha256"]) == 64

    assert mgr.latest() == path
    assert_same(mgr.load(path), state)
    # A fresh manager (a restarted job) sees the same thing and leaves it alone.
    assert CheckpointManager(tmp_path, keep_last=3).latest() == path
    assert dir_names(tmp_path) == ["step_00000100"]


def test_latest_is_highest_step_not_newest_write(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(20, {"extra": 20})
    mgr.save(3, {"extra": 3})
    assert mgr.latest() == tmp_path / "step_00000020"
    assert mgr.load(mgr.latest()) == {"extra": 20}


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, {"extra": step})
    assert dir_names(tmp_path) == ["step_00000003", "step_00000004"]
    assert [mgr.load(p)["extra"] for p in mgr.checkpoints()] == [3, 4]


def test_keep_last_zero_keeps_all(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        mgr.save(step, {"extra": step})
    assert dir_names(tmp_path) == ["step_00000001", "step_00000002", "step_00000003"]


def test_prune_never_deletes_the_checkpoint_just_saved(tmp_path: Path) -> None:
    # After rewinding to an earlier checkpoint, the new save has a lower step than old ones.
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(10, {"extra": 10})
    path = mgr.save(5, {"extra": 5})
    assert path.is_dir() and mgr.load(path) == {"extra": 5}


def test_prune_ignores_incomplete_dirs(tmp_path: Path) -> None:
    (tmp_path / "step_00000001").mkdir(parents=True)  # no marker: not ours to count or delete
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(2, {"extra": 2})
    mgr.save(3, {"extra": 3})
    assert dir_names(tmp_path) == ["step_00000001", "step_00000003"]


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(7, {"extra": "first"})
    path = mgr.save(7, {"extra": "second"})
    assert mgr.load(path) == {"extra": "second"}
    assert dir_names(tmp_path) == ["step_00000007"]


def test_exception_during_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save(1, make_state(1))
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first file is already on disk when this happens
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, make_state(2))
    monkeypatch.undo()

    assert dir_names(tmp_path) == ["step_00000001"]  # the temp dir was cleaned up
    assert mgr.latest() == good
    assert_same(mgr.load(good), make_state(1))


def test_hard_crash_during_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save(1, make_state(1))
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a file")
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point may run...
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", dying_save)
        patch.setattr(shutil, "rmtree", lambda *a, **k: None)  # ...so no cleanup either
        with pytest.raises(KeyboardInterrupt):
            mgr.save(2, make_state(2))

    leftovers = [n for n in dir_names(tmp_path) if n.startswith(".tmp_")]
    assert len(leftovers) == 1
    assert mgr.latest() == good  # the half-written temp dir is invisible

    restarted = CheckpointManager(tmp_path, keep_last=1)
    assert dir_names(tmp_path) == ["step_00000001"]  # stale temp dir removed
    assert restarted.latest() == good
    assert_same(restarted.load(good), make_state(1))


def test_failed_rename_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save(1, {"extra": 1})
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".tmp_new_"):
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        mgr.save(2, {"extra": 2})
    # Re-saving the same step moves the old copy aside first; it must be put back.
    with pytest.raises(OSError, match="rename failed"):
        mgr.save(1, {"extra": "replacement"})
    monkeypatch.undo()

    assert dir_names(tmp_path) == ["step_00000001"]
    assert mgr.latest() == good
    assert mgr.load(good) == {"extra": 1}


def test_crash_between_move_aside_and_rename_is_recovered(tmp_path: Path) -> None:
    # Reproduce what a crash leaves when re-saving step 1: old copy moved aside, new one complete
    # but not yet renamed, no step_00000001 at all. The restart must bring step 1 back.
    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(1, {"extra": "old"})
    mgr.save(2, {"extra": "new"})
    os.rename(tmp_path / "step_00000001", tmp_path / ".tmp_old_00000001_1_x")
    os.rename(tmp_path / "step_00000002", tmp_path / ".tmp_new_00000002_1_y")
    (tmp_path / ".tmp_new_00000003_1_z").mkdir()  # an unfinished save: no marker

    restarted = CheckpointManager(tmp_path, keep_last=0)
    assert dir_names(tmp_path) == ["step_00000001", "step_00000002"]
    assert restarted.load(restarted.latest()) == {"extra": "new"}
    assert restarted.load(tmp_path / "step_00000001") == {"extra": "old"}


def test_stale_temp_cleanup_spares_checkpoints(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    mgr.save(1, {"extra": 1})
    shutil.copytree(tmp_path / "step_00000001", tmp_path / ".tmp_old_00000001_9_a")  # superseded copy
    (tmp_path / ".tmp_new_00000002_9_b").mkdir()
    (tmp_path / ".tmp_new_00000002_9_b" / "model.pt").write_bytes(b"partial")
    (tmp_path / ".tmp_del_step_00000000_c").mkdir()
    (tmp_path / "step_00000005").mkdir()  # incomplete, but not a temp dir: left alone
    (tmp_path / "notes.txt").write_text("user file")

    CheckpointManager(tmp_path, keep_last=0)
    assert dir_names(tmp_path) == ["notes.txt", "step_00000001", "step_00000005"]


def test_dir_without_marker_is_ignored_and_rejected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    good = mgr.save(1, {"extra": 1})
    broken = mgr.save(2, {"extra": 2})
    (broken / MARKER_NAME).unlink()
    assert mgr.latest() == good
    with pytest.raises(FileNotFoundError, match=r"step_00000002.*complete\.json"):
        mgr.load(broken)


def test_truncated_file_is_ignored_and_rejected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    good = mgr.save(1, make_state(1))
    broken = mgr.save(2, make_state(2))
    data = (broken / "optimizer.pt").read_bytes()
    (broken / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert mgr.latest() == good
    with pytest.raises(CorruptCheckpointError, match=r"optimizer\.pt.*truncated"):
        mgr.load(broken)


def test_corrupted_bytes_fail_the_hash_check(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    path = mgr.save(1, make_state(1))
    data = bytearray((path / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so only the sha256 can notice
    (path / "model.pt").write_bytes(bytes(data))
    assert mgr.latest() == path
    with pytest.raises(CorruptCheckpointError, match=r"model\.pt.*sha256"):
        mgr.load(path)


def test_missing_file_is_ignored_and_rejected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    good = mgr.save(1, {"model": torch.ones(2), "extra": 1})
    broken = mgr.save(2, {"model": torch.ones(2), "extra": 2})
    (broken / "model.pt").unlink()
    assert mgr.latest() == good
    with pytest.raises(FileNotFoundError, match=r"model\.pt"):
        mgr.load(broken)


def test_resolve_resume(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=0)
    assert mgr.resolve_resume("none") is None
    assert mgr.resolve_resume("auto") is None
    first = mgr.save(1, {"extra": 1})
    second = mgr.save(2, {"extra": 2})
    assert mgr.resolve_resume("auto") == second
    assert mgr.resolve_resume("none") is None
    assert mgr.resolve_resume(str(first)) == first

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        mgr.resolve_resume(str(missing))
    (second / MARKER_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"step_00000002.*complete\.json"):
        mgr.resolve_resume(str(second))
    assert mgr.resolve_resume("auto") == first


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    with pytest.raises(ValueError, match="step"):
        mgr.save(-1, {"extra": 1})
    with pytest.raises(ValueError, match="file name"):
        mgr.save(1, {"../escape": 1})
    with pytest.raises(ValueError, match="empty"):
        mgr.save(1, {})
    assert dir_names(tmp_path) == []



def test_save_in_three_calls_for_files_others_wrote(tmp_path: Path) -> None:
    # The multi-rank save: files appear in the temp dir (some hashed by their writers), one process commits.
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, {"extra": 1})
    tmp = mgr.begin_save(2)
    (tmp / "__0_0.distcp").write_bytes(b"rank zero")
    (tmp / "__1_0.distcp").write_bytes(b"rank one")
    path = mgr.finish_save(tmp, 2, {"__1_0.distcp": file_digest(tmp / "__1_0.distcp")})
    marker = verify_checkpoint(path)
    assert sorted(marker["files"]) == ["__0_0.distcp", "__1_0.distcp"]
    assert dir_names(tmp_path) == ["step_00000002"]  # installed, then pruned to keep_last=1

    # A file reported but absent, or of another size than reported, is never installed.
    tmp = mgr.begin_save(3)
    (tmp / "a").write_bytes(b"12345")
    with pytest.raises(FileNotFoundError, match="missing"):
        mgr.finish_save(tmp, 3, {"b": {"size": 1, "sha256": "0" * 64}})
    with pytest.raises(CorruptCheckpointError, match="reported"):
        mgr.finish_save(tmp, 3, {"a": {"size": 4, "sha256": "0" * 64}})
    mgr.abort_save(tmp)
    assert dir_names(tmp_path) == ["step_00000002"]
    with pytest.raises(ValueError, match="not a save directory"):
        mgr.abort_save(path)  # only begin_save directories may be deleted this way


def test_verify_checkpoint_splits_the_hashing(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    path = mgr.save(1, {"a": 1, "b": 2})  # files a.pt, b.pt
    data = bytearray((path / "b.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only b.pt's hash can tell
    (path / "b.pt").write_bytes(bytes(data))
    verify_checkpoint(path, share=(0, 2))  # hashes a.pt only
    with pytest.raises(CorruptCheckpointError, match=r"b\.pt.*sha256"):
        verify_checkpoint(path, share=(1, 2))
