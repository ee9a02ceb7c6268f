"""The input lists: a folder (media with .json/.txt caption sidecars), a CSV or a JSONL list -> `InputItem`s, the
caption rows of an item, and the webdataset key of its sample. data/README.md documents the formats."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from magi_train.data.prepare.records import MISSING_CAPTION, InputListError, SkipClip

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class InputItem:
    source: str  # the path as listed (relative to the list or folder): the manifest and the sample's json name it
    path: Path  # where to read it
    captions: tuple[str, ...] = ()  # one per chunk (AR captions), possibly empty
    caption: Optional[str] = None  # the whole clip
    where: str = ""  # where it was listed ("list.csv:12", a sidecar file), for messages
    problem: Optional[str] = None  # a caption that could not be read (folder sidecars)

    @property
    def kind(self) -> str:
        return "image" if self.path.suffix.lower() in IMAGE_SUFFIXES else "video"


def read_inputs(path: str | os.PathLike[str]) -> list[InputItem]:
    """A folder, a .csv or a .jsonl list -> the inputs, in listed (folder: sorted) order."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    if not path.is_file():
        raise InputListError(f"input {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv_list(path)
    if suffix == ".jsonl":
        return read_jsonl_list(path)
    raise InputListError(f"input {path}: expected a folder, a .csv or a .jsonl list (got {suffix or 'no suffix'!r})")


def _normalised(source: str) -> str:
    return PurePosixPath(os.path.normpath(source.replace("\\", "/"))).as_posix()


def _resolve(base: Path, source: str) -> Path:
    candidate = Path(source).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def _captions_value(value: Any, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise InputListError(f"{where}: 'captions' must be a list of strings, got {value!r}"[:300])
    return tuple(c.strip() for c in value)


def _caption_value(value: Any, where: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputListError(f"{where}: 'caption' must be a string, got {type(value).__name__}")
    return value.strip() or None


def read_jsonl_list(path: Path) -> list[InputItem]:
    """One JSON object a line: `path` and `caption` and/or `captions`; blank lines are ignored."""
    items = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first line
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputListError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(entry, dict):
                raise InputListError(f"{where}: expected a JSON object with 'path', got {type(entry).__name__}")
            source = entry.get("path")
            if not isinstance(source, str) or not source.strip():
                raise InputListError(f"{where}: missing or empty 'path'")
            items.append(InputItem(_normalised(source), _resolve(path.parent, source),
                                   _captions_value(entry.get("captions"), where),
                                   _caption_value(entry.get("caption"), where), where))
    return items


def read_csv_list(path: Path) -> list[InputItem]:
    """A header with `path` and `caption` and/or `captions` (a JSON list of strings); other columns are ignored."""
    items = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # spreadsheets often write a byte-order mark
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "path" not in header:
            raise InputListError(f"{path}:1: the header {header} has no 'path' column (expected path,caption)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():
                raise InputListError(f"{where}: {len(row.get(None, [])) + len(header)} fields where the header "
                                     f"has {len(header)} (quote captions that contain commas)")
            source = row["path"].strip()
            if not source:
                raise InputListError(f"{where}: empty 'path'")
            raw = (row.get("captions") or "").strip()
            try:
                captions = json.loads(raw) if raw else None
            except json.JSONDecodeError as e:
                raise InputListError(f"{where}: 'captions' is not a JSON list of strings ({e.msg})") from None
            items.append(InputItem(_normalised(source), _resolve(path.parent, source),
                                   _captions_value(captions, where), _caption_value(row.get("caption"), where),
                                   where))
    return items


def read_folder(folder: Path) -> list[InputItem]:
    """Every video and image under `folder` (recursively, sorted); the caption comes from `<name>.json` (the
    `caption`/`captions` fields of a list entry) or else `<name>.txt` (the whole-clip caption)."""
    items = []
    media = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in media:
        source = path.relative_to(folder).as_posix()
        sidecar_json, sidecar_txt = path.with_suffix(".json"), path.with_suffix(".txt")
        captions: tuple[str, ...] = ()
        caption: Optional[str] = None
        problem: Optional[str] = None
        where = str(path)
        try:
            if sidecar_json.is_file():
                where = str(sidecar_json)
                entry = json.loads(sidecar_json.read_text(encoding="utf-8"))
                if not isinstance(entry, dict):
                    raise InputListError(f"{where}: expected a JSON object with 'caption' and/or 'captions'")
                captions = _captions_value(entry.get("captions"), where)
                caption = _caption_value(entry.get("caption"), where)
            elif sidecar_txt.is_file():
                where = str(sidecar_txt)
                caption = " ".join(sidecar_txt.read_text(encoding="utf-8").split()) or None
            else:
                problem = f"no caption file ({sidecar_json.name} or {sidecar_txt.name}) next to {path}"
        except (InputListError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            # One broken sidecar in a large folder skips that clip; it does not stop the run.
            problem = f"{where}: {e}" if not isinstance(e, InputListError) else str(e)
        items.append(InputItem(source, path, captions, caption, where, problem))
    return items


def caption_rows(item: InputItem) -> tuple[list[str], Optional[int]]:
    """The caption rows of a clip and the most chunks they can describe (None: any number).

    Two or more per-chunk captions give one row per chunk, and a clip is cut to the chunks they describe; else
    the whole-clip caption (or the one per-chunk caption) is a single row for the whole clip (R = 1).
    """
    if item.problem:
        raise SkipClip(MISSING_CAPTION, item.problem)
    if len(item.captions) >= 2:
        empty = [i for i, c in enumerate(item.captions) if not c]
        if empty:
            raise SkipClip(MISSING_CAPTION, f"{item.where}: per-chunk caption {empty[0]} is empty")
        return list(item.captions), len(item.captions)
    text = item.caption or (item.captions[0] if item.captions else None)
    if not text:
        raise SkipClip(MISSING_CAPTION, f"{item.where}: no 'caption' or 'captions'")
    return [text], None


def sample_key(source: str) -> str:
    """A webdataset key for a source path: readable, unique, and free of dots (webdataset splits on them)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", PurePosixPath(source).stem)[:48] or "clip"
    return f"{stem}-{hashlib.sha1(source.encode('utf-8')).hexdigest()[:12]}"
