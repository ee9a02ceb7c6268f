"""The output folder: `shard-NNNNNN.tar` files of K samples each, written under a temporary name and renamed when
complete (`ShardWriter`), the settings of the run (`prepare.json`), and `manifest.jsonl`, which records the inputs
of every completed shard so that `--resume` skips them (`Manifest`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from magi_train.checkpoint.atomic import fsync_dir, replace_text
from magi_train.data.prepare.records import Encoded, PrepareError

SHARD_NAME = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
PARTIAL_SUFFIX = ".partial"
MANIFEST_NAME = "manifest.jsonl"
SETTINGS_NAME = "prepare.json"


class Manifest:
    """`manifest.jsonl`: one line per completed shard, {"shard", "samples", "keys", "sources"}.

    A shard is committed by appending its line *before* renaming it from `<shard>.partial`: a line whose shard is
    missing is therefore an interrupted commit (or a shard someone deleted), and its inputs are redone. A run that
    dies mid-shard leaves only a `.partial` file, which the next `--resume` deletes.
    """

    def __init__(self, out: Path, entries: list[dict[str, Any]]) -> None:
        self.out = out
        self.entries = entries

    @property
    def path(self) -> Path:
        return self.out / MANIFEST_NAME

    @property
    def sources(self) -> set[str]:
        return {s for e in self.entries for s in e["sources"]}

    @property
    def samples(self) -> int:
        return sum(int(e["samples"]) for e in self.entries)

    @property
    def next_index(self) -> int:
        indices = [int(SHARD_RE.match(e["shard"]).group(1)) for e in self.entries]  # type: ignore[union-attr]
        return max(indices) + 1 if indices else 0

    @classmethod
    def open(cls, out: Path, settings: dict[str, Any], resume: bool) -> tuple["Manifest", list[str]]:
        """Start (or with `resume`, continue) the dataset in `out`; returns the manifest and notes for the user."""
        out.mkdir(parents=True, exist_ok=True)
        settings_path, manifest_path = out / SETTINGS_NAME, out / MANIFEST_NAME
        shards = sorted(p.name for p in out.iterdir() if SHARD_RE.match(p.name))
        partials = sorted(p for p in out.iterdir() if p.name.endswith(".tar" + PARTIAL_SUFFIX))
        existing = [p.name for p in (settings_path, manifest_path) if p.exists()] + shards + [p.name for p in partials]
        if existing and not resume:
            raise PrepareError(f"{out} already holds a dataset ({', '.join(existing[:4])}"
                               f"{', ...' if len(existing) > 4 else ''}): pass --resume to continue it, or choose "
                               f"an empty folder")
        notes: list[str] = []
        if settings_path.exists():
            try:
                recorded = json.loads(settings_path.read_text())
            except json.JSONDecodeError as e:
                raise PrepareError(f"{settings_path} does not parse ({e})") from None
            changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            if changed:
                detail = "; ".join(f"{k}: was {recorded.get(k)!r}, now {settings.get(k)!r}" for k in changed)
                raise PrepareError(f"--resume with other settings than {settings_path} records ({detail}): a dataset "
                                   f"must be prepared one way; use a new output folder")
        else:
            replace_text(settings_path, json.dumps(settings, indent=2) + "\n", settings_path.name + PARTIAL_SUFFIX)

        for partial in partials:  # an interrupted shard: its inputs are not in the manifest and are redone
            partial.unlink()
            notes.append(f"discarded the interrupted shard {partial.name}")
        entries = cls._read_entries(manifest_path, notes)
        kept = []
        for entry in entries:
            if (out / entry["shard"]).is_file():
                kept.append(entry)
            else:
                notes.append(f"{entry['shard']} is in the manifest but missing: its {entry['samples']} inputs "
                             f"will be redone")
        listed = {e["shard"] for e in kept}
        strays = [s for s in shards if s not in listed]
        if strays:
            raise PrepareError(f"{out}: {', '.join(strays)} not recorded in {MANIFEST_NAME} (not written by this tool, "
                               f"or the manifest was edited); move them away, then resume")
        manifest = cls(out, kept)
        if kept != entries or not manifest_path.exists():
            replace_text(manifest_path, "".join(json.dumps(e) + "\n" for e in kept),
                         manifest_path.name + PARTIAL_SUFFIX)
        return manifest, notes

    @staticmethod
    def _read_entries(path: Path, notes: list[str]) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        entries = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                ok = (isinstance(entry, dict) and isinstance(entry.get("shard"), str) and SHARD_RE.match(entry["shard"])
                      and isinstance(entry.get("sources"), list) and isinstance(entry.get("samples"), int))
            except json.JSONDecodeError:
                ok = False
            if not ok:
                if number == len(lines):  # a line cut short by a crash while it was written: not committed
                    notes.append(f"ignored the incomplete last line of {path}")
                    continue
                raise PrepareError(f"{path}:{number}: not a manifest entry ({line[:120]!r})")
            entries.append(entry)
        return entries

    def commit(self, shard: str, keys: Sequence[str], sources: Sequence[str]) -> None:
        entry = {"shard": shard, "samples": len(keys), "keys": list(keys), "sources": list(sources)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)


class ShardWriter:
    """Collects encoded samples into `shard-NNNNNN.tar`, `samples_per_shard` each, numbered after the manifest's."""

    def __init__(self, manifest: Manifest, samples_per_shard: int) -> None:
        import webdataset

        self._tar_writer = webdataset.TarWriter
        self.manifest = manifest
        self.samples_per_shard = samples_per_shard
        self.written: list[str] = []
        self._index = manifest.next_index
        self._file: Any = None
        self._tar: Any = None
        self._keys: list[str] = []
        self._sources: list[str] = []

    @property
    def _name(self) -> str:
        return SHARD_NAME.format(self._index)

    def add(self, sample: Encoded) -> None:
        if self._tar is None:
            self._file = open(self.manifest.out / (self._name + PARTIAL_SUFFIX), "wb")
            self._tar = self._tar_writer(self._file, encoder=False)
        self._tar.write(sample.members)
        self._keys.append(sample.key)
        self._sources.append(sample.source)
        if len(self._keys) >= self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        out = self.manifest.out
        self.manifest.commit(self._name, self._keys, self._sources)
        os.replace(out / (self._name + PARTIAL_SUFFIX), out / self._name)
        fsync_dir(out)
        self.written.append(self._name)
        self._index += 1
        self._file = self._tar = None
        self._keys, self._sources = [], []

    def close(self) -> None:
        """Complete the last, partly filled shard."""
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written (its inputs are not in the manifest, so a resume redoes them)."""
        if self._file is not None:
            try:
                self._tar.close()  # else the tar stream would write its end blocks into a closed file later
            finally:
                self._file.close()
            (self.manifest.out / (self._name + PARTIAL_SUFFIX)).unlink(missing_ok=True)
            self._file = self._tar = None
