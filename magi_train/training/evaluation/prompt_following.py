"""Does a model do what its chunk-wise captions ask? Held-out captions of the synthetic shape videos, and the
decoded videos scored by the analytic detector (detector.py).

Cases (`held_out_cases`): clips of `magi_train/data/synthetic_video.py` with one shape, drawn from a random
stream that the dataset never uses (SeedSequence([seed, 2, index]); the dataset's videos are kind 0, its stills
kind 1), so each caption is worded exactly as a training caption and comes with its ground truth per chunk
(one caption per second = one 24-frame chunk): the shape's colour and direction, or "still". A set fraction of
the cases changes what it asks between chunks, in the pattern floor((i + 1) f) > floor(i f) so that every
prefix of the cases keeps the fraction and adding cases leaves the earlier ones as they were:

    steady     the same colour and the same direction in every chunk, a moving one: a shape with no room to
               move stays still for good, so the rejection sampling would otherwise make a third of the steady
               cases still throughout (at 128x128, 3 chunks), which a generator of static shapes would pass
    direction  the direction changes at some chunk (the colour does not)
    colour     the colour changes at some chunk ("the red circle turns blue and ..."; synthetic_video's opt-in
               colour_change: only a model trained on such clips can follow it)

Scores over the cases (`score`, or `evaluate` with a generator):

    colour     per chunk: the detected dominant colour is the caption's
    direction  per chunk: the detected direction (or still) is the caption's
    switch     per chunk, for the cases with a change, the chunks from the first change on: colour and
               direction both as their caption says (the new instruction was taken up, and kept)

A generator is any callable `generate(captions, num_frames, seed) -> uint8 (T, H, W, 3)`, so the scoring runs on
a pipeline, a stub or a future demo alike; `evaluate` gives case i the seed `seed + i` whatever the generator,
so that several models see the same noise per case.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from magi_train.data.synthetic_video import ClipPlan, clip_captions, plan_clip, render_clip
from magi_train.training.evaluation.detector import STILL, ChunkDetection, DetectorConfig, detect_chunks

KINDS = ("steady", "direction", "colour")
CASE_STREAM = 2  # SeedSequence([seed, CASE_STREAM, index]): a stream make_dataset never draws from
# Plans are cheap (no pixels, ~0.3 ms), but three seconds of straight travel seldom fit in the frame: a steady
# 3-chunk case takes ~1,000 draws at 64x64 or 128x128 (a 2-chunk one ~50), longer ones far more.
_MAX_ATTEMPTS = 100_000

Generate = Callable[[List[str], int, int], np.ndarray]  # (captions, num_frames, seed) -> uint8 (T, H, W, 3)


@dataclass(frozen=True)
class Case:
    index: int
    kind: str  # one of KINDS
    captions: tuple[str, ...]  # one per chunk, worded as synthetic_video words its per-second captions
    colours: tuple[str, ...]  # the shape's colour in each chunk
    directions: tuple[str, ...]  # a DIRECTIONS phrase or STILL in each chunk
    plan: ClipPlan  # what synthetic_video paints for these captions (`render`)

    @property
    def num_frames(self) -> int:
        return self.plan.frames

    @property
    def chunk_frames(self) -> int:
        return self.plan.fps

    @property
    def first_change(self) -> Optional[int]:
        """The first chunk whose colour or direction differs from the chunk before; None for a steady case."""
        for k in range(1, len(self.captions)):
            if (self.colours[k], self.directions[k]) != (self.colours[k - 1], self.directions[k - 1]):
                return k
        return None

    def render(self) -> np.ndarray:
        """The ground truth: synthetic_video's clip of these captions, uint8 (T, H, W, 3)."""
        return render_clip(self.plan).frames


def _kind_of(index: int, change_fraction: float, colour_fraction: float) -> str:
    def picked(i: int, fraction: float) -> bool:  # spreads the picked indices evenly over every prefix
        return math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)

    if not picked(index, change_fraction):
        return "steady"
    changes_before = sum(picked(i, change_fraction) for i in range(index))
    return "colour" if picked(changes_before, colour_fraction) else "direction"


