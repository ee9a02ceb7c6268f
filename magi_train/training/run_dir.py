"""One writer per training run directory (trainer.output_dir), and what a new run may find there.

The lock. Global rank 0 takes an exclusive `flock` on `<output_dir>/.lock` before anything is written in the
directory (before the checkpoint manager, which tidies interrupted saves when it opens) and holds it for the run.
Two trainers on one directory would interleave their checkpoints and metrics; the second one fails at once
instead, naming the holder that the first wrote into the file (pid, host, start time, command). The kernel drops
a flock when its holder dies, however it dies, so a SIGKILLed or crashed run never blocks its requeue; the record
it left is then named as a stale holder and replaced.

An existing run. A run that starts from scratch (trainer.resume=none) refuses a directory that already holds
checkpoints or metrics: its steps would mix with the old run's. trainer.resume=auto continues that run,
another trainer.output_dir keeps both, and trainer.overwrite=true replaces it (removed once the lock is held).

The launcher. A worker whose torchrun agent was SIGKILLed keeps running as an orphan: it would keep the lock
(and keep writing) while the job is relaunched. Under torchrun a daemon thread watches the parent pid and ends
the process when the agent is gone (`LauncherWatch`); checkpoints are installed atomically, so nothing is lost
that a resume does not recover.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from magi_train.checkpoint.atomic import fsync_dir
from magi_train.checkpoint.manager import CheckpointManager
from magi_train.observability.metrics import METRICS_FILE, WANDB_RUN_FILE

LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
VIDEOS_DIR = "videos"


class RunDirError(RuntimeError):
    """trainer.output_dir cannot be used as asked (locked by another trainer, or holds another run)."""


def _holder_record() -> dict:
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z",
            time.localtime(now)), "started": now, "command": " ".join([sys.executable, *sys.argv])}


def describe_holder(text: str) -> str:
    """The holder record of a lock file, as a phrase for messages."""
    if not text.strip():
        return "a trainer that has not recorded itself yet (it is starting)"
    try:
        rec = json.loads(text)
        return f"pid {rec['pid']} on host {rec['host']}, running since {rec['since']} ({rec['command']})"
    except (ValueError, KeyError, TypeError):
        return f"an unreadable holder record {text[:200]!r}"


class RunDirLock:
    """An exclusive flock on `<directory>/.lock` with its holder recorded in the file.

    flock belongs to the open file description: a second RunDirLock on the same directory conflicts with the
    first even within one process, and a forked child shares its parent's lock until it exits."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Optional[str]:
        """Take the lock or raise `RunDirError` naming its holder. Returns a line naming the stale holder whose
        record was taken over (one that ended without releasing), or None."""
        if self._fd is not None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read(fd))
            os.close(fd)
            raise RunDirError(f"trainer.output_dir {self.directory} is in use by another trainer: {holder} (lock "
                              f"{self.path}). Two runs in one directory would mix their checkpoints and metrics: "
                              f"let that run end (or stop it) first, or choose another trainer.output_dir") from None
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"cannot lock {self.path} ({e}): the file system of trainer.output_dir must support "
                              f"flock (on Lustre, mount it with -o flock)") from e
        try:
            previous = _read(fd)
            record = json.dumps(_holder_record())
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode() + b"\n", 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise
        self._fd = fd
        if previous.strip():
            return (f"{self.path}: taking over from {describe_holder(previous)}, which ended without releasing it "
                    f"(killed or crashed)")
        return None

    def release(self) -> None:
        """Clear the holder record (a clean exit leaves no stale holder behind) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # the last descriptor of the open file description: the kernel drops the flock

    def __del__(self) -> None:
        # A lock whose owner is gone (a trainer dropped without close()) is released like a file closed on
        # deallocation; the record is cleared too, as it names no live holder.
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit `os` may be gone; the kernel drops the lock then
            pass

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")


def previous_run(directory: Path) -> List[str]:
    """What a run left in `directory` that a new run would mix with: its checkpoints (any step_* directory, even
    an incomplete one) and its metrics."""
    found = []
    steps = [path.name for path, _ in CheckpointManager(directory / CHECKPOINTS_DIR, 0, read_only=True).candidates()]
    if steps:
        shown = ", ".join(reversed(steps[:3])) + (f" and {len(steps) - 3} older" if len(steps) > 3 else "")
        found.append(f"{len(steps)} checkpoint(s) in {directory / CHECKPOINTS_DIR} ({shown})")
    metrics = directory / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"metrics {metrics} ({metrics.stat().st_size} bytes)")
    return found


def start_fresh(directory: Path, overwrite: bool) -> List[str]:
    """For a run from scratch (trainer.resume=none), called with the lock held: raise if `directory` holds
    another run, or with `overwrite` remove that run's checkpoints, metrics, wandb run id and videos. Returns
    the lines to print."""
    found = previous_run(directory)
    if not found:
        return []
    if not overwrite:
        raise RunDirError(
            f"trainer.output_dir {directory} holds another run: {'; '.join(found)}. A new run (trainer.resume=none) "
            f"would mix its steps with that one's. Either continue it (trainer.resume=auto), start this run in "
            f"another trainer.output_dir, or replace it (trainer.overwrite=true deletes its checkpoints and metrics)")
    removed = []
    for name in (CHECKPOINTS_DIR, VIDEOS_DIR, METRICS_FILE, WANDB_RUN_FILE):
        path = directory / name
        if path.is_dir():
            # Renamed first: a deletion cut short leaves a dot-directory, never a half checkpoint in its place.
            trash = Path(tempfile.mkdtemp(prefix=f".overwritten_{name}_", dir=directory))
            trash.rmdir()
            os.rename(path, trash)
            fsync_dir(directory)
            shutil.rmtree(trash)
            removed.append(f"{path}/")
        elif path.exists():
            path.unlink()
            removed.append(str(path))
    return [f"trainer.overwrite=true: removed the previous run in {directory} ({'; '.join(found)}): "
            + ", ".join(removed)]


class LauncherWatch:
    """Ends this process when its launcher (the torchrun agent, its parent) is gone.

    torchrun sets TORCHELASTIC_RUN_ID in its workers' environment (the launcher's contract), so only its
    workers are watched. A SIGKILLed agent cannot stop its workers; they are re-parented and keep training, and
    their rank 0 keeps trainer.output_dir locked while the job is relaunched. `getppid` and `exit` are the
    process's own unless a test passes stand-ins."""

    def __init__(self, what: str, interval: float = 1.0, getppid: Callable[[], int] = os.getppid,
                 exit: Callable[[int], None] = os._exit) -> None:
        self.what = what  # what the exit abandons, for the message
        self.interval = interval
        self._getppid, self._exit = getppid, exit
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def under_torchrun() -> bool:
        return "TORCHELASTIC_RUN_ID" in os.environ

    def start(self) -> None:
        if self._thread is not None:
            return
        parent = self._getppid()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(parent,), name="launcher-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def _watch(self, parent: int) -> None:
        while not self._stop.wait(self.interval):
            now = self._getppid()
            if now != parent:
                print(f"magi: the launcher of this worker (torchrun agent, pid {parent}) is gone (parent now pid "
                      f"{now}): exiting (pid {os.getpid()}) instead of training on as an orphan; {self.what}",
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                self._exit(1)
                return
