"""The storage format of the trainer's checkpoints (magi_train/checkpoint/sharded.py): safetensors pieces and a
JSON index, checked strictly before anything is read; the save's plan (replicas written once, boxes tiling each
tensor); reads of only the overlap of a stored piece with a box; a full disk during a save says so.

Resharding under many layouts is tests/distributed/test_dist_checkpoint.py; planted pickles are
tests/unit/test_no_pickle.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from magi_train.checkpoint import sharded
from magi_train.checkpoint.distributed import (checkpoint_has, load_train_state, read_full_model_state,
                                               read_trainer_state, save_train_state)
from magi_train.checkpoint.manager import MARKER_NAME, CheckpointManager, CorruptCheckpointError, file_digest
from magi_train.checkpoint.tensorfile import open_tensor_file
from tests.configs import tiny_model


def rewrite_marker(path: Path) -> None:
    """Make complete.json match the files as they are now (what someone who crafts a directory can do)."""
    marker = json.loads((path / MARKER_NAME).read_text())
    marker["files"] = {p.name: file_digest(p) for p in sorted(path.iterdir()) if p.name != MARKER_NAME}
    (path / MARKER_NAME).write_text(json.dumps(marker))


# ------------------------------------------------------------------ a real checkpoint of one process


@pytest.fixture(scope="module")
def parallel():
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel

    return init_parallel(ParallelConfig())


def build(parallel, seed: int):
    from magi_train.config.schema import OptimizerConfig
    from magi_train.parallel.parallelize import build_parallel_dit
    from magi_train.parallel.zero import ShardedAdamW

    model = build_parallel_dit(tiny_model(), parallel, init_seed=seed)
    optimizer = ShardedAdamW(list(model.named_parameters()), OptimizerConfig(lr=1e-2), group=parallel.groups.dp_cp)
    return model, optimizer


def trained(parallel):
    model, optimizer = build(parallel, seed=1)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    return model, optimizer


@pytest.fixture(scope="module")
def saved(parallel, tmp_path_factory) -> Path:
    model, optimizer = trained(parallel)
    ema = {name: torch.full(p.shape, 0.5, dtype=torch.float64) for name, p in model.named_parameters()}
    manager = CheckpointManager(tmp_path_factory.mktemp("ckpt"), keep_last=1)
    return save_train_state(manager, 3, [model], optimizer, {"step": 3}, parallel, extra_weights={"ema": [ema]})


def copy_of(saved: Path, tmp_path: Path) -> Path:
    path = tmp_path / saved.name
    shutil.copytree(saved, path)
    return path


def test_layout_and_round_trip(saved, parallel):
    assert sorted(p.name for p in saved.iterdir()) == ["complete.json", "index.json", "rank_00000.safetensors",
                                                       "trainer.json"]
    index = json.loads((saved / "index.json").read_text())
    assert index["format"] == "magi-train-sharded" and index["version"] == 1
    entry = index["tensors"]["model.x_embedder.weight"]
    assert entry["dtype"] == "float32" and entry["pieces"] == [
        {"file": "rank_00000.safetensors", "name": "model.x_embedder.weight@0,0,0,0,0", "offsets": [0] * 5,
         "sizes": entry["shape"]}]
    assert index["tensors"]["ema.x_embedder.weight"]["dtype"] == "float64"
    assert index["tensors"]["optim.x_embedder.weight.step"]["shape"] == [1]

    model, optimizer = trained(parallel)
    fresh, fresh_opt = build(parallel, seed=2)
    extra = load_train_state(saved, [fresh], fresh_opt, parallel)
    assert extra["step"] == 3 and extra["layout"]["world_size"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    want, got = optimizer.owned_state(), fresh_opt.owned_state()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[n][k], got[n][k]) for n in want for k in want[n])
    full = read_full_model_state(saved)
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    assert checkpoint_has(saved, "ema") and not checkpoint_has(saved, "swa")


# ------------------------------------------------------------------ the index, checked before use


def edit_index(path: Path, edit) -> None:
    index = json.loads((path / "index.json").read_text())
    edit(index)
    (path / "index.json").write_text(json.dumps(index))
    rewrite_marker(path)


def first_piece(index: dict, key: str = "model.x_embedder.weight") -> dict:
    return index["tensors"][key]["pieces"][0]


def split_rows(index: dict, first_end: float, second_start: float) -> None:
    """model.x_embedder.weight's piece as two: rows [0, first_end * n) and [second_start * n, n)."""
    entry = index["tensors"]["model.x_embedder.weight"]
    piece, n = entry["pieces"][0], entry["shape"][0]
    a, b = int(first_end * n), int(second_start * n)
    entry["pieces"] = [{**piece, "sizes": [a, *piece["sizes"][1:]]},
                       {**piece, "name": "other", "offsets": [b, *piece["offsets"][1:]],
                        "sizes": [n - b, *piece["sizes"][1:]]}]


