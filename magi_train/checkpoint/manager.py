"""Training checkpoints, written so that a crash never costs the last good one.

Layout under ``root`` (one directory per checkpoint):

    step_00001000/
        model.safetensors, trainer.json  `save`: per top-level key of the state, a dict of tensors as
                                         ``<key>.safetensors`` or a JSON-able value as ``<key>.json``, or
        index.json, rank_00000...        files many ranks wrote (checkpoint/distributed.py, sharded.py)
                                         between `begin_save` and `finish_save`
        complete.json                    written last: step, time, and size + sha256 of every file
    .tmp_new_00002000_<pid>_<rand>/      a save in progress, or one a crash interrupted

A directory counts as a checkpoint only when it has its final ``step_*`` name and a marker whose
files all exist with the recorded sizes. The final name appears through one ``os.rename`` of a
fully written, fsynced directory, so readers see either the whole checkpoint or none of it.

Nothing is ever unpickled: a checkpoint may come from someone else (inference's ``ckpt.dir``, a teacher, the
converter's input), and the marker's sha256s prove nothing then, since its writer wrote the marker too. A
``.pt`` file (what older versions wrote with torch.save) or a DCP ``.metadata`` is refused, naming it.

A save that runs out of space (or hits any other OSError writing its files) fails before installing anything,
with an OSError that says "no space left on device", names the checkpoint and the free space left; the
free space is checked against the bytes to write before the first one is.

One manager per root at a time: construction deletes ``.tmp_*`` directories it thinks are stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from magi_train.checkpoint.atomic import check_free_space, fsync_dir, replace_dir, write_error, write_file
from magi_train.checkpoint.tensorfile import TensorSpec, file_size, read_tensor_file, write_tensor_file

MARKER_NAME = "complete.json"
DISTRIBUTED_INDEX = "index.json"  # the index of a checkpoint written by many ranks (checkpoint/sharded.py)
DCP_METADATA = ".metadata"  # what the older, pickle-based distributed format (torch.distributed.checkpoint) had
# Files older versions wrote with pickle (torch.save, DCP): refused by name, never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".distcp")
TENSORS_SUFFIX, JSON_SUFFIX = ".safetensors", ".json"
MARKER_FORMAT = "magi-train-checkpoint"
MARKER_VERSION = 1

_STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
# A state key becomes a file name, so keep it to characters that are safe everywhere.
_STATE_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_TMP_PREFIX = ".tmp_"
_NEW_PREFIX = ".tmp_new_"  # being written
_OLD_PREFIX = ".tmp_old_"  # a same-step checkpoint moved aside while its replacement goes in
_DEL_PREFIX = ".tmp_del_"  # pruned; renamed first so a half-deleted dir is never taken for a checkpoint


class CorruptCheckpointError(ValueError):
    """A checkpoint's files disagree with its ``complete.json`` marker (or the marker is unreadable)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, read_only: bool = False) -> None:
        self.root = Path(root)
        self.keep_last = int(keep_last)  # <= 0 keeps every checkpoint
        self.read_only = read_only
        if read_only:
            # Readers (inference, conversion) must not tidy up a directory a running trainer is writing to.
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover_interrupted()

    # ------------------------------------------------------------------ writing

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as checkpoint ``step`` atomically, then prune old ones. Returns its path.

        Each value is either a dict of tensors, saved as ``<key>.safetensors`` (dtypes and key order kept), or
        a JSON-able value, saved as ``<key>.json`` (dicts with string keys, lists, strings, numbers, booleans,
        None: nothing JSON would change); anything else raises ValueError naming the key, before anything is
        written. So does a lack of free space for it (an OSError)."""
        if not state:
            raise ValueError("refusing to save an empty checkpoint state")
        files = dict(_encode(key, value) for key, value in state.items())
        self._check_writable(step)
        what = f"saving checkpoint {self.root / step_dir_name(step)}"
        check_free_space(self.root, sum(size for _, size in files.values()), what)
        tmp = self.begin_save(step)
        try:
            try:
                digests = self._write_files(tmp, files)
            except OSError as e:
                raise write_error(e, what, self.root) from e
            return self.finish_save(tmp, step, digests)
        except BaseException:
            # Only our own unfinished temp dir is removed; anything already installed stays.
            self.abort_save(tmp)
            raise

    # A save in three calls, for directories that other processes fill (one writer of the marker):
    # begin_save -> everyone writes files into the returned dir -> finish_save, or abort_save on failure.

    def begin_save(self, step: int) -> Path:
        """Create and return the temporary directory that checkpoint ``step`` is written into."""
        self._check_writable(step)
        return Path(tempfile.mkdtemp(prefix=f"{_NEW_PREFIX}{step:08d}_{os.getpid()}_", dir=self.root))

    def _check_writable(self, step: Any) -> None:
        if self.read_only:
            raise RuntimeError(f"CheckpointManager({self.root}) was opened read-only")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")

    def finish_save(self, tmp: Path, step: int, digests: dict[str, dict[str, Any]] | None = None) -> Path:
        """Write the marker for every file in ``tmp``, install it as checkpoint ``step`` and prune.

        ``digests`` ({file name: {"size", "sha256"}}) may carry hashes other processes computed for the
        files they wrote; the rest are hashed here. All files must be complete and fsynced by now."""
        self._check_own_tmp(tmp)
        digests = digests or {}
        present = {entry.name: entry for entry in tmp.iterdir()}
        missing = sorted(set(digests) - set(present))
        if missing:
            raise FileNotFoundError(f"files reported written are missing from {tmp}: {missing}")
        files: dict[str, dict[str, Any]] = {}
        # The marker lists the reported files in their given order (`load` returns the keys in that order).
        for name in [*digests, *sorted(set(present) - set(digests))]:
            entry = present[name]
            if name == MARKER_NAME or not entry.is_file():
                raise ValueError(f"{entry} cannot be part of a checkpoint: only regular files other than {MARKER_NAME}")
            size = entry.stat().st_size
            info = digests.get(name) or file_digest(entry)
            if info["size"] != size:
                raise CorruptCheckpointError(f"{entry} has {size} bytes, its writer reported {info['size']}")
            files[name] = {"size": size, "sha256": str(info["sha256"])}
        if not files:
            raise ValueError(f"refusing to install the empty directory {tmp} as a checkpoint")
        marker = {
            "format": MARKER_FORMAT,
            "version": MARKER_VERSION,
            "step": step,
            "time": time.time(),
            "files": files,
        }
        # The marker goes last: its presence is what makes the directory a checkpoint.
        try:
            write_file(tmp / MARKER_NAME, [json.dumps(marker, indent=2).encode("utf-8")])
        except OSError as e:
            raise write_error(e, f"saving checkpoint {self.root / step_dir_name(step)}", self.root) from e
        fsync_dir(tmp)
        final = self._install(tmp, step)
        self._prune(keep=final)
        return final

    def abort_save(self, tmp: Path) -> None:
        """Delete an unfinished save's directory (a no-op once it was installed)."""
        self._check_own_tmp(tmp)
        shutil.rmtree(tmp, ignore_errors=True)

    def _check_own_tmp(self, tmp: Path) -> None:
        # These methods delete or rename what they are given: only a begin_save directory qualifies.
        tmp = Path(tmp)
        if tmp.parent != self.root or not tmp.name.startswith(_NEW_PREFIX):
            raise ValueError(f"{tmp} is not a save directory of CheckpointManager({self.root})")

    def _write_files(self, tmp: Path, files: dict[str, tuple[Any, int]]) -> dict[str, dict[str, Any]]:
        digests: dict[str, dict[str, Any]] = {}
        for name, (payload, _) in files.items():
            if isinstance(payload, bytes):
                write_file(tmp / name, [payload])
            else:
                write_tensor_file(tmp / name, payload)
            digests[name] = file_digest(tmp / name)
        return digests

    def _install(self, tmp: Path, step: int) -> Path:
        # Re-saving a step keeps the old copy (under _OLD_PREFIX, cleaned up on restart) until the new one
        # holds the name.
        return replace_dir(tmp, self.root / step_dir_name(step), aside_prefix=f"{_OLD_PREFIX}{step:08d}_{os.getpid()}_")

    def _prune(self, keep: Path) -> None:
        """Delete all but the newest ``keep_last`` checkpoints; never the one just written.

        ``keep`` is protected because after a rewind (resuming from an earlier step) the new
        checkpoint can have a lower step than older ones still on disk.
        """
        if self.keep_last <= 0:
            return
        complete = self.checkpoints()
        doomed = [p for p in complete[: max(len(complete) - self.keep_last, 0)] if p != keep]
        for path in doomed:
            trash = Path(tempfile.mkdtemp(prefix=f"{_DEL_PREFIX}{path.name}_", dir=self.root))
            trash.rmdir()
            os.rename(path, trash)
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)

    def _recover_interrupted(self) -> None:
        """Finish or discard what a crashed save left in ``root``.

        A complete temp dir whose step has no final dir is the only copy of that checkpoint (the
        crash hit between moving the old copy aside and renaming the new one in), so it is promoted
        rather than deleted. Everything else under ``.tmp_*`` is debris.
        """
        survivors: dict[int, list[tuple[float, Path]]] = {}
        for entry in sorted(self.root.iterdir()):
            if not entry.name.startswith(_TMP_PREFIX) or not entry.is_dir():
                continue
            marker = None
            if not entry.name.startswith(_DEL_PREFIX):
                try:
                    marker = _verify(entry, check_hashes=False)
                except (OSError, ValueError):
                    marker = None
            if marker is None:
                shutil.rmtree(entry, ignore_errors=True)
            else:
                survivors.setdefault(marker["step"], []).append((float(marker["time"]), entry))
        for step, found in survivors.items():
            found.sort(key=lambda item: item[0])
            final = self.root / step_dir_name(step)
            if not final.exists():
                os.rename(found.pop()[1], final)  # the newest save of that step wins
                fsync_dir(self.root)
            for _, entry in found:
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------ reading

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints under root, oldest step first (sizes checked, hashes not)."""
        found: list[tuple[int, Path]] = []
        if not self.root.is_dir():  # a reader may look before the first writer created the directory
            return []
        for entry in self.root.iterdir():
            match = _STEP_DIR_RE.match(entry.name)
            if match is None or not entry.is_dir():
                continue
            try:
                marker = _verify(entry, check_hashes=False)
            except (OSError, ValueError):
                continue
            if marker["step"] == int(match.group(1)):
                found.append((marker["step"], entry))
        return [path for _, path in sorted(found)]

    def candidates(self) -> list[tuple[Path, str | None]]:
        """Every ``step_*`` directory under root, newest step first, with why it is not a complete checkpoint
        (None when its marker and file sizes check out; hashes are not checked here). `resume=auto` walks this
        list and warns about each one it skips."""
        found: list[tuple[int, Path, str | None]] = []
        if not self.root.is_dir():
            return []
        for entry in self.root.iterdir():
            match = _STEP_DIR_RE.match(entry.name)
            if match is None or not entry.is_dir():
                continue
            problem = None
            try:
                marker = _verify(entry, check_hashes=False)
                if marker["step"] != int(match.group(1)):
                    problem = f"its {MARKER_NAME} says step {marker['step']}, its name step {int(match.group(1))}"
            except (OSError, ValueError) as e:
                problem = str(e)
            found.append((int(match.group(1)), entry, problem))
        return [(path, problem) for _, path, problem in sorted(found, key=lambda item: item[0], reverse=True)]

    def latest(self) -> Path | None:
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def load(self, path: str | Path) -> dict[str, Any]:
        """Load a checkpoint written by :meth:`save`, after checking every file's sha256: {key: dict of
        tensors or JSON value}, in the order saved. A file in a pickle-based format (``.pt``, DCP) is
        refused, naming it, before anything is read."""
        path = Path(path)
        names = list(read_marker(path)["files"])
        refuse_pickles(path, names)
        if DISTRIBUTED_INDEX in names:
            raise ValueError(
                f"checkpoint {path} is a distributed (multi-rank) checkpoint: read it with "
                "magi_train.checkpoint.distributed.read_full_model_state or load_train_state"
            )
        keys = {name: _state_key(path, name) for name in names}  # an unknown kind of file fails before reading
        _verify(path, check_hashes=True)
        return {keys[name]: read_state_file(path / name) for name in names}

    def resolve_resume(self, spec: str) -> Path | None:
        """``"none"`` -> None, ``"auto"`` -> newest complete checkpoint or None, else a checkpoint path."""
        if spec == "none":
            return None
        if spec == "auto":
            return self.latest()
        path = checkpoint_dir(spec, "resume checkpoint")
        _verify(path, check_hashes=False)
        return path


def checkpoint_dir(spec: str, what: str) -> Path:
    """`spec` (a user-given checkpoint path, ~ expanded) if it is an existing directory, else the error that
    says which, starting with `what` (how the caller names the setting)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is not a directory")
    return path


