"""The driver: `run_prepare` reads the inputs, opens (or resumes) the output folder, skips what is known bad
without decoding it, streams the rest through the workers into shards, and returns the `Summary` (written clips,
skips by reason, clips/s)."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from magi_train.data.prepare.config import PrepareConfig, make_plan
from magi_train.data.prepare.inputs import InputItem, caption_rows, read_inputs
from magi_train.data.prepare.output import Manifest, ShardWriter
from magi_train.data.prepare.records import DUPLICATE, MISSING_FILE, Encoded, SkipClip, Skipped
from magi_train.data.prepare.workers import encode_here, encode_in_workers

@dataclass
class Summary:
    out: Path
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    already_done: int = 0  # inputs found in the manifest (--resume)
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until the last worker had its models loaded; part of `seconds`
    notes: list[str] = field(default_factory=list)

    @property
    def clips_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when the dataset holds samples (written now or by the run this one resumes)."""
        return 0 if self.written or self.already_done else 1

    def format(self) -> str:
        shards = f" ({self.shards[0]} .. {self.shards[-1]})" if self.shards else ""
        lines = [f"wrote {self.written} clips in {len(self.shards)} shards{shards} to {self.out}",
                 f"  {self.seconds:.1f} s wall, {self.clips_per_second:.2f} clips/s "
                 f"(of which {self.startup_seconds:.1f} s starting workers and loading models)"]
        if self.already_done:
            lines.append(f"  {self.already_done} inputs were already in completed shards (--resume)")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"skipped {len(self.skipped)} inputs" + (":" if self.skipped else ""))
        by_reason: dict[str, list[Skipped]] = {}
        for s in self.skipped:
            by_reason.setdefault(s.reason, []).append(s)
        for reason in sorted(by_reason):
            lines.append(f"  {reason} ({len(by_reason[reason])}):")
            lines.extend(f"    {s.source}: {s.detail}" for s in sorted(by_reason[reason], key=lambda s: s.source))
        return "\n".join(lines)


def run_prepare(cfg: PrepareConfig) -> Summary:
    """Prepare (or continue) the dataset in `cfg.out`; raises InputListError / PrepareError for unusable settings."""
    from tqdm import tqdm

    start = time.perf_counter()
    plan = make_plan(cfg)
    items = read_inputs(cfg.input)
    manifest, notes = Manifest.open(cfg.out, cfg.recorded(), cfg.resume)
    summary = Summary(cfg.out, notes=notes)
    done, seen = manifest.sources, set()
    pending: list[InputItem] = []
    for item in items:
        if item.source in seen:
            summary.skipped.append(Skipped(item.source, DUPLICATE, f"listed again at {item.where}"))
            continue
        seen.add(item.source)
        if item.source in done:
            summary.already_done += 1
        elif not item.path.is_file():
            summary.skipped.append(Skipped(item.source, MISSING_FILE, f"{item.path} (listed at {item.where})"))
        else:
            try:  # caption problems are known without decoding anything
                caption_rows(item)
                pending.append(item)
            except SkipClip as e:
                summary.skipped.append(Skipped(item.source, e.reason, e.detail))

    batches = [pending[i : i + cfg.batch_size] for i in range(0, len(pending), cfg.batch_size)]
    timing: dict[str, float] = {}
    writer = ShardWriter(manifest, cfg.samples_per_shard)
    encode = encode_in_workers if cfg.workers > 0 else encode_here
    bar = tqdm(total=len(pending), unit="clip", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        if batches:
            with contextlib.closing(encode(batches, plan, timing)) as stream:  # stops the workers on any error
                for results in stream:
                    for result in results:
                        if isinstance(result, Encoded):
                            writer.add(result)
                            summary.written += 1
                        else:
                            summary.skipped.append(result)
                    bar.update(len(results))
                    bar.set_postfix(skipped=len(summary.skipped), refresh=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    summary.shards = writer.written
    summary.startup_seconds = timing.get("startup", 0.0)
    summary.seconds = time.perf_counter() - start
    return summary
