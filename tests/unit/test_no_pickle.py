"""No checkpoint loader unpickles anything: a crafted checkpoint directory cannot run code.

A pickle whose unpickling would create a sentinel file (what an attacker's code could do, harmlessly) is planted
in every file a loader reads: the older formats' `.metadata`, `.distcp`, `model.pt`, `trainer.pt`, and this
format's `index.json`, `rank_*.safetensors`, `trainer.json`, `model.safetensors`; once with the marker left
as it was and once rewritten to match the planted files' sizes and sha256 (whoever crafts the directory writes
the marker too). Every loader entry is called on each: the sentinel never appears, the loaders that read every
file fail with a clear error, and any other either fails so or returns exactly what the genuine checkpoint
holds (it did not read the planted file).

Plus a static check: no non-test code of magi_train/, magi_infer/ or tools/ calls a pickle-based loader.
"""

from __future__ import annotations

import builtins
import importlib.util
import io
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from magi_train.checkpoint.distributed import load_train_state, read_full_weights, save_train_state
from magi_train.checkpoint.manager import MARKER_NAME, CheckpointManager, file_digest
from magi_train.checkpoint.weights import load_weights, read_our_model_state, read_our_trainer_state
from magi_train.config.compose import config_to_dict
from tests.configs import tiny_model

REPO = Path(__file__).resolve().parents[2]