class PickleCheckpointError(ValueError):
    """A checkpoint holds a file in a pickle-based format; it is refused, never read."""


def old_format_error(path: str | Path) -> PickleCheckpointError:
    """The error for a checkpoint in the older DCP layout (a ``.metadata`` file)."""
    return PickleCheckpointError(
        f"checkpoint {path} is in the older pickle-based format of torch.distributed.checkpoint (it has "
        f"{DCP_METADATA}): reading it would unpickle {DCP_METADATA} and its .distcp pieces, which can run code "
        f"from the files, so it is not read. Checkpoints are now safetensors pieces with a JSON "
        f"{DISTRIBUTED_INDEX}; re-create this one with the current trainer")


def refuse_pickles(path: str | Path, names: Any) -> None:
    """Raise PickleCheckpointError if a file of checkpoint ``path`` named in ``names`` is in a pickle-based
    format (older versions' torch.save ``.pt`` files, DCP's ``.metadata`` / ``.distcp``)."""
    names = list(names)
    if DCP_METADATA in names:
        raise old_format_error(path)
    for name in names:
        if name.endswith(PICKLE_SUFFIXES):
            raise PickleCheckpointError(
                f"{Path(path) / name} is a pickle (torch.save, the format of older checkpoints): loading it would "
                "unpickle it, which can run code from the file, so it is not read. Checkpoints are now "
                f"safetensors + JSON; re-create this one (released weights: tools/convert_checkpoint.py to-ours)")