def _case(plan: ClipPlan, index: int, kind: str) -> Optional[Case]:
    """The case of `plan` if it is one of `kind` (one shape, and its changes as `kind` says), else None."""
    if len(plan.shapes) != 1:
        return None
    shape = plan.shapes[0]
    chunks = len(shape.directions)
    colours = tuple(shape.colour_at(k) for k in range(chunks))
    directions = tuple(STILL if d is None else d for d in shape.directions)
    colour_changes = len(set(colours)) > 1
    direction_changes = any(directions[k] != directions[k - 1] for k in range(1, chunks))
    wanted = {"steady": not colour_changes and not direction_changes and directions[0] != STILL,
              "direction": not colour_changes and direction_changes,
              "colour": colour_changes}[kind]
    if not wanted:
        return None
    return Case(index, kind, tuple(clip_captions(plan)[0]), colours, directions, plan)


def held_out_cases(count: int, seed: int = 0, width: int = 64, height: int = 64, num_frames: int = 48,
                   fps: int = 24, change_fraction: float = 0.5, colour_fraction: float = 0.0) -> List[Case]:
    """`count` evaluation cases of `num_frames` frames at width x height (one caption per `fps` frames, the
    last chunk possibly partial); a pure function of its arguments. `change_fraction` of the cases change
    between chunks, `colour_fraction` of those by a colour change, the rest by a change of direction."""
    if count < 1:
        raise ValueError(f"cases ({count}) must be >= 1")
    if fps < 1 or num_frames <= fps:
        raise ValueError(f"num_frames ({num_frames}) must be more than one chunk of {fps} frames: a change "
                         "between chunks needs two chunks")
    if width < 8 or height < 8:
        raise ValueError(f"size {width}x{height} is too small (at least 8x8)")
    for name, value in (("change_fraction", change_fraction), ("colour_fraction", colour_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} ({value}) is a fraction: it must be in [0, 1]")
    cases = []
    for index in range(count):
        kind = _kind_of(index, change_fraction, colour_fraction)
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFF_FFFF, CASE_STREAM, index]))
        # Half the seconds turn a new colour in a colour case; never in the others (as the ordinary dataset).
        colour_change = 0.5 if kind == "colour" else 0.0
        for _ in range(_MAX_ATTEMPTS):
            case = _case(plan_clip(rng, width, height, num_frames, fps, colour_change), index, kind)
            if case is not None:
                cases.append(case)
                break
        else:
            raise RuntimeError(f"case {index}: no {kind} clip of {num_frames} frames in {_MAX_ATTEMPTS} draws")
    return cases


@dataclass(frozen=True)
class CaseResult:
    case: Case
    detected: tuple[ChunkDetection, ...]

    @property
    def colour_ok(self) -> List[bool]:
        return [d.colour == c for d, c in zip(self.detected, self.case.colours)]

    @property
    def direction_ok(self) -> List[bool]:
        return [d.direction == t for d, t in zip(self.detected, self.case.directions)]

    @property
    def switch_ok(self) -> List[bool]:
        """Per chunk from the first change on (empty for a steady case): colour and direction both right."""
        first = self.case.first_change
        if first is None:
            return []
        return [c and d for c, d in zip(self.colour_ok[first:], self.direction_ok[first:])]

    def as_dict(self) -> Dict[str, object]:
        return {"index": self.case.index, "kind": self.case.kind, "captions": list(self.case.captions),
                "first_change": self.case.first_change,
                "chunks": [{"colour": c, "direction": t, "detected_colour": d.colour,
                            "detected_direction": d.direction, "speed": round(d.speed, 4),
                            "coverage": round(d.coverage, 4)}
                           for c, t, d in zip(self.case.colours, self.case.directions, self.detected)]}