def grow(index: dict) -> None:
    """A tensor far larger than its file: shape and piece both claim 10^9 rows."""
    entry = index["tensors"]["model.x_embedder.weight"]
    entry["shape"][0] = entry["pieces"][0]["sizes"][0] = 10**9


@pytest.mark.parametrize(("edit", "message"), [
    (lambda i: first_piece(i).update(file="../rank_00000.safetensors"), r"file '\.\./rank_00000\.safetensors' is not"),
    (lambda i: first_piece(i).update(file="/etc/passwd.safetensors"), "is not a .safetensors file of this checkpoint"),
    (lambda i: first_piece(i).update(file="rank_00009.safetensors"), "listed in complete.json"),
    (lambda i: first_piece(i).update(file="trainer.json"), "is not a .safetensors file"),
    (lambda i: first_piece(i).update(offsets=[1, 0, 0, 0, 0]), "outside its shape"),
    (lambda i: first_piece(i).update(offsets=[-1, 0, 0, 0, 0]), "non-negative integers"),
    (lambda i: first_piece(i).update(offsets=[0.0, 0, 0, 0, 0]), "non-negative integers"),
    (lambda i: first_piece(i).update(offsets=[False, 0, 0, 0, 0]), "non-negative integers"),
    (lambda i: first_piece(i).update(offsets=[0, 0]), "has 2 entries, the tensor 5 dimensions"),
    (lambda i: first_piece(i).update(extra=1), "must be an object with exactly file, name, offsets, sizes"),
    (lambda i: first_piece(i).update(name=""), "is empty"),
    (lambda i: i["tensors"]["model.x_embedder.weight"].update(dtype="object"), "dtype 'object' is not one of"),
    (lambda i: i["tensors"]["model.x_embedder.weight"].update(pieces=[]), "must be a non-empty list"),
    (grow, "fewer than the pieces the index places in it"),
    (lambda i: split_rows(i, 0.5, 0.25), "overlapping pieces"),
    (lambda i: split_rows(i, 0.25, 0.5), "a hole"),
    (lambda i: i.update(format="torch-dcp"), "is not 'magi-train-sharded'"),
    (lambda i: i.update(tensors=[]), "tensors must be an object"),
])
def test_a_bad_index_is_refused_naming_the_entry(saved, tmp_path, parallel, edit, message):
    path = copy_of(saved, tmp_path)
    edit_index(path, edit)
    model, optimizer = build(parallel, seed=2)
    for read in (lambda: read_full_model_state(path), lambda: checkpoint_has(path, "model"),
                 lambda: load_train_state(path, [model], optimizer, parallel)):
        with pytest.raises(CorruptCheckpointError, match=message) as err:
            read()
        assert str(path / "index.json") in str(err.value)