def read_state_file(file: Path) -> Any:
    """One file of a checkpoint written by `CheckpointManager.save`: a ``.safetensors`` file's tensors (in
    the order saved) or a ``.json`` file's value. Hashes are the caller's to check."""
    file = Path(file)
    refuse_pickles(file.parent, [file.name])
    if file.name.endswith(TENSORS_SUFFIX):
        try:
            return read_tensor_file(file)
        except ValueError as e:
            raise CorruptCheckpointError(str(e)) from e
    if file.name.endswith(JSON_SUFFIX):
        try:
            return json.loads(file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{file} is not valid JSON: {e}") from e
    raise ValueError(f"{file} is not a file a checkpoint holds (only {TENSORS_SUFFIX} and {JSON_SUFFIX} are read)")


def _state_key(path: Path, name: str) -> str:
    for suffix in (TENSORS_SUFFIX, JSON_SUFFIX):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{path / name} is not a file a checkpoint holds (only {TENSORS_SUFFIX} and {JSON_SUFFIX} "
                     "files are read)")


def _encode(key: Any, value: Any) -> tuple[str, tuple[Any, int]]:
    """(file name, (what to write, its size)) of one state entry; ValueError naming the key otherwise."""
    if not isinstance(key, str) or not _STATE_KEY_RE.match(key):
        raise ValueError(f"state key {key!r} cannot be a file name; use letters, digits, '_', '.', '-'")
    if isinstance(value, dict) and value and all(isinstance(t, torch.Tensor) for t in value.values()):
        name = f"{key}{TENSORS_SUFFIX}"
        tensors = list(value.items())
        try:
            if not all(isinstance(k, str) for k, _ in tensors):
                raise ValueError("its tensor names must be strings")
            specs: list[TensorSpec] = [(k, t.dtype, tuple(t.shape)) for k, t in tensors]
            size = file_size(specs)
        except ValueError as e:
            raise ValueError(f"state[{key!r}] cannot be saved as {name}: {e}") from e
        payload: Any = tensors
    else:
        name = f"{key}{JSON_SUFFIX}"
        problem = _json_problem(value, f"state[{key!r}]")
        if problem is not None:
            raise ValueError(f"state[{key!r}] can be saved neither as {key}{TENSORS_SUFFIX} (a dict of tensors "
                             f"only) nor as {name} (JSON-able values only): {problem}")
        payload = json.dumps(value, indent=2).encode("utf-8")
        size = len(payload)
    if name in (MARKER_NAME, DISTRIBUTED_INDEX):
        raise ValueError(f"state key {key!r} would be saved as {name}, a name checkpoints reserve")
    return name, (payload, size)


def _json_problem(value: Any, where: str) -> str | None:
    """What in `value` JSON cannot hold as it is (None when nothing): a round trip must give it back equal."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has the key {k!r}, not a string"
            problem = _json_problem(v, f"{where}[{k!r}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            problem = _json_problem(v, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, tuple):
        return f"{where} is a tuple, which would come back as a list"
    return f"{where} is a {type(value).__module__}.{type(value).__qualname__}"


def find_checkpoint(path: str | Path) -> Path | None:
    """``path`` if it is a checkpoint (has a marker), else the newest complete checkpoint under it, else None.

    Read-only: unlike constructing a writable manager it never tidies ``path``, where a running trainer may
    be in the middle of a save."""
    path = Path(path)
    if (path / MARKER_NAME).is_file():
        return path
    if not path.is_dir():
        return None
    return CheckpointManager(path, keep_last=0, read_only=True).latest()


def read_marker(path: str | Path) -> dict[str, Any]:
    """The parsed ``complete.json`` of checkpoint ``path``; raises if absent or malformed."""
    path = Path(path)
    marker_path = path / MARKER_NAME
    if not marker_path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} has no {MARKER_NAME}: it is incomplete (interrupted save?) "
            "or not a checkpoint directory"
        )
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{marker_path} is not valid JSON: {e}") from e
    if (
        not isinstance(marker, dict)
        or marker.get("format") != MARKER_FORMAT
        or not isinstance(marker.get("step"), int)
        or not isinstance(marker.get("time"), (int, float))
        or not isinstance(marker.get("files"), dict)
        or not all(
            isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str)
            for info in marker["files"].values()
        )
    ):
        raise CorruptCheckpointError(f"{marker_path} is not a {MARKER_FORMAT} marker")
    return marker


def verify_checkpoint(path: str | Path, share: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Check checkpoint ``path`` against its marker and return the marker: every file's size, and the
    sha256 of the files whose index (in name order) is ``index`` modulo ``count`` for ``share = (index,
    count)``, so that ``count`` processes can split the hashing of a large checkpoint."""
    path = Path(path)
    index, count = share
    marker = _verify(path, check_hashes=False)
    for i, (name, info) in enumerate(sorted(marker["files"].items())):
        if i % count == index and _sha256(path / name) != info["sha256"]:
            raise CorruptCheckpointError(f"checkpoint file {path / name} does not match its sha256 in {MARKER_NAME}")
    return marker


def _verify(path: Path, check_hashes: bool) -> dict[str, Any]:
    """Check ``path`` against its marker and return the marker; raise naming the first bad file."""
    marker = read_marker(path)
    for name, info in marker["files"].items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name} (listed in {MARKER_NAME})")
        size = file.stat().st_size
        if size != info["size"]:
            raise CorruptCheckpointError(
                f"checkpoint file {file} has {size} bytes, {MARKER_NAME} says {info['size']} (truncated?)"
            )
        if check_hashes and _sha256(file) != info["sha256"]:
            raise CorruptCheckpointError(f"checkpoint file {file} does not match its sha256 in {MARKER_NAME}")
    return marker


def file_digest(path: str | Path) -> dict[str, Any]:
    """A file's entry in the marker: its size and sha256."""
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