def score_case(case: Case, frames: np.ndarray, config: DetectorConfig = DetectorConfig()) -> CaseResult:
    """Detect `frames` (uint8 (T, H, W, 3), T = case.num_frames) chunk by chunk against the case's captions."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"case {case.index}: frames must be uint8 (T, H, W, 3), got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    if len(frames) != case.num_frames:
        raise ValueError(f"case {case.index}: {len(frames)} frames, but its {len(case.captions)} captions cover "
                         f"{case.num_frames}")
    return CaseResult(case, tuple(detect_chunks(frames, case.chunk_frames, config=config)))


def _rate(flags: Sequence[bool]) -> Optional[float]:
    return sum(flags) / len(flags) if flags else None


@dataclass
class PromptFollowingReport:
    label: str
    results: List[CaseResult]
    seconds: float = 0.0  # generating and scoring
    extra: Dict[str, object] = field(default_factory=dict)  # what the caller wants recorded (model, steps)

    def _flags(self, attr: str) -> List[bool]:
        return [ok for r in self.results for ok in getattr(r, attr)]

    @property
    def colour(self) -> Optional[float]:
        return _rate(self._flags("colour_ok"))

    @property
    def direction(self) -> Optional[float]:
        return _rate(self._flags("direction_ok"))

    @property
    def switch(self) -> Optional[float]:
        """None when no case changes."""
        return _rate(self._flags("switch_ok"))

    def _count(self, attr: str) -> str:
        flags = self._flags(attr)
        return f"{sum(flags)}/{len(flags)}"

    def lines(self) -> List[str]:
        changing = sum(r.case.first_change is not None for r in self.results)
        return [f"{self.label}: {len(self.results)} cases ({changing} with a change), {self.seconds:.1f} s",
                f"  colour accuracy     {_percent(self.colour)}  ({self._count('colour_ok')} chunks)",
                f"  direction accuracy  {_percent(self.direction)}  ({self._count('direction_ok')} chunks)",
                f"  switch accuracy     {_percent(self.switch)}  ({self._count('switch_ok')} chunks from the "
                f"first change on)"]

    def as_dict(self) -> Dict[str, object]:
        return {"label": self.label, "cases": len(self.results), "colour": self.colour,
                "direction": self.direction, "switch": self.switch, "seconds": round(self.seconds, 3),
                **self.extra, "per_case": [r.as_dict() for r in self.results]}


def _percent(value: Optional[float]) -> str:
    return "   n/a" if value is None else f"{100.0 * value:5.1f}%"


def score(cases: Sequence[Case], videos: Sequence[np.ndarray], label: str = "",
          config: DetectorConfig = DetectorConfig()) -> PromptFollowingReport:
    """Score one video per case (in order)."""
    if len(videos) != len(cases):
        raise ValueError(f"{len(videos)} videos for {len(cases)} cases")
    return PromptFollowingReport(label, [score_case(c, v, config) for c, v in zip(cases, videos)])


def evaluate(generate: Generate, cases: Sequence[Case], seed: int = 0, label: str = "",
             config: DetectorConfig = DetectorConfig()) -> PromptFollowingReport:
    """Generate each case (`generate(list(case.captions), case.num_frames, seed + case.index)`) and score it."""
    start = time.perf_counter()
    results = []
    for case in cases:
        frames = generate(list(case.captions), case.num_frames, seed + case.index)
        results.append(score_case(case, np.asarray(frames), config))
    return PromptFollowingReport(label, results, time.perf_counter() - start)


def table(reports: Sequence[PromptFollowingReport]) -> List[str]:
    """One row per report: the three scores side by side (the issue's table)."""
    width = max([len("run")] + [len(r.label) for r in reports])
    out = [f"{'run':<{width}}  colour  direction  switch  cases  seconds"]
    for r in reports:
        out.append(f"{r.label:<{width}}  {_percent(r.colour)}  {_percent(r.direction):>9}  {_percent(r.switch)}  "
                   f"{len(r.results):>5}  {r.seconds:7.1f}")
    return out