def test_stored_tensors_are_checked_against_the_index(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    edit_index(path, lambda i: i["tensors"]["model.x_embedder.weight"].update(dtype="bfloat16"))
    with pytest.raises(CorruptCheckpointError, match=r"rank_00000\.safetensors: tensor "
                                                     r"'model\.x_embedder\.weight@0,0,0,0,0' is F32 .*says BF16"):
        read_full_model_state(path)
    path = copy_of(saved, tmp_path / "b")
    edit_index(path, lambda i: first_piece(i).update(name="model.nothing@0"))
    with pytest.raises(CorruptCheckpointError, match=r"holds no tensor 'model\.nothing@0'"):
        read_full_model_state(path)
    path = copy_of(saved, tmp_path / "c")
    size = (path / "rank_00000.safetensors").stat().st_size  # as large as the index needs it to be
    (path / "rank_00000.safetensors").write_bytes(b"\xff" * size)
    rewrite_marker(path)
    with pytest.raises(ValueError, match=r"rank_00000\.safetensors is not a readable safetensors file"):
        read_full_model_state(path)


def test_trainer_json_must_be_json(saved, tmp_path):
    path = copy_of(saved, tmp_path)
    (path / "trainer.json").write_bytes(b"\x80\x04K\x01.")
    rewrite_marker(path)
    with pytest.raises(CorruptCheckpointError, match=r"trainer\.json is not valid JSON"):
        read_trainer_state(path)


# ------------------------------------------------------------------ the save's plan and the reads


def box(key, shape, offsets, sizes, dtype="float32"):
    return (key, tuple(shape), dtype, tuple(offsets), tuple(sizes))


def test_plan_writes_replicas_once_and_checks_the_tiling():
    # Rank 1 holds rows 2..3 and, like rank 0, the replicated bias.
    index, writes, sizes = sharded.plan([
        [box("w", (4, 3), (0, 0), (2, 3)), box("b", (3,), (0,), (3,))],
        [box("w", (4, 3), (2, 0), (2, 3)), box("b", (3,), (0,), (3,))],
        [],
    ])
    assert writes == [[("w", (0, 0)), ("b", (0,))], [("w", (2, 0))], []]
    assert [p.file for p in index["w"].pieces] == ["rank_00000.safetensors", "rank_00001.safetensors"]
    assert index["b"].pieces == (sharded.Piece("rank_00000.safetensors", "b@0", (0,), (3,)),)
    assert sizes[0] > 4 * 9 and sizes[2] == 0
    with pytest.raises(ValueError, match="the boxes the ranks would save for w has overlapping pieces"):
        sharded.plan([[box("w", (4, 3), (0, 0), (3, 3))], [box("w", (4, 3), (2, 0), (2, 3))]])
    with pytest.raises(ValueError, match=r"w has pieces covering 6 of its 12 elements \(a hole\)"):
        sharded.plan([[box("w", (4, 3), (0, 0), (2, 3))]])
    with pytest.raises(ValueError, match=r"w: rank 1 holds it as \(4, 3\) bfloat16, an earlier rank as "
                                         r"\(4, 3\) float32"):
        sharded.plan([[box("w", (4, 3), (0, 0), (2, 3))], [box("w", (4, 3), (2, 0), (2, 3), "bfloat16")]])


def test_a_box_reads_only_the_overlap_of_each_piece(tmp_path, monkeypatch):
    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    # Stored as two row blocks by two "ranks"; the SwiGLU-like pieces are views of one tensor.
    state0 = {"w": ((8, 6), [((0, 0), full[:5])])}
    state1 = {"w": ((8, 6), [((5, 0), full[5:])])}
    index, writes, _ = sharded.plan([sharded.describe(state0), sharded.describe(state1)])
    sharded.write_pieces(tmp_path, 0, state0, writes[0])
    sharded.write_pieces(tmp_path, 1, state1, writes[1])
    (tmp_path / "index.json").write_bytes(sharded.index_json(index))
    files = {p.name: file_digest(p) for p in tmp_path.iterdir()}
    index = sharded.read_index(tmp_path, files)

    read_shapes = []
    real = sharded.PieceReader._open

    def spying_open(self, entry, piece):
        handle = real(self, entry, piece)

        class Spy:
            def get_slice(self, name):
                stored = handle.get_slice(name)

                class Slice:
                    def __getitem__(self, item):
                        out = stored[item]
                        read_shapes.append(tuple(out.shape))
                        return out
                return Slice()
        return Spy()

    monkeypatch.setattr(sharded.PieceReader, "_open", spying_open)
    target = torch.full((4, 2), float("nan"))  # rows 3..6, columns 2..3: 2 rows of each piece
    with sharded.PieceReader(tmp_path, index) as reader:
        reader.read_into("w", (3, 2), target)
    assert torch.equal(target, full[3:7, 2:4])
    assert read_shapes == [(2, 2), (2, 2)]  # never a whole piece
    with open_tensor_file(tmp_path / "rank_00000.safetensors") as f:
        assert list(f.offset_keys()) == ["w@0,0"]


# ------------------------------------------------------------------ a full disk


def test_disk_full_during_a_distributed_save_says_so(saved, tmp_path, parallel, monkeypatch):
    model, optimizer = trained(parallel)
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=2)
    good = save_train_state(manager, 1, [model], optimizer, {"step": 1}, parallel)
    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(1)
        if len(calls) == 4:  # trainer.json and index.json are written, and the piece file's header
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as err:
        save_train_state(manager, 2, [model], optimizer, {"step": 2}, parallel)
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and "no space left on device" in message, message
    assert str(root / "step_00000002") in message and "rank_00000.safetensors" in message and "free" in message
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]  # the temporary directory is gone
    assert read_trainer_state(good)["step"] == 1 and read_full_model_state(good)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError) as err:
        save_train_state(manager, 2, [model], optimizer, {"step": 2}, parallel)
    monkeypatch.undo()
    message = str(err.value)
    assert err.value.errno == errno.ENOSPC and "no space left on device: it needs" in message, message
    assert "1,000 bytes free" in message and str(root / "step_00000002") in message, message
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
