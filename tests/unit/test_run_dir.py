"""One writer per run directory (training/run_dir.py), what a resume may change (training/resume_config.py), and
metrics / wandb records that continue across resumes (observability/metrics.py). No model is built here; the
trainer's use of them is in tests/unit/test_trainer.py, real processes in tests/e2e/test_run_guards.py."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from magi_train.observability.metrics import WANDB_RUN_FILE, MetricsLogger, rewind_metrics
from magi_train.config.schema import TrainerConfig, WandbConfig
from magi_train.training.resume_config import ConfigChangeError, check_resume_config, config_changes
from magi_train.training.run_dir import LauncherWatch, RunDirError, RunDirLock, start_fresh


# ---------------------------------------------------------------- the lock
def test_two_locks_on_one_directory_conflict_and_the_error_names_the_holder(tmp_path):
    first = RunDirLock(tmp_path / "run")
    assert first.acquire() is None  # a new directory: nobody to take over from
    second = RunDirLock(tmp_path / "run")  # another open file description: flock conflicts within a process too
    with pytest.raises(RunDirError) as info:
        second.acquire()
    message = str(info.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "running since" in message
    assert str(tmp_path / "run") in message and "another trainer.output_dir" in message
    assert not second.held
    first.release()
    assert (tmp_path / "run" / ".lock").read_text() == ""  # a clean release leaves no holder behind
    assert second.acquire() is None  # ... so the next one takes over silently
    record = json.loads((tmp_path / "run" / ".lock").read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["command"]
    second.release()


def test_a_dead_holder_never_blocks_and_is_named_when_taken_over(tmp_path):
    # A child takes the lock and dies without releasing it (as a SIGKILLed trainer does): the kernel drops it.
    pid = os.fork()
    if pid == 0:
        held = RunDirLock(tmp_path)
        held.acquire()
        os._exit(0)  # no release, no clean-up: the record stays
    os.waitpid(pid, 0)
    lock = RunDirLock(tmp_path)
    note = lock.acquire()
    assert note is not None and f"pid {pid} on host {socket.gethostname()}" in note
    assert "ended without releasing it" in note
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_dropped_lock_is_released(tmp_path):
    lock = RunDirLock(tmp_path)
    lock.acquire()
    del lock  # e.g. a trainer a test let go without close()
    other = RunDirLock(tmp_path)
    assert other.acquire() is None
    other.release()


# ---------------------------------------------------------------- a new run in a used directory
def _old_run(out: Path) -> None:
    (out / "checkpoints" / "step_00000004").mkdir(parents=True)
    (out / "checkpoints" / "step_00000008").mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / WANDB_RUN_FILE).write_text('{"id": "abc12345"}\n')
    (out / "videos").mkdir()


def test_a_new_run_refuses_another_runs_directory_naming_what_it_found_and_the_ways_out(tmp_path):
    _old_run(tmp_path)
    with pytest.raises(RunDirError) as info:
        start_fresh(tmp_path, overwrite=False)
    message = str(info.value)
    assert "2 checkpoint(s)" in message and "step_00000008" in message and "metrics.jsonl" in message
    for way_out in ("trainer.resume=auto", "another trainer.output_dir", "trainer.overwrite=true"):
        assert way_out in message
    assert (tmp_path / "checkpoints" / "step_00000004").is_dir()  # nothing touched
    # Metrics alone are another run too.
    (tmp_path / "checkpoints").rename(tmp_path / "elsewhere")
    with pytest.raises(RunDirError, match="metrics"):
        start_fresh(tmp_path, overwrite=False)
    assert start_fresh(tmp_path / "empty", overwrite=False) == []


def test_overwrite_removes_the_old_run_and_says_what_it_removed(tmp_path):
    _old_run(tmp_path)
    (tmp_path / ".lock").write_text("")
    (tmp_path / "hydra").mkdir()
    lines = start_fresh(tmp_path, overwrite=True)
    assert len(lines) == 1 and "trainer.overwrite=true: removed" in lines[0] and "step_00000008" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "hydra"]


# ---------------------------------------------------------------- the launcher
def test_a_worker_exits_when_its_launcher_is_gone(capsys):
    parents, exits = iter([100, 100, 100, 1]), []
    watch = LauncherWatch("the run dir is free", interval=0.01, getppid=lambda: next(parents, 1), exit=exits.append)
    watch.start()
    watch._thread.join(timeout=60)  # the watch ends once it has called exit
    assert exits == [1]
    err = capsys.readouterr().err
    assert "torchrun agent, pid 100" in err and "parent now pid 1" in err and "the run dir is free" in err
    watch.stop()


def test_the_launcher_watch_stops_quietly(capsys):
    exits = []
    watch = LauncherWatch("x", interval=0.01, getppid=lambda: 7, exit=exits.append)
    watch.start()
    watch.stop()
    assert exits == [] and capsys.readouterr().err == ""


# ---------------------------------------------------------------- what a resume may change
SAVED = {"model": {"hidden_size": 256, "name": "tiny", "attention_backend": "torch"},
         "data": {"seed": 0, "shards": "a/", "num_workers": 0, "micro_batch_size": 2, "global_batch_size": 0},
         "optimizer": {"lr": 1e-3}, "diffusion": {"t_shift": 0.33},
         "parallel": {"tp": 1, "pp": 1, "dp": -1}, "trainer": {"seed": 1, "max_steps": 10, "resume": "none"}}


def _with(**changes):
    out = json.loads(json.dumps(SAVED))
    for key, value in changes.items():
        section, name = key.split("__")
        out[section][name] = value
    return out


def test_guarded_changes_are_errors_and_the_rest_are_printed():
    now = _with(model__hidden_size=128, data__seed=3, trainer__seed=2, optimizer__lr=5e-4, diffusion__t_shift=0.5,
                trainer__max_steps=20, trainer__resume="auto", model__attention_backend="sdpa", model__name="other",
                data__num_workers=4, data__micro_batch_size=1)
    errors, notes = config_changes(SAVED, now, saved_batch=4, batch=4, allow=[])
    assert sorted(errors) == ["data.seed", "model.hidden_size", "trainer.seed"]
    assert errors["model.hidden_size"] == "model.hidden_size: checkpoint 256, now 128"
    printed = "\n".join(notes)
    for key in ("optimizer.lr", "diffusion.t_shift", "trainer.max_steps", "model.attention_backend", "model.name",
                "data.num_workers", "data.micro_batch_size"):
        assert key in printed, key
    assert "trainer.resume" not in printed  # none -> auto is what every resume does


def test_parallel_layout_changes_are_accepted():
    now = _with(parallel__tp=2, parallel__pp=2, parallel__dp=1)
    errors, notes = config_changes(SAVED, now, saved_batch=4, batch=4, allow=[])
    assert errors == {} and len(notes) == 3


def test_the_global_batch_is_compared_as_samples_per_step():
    errors, _ = config_changes(SAVED, SAVED, saved_batch=4, batch=8, allow=[])
    assert list(errors) == ["data.global_batch_size"] and "checkpoint 4 samples per step, now 8" in errors[
        "data.global_batch_size"]
    assert config_changes(SAVED, SAVED, saved_batch=None, batch=8, allow=[])[0] == {}  # not recorded: not compared


def test_allow_config_change_takes_dotted_keys_and_prefixes():
    now = _with(data__shards="b/", data__seed=1, trainer__seed=5)
    errors, notes = config_changes(SAVED, now, saved_batch=4, batch=4, allow=["data", "trainer.seed"])
    assert errors == {} and all("allowed by trainer.allow_config_change" in n for n in notes)
    errors, _ = config_changes(SAVED, now, saved_batch=4, batch=4, allow=["data.shards"])
    assert sorted(errors) == ["data.seed", "trainer.seed"]


def test_a_field_one_schema_lacks_is_only_noted():
    now = _with(model__new_field=1)
    errors, notes = config_changes(SAVED, now, saved_batch=None, batch=4, allow=[])
    assert errors == {} and notes == ["model.new_field: checkpoint (absent), now 1"]


def test_the_error_lists_every_change_and_the_ways_out(tmp_path):
    state = {"config": SAVED, "global_batch": 4}
    with pytest.raises(ConfigChangeError) as info:
        check_resume_config(tmp_path, state, _with(trainer__seed=2, data__shards="b/"), 4, [])
    message = str(info.value)
    assert "data.shards: checkpoint \"a/\", now \"b/\"" in message and "trainer.seed: checkpoint 1, now 2" in message
    assert "trainer.allow_config_change=[data.shards,trainer.seed]" in message
    assert "another trainer.output_dir" in message
    assert check_resume_config(tmp_path, state, SAVED, 4, []) == []
    assert "not compared" in check_resume_config(tmp_path, {}, SAVED, 4, [])[0]


# ---------------------------------------------------------------- metrics that continue
def _records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rewind_keeps_the_steps_the_run_does_not_train_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in (0, 1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # killed while writing step 5
    assert rewind_metrics(path, 3) == (2, True)
    assert [r["step"] for r in _records(path)] == [0, 1, 2, 3]
    assert rewind_metrics(path, 3) == (0, False)  # nothing more to drop: the file is left as it is
    assert rewind_metrics(path, 0) == (4, False) and path.read_text() == ""  # from step 0 every record is redone
    assert rewind_metrics(tmp_path / "none.jsonl", 3) == (0, False)
    assert not list(tmp_path.glob(".*tmp"))


def test_rewind_refuses_a_damaged_record_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a metrics record"):
        rewind_metrics(path, 1)
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'  # nothing lost


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def log(self, *a, **kw):
        pass

    def finish(self):
        pass


def test_wandb_continues_its_run_on_resume_and_starts_a_new_one_otherwise(tmp_path, monkeypatch):
    import wandb

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or _FakeRun(**kwargs))
    cfg = TrainerConfig(progress_bar=False, wandb=WandbConfig(mode="offline"))

    def start(step):
        MetricsLogger(cfg, tmp_path, {}, start_step=step, enabled=True).close()
        return calls[-1]

    fresh = start(0)
    assert fresh["resume"] is None and fresh["mode"] == "offline"
    assert json.loads((tmp_path / WANDB_RUN_FILE).read_text()) == {"id": fresh["id"]}
    resumed = start(4)
    assert resumed["id"] == fresh["id"] and resumed["resume"] == "allow"
    anew = start(0)  # a run from scratch (a new or overwritten run) is a new wandb run
    assert anew["id"] != fresh["id"] and anew["resume"] is None
    assert json.loads((tmp_path / WANDB_RUN_FILE).read_text()) == {"id": anew["id"]}
