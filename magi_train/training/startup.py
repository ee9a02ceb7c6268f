"""What a trainer settles before it builds a model: who owns trainer.output_dir, which checkpoint it resumes
from, and whether the run fits in memory. Every step is collective and fails on every rank at once, so that no
rank is left waiting in a collective the others have abandoned.

    RunDirectory     rank 0's lock on output_dir (training/run_dir.py), the fresh-run check, the launcher watch
    choose_resume    trainer.resume -> the checkpoint every rank verified, its saved config checked
    choose_init      trainer.init_from -> the weights a new run starts from (a resumed run keeps its record)
    check_memory     the memory estimate against the device's free memory (observability/memory_check.py)
"""

from __future__ import annotations

import pickle
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch.distributed as dist

from magi_train.checkpoint.manager import CheckpointManager, CorruptCheckpointError, checkpoint_dir, verify_checkpoint
from magi_train.checkpoint.weights import read_our_trainer_state
from magi_train.config.schema import TrainConfig
from magi_train.observability.memory_check import check_train_memory
from magi_train.parallel.groups import Parallel
from magi_train.training.resume_config import check_resume_config
from magi_train.training.run_dir import LauncherWatch, RunDirLock, start_fresh

T = TypeVar("T")


def _portable(error: Exception) -> Exception:
    """`error` if the other ranks can rebuild it from the broadcast, else a RuntimeError with its text. An
    exception travels as its class and its args (how pickle rebuilds one), so it must serialise and its class
    must accept its own args; checked by building it again here, without unpickling anything."""
    try:
        pickle.dumps(error)
        type(error)(*error.args)
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send the text
        return RuntimeError(f"{type(error).__name__} on rank 0: {error}")


def agree(parallel: Parallel, fn: Callable[[], T]) -> T:
    """`fn()` run on global rank 0 and its result on every rank; its exception is raised on every rank."""
    box: List[object] = [None]
    error: Optional[BaseException] = None
    if parallel.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
            box[0] = ("error", _portable(e))
    if parallel.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


class RunDirectory:
    """trainer.output_dir held by one trainer: rank 0 holds the lock from `open` to `close`; under torchrun a
    watch thread ends an orphaned worker."""

    def __init__(self, cfg: TrainConfig, parallel: Parallel):
        self.cfg, self.parallel = cfg, parallel
        self.path = Path(cfg.trainer.output_dir)
        self._lock = RunDirLock(self.path)  # only global rank 0 takes it
        self.locked = False  # the same on every rank: whether rank 0 holds the directory for this trainer
        self._watch = LauncherWatch(f"trainer.output_dir {self.path} is released for a relaunch "
                                    f"(trainer.resume=auto continues from its newest checkpoint)")

    def open(self, new_run: bool = False) -> None:
        """Take the directory (collective): rank 0 locks it and, for a run from scratch, checks that it holds no
        other run (or removes it with trainer.overwrite=true)."""
        tc = self.cfg.trainer

        def take() -> List[str]:
            lines = [line for line in [self._lock.acquire()] if line]
            try:
                if new_run and tc.resume == "none":
                    _check_init_outside(tc.init_from, self.path)
                    lines += start_fresh(self.path, tc.overwrite)
            except BaseException:
                self._lock.release()
                raise
            return lines

        for line in agree(self.parallel, take):
            print(line, flush=True)
        self.locked = True
        if tc.exit_with_launcher and LauncherWatch.under_torchrun():
            self._watch.start()

    def close(self) -> None:
        self._watch.stop()
        self._lock.release()
        self.locked = False


def _check_init_outside(init_from: Optional[str], output_dir: Path) -> None:
    """A new run never starts from weights inside its own output_dir: trainer.overwrite would delete them
    before they are read, and without it the directory holds another run."""
    if not init_from:
        return
    source, out = Path(init_from).resolve(), output_dir.resolve()
    if source == out or out in source.parents:
        raise ValueError(f"trainer.init_from={init_from} lies inside trainer.output_dir={output_dir}, where a new "
                         f"run replaces what it finds; train into another trainer.output_dir (or continue that "
                         f"run with trainer.resume=auto)")


def choose_resume(cfg: TrainConfig, parallel: Parallel, checkpoints: CheckpointManager,
                  global_batch: int) -> Optional[Path]:
    """The checkpoint to resume from, the same on every rank. Rank 0 lists the candidates (its manager has just
    tidied interrupted saves): for `auto` every step_* directory, newest first, with why it is not complete;
    every rank then checks its share of the sha256s of one candidate after the other, and the newest that
    verifies everywhere is taken. Each one skipped prints why; when checkpoints exist and none verifies the run
    stops, naming each: it never starts from scratch over broken checkpoints. An explicit path is verified the
    same way and raises when it fails. The saved config is then checked against this run's
    (training/resume_config.py)."""
    spec = cfg.trainer.resume
    if spec == "none":
        return None
    listing: List[Tuple[Path, Optional[str]]] = agree(parallel, lambda: _candidates(checkpoints, spec))
    skipped = []
    for path, problem in listing:
        problem = problem or _verify_everywhere(parallel, path)
        if problem is None:
            break
        if spec != "auto":
            raise CorruptCheckpointError(f"trainer.resume={spec}: {problem}")
        skipped.append(f"{path.name}: {problem}")
        if parallel.is_main:
            print(f"warning: trainer.resume=auto skips {path}: {problem}", flush=True)
    else:
        if skipped:
            raise CorruptCheckpointError(
                f"trainer.resume=auto: no checkpoint under {checkpoints.root} verifies, so the run does not start "
                f"over them from scratch:\n  " + "\n  ".join(skipped) + "\nMove the broken ones aside to start "
                "anew, or set trainer.resume to a checkpoint that verifies")
        return None
    run_config = asdict(cfg)
    for line in agree(parallel, lambda: check_resume_config(path, read_our_trainer_state(path), run_config,
                                                            global_batch, cfg.trainer.allow_config_change)):
        print(line, flush=True)
    return path


