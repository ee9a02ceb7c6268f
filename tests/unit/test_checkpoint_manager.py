"""CheckpointManager: atomic saves (safetensors + JSON, nothing pickled), pruning, crash recovery, integrity
checks, resume resolution, and a full disk that says so."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from magi_train.checkpoint.manager import (MARKER_NAME, CheckpointManager, CorruptCheckpointError, file_digest,
                                          verify_checkpoint)


def make_state(seed: int) -> dict:
    """What a model-only checkpoint holds: dicts of tensors (any dtype) and JSON-able values."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=gen))
        model.bias.copy_(torch.randn(3, generator=gen))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, generator=gen)).sum().backward()
    optimizer.step()
    moments = {f"{name}.{k}": v.clone()  # "step" is a 0-d tensor
               for (name, p) in model.named_parameters() for k, v in optimizer.state[p].items()}
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": moments,
        "ema": {"weight": torch.randn(3, 4, generator=gen).to(torch.bfloat16), "count": torch.tensor([seed])},
        "extra": {
            "step": seed,
            "data_position": {"shard": 3, "sample": 17 + seed},
            "losses": [0.5, float(seed), None],
            "config": {"model": {"hidden": 64}, "lr": 1e-3, "name": "tiny", "flag": True},
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
    assert sorted(p.name for p in path.iterdir()) == ["complete.json", "ema.safetensors", "extra.json",
                                                      "model.safetensors", "optimizer.safetensors"]
    marker = json.loads((path / MARKER_NAME).read_text())
    assert marker["step"] == 100
    assert list(marker["files"]) == ["model.safetensors", "optimizer.safetensors", "ema.safetensors", "extra.json"]
    assert marker["files"]["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size
    assert len(marker["files"]["model.safetensors"]["sha256"]) == 64
    assert json.loads((path / "extra.json").read_text()) == state["extra"]  # plain JSON, readable by anything

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


def failing_os_write(fail_at: int, error=None, partial: bool = False):
    """An os.write that fails at its `fail_at`-th call (after writing half of that chunk when `partial`)."""
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(1)
        if len(calls) == fail_at:
            if partial:
                real_write(fd, bytes(memoryview(data)[: len(data) // 2]))
            raise error if error is not None else OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    return write


def test_disk_full_during_write_says_so_and_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save(1, make_state(1))
    # The third write: model.safetensors' header and first tensor are on disk when the disk fills up.
    monkeypatch.setattr(os, "write", failing_os_write(3, partial=True))
    with pytest.raises(OSError) as err:
        mgr.save(2, make_state(2))
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert "no space left on device" in message and str(tmp_path / "step_00000002") in message, message
    assert "model.safetensors" in message and "free" in message, message

    assert dir_names(tmp_path) == ["step_00000001"]  # the temp dir was cleaned up
    assert mgr.latest() == good
    assert_same(mgr.load(good), make_state(1))


def test_other_write_errors_name_the_file_and_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    monkeypatch.setattr(os, "write", failing_os_write(1, OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError) as err:
        mgr.save(2, make_state(2))
    monkeypatch.undo()
    assert err.value.errno == errno.EIO
    message = str(err.value)
    assert "Input/output error" in message and "no space" not in message, message
    assert str(tmp_path / "step_00000002") in message and "model.safetensors" in message and "free" in message
    assert dir_names(tmp_path) == []


def test_free_space_is_checked_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save(1, make_state(1))
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError) as err:
        mgr.save(2, make_state(2))
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and writes == []  # nothing was written
    message = str(err.value)
    assert "no space left on device" in message and str(tmp_path / "step_00000002") in message, message
    assert "100 bytes free" in message, message
    assert dir_names(tmp_path) == ["step_00000001"] and mgr.latest() == good


def test_hard_crash_during_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save(1, make_state(1))

    with monkeypatch.context() as patch:
        # KeyboardInterrupt stands in for SIGKILL: nothing after this point may run...
        patch.setattr(os, "write", failing_os_write(3, KeyboardInterrupt(), partial=True))
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
    (tmp_path / ".tmp_new_00000002_9_b" / "model.safetensors").write_bytes(b"partial")
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
    data = (broken / "optimizer.safetensors").read_bytes()
    (broken / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    assert mgr.latest() == good
    with pytest.raises(CorruptCheckpointError, match=r"optimizer\.safetensors.*truncated"):
        mgr.load(broken)


def test_corrupted_bytes_fail_the_hash_check(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    path = mgr.save(1, make_state(1))
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # in the tensor data, same size: only the sha256 can notice
    (path / "model.safetensors").write_bytes(bytes(data))
    assert mgr.latest() == path
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*sha256"):
        mgr.load(path)


def test_missing_file_is_ignored_and_rejected(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=0)
    good = mgr.save(1, {"model": {"w": torch.ones(2)}, "extra": 1})
    broken = mgr.save(2, {"model": {"w": torch.ones(2)}, "extra": 2})
    (broken / "model.safetensors").unlink()
    assert mgr.latest() == good
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
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


@pytest.mark.parametrize(("state", "message"), [
    ({"extra": (1, 2)}, r"state\['extra'\] is a tuple"),
    ({"extra": {"rng": {"state": torch.ones(2)}}}, r"state\['extra'\]\['rng'\]\['state'\] is a torch\.Tensor"),
    ({"extra": {"state": {0: 1}}}, r"state\['extra'\]\['state'\] has the key 0"),
    ({"model": {"w": torch.ones(2), "step": 3}}, r"state\['model'\]\['w'\] is a torch\.Tensor"),
    ({"model": torch.ones(2)}, r"state\['model'\] is a torch\.Tensor"),
    ({"extra": np.float32(1.0)}, r"state\['extra'\] is a numpy\.float32"),
    ({"model": {1: torch.ones(2)}}, r"model\.safetensors: its tensor names must be strings"),
    ({"model": {"w": torch.ones(2, dtype=torch.complex64)}}, r"model\.safetensors.*complex64 cannot be stored"),
    ({"index": {"a": 1}}, "index.json, a name checkpoints reserve"),
    ({"complete": 1}, "complete.json, a name checkpoints reserve"),
])
def test_values_that_are_neither_tensors_nor_json_are_refused(tmp_path: Path, state: dict, message: str) -> None:
    # Nothing is pickled: a value that is neither a dict of tensors nor JSON-able (as it is) fails by key.
    mgr = CheckpointManager(tmp_path, keep_last=1)
    with pytest.raises(ValueError, match=message):
        mgr.save(1, {"ok": 1, **state})
    assert dir_names(tmp_path) == []



def test_save_in_three_calls_for_files_others_wrote(tmp_path: Path) -> None:
    # The multi-rank save: files appear in the temp dir (some hashed by their writers), one process commits.
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, {"extra": 1})
    tmp = mgr.begin_save(2)
    (tmp / "rank_00000.safetensors").write_bytes(b"rank zero")
    (tmp / "rank_00001.safetensors").write_bytes(b"rank one")
    path = mgr.finish_save(tmp, 2, {"rank_00001.safetensors": file_digest(tmp / "rank_00001.safetensors")})
    marker = verify_checkpoint(path)
    assert sorted(marker["files"]) == ["rank_00000.safetensors", "rank_00001.safetensors"]
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
    path = mgr.save(1, {"a": 1, "b": 2})  # files a.json, b.json
    data = bytearray((path / "b.json").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only b.json's hash can tell
    (path / "b.json").write_bytes(bytes(data))
    verify_checkpoint(path, share=(0, 2))  # hashes a.json only
    with pytest.raises(CorruptCheckpointError, match=r"b\.json.*sha256"):
        verify_checkpoint(path, share=(1, 2))
