"""The prompt-following score (magi_train/training/evaluation/prompt_following.py, detector.py and
tools/eval_prompt_following.py): held-out cases worded as the data, an analytic detector that reads the data's
own clips right (also blurred or through x264) and clips that contradict their captions wrong, and the
generator seam end to end. Also synthetic_video's opt-in colour change, which leaves the ordinary clips as they
were."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from magi_train.data.synthetic import DIRECTIONS, PALETTE
from magi_train.data.synthetic_video import COLOUR_RGB, SHAPES, make_clip, render_clip, write_mp4
from magi_train.data.video_io import read_video
from magi_train.training.evaluation.detector import STILL, detect_chunks, quantise
from magi_train.training.evaluation.prompt_following import evaluate, held_out_cases, score, score_case, table

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_base"

# The caption grammar of synthetic_video, written out here independently of its code.
_DIR = "|".join(sorted((re.escape(d) for d, _, _ in DIRECTIONS), key=len, reverse=True))
_COLOUR = "|".join(PALETTE)
_LOC = ("in the top left|at the top|in the top right|on the left|in the center|on the right|in the bottom left|"
        "at the bottom|in the bottom right")
_MOTION = rf"(?:moves (?P<dir>{_DIR})|stays still) (?:{_LOC})"
FIRST = re.compile(rf"^an? (?P<colour>{_COLOUR}) (?P<kind>{'|'.join(SHAPES)}) {_MOTION}, over an? .+ background$")
LATER = re.compile(rf"^the (?P<colour>{_COLOUR}) (?P<kind>{'|'.join(SHAPES)}) (?:turns (?P<new>{_COLOUR}) and )?"
                   rf"{_MOTION}$")


def read_caption(index: int, text: str) -> tuple[str, str]:
    """(colour, direction or STILL) that a per-chunk caption asks for."""
    m = (FIRST if index == 0 else LATER).match(text)
    assert m, f"caption {index} {text!r} is not worded as synthetic_video words them"
    return m.group("new") or m.group("colour") if index else m.group("colour"), m.group("dir") or STILL


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    out = frames.astype(np.float64)
    for axis in (1, 2):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(4)], mode="edge")
        out = sum(w * np.take(padded, np.arange(i, i + frames.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --- the cases ----------------------------------------------------------------------------------------------


def test_cases_are_a_pure_function_of_the_seed_with_the_asked_share_of_changes():
    cases = held_out_cases(12, seed=3, change_fraction=0.5, colour_fraction=0.5)
    again = held_out_cases(12, seed=3, change_fraction=0.5, colour_fraction=0.5)
    assert [c.captions for c in cases] == [c.captions for c in again]
    # A prefix is the same cases: adding cases leaves the earlier ones (and their scores) alone.
    assert [c.captions for c in held_out_cases(5, seed=3, colour_fraction=0.5)] == [c.captions for c in cases[:5]]
    assert [c.captions for c in held_out_cases(12, seed=4)] != [c.captions for c in cases]
    kinds = [c.kind for c in cases]
    assert (kinds.count("steady"), kinds.count("direction"), kinds.count("colour")) == (6, 3, 3)
    assert all((c.first_change is None) == (c.kind == "steady") for c in cases)
    assert [c.kind for c in held_out_cases(4, seed=3, change_fraction=0.0)] == ["steady"] * 4
    assert all(c.kind == "direction" for c in held_out_cases(4, seed=3, change_fraction=1.0))


def test_captions_are_worded_as_the_data_and_say_the_ground_truth():
    cases = held_out_cases(16, seed=1, width=160, height=96, num_frames=72, colour_fraction=0.5)
    for case in cases:
        assert len(case.captions) == len(case.colours) == len(case.directions) == 3
        said = [read_caption(k, text) for k, text in enumerate(case.captions)]
        assert said == list(zip(case.colours, case.directions)), case.captions
        if case.kind == "steady":  # moving, the same way throughout
            assert len(set(said)) == 1 and said[0][1] != STILL
        elif case.kind == "direction":
            assert len(set(case.colours)) == 1 and len(set(case.directions)) > 1
        else:
            assert len(set(case.colours)) > 1
        # The ground-truth clip is the data generator's, captions included.
        assert render_clip(case.plan).captions == list(case.captions)


def test_case_arguments_are_checked_by_name():
    with pytest.raises(ValueError, match=r"num_frames \(24\) must be more than one chunk of 24 frames"):
        held_out_cases(2, num_frames=24)
    with pytest.raises(ValueError, match=r"change_fraction \(1.5\)"):
        held_out_cases(2, change_fraction=1.5)
    with pytest.raises(ValueError, match=r"cases \(0\) must be >= 1"):
        held_out_cases(0)


# --- synthetic_video's opt-in colour change -------------------------------------------------------------------


def clip_digest(seed: int, width: int, height: int, frames: int, fps: int) -> str:
    rng = np.random.default_rng(seed)
    clip = make_clip(rng, width, height, frames, fps)
    payload = clip.frames.tobytes() + json.dumps([clip.captions, clip.caption]).encode()
    return f"{hashlib.sha256(payload).hexdigest()}:{rng.integers(1 << 30)}"


def test_clips_without_colour_change_are_bit_identical_to_before_the_option():
    # Recorded with the code of commit 36df183, before plan_clip / colour_change existed; the number after the
    # colon is the generator's next draw, so the clip also consumes exactly the random numbers it did.
    assert clip_digest(3, 64, 48, 60, 24) == \
        "89f692f3ff10df8dc0db24b83752a7e99c4c1984fa4512cbb13ad302b7aab958:506064899"
    assert clip_digest(7, 96, 160, 72, 24) == \
        "0535f0d1b69bf4fef1f52ed8aa4a233694fb72cccba415e151cd30a24e61dfd6:751913965"
    assert clip_digest(11, 32, 32, 1, 24) == \
        "6412d6aeb0d882860a588f721f0369f0ca8799751f26db4920d63505844b8eec:901052327"


def test_colour_change_paints_and_words_the_new_colour():
    changed = 0
    for seed in range(6):
        clip = make_clip(np.random.default_rng(seed), 64, 64, 72, 24, colour_change=0.5)
        for shape in clip.shapes:
            for second in range(3):
                colour = shape.colour_at(second)
                # The shape's centre (inside every kind) half-way through the second is painted in that second's
                # colour, unless the other shape passes over it.
                x, y = np.rint(shape.path[24 * second + 12]).astype(int)
                assert tuple(clip.frames[24 * second + 12, y, x]) == COLOUR_RGB[colour] or len(clip.shapes) > 1
                if second and colour != shape.colour_at(second - 1):
                    changed += 1
                    assert f"the {shape.colour_at(second - 1)} {shape.kind} turns {colour} and " in \
                        clip.captions[second]
                    assert f"turns {colour} and " in clip.caption
    assert changed >= 3
    with pytest.raises(ValueError, match=r"colour_change \(2.0\) is a probability"):
        make_clip(np.random.default_rng(0), 64, 64, 48, 24, colour_change=2.0)


def test_max_shapes_one_keeps_the_first_shape_and_every_other_draw():
    two_shape = 0
    for seed in range(12):
        full = make_clip(np.random.default_rng(seed), 64, 64, 48, 24, colour_change=0.3)
        rng = np.random.default_rng(seed)
        one = make_clip(rng, 64, 64, 48, 24, colour_change=0.3, max_shapes=1)
        assert len(one.shapes) == 1
        if len(full.shapes) == 1:  # nothing to drop: the very same clip
            assert np.array_equal(one.frames, full.frames) and one.captions == full.captions
            continue
        two_shape += 1
        first = full.shapes[0]
        assert (one.shapes[0].kind, one.shapes[0].colour, one.shapes[0].radius) == (first.kind, first.colour, first.radius)
        assert np.array_equal(one.shapes[0].path, first.path)
        assert " while " not in one.caption and first.kind in one.caption
    assert two_shape >= 2
    with pytest.raises(ValueError, match=r"max_shapes \(3\) must be 1 or 2"):
        make_clip(np.random.default_rng(0), 64, 64, 48, 24, max_shapes=3)


# --- the detector on the data's own clips ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def truth():
    """Ground-truth clips of two sizes, 2 and 3 chunks, with direction and colour changes."""
    sets = {}
    for width, height, frames in ((160, 96, 48), (128, 128, 72)):
        cases = held_out_cases(8, seed=7, width=width, height=height, num_frames=frames, colour_fraction=0.5)
        sets[(width, height)] = (cases, [c.render() for c in cases])
    return sets


def scores(report) -> tuple[float, float, float]:
    return report.colour, report.direction, report.switch


def test_the_detector_reads_ground_truth_clips(truth):
    for (width, height), (cases, videos) in truth.items():
        report = score(cases, videos, f"truth {width}x{height}")
        assert min(scores(report)) >= 0.95, report.lines()


def test_quantise_is_the_captions_compass():
    for phrase, dx, dy in DIRECTIONS:
        assert quantise(dx, dy) == phrase
        # Within half a 45 degree sector of the heading, it is still that direction.
        angle = np.arctan2(dy, dx) + np.radians(20)
        assert quantise(np.cos(angle), np.sin(angle)) == phrase


def test_lossy_copies_still_score_high(truth, tmp_path):
    cases, videos = truth[(160, 96)]
    blurred = score(cases, [gaussian_blur(v, 2.0) for v in videos])
    assert min(scores(blurred)) >= 0.95, blurred.lines()
    decoded = []
    for i, video in enumerate(videos):
        write_mp4(tmp_path / f"{i}.mp4", video, 24, crf=35)  # a coarse x264: ringing, chroma subsampling
        decoded.append(read_video(tmp_path / f"{i}.mp4", 24, 96, 160).numpy())
    through_x264 = score(cases, decoded)
    assert min(scores(through_x264)) >= 0.95, through_x264.lines()


def test_clips_that_contradict_their_captions_score_low(truth):
    cases, videos = truth[(128, 128)]
    # Each case shown another case's clip: other colours, other motions.
    swapped = score(cases, videos[1:] + videos[:1])
    assert swapped.colour <= 0.5 and swapped.direction <= 0.5 and swapped.switch <= 0.5, swapped.lines()
    # Played backwards: every moving chunk goes the opposite way (the colours stay right, but a colour change
    # now comes in the wrong chunk).
    backwards = score(cases, [v[::-1].copy() for v in videos])
    assert backwards.direction <= 0.3 and backwards.switch <= 0.3, backwards.lines()
    # Repainted in another palette colour, moving exactly as asked: colour wrong, direction right.
    recoloured = []
    for case in cases:
        shape = case.plan.shapes[0]
        other = [c for c in PALETTE if c not in case.colours][0]
        plan = dataclasses.replace(case.plan, shapes=(dataclasses.replace(shape, colour=other, colours=()),))
        recoloured.append(render_clip(plan).frames)
    report = score(cases, recoloured)
    assert report.colour == 0.0 and report.switch == 0.0 and report.direction >= 0.95, report.lines()


def test_a_frame_without_a_shape_is_no_detection():
    background = np.full((48, 64, 64, 3), 100, np.uint8)  # plain grey: nothing painted on it
    assert [(d.colour, d.direction) for d in detect_chunks(background, 24)] == [(None, None)] * 2
    with pytest.raises(ValueError, match=r"frames must be uint8 \(T, H, W, 3\), got float64"):
        detect_chunks(background.astype(np.float64), 24)


# --- the generator seam ---------------------------------------------------------------------------------------


def test_evaluate_takes_any_generator_the_truth_scores_all_and_noise_little():
    cases = held_out_cases(6, seed=2, num_frames=48)
    by_captions = {c.captions: c for c in cases}
    calls = []

    def ground_truth(captions, num_frames, seed):
        calls.append((seed, num_frames))
        return by_captions[tuple(captions)].render()

    report = evaluate(ground_truth, cases, seed=100, label="truth")
    assert calls == [(100 + i, 48) for i in range(6)]  # case i: seed + i, whichever generator
    assert scores(report) == (1.0, 1.0, 1.0)

    def noise(captions, num_frames, seed):
        return np.random.default_rng(seed).integers(0, 256, (num_frames, 64, 64, 3), dtype=np.uint8)

    noisy = evaluate(noise, cases, label="noise")
    assert max(scores(noisy)) <= 0.35, noisy.lines()
    lines = table([report, noisy])
    assert lines[0].split() == ["run", "colour", "direction", "switch", "cases", "seconds"]
    assert lines[1].split()[:4] == ["truth", "100.0%", "100.0%", "100.0%"]
    as_json = json.loads(json.dumps(noisy.as_dict()))
    assert as_json["cases"] == 6 and len(as_json["per_case"]) == 6 and "detected_direction" in \
        as_json["per_case"][0]["chunks"][0]
    with pytest.raises(ValueError, match=r"case 0: 40 frames, but its 2 captions cover 48"):
        score_case(cases[0], np.zeros((40, 64, 64, 3), np.uint8))


# --- the tool's arguments -------------------------------------------------------------------------------------


def tool_error(capsys, *argv: str) -> str:
    from tools.eval_prompt_following import main

    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ((), r"nothing to evaluate: give --model DIR or one or more --run LABEL:MODEL_DIR:STEPS"),
    (("--run", "base"), r"--run 'base' is not LABEL:MODEL_DIR:STEPS"),
    (("--run", f"a:{TINY}:zero"), r"STEPS 'zero' must be a whole number >= 1"),
    (("--run", f"a:{TINY}:8", "--run", f"a:{TINY}:4"), r"run labels repeat \(\['a', 'a'\]\)"),
    (("--run", "a:/no/such/model:8"), r"run 'a': model /no/such/model does not exist"),
    (("--model", str(TINY), "--vae", "/no/such/vae"), r"--vae /no/such/vae is not a directory"),
    (("--model", str(TINY), "--size", "big"), r"--size 'big' is not WIDTHxHEIGHT"),
    (("--run", f"a:{TINY}:8", "--steps", "8"), r"--steps goes with --model"),
    (("--model", str(TINY), "--colour-fraction", "2"), r"--colour-fraction 2.0 must be in \[0, 1\]"),
])
def test_tool_argument_errors_name_the_problem(capsys, argv, message):
    assert re.search(message, tool_error(capsys, *argv))


def test_tool_refuses_what_cannot_be_scored_before_generating(capsys, tmp_path):
    # The tiny preset decodes with the latent-colour preview unless given a VAE.
    assert re.search(r"run 'a': .* decodes with the latent-colour preview .* pass --vae DIR",
                     tool_error(capsys, "--run", f"a:{TINY}:8"))
    vae = tmp_path / "vae"
    vae.mkdir()
    # A second run's bad steps stop the tool before the first run generates anything.
    err = tool_error(capsys, "--vae", str(vae), "--run", f"a:{TINY}:8", "--run", f"b:{TINY}:6")
    assert re.search(r"run 'b' .*sampler.num_steps=6 must be a positive multiple of sampler.window_size=4", err,
                     re.S)
    assert re.search(r"num_frames \(24\) must be more than one chunk",
                     tool_error(capsys, "--vae", str(vae), "--model", str(TINY), "--frames", "24"))