def _candidates(checkpoints: CheckpointManager, spec: str) -> List[Tuple[Path, Optional[str]]]:
    if spec == "auto":
        return checkpoints.candidates()
    return [(checkpoint_dir(spec, "trainer.resume: checkpoint"), None)]


def _verify_everywhere(parallel: Parallel, path: Path) -> Optional[str]:
    """Every rank hashes its share of checkpoint `path`'s files; None when all match, else the problems."""
    problem = None
    try:
        verify_checkpoint(path, share=(parallel.rank, parallel.world_size))
    except (OSError, ValueError) as e:
        problem = str(e)
    problems = [problem]
    if parallel.world_size > 1:
        problems = [None] * parallel.world_size
        dist.all_gather_object(problems, problem)
    found = list(dict.fromkeys(e for e in problems if e))
    return "; ".join(found) if found else None


def check_memory(cfg: TrainConfig, parallel: Parallel) -> None:
    """Refuse a run whose estimate exceeds the device's free memory, before anything is allocated."""
    p = parallel
    sharing = 1
    if p.device.type == "cpu" and p.world_size > 1:
        # Every rank of this host draws on the same RAM (one host name gathered per rank, once per run).
        hosts: List[object] = [None] * p.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        sharing = hosts.count(socket.gethostname())
    problem = check_train_memory(cfg, p.tp, p.cp, p.pp, p.dp, p.device, sharing)
    if problem is not None:
        raise MemoryError(problem)


def choose_init(cfg: TrainConfig, parallel: Parallel, resume_from: Optional[Path]) -> Optional[Dict[str, Any]]:
    """The init_from record of this run (training/init_from.py), the same on every rank: a resumed run keeps
    the one its checkpoint holds (trainer.init_from is then not applied: printed, with a warning when it names
    other weights than the run started from); a new run resolves trainer.init_from (None: no init_from)."""
    from magi_train.training.init_from import RECORD_KEY, identity_problem, resolve_init_source

    spec = cfg.trainer.init_from
    if resume_from is None:
        if not spec:
            if cfg.trainer.init_from_ema:
                raise ValueError("trainer.init_from_ema=true without trainer.init_from: name the checkpoint whose "
                                 "EMA weights the run starts from")
            return None
        return agree(parallel, lambda: resolve_init_source(spec, cfg.model, cfg.trainer.init_from_ema).record())

    def kept() -> Tuple[Optional[Dict[str, Any]], List[str]]:
        recorded = read_our_trainer_state(resume_from).get(RECORD_KEY)
        if not spec:
            return recorded, []
        if cfg.lora.rank > 0:  # the adapters resume; the frozen base is the recorded one (loaded again)
            lines = [f"trainer.init_from={spec}: the run resumes from {resume_from}, its frozen base is the "
                     f"weights it recorded" + (f" ({recorded['resolved']})" if recorded else "")]
        else:
            lines = [f"trainer.init_from={spec} is not applied: the run resumes from {resume_from}"
                     + (f", which started from {recorded['resolved']}" if recorded else "")]
        if recorded:
            problem = identity_problem(recorded, resolve_init_source(spec, cfg.model))
            if problem:
                lines.append(f"warning: {problem}")
        return recorded, lines

    recorded, lines = agree(parallel, kept)
    for line in lines:
        print(line, flush=True)
    return recorded


def load_init_weights(cfg: TrainConfig, parallel: Parallel, record: Dict[str, Any], models, full_shapes,
                      resuming: bool = False) -> None:
    """The init_from weights of `record` (choose_init) into this rank's model chunks (each rank reads the whole
    state dict and keeps its tensor-parallel slices of the layers it holds); a mismatch with the preset names
    every field. The source must still be the weights the record names (sha256): a run that rebuilds its
    frozen base on resume (LoRA) never continues on other weights."""
    from magi_train.checkpoint.weights import load_into
    from magi_train.training.init_from import InitSource, identity_problem, read_init_weights, resolve_init_source

    source = InitSource(**record)
    problem = identity_problem(record, resolve_init_source(source.resolved, cfg.model, source.ema))
    if problem is not None:
        raise ValueError(f"{problem}: the weights changed since the run recorded them")
    state, description, notes = read_init_weights(source, cfg.model)
    for model in models:
        load_into(model, state, description, full_shapes, parallel.tp_rank, parallel.tp)
    del state
    if parallel.is_main:
        for line in notes:
            print(line, flush=True)
        what = ("the frozen base reloaded from" if resuming else "initialised from")
        print(f"{what} {source.describe()} (sha256 {source.sha256[:12]})" + ("" if resuming else
              ": step 0, fresh optimizer"), flush=True)