class Plant:
    """Unpickling this opens (creates) `sentinel` for writing: any code could run in its place."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return builtins.open, (self.sentinel, "w")


def pickled(sentinel: Path) -> bytes:
    return pickle.dumps(Plant(sentinel))


def torch_saved(sentinel: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Plant(sentinel), buffer)
    return buffer.getvalue()


def rewrite_marker(path: Path) -> None:
    marker = json.loads((path / MARKER_NAME).read_text())
    marker["files"] = {p.name: file_digest(p) for p in sorted(path.iterdir()) if p.name != MARKER_NAME}
    (path / MARKER_NAME).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def payloads_work(tmp_path_factory) -> None:
    """What the loaders are shown not to do: plain unpickling of these bytes does create the sentinel."""
    sentinel = tmp_path_factory.mktemp("payload") / "sentinel"
    pickle.loads(pickled(sentinel)).close()
    assert sentinel.exists()
    sentinel.unlink()
    torch.load(io.BytesIO(torch_saved(sentinel)), weights_only=False).close()
    assert sentinel.exists()


# ------------------------------------------------------------------ the genuine checkpoints


@pytest.fixture(scope="module")
def cfg():
    return tiny_model()


@pytest.fixture(scope="module")
def parallel():
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel

    return init_parallel(ParallelConfig())


def model_and_optimizer(cfg, parallel, seed: int):
    from magi_train.config.schema import OptimizerConfig
    from magi_train.parallel.parallelize import build_parallel_dit
    from magi_train.parallel.zero import ShardedAdamW

    model = build_parallel_dit(cfg, parallel, init_seed=seed)
    return model, ShardedAdamW(list(model.named_parameters()), OptimizerConfig(), group=parallel.groups.dp_cp)


@pytest.fixture(scope="module")
def genuine(cfg, parallel, tmp_path_factory) -> dict:
    """A checkpoint the trainer wrote and a model-only one (the converter's), with the model config in them."""
    root = tmp_path_factory.mktemp("genuine")
    trainer = {"step": 1, "config": {"model": config_to_dict(cfg)}}
    model, optimizer = model_and_optimizer(cfg, parallel, seed=0)
    distributed = save_train_state(CheckpointManager(root / "trained", keep_last=0), 1, [model], optimizer,
                                   trainer, parallel)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model_only = CheckpointManager(root / "converted", keep_last=0).save(1, {"model": state, "trainer": trainer})
    return {"distributed": distributed, "model_only": model_only}


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_no_pickle",
                                                  REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# ------------------------------------------------------------------ the crafted ones


def old_dcp(path: Path, cfg, sentinel: Path) -> None:
    """The older trainer layout: a pickled .metadata and torch.save pieces (and a harmless trainer.json)."""
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(pickled(sentinel))
    (path / "__0_0.distcp").write_bytes(torch_saved(sentinel))
    (path / "trainer.json").write_text(json.dumps({"step": 1, "config": {"model": config_to_dict(cfg)}}))
    (path / MARKER_NAME).write_text(json.dumps({"format": "magi-train-checkpoint", "version": 1, "step": 1,
                                                "time": 0.0, "files": {}}))
    rewrite_marker(path)


def old_model_only(path: Path, cfg, sentinel: Path) -> None:
    """The older converter layout: model.pt and trainer.pt."""
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(torch_saved(sentinel))
    (path / "trainer.pt").write_bytes(torch_saved(sentinel))
    (path / MARKER_NAME).write_text(json.dumps({"format": "magi-train-checkpoint", "version": 1, "step": 1,
                                                "time": 0.0, "files": {}}))
    rewrite_marker(path)


# (which genuine checkpoint, the file of it replaced by a pickle)
REPLACED = [("distributed", name) for name in ("index.json", "rank_00000.safetensors", "trainer.json")] + \
           [("model_only", name) for name in ("model.safetensors", "trainer.json")]
# (which genuine checkpoint, a pickle file added to it): only listed in a rewritten marker does anyone see it.
ADDED = [("distributed", "__0_0.distcp"), ("distributed", ".metadata"), ("model_only", "optimizer.pt"),
         ("model_only", "model.pt")]


def crafted_cases():
    cases = [pytest.param("old_dcp", None, True, id="old-dcp-layout"),
             pytest.param("old_model_only", None, True, id="old-pt-layout")]
    for kind, name in REPLACED:
        for rewrite in (False, True):
            cases.append(pytest.param(kind, name, rewrite,
                                      id=f"{kind}-{name}-{'marker-rewritten' if rewrite else 'stale-marker'}"))
    cases += [pytest.param(kind, name, True, id=f"{kind}-added-{name}") for kind, name in ADDED]
    return cases


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize(("kind", "planted", "rewrite"), crafted_cases())
def test_no_loader_runs_a_planted_pickle(kind, planted, rewrite, genuine, cfg, parallel, tool, tmp_path, capsys,
                                        payloads_work):
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "ckpt" / "step_00000001"
    if kind == "old_dcp":
        old_dcp(path, cfg, sentinel)
    elif kind == "old_model_only":
        old_model_only(path, cfg, sentinel)
    else:
        shutil.copytree(genuine[kind], path)
        data = pickled(sentinel) if planted.endswith((".json", ".metadata")) else torch_saved(sentinel)
        (path / planted).write_bytes(data)
        if rewrite:
            rewrite_marker(path)
    clean = genuine.get(kind)
    model, optimizer = model_and_optimizer(cfg, parallel, seed=1)

    entries = {
        "load_weights": lambda p: load_weights(p, cfg, fp8=False)[0],
        "read_our_model_state": read_our_model_state,
        "read_our_trainer_state": read_our_trainer_state,
        "read_full_weights": read_full_weights,
        "load_train_state": lambda p: load_train_state(p, [model], optimizer, parallel),
        "CheckpointManager.load": lambda p: CheckpointManager(p.parent, keep_last=0, read_only=True).load(p),
        "ours_to_released": lambda p: tool.ours_to_released(p, tmp_path / f"out_{p.parent.name}"),
    }
    # The entries that read every file of this kind of checkpoint (the others may not touch the planted one).
    reads_all = {"load_weights", "ours_to_released",
                 "CheckpointManager.load" if kind in ("model_only", "old_model_only") else "load_train_state"}
    outcomes = {}
    for name, entry in entries.items():
        try:
            result = entry(path)
        except (ValueError, FileNotFoundError) as e:  # CorruptCheckpointError, PickleCheckpointError, ConversionError
            outcomes[name] = str(e)
            assert str(path) in str(e), (name, str(e))
        else:
            # It returned: only if it never read the planted file, so it returns what the genuine one holds.
            assert name not in reads_all and clean is not None, (name, "read a crafted checkpoint without failing")
            if name != "load_train_state":
                assert same(result, entry(clean)), name
        assert not sentinel.exists(), f"{name} ran the pickle planted in {planted or kind}"
    assert tool.main(["to-released", "--src", str(path), "--out", str(tmp_path / "cli_out")]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(path) in err, err
    assert not sentinel.exists()

    if kind.startswith("old") or planted.endswith((".pt", ".distcp", ".metadata")):
        # Every entry refuses a pickle-based file by name, saying why, before reading anything.
        assert set(outcomes) == set(entries)
        for name, message in outcomes.items():
            assert "pickle" in message, (name, message)
        if kind == "old_dcp" or planted == ".metadata":
            assert all("older pickle-based format" in m and ".metadata" in m for m in outcomes.values()), outcomes
    else:
        expected = (r"sha256|bytes, complete\.json says|not valid JSON|not a readable safetensors file|fewer than"
                    r"|is not a \.safetensors file")
        for name in reads_all:
            assert re.search(expected, outcomes[name]), (name, outcomes[name])


# ------------------------------------------------------------------ the static check

# torch.load( but not safetensors.torch.load( (which parses safetensors bytes).
FORBIDDEN = re.compile(r"(?<![\w.])torch\.load\(|pickle\.loads?\b|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
                       r"|FileSystemReader")
# A line that unpickles no file (e.g. a round trip of an object of our own in memory) says so and why:
# `# pickle-safe: <reason>`, for review.
EXEMPT = "# pickle-safe:"


def test_no_code_calls_a_pickle_based_loader():
    for line in ("x = torch.load(f)", "torch.load(f, weights_only=True)", "pickle.load(f)", "pickle.loads(data)",
                 "np.load(p, allow_pickle=True)", "torch.load(p, weights_only = False)", "dcp.FileSystemReader(p)"):
        assert FORBIDDEN.search(line), line  # the check itself sees each pattern...
    assert not FORBIDDEN.search("safetensors.torch.load(data)")  # ...and not safetensors' parser
    found = []
    for package in ("magi_train", "magi_infer", "tools"):
        for path in sorted((REPO / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                hits = FORBIDDEN.findall(line)
                if hits and EXEMPT not in line:
                    found.append(f"{path.relative_to(REPO)}:{number}: {', '.join(hits)}: {line.strip()}")
    assert not found, "pickle-based loading in non-test code (a checkpoint could run code):\n" + "\n".join(found)
