"""Tiny real-pixel videos for testing dataset preparation: coloured shapes moving over a plain or gradient background.

Unlike `synthetic.py` (which draws latents directly), these are real mp4 files (H.264, yuv420p) and PNG stills,
so they go through the whole preparation path: decoding, fps resampling, bucketing, the VAE and the text encoder.
Each video comes with MAGI-1 style "AR captions": one caption per second (a 24-frame chunk at 24 fps) saying what
moves where during that second, the first one in more detail (the background too), and a whole-clip caption.
The wording follows `synthetic.py` (palette colours, compass directions, the nine locations).

Every clip is a pure function of (seed, kind, index), so adding clips does not change the earlier ones.
A clip is drawn in two steps: `plan_clip` draws what it shows (background, shapes, paths, colours; cheap, no
pixels) and `render_clip` paints it and words its captions, so a caller can choose clips by their content (the
prompt-following evaluation keeps one-shape clips with or without a change) without painting the rejected ones.
`colour_change` (off by default, and then no random number is drawn for it) lets a shape change colour between
seconds ("the red circle turns blue and moves down ...").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from magi_train.data.synthetic import DIRECTIONS, PALETTE

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# RGB of the palette names used by `synthetic.py`; all stand out against the dark and grey backgrounds below.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 200, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40),
    "purple": (150, 50, 200), "orange": (250, 140, 20), "white": (245, 245, 245), "cyan": (40, 220, 220),
}
PLAIN_BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (12, 12, 12), "grey": (100, 100, 100),
                                                       "navy": (20, 24, 80)}
# A gradient runs from its first colour (top or left) to its second.
GRADIENT_BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "black to grey": ((10, 10, 10), (110, 110, 110)),
    "navy to black": ((30, 30, 110), (8, 8, 20)),
    "dark green to black": ((10, 70, 30), (5, 10, 5)),
}
STILL_PROBABILITY = 1.0 / 9.0
_SPEED_FRACTION = (0.15, 0.35)  # travel per second, as a fraction of min(H, W)
_SIZE_FRACTION = (0.12, 0.2)  # shape "radius", as a fraction of min(H, W)

# Phrase for a location given (vertical third, horizontal third), worded as in synthetic.py.
_LOCATIONS: dict[tuple[int, int], str] = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}


def location_phrase(x: float, y: float, height: int, width: int) -> str:
    def third(value: float, size: int) -> int:
        return min(max(int(3.0 * value / size), 0), 2)

    return _LOCATIONS[(third(y, height), third(x, width))]


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of PALETTE
    radius: float
    path: np.ndarray  # (frames, 2) centre (x, y) in pixels at every frame
    directions: tuple[str | None, ...]  # per second: a DIRECTIONS phrase, or None when still
    colours: tuple[str, ...] = ()  # per second when the colour may change (plan_clip's colour_change); () = `colour`

    def colour_at(self, second: int) -> str:
        return self.colours[second] if self.colours else self.colour


@dataclass(frozen=True)
class ClipPlan:
    """What a clip shows, before any pixel is painted (`render_clip` paints it)."""
    width: int
    height: int
    frames: int
    fps: int
    background: np.ndarray  # (H, W, 3) float
    background_phrase: str
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    captions: list[str]  # one per second (per `fps` frames, the last second possibly partial)
    caption: str  # the whole clip
    shapes: tuple[Shape, ...] = ()  # what was drawn: the ground truth behind the captions


def _background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    """(H, W, 3) float background and its caption phrase."""
    if rng.uniform() < 0.5:
        name = sorted(PLAIN_BACKGROUNDS)[int(rng.integers(len(PLAIN_BACKGROUNDS)))]
        plain = np.broadcast_to(np.array(PLAIN_BACKGROUNDS[name], np.float64), (height, width, 3)).copy()
        return plain, f"a plain {name} background"
    name = sorted(GRADIENT_BACKGROUNDS)[int(rng.integers(len(GRADIENT_BACKGROUNDS)))]
    first, second = (np.array(c, np.float64) for c in GRADIENT_BACKGROUNDS[name])
    vertical = rng.uniform() < 0.5
    ramp = np.linspace(0.0, 1.0, height if vertical else width)
    ramp = ramp[:, None, None] if vertical else ramp[None, :, None]
    image = first + (second - first) * ramp
    return np.broadcast_to(image, (height, width, 3)).copy(), f"a {name} gradient background"


def _shape_path(rng: np.random.Generator, radius: float, frames: int, fps: int, height: int, width: int
                ) -> tuple[np.ndarray, tuple[str | None, ...]]:
    """A centre per frame: each second the shape takes a new compass direction that keeps it inside the frame."""
    low = np.array([radius, radius])
    high = np.array([width - 1 - radius, height - 1 - radius])
    position = rng.uniform(low, high)
    path = np.empty((frames, 2))
    directions: list[str | None] = []
    for start in range(0, frames, fps):
        steps = min(fps, frames - start)
        speed = rng.uniform(*_SPEED_FRACTION) * min(height, width) / fps  # pixels per frame
        velocity = np.zeros(2)
        direction: str | None = None
        if rng.uniform() >= STILL_PROBABILITY:
            # Only directions whose whole second of travel stays inside the frame; none fits -> stays still.
            fitting = []
            for phrase, dx, dy in DIRECTIONS:
                v = np.array([dx, dy]) / math.hypot(dx, dy) * speed
                end = position + v * steps
                if np.all(end >= low) and np.all(end <= high):
                    fitting.append((phrase, v))
            if fitting:
                direction, velocity = fitting[int(rng.integers(len(fitting)))]
        directions.append(direction)
        for k in range(steps):
            position = position + velocity
            path[start + k] = position
    return path, tuple(directions)


def _draw(canvas: np.ndarray, shape: Shape, frame: int, y: np.ndarray, x: np.ndarray, colour: str) -> None:
    """Paint `shape` in `colour` at its frame-`frame` position; y, x are the (H, W) pixel-coordinate grids."""
    cx, cy = shape.path[frame]
    r = shape.radius
    if shape.kind == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape.kind == "square":
        inside = (np.abs(x - cx) <= 0.85 * r) & (np.abs(y - cy) <= 0.85 * r)
    else:  # an upward triangle: apex at (cx, cy - r), base on y = cy + r/2, half-width growing downwards
        inside = (y <= cy + 0.5 * r) & (np.abs(x - cx) <= (y - (cy - r)) * (0.866 / 1.5))
    canvas[inside] = COLOUR_RGB[colour]


def _motion(direction: str | None) -> str:
    return "stays still" if direction is None else f"moves {direction}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_clip(rng: np.random.Generator, width: int, height: int, frames: int, fps: int,
              colour_change: float = 0.0, max_shapes: int = 2) -> Clip:
    """Frames and captions of one clip; `frames` = 1 gives a still image (its caption has no motion).
    `colour_change`: the probability that a shape changes colour at each new second (0: never).
    `max_shapes`: 1 keeps only the first shape of two-shape clips (what the held-out cases show)."""
    return render_clip(plan_clip(rng, width, height, frames, fps, colour_change, max_shapes))


def plan_clip(rng: np.random.Generator, width: int, height: int, frames: int, fps: int,
              colour_change: float = 0.0, max_shapes: int = 2) -> ClipPlan:
    """What `make_clip` draws from `rng`, without painting it (the same random numbers in the same order)."""
    if width < 8 or height < 8:
        raise ValueError(f"clip size {width}x{height} is too small (at least 8x8)")
    if frames < 1 or fps < 1:
        raise ValueError(f"frames ({frames}) and fps ({fps}) must be >= 1")
    if not 0.0 <= colour_change <= 1.0:
        raise ValueError(f"colour_change ({colour_change}) is a probability: it must be in [0, 1]")
    if max_shapes not in (1, 2):
        raise ValueError(f"max_shapes ({max_shapes}) must be 1 or 2")
    background, background_phrase = _background(rng, height, width)
    count = 1 if rng.uniform() < 0.6 else 2
    colours = [PALETTE[k] for k in rng.permutation(len(PALETTE))[:count]]  # distinct: captions stay unambiguous
    # The draws above stay as they are (so max_shapes=2 clips are unchanged); the second shape is then not drawn.
    colours = colours[:max_shapes]
    shapes = []
    for colour in colours:
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        radius = rng.uniform(*_SIZE_FRACTION) * min(height, width)
        path, directions = _shape_path(rng, radius, frames, fps, height, width)
        shapes.append(Shape(kind, colour, radius, path, directions))
    if colour_change > 0 and frames > 1:
        # Drawn after every path, and only when asked for, so that clips without it stay as they always were.
        # A new colour is one no shape of the clip has had: "the blue circle" names one shape for the whole clip.
        used = set(colours)
        for i, shape in enumerate(shapes):
            sequence = [shape.colour]
            for _ in range(1, len(shape.directions)):
                free = [c for c in PALETTE if c not in used]
                if free and rng.uniform() < colour_change:
                    sequence.append(free[int(rng.integers(len(free)))])
                    used.add(sequence[-1])
                else:
                    sequence.append(sequence[-1])
            shapes[i] = replace(shape, colours=tuple(sequence))
    return ClipPlan(width, height, frames, fps, background, background_phrase, tuple(shapes))


def render_clip(plan: ClipPlan) -> Clip:
    """Paint a plan and word its captions."""
    video = np.empty((plan.frames, plan.height, plan.width, 3), np.uint8)
    y, x = np.mgrid[0:plan.height, 0:plan.width].astype(np.float64)
    for f in range(plan.frames):
        canvas = plan.background.copy()
        for shape in plan.shapes:
            _draw(canvas, shape, f, y, x, shape.colour_at(f // plan.fps))
        video[f] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    captions, caption = clip_captions(plan)
    return Clip(video, captions, caption, plan.shapes)


def clip_captions(plan: ClipPlan) -> tuple[list[str], str]:
    """A plan's per-second captions and its whole-clip caption (no pixels painted)."""
    frames, fps, height, width, shapes = plan.frames, plan.fps, plan.height, plan.width, plan.shapes
    background_phrase = plan.background_phrase
    if frames == 1:
        text = " and ".join(f"{_article(s.colour)} {s.colour} {s.kind} "
                            f"{location_phrase(*s.path[0], height, width)}" for s in shapes)
        caption = f"{text}, over {background_phrase}"
        return [caption], caption

    captions = []
    for second, start in enumerate(range(0, frames, fps)):
        middle = min(start + fps // 2, frames - 1)  # where the shape is half-way through that second
        clauses = []
        for s in shapes:
            where = location_phrase(*s.path[middle], height, width)
            motion = _motion(s.directions[second])
            if second == 0:
                clauses.append(f"{_article(s.colour)} {s.colour} {s.kind} {motion} {where}")
            elif s.colour_at(second) != s.colour_at(second - 1):  # named by the colour it had, then the new one
                clauses.append(f"the {s.colour_at(second - 1)} {s.kind} turns {s.colour_at(second)} and {motion} "
                               f"{where}")
            else:  # later seconds refer back to it
                clauses.append(f"the {s.colour_at(second)} {s.kind} {motion} {where}")
        text = ", ".join(clauses)
        captions.append(f"{text}, over {background_phrase}" if second == 0 else text)

    def summary(s: Shape) -> str:
        steps = []
        for i, d in enumerate(s.directions):
            turned = i > 0 and s.colour_at(i) != s.colour_at(i - 1)
            if i == 0 or d != s.directions[i - 1] or turned:
                steps.append((f"turns {s.colour_at(i)} and " if turned else "") + _motion(d))
        return f"{_article(s.colour)} {s.colour} {s.kind} " + ", then ".join(steps)

    caption = ", while ".join(summary(s) for s in shapes) + f", over {background_phrase}"
    return captions, caption


def write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int = 18) -> None:
    """H.264 (libx264) in yuv420p, an ordinary (not fragmented) mp4.

    x264's lookahead is off: on frames this small it made the output, decoded pixels included, vary from run to
    run (seen at 48x32), and the dataset must be a function of the seed."""
    _, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"{path}: yuv420p needs an even width and height, got {width}x{height}")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf), "x264-params": "rc-lookahead=0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_png(path: Path, rgb: np.ndarray) -> None:
    height, width, _ = rgb.shape
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        container.mux(stream.encode(None))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"64x48,48x64" -> [(64, 48), (48, 64)] as (width, height); each must be even and at least 8."""
    sizes = []
    for part in text.split(","):
        try:
            width, height = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--size {part!r} is not WIDTHxHEIGHT (e.g. 64x48)") from None
        if width < 8 or height < 8 or width % 2 or height % 2:
            raise ValueError(f"--size {part!r}: width and height must be even and >= 8 (yuv420p)")
        sizes.append((width, height))
    return sizes


def parse_seconds(text: str) -> tuple[float, float]:
    """"2" -> (2, 2); "1-3" -> (1, 3)."""
    parts = text.split("-")
    try:
        low, high = (float(parts[0]), float(parts[-1])) if len(parts) in (1, 2) else (math.nan, math.nan)
    except ValueError:
        low = high = math.nan
    if not (0 < low <= high):
        raise ValueError(f"--seconds {text!r} is not a duration or a range like 1-3 (positive, low <= high)")
    return low, high


def make_dataset(out: Path, num_videos: int, num_images: int, fps: int, seconds: tuple[float, float],
                 sizes: Sequence[tuple[int, int]], seed: int = 0, sidecars: bool = False,
                 colour_change: float = 0.0, max_shapes: int = 2) -> list[dict]:
    """Write the videos, the stills and `captions.jsonl` under `out`; returns the list entries.

    Clip i takes size i mod len(sizes), so every size is used once there are enough clips; its duration is drawn
    in whole frames from `seconds`. With `sidecars`, each file also gets a `<name>.json` with its captions, the
    layout `prepare_dataset.py` reads from a folder. `colour_change` as `make_clip`'s (videos only; 0: the
    dataset is what it was before the option existed); `max_shapes` as `make_clip`'s (videos only).
    """
    if num_videos < 0 or num_images < 0 or num_videos + num_images == 0:
        raise ValueError(f"need at least one video or image (got {num_videos} videos, {num_images} images)")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(num_videos):
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFF_FFFF, 0, index]))
        width, height = sizes[index % len(sizes)]
        frames = int(rng.integers(round(seconds[0] * fps), round(seconds[1] * fps) + 1))
        clip = make_clip(rng, width, height, max(frames, 2), fps, colour_change, max_shapes)
        name = f"clip_{index:04d}.mp4"
        write_mp4(out / name, clip.frames, fps)
        entries.append({"path": name, "captions": clip.captions, "caption": clip.caption})
    for index in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFF_FFFF, 1, index]))
        width, height = sizes[index % len(sizes)]
        clip = make_clip(rng, width, height, 1, fps)
        name = f"image_{index:04d}.png"
        write_png(out / name, clip.frames[0])
        entries.append({"path": name, "captions": clip.captions, "caption": clip.caption})
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
    if sidecars:
        for entry in entries:
            sidecar = {"caption": entry["caption"], "captions": entry["captions"]}
            (out / entry["path"]).with_suffix(".json").write_text(json.dumps(sidecar) + "\n", encoding="utf-8")
    return entries
