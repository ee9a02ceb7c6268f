"""Dataset preparation pieces: buckets, resize/crop, fps resampling, input lists, captions, manifest and shards."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from magi_train.data.video_io import read_video
from magi_train.data.prepare import (MISSING_CAPTION, TOO_SHORT, UNDECODABLE, Bucket, Encoded, InputItem,
                                     InputListError, Manifest, PrepareError, ShardWriter, SkipClip, caption_rows,
                                     choose_bucket, load_clip, parse_buckets, read_inputs, resample_counts,
                                     resize_crop, resize_crop_geometry, sample_key)
from magi_train.data.synthetic_video import make_clip, parse_seconds, parse_sizes, write_mp4, write_png

BUCKETS = [Bucket(720, 1280), Bucket(1280, 720), Bucket(960, 960)]
SETTINGS = {"buckets": ["48x64"], "fps": 24}


# ---------------------------------------------------------------- buckets and resizing

@pytest.mark.parametrize("size, expected", [
    ((1080, 1920), Bucket(720, 1280)),  # 16:9 landscape
    ((480, 640), Bucket(720, 1280)),  # 4:3 is exactly half-way (in log-aspect) between 16:9 and 1:1: first listed
    ((480, 720), Bucket(720, 1280)),  # 3:2
    ((1920, 1080), Bucket(1280, 720)),
    ((500, 512), Bucket(960, 960)),
    ((100, 1000), Bucket(720, 1280)),  # extreme panorama: the widest bucket
])
def test_bucket_nearest_in_aspect_ratio(size, expected):
    assert choose_bucket(*size, BUCKETS) == expected


def test_bucket_distance_is_symmetric_in_log_aspect():
    # 2:1 and 1:2 are equally far from 1:1: a tie, which the first listed wins.
    assert choose_bucket(500, 500, [Bucket(500, 1000), Bucket(1000, 500)]) == Bucket(500, 1000)
    assert choose_bucket(500, 500, [Bucket(1000, 500), Bucket(500, 1000)]) == Bucket(1000, 500)
    # 4:3 is the geometric mean of 16:9 and 1:1: an exact tie, not decided by rounding.
    assert choose_bucket(3, 4, [Bucket(9, 16), Bucket(8, 8)]) == Bucket(9, 16)
    assert choose_bucket(3, 4, [Bucket(8, 8), Bucket(9, 16)]) == Bucket(8, 8)
    # Just off the tie, the nearer one wins in either order.
    for buckets in ([Bucket(9, 16), Bucket(8, 8)], [Bucket(8, 8), Bucket(9, 16)]):
        assert choose_bucket(300, 401, buckets) == Bucket(9, 16)
        assert choose_bucket(301, 400, buckets) == Bucket(8, 8)


def test_parse_buckets_names_the_bad_one():
    assert parse_buckets(["720x1280", " 480x832"], 16) == [Bucket(720, 1280), Bucket(480, 832)]
    with pytest.raises(PrepareError, match=r"'720x1000'.*multiples of 16"):
        parse_buckets(["720x1280", "720x1000"], 16)
    with pytest.raises(PrepareError, match=r"'wide' is not HEIGHTxWIDTH"):
        parse_buckets(["wide"], 16)


@pytest.mark.parametrize("source, target, expected", [
    ((1080, 1920), (720, 1280), (720, 1280, 0, 0)),  # same aspect: a plain resize
    ((1080, 1440), (720, 1280), (960, 1280, 120, 0)),  # 4:3 into 16:9: width fits, crop rows
    ((1920, 1080), (720, 1280), (2276, 1280, 778, 0)),  # portrait into landscape: width fits, crop a lot
    ((48, 64), (96, 96), (96, 128, 0, 16)),  # upscaling: height fits, crop columns
    ((100, 100), (64, 48), (64, 64, 0, 8)),
])
def test_resize_crop_geometry(source, target, expected):
    scaled_h, scaled_w, top, left = resize_crop_geometry(*source, *target)
    assert (scaled_h, scaled_w, top, left) == expected
    assert scaled_h >= target[0] and scaled_w >= target[1]  # the target is always covered


def test_resize_crop_keeps_the_centre():
    # A 40x120 frame in three vertical bands (red | green | blue), cropped to a square: only green survives.
    rgb = np.zeros((40, 120, 3), np.uint8)
    rgb[:, :40, 0] = rgb[:, 40:80, 1] = rgb[:, 80:, 2] = 255
    out = resize_crop(av.VideoFrame.from_ndarray(rgb, format="rgb24"), Bucket(32, 32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 4:-4, 1].min() > 240 and out[:, 4:-4, [0, 2]].max() < 15


# ---------------------------------------------------------------- frame-rate resampling

def fps_filter_counts(times: list[Fraction], end: Fraction, fps: int) -> list[int]:
    """ffmpeg's fps filter written out directly: output k shows the last frame whose slot round(t*fps) <= k,
    for k < round(end * fps)."""
    slots = [math.floor(t * fps + Fraction(1, 2)) for t in times]
    total = max(math.floor(end * fps + Fraction(1, 2)), 1)
    counts = [0] * len(times)
    for k in range(total):
        counts[max(i for i, s in enumerate(slots) if s <= k or i == 0)] += 1
    return counts


@pytest.mark.parametrize("source_fps, frames, expected_total", [(24, 48, 48), (30, 60, 48), (12, 12, 24),
                                                                 (25, 50, 48), (60, 30, 12)])
def test_resampling_to_24_fps(source_fps, frames, expected_total):
    times = [Fraction(i, source_fps) for i in range(frames)]
    counts = resample_counts(times, 24, durations=[Fraction(1, source_fps)] * frames)
    assert sum(counts) == expected_total  # the output lasts as long as the source
    assert counts == fps_filter_counts(times, Fraction(frames, source_fps), 24)
    if source_fps == 24:
        assert counts == [1] * frames
    if source_fps == 12:
        assert counts == [2] * frames  # every frame shown twice
    if source_fps == 30:
        assert counts.count(0) == 12  # one in five dropped


def test_resampling_uses_timestamps_not_frame_indices():
    # Variable frame rate: a 12-frame (0.5 s) gap is filled by repeating the frame before it; the start time (10 s)
    # does not matter.
    times = [Fraction(10) + Fraction(i, 24) for i in range(12)] + [Fraction(10) + Fraction(1) + Fraction(i, 24)
                                                                   for i in range(12)]
    counts = resample_counts(times, 24)
    assert sum(counts) == 36 and counts[11] == 13  # frame 11 holds until the next one at t = 1 s
    assert counts[:11] == [1] * 11 and counts[12:] == [1] * 12


def test_resampling_limit_and_single_frame():
    times = [Fraction(i, 24) for i in range(100)]
    assert sum(resample_counts(times, 24, limit=24)) == 24
    assert resample_counts([Fraction(0)], 24) == [1]  # a lone frame without a duration still gives one frame


def write_clip(path: Path, frames: int, fps: int, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    clip = make_clip(np.random.default_rng(seed), width, height, frames, fps)
    write_mp4(path, clip.frames, fps)
    return path


@pytest.mark.parametrize("source_fps, frames, available", [(30, 45, 36), (12, 18, 36), (24, 50, 50)])
def test_load_clip_resamples_and_keeps_whole_chunks(tmp_path, source_fps, frames, available):
    path = write_clip(tmp_path / "clip.mp4", frames, source_fps)
    clip = load_clip(InputItem("clip.mp4", path), [Bucket(48, 64)], fps=24, chunk_frames=24)
    assert clip.available == available and clip.frames.shape == (available // 24 * 24, 48, 64, 3)
    assert clip.source_size == (48, 64) and clip.bucket == Bucket(48, 64)
    # Same frames as the inference reader's ffmpeg-style resampling (no resize: the bucket is the source size).
    reference = read_video(path, 24, 48, 64)
    assert len(reference) == available and torch.equal(torch.from_numpy(clip.frames), reference[: len(clip.frames)])


def test_load_clip_crops_to_the_nearest_bucket_and_caps_length(tmp_path):
    path = write_clip(tmp_path / "tall.mp4", 80, 24, width=48, height=64)
    clip = load_clip(InputItem("tall.mp4", path), [Bucket(32, 64), Bucket(64, 32)], fps=24, chunk_frames=24,
                     max_frames=48)
    assert clip.bucket == Bucket(64, 32) and clip.frames.shape == (48, 64, 32, 3)


def test_load_clip_image_and_bad_inputs(tmp_path):
    write_png(tmp_path / "still.png", np.full((40, 40, 3), 200, np.uint8))
    image = load_clip(InputItem("still.png", tmp_path / "still.png"), [Bucket(32, 32)], 24, 24)
    assert image.frames.shape == (1, 32, 32, 3)

    short = write_clip(tmp_path / "short.mp4", 20, 24)
    with pytest.raises(SkipClip, match="20 frames at 24 fps") as e:
        load_clip(InputItem("short.mp4", short), [Bucket(48, 64)], 24, 24)
    assert e.value.reason == TOO_SHORT

    (tmp_path / "garbage.mp4").write_bytes(b"\x00not a video" * 100)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(write_clip(tmp_path / "whole.mp4", 48, 24).read_bytes()[:1500])
    for name in ("garbage.mp4", "truncated.mp4"):
        with pytest.raises(SkipClip) as e:
            load_clip(InputItem(name, tmp_path / name), [Bucket(48, 64)], 24, 24)
        assert e.value.reason == UNDECODABLE


# ---------------------------------------------------------------- input lists

def test_jsonl_list(tmp_path):
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "train.jsonl"
    lst.write_text('{"path": "../clips/a.mp4", "caption": " a cat "}\n\n'
                   '{"path": "/abs/b.png", "captions": ["one", "two"]}\n')
    a, b = read_inputs(lst)
    assert (a.source, a.path, a.caption, a.captions) == ("../clips/a.mp4", tmp_path / "lists/../clips/a.mp4",
                                                         "a cat", ())
    assert (b.path, b.captions, b.caption, b.kind) == (Path("/abs/b.png"), ("one", "two"), None, "image")
    assert a.where == f"{lst}:1" and b.where == f"{lst}:3"


@pytest.mark.parametrize("line, message", [
    ('{"path": "a.mp4", "caption": "x"', "not valid JSON"),
    ('["a.mp4"]', "expected a JSON object"),
    ('{"caption": "x"}', "missing or empty 'path'"),
    ('{"path": "a.mp4", "captions": "one"}', "'captions' must be a list of strings"),
    ('{"path": "a.mp4", "caption": 3}', "'caption' must be a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    lst = tmp_path / "bad.jsonl"
    lst.write_text('{"path": "ok.mp4", "caption": "fine"}\n' + line + "\n")
    with pytest.raises(InputListError, match=rf"bad\.jsonl:2: .*{message}"):
        read_inputs(lst)


def test_csv_list(tmp_path):
    lst = tmp_path / "list.csv"
    lst.write_text('path,caption,captions,score\n'
                   'a.mp4,"a dog, running",,0.5\n'
                   'b.mp4,,"[""first second"", ""second second""]",0.1\n')
    a, b = read_inputs(lst)
    assert (a.source, a.path, a.caption, a.captions) == ("a.mp4", tmp_path / "a.mp4", "a dog, running", ())
    assert (b.caption, b.captions, b.where) == (None, ("first second", "second second"), f"{lst}:3")


@pytest.mark.parametrize("text, message", [
    ("file,caption\na.mp4,x\n", r"list\.csv:1: the header .* has no 'path' column"),
    ("path,caption\na.mp4,x\nb.mp4,a dog, running\n", r"list\.csv:3: 3 fields where the header has 2"),
    ("path,caption\na.mp4,x\n,y\n", r"list\.csv:3: empty 'path'"),
    ('path,captions\na.mp4,"[""x"""\n', r"list\.csv:2: 'captions' is not a JSON list"),
])
def test_csv_errors_name_file_and_line(tmp_path, text, message):
    lst = tmp_path / "list.csv"
    lst.write_text(text)
    with pytest.raises(InputListError, match=message):
        read_inputs(lst)


def test_folder_with_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("a.mp4", "sub/b.MOV", "c.png", "d.webm", "e.mkv", ".hidden/x.mp4", "notes.txt", "f.gif"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a.json").write_text(json.dumps({"caption": "whole", "captions": ["s1", "s2"]}))
    (tmp_path / "sub" / "b.txt").write_text("  a boat\n drifts  \n")
    (tmp_path / "d.json").write_text("{broken")
    items = {i.source: i for i in read_inputs(tmp_path)}
    assert sorted(items) == ["a.mp4", "c.png", "d.webm", "e.mkv", "sub/b.MOV"]
    assert (items["a.mp4"].caption, items["a.mp4"].captions) == ("whole", ("s1", "s2"))
    assert items["sub/b.MOV"].caption == "a boat drifts" and items["sub/b.MOV"].kind == "video"
    assert items["c.png"].kind == "image" and "no caption file (c.json or c.txt)" in items["c.png"].problem
    assert str(tmp_path / "d.json") in items["d.webm"].problem  # a broken sidecar skips the clip, not the run


def test_unknown_input(tmp_path):
    with pytest.raises(InputListError, match="does not exist"):
        read_inputs(tmp_path / "nope.jsonl")
    (tmp_path / "list.txt").write_text("a.mp4\n")
    with pytest.raises(InputListError, match=r"expected a folder, a \.csv or a \.jsonl"):
        read_inputs(tmp_path / "list.txt")


def test_caption_rows():
    item = InputItem("a.mp4", Path("a.mp4"), captions=("s1", "s2", "s3"), caption="whole")
    assert caption_rows(item) == (["s1", "s2", "s3"], 3)  # per-chunk captions win and bound the chunks
    assert caption_rows(InputItem("a.mp4", Path("a.mp4"), ("first",), "whole")) == (["whole"], None)
    assert caption_rows(InputItem("a.mp4", Path("a.mp4"), ("first",))) == (["first"], None)
    for bad in (InputItem("a.mp4", Path("a.mp4")), InputItem("a.mp4", Path("a.mp4"), ("s1", "")),
                InputItem("a.mp4", Path("a.mp4"), caption="x", problem="broken sidecar")):
        with pytest.raises(SkipClip) as e:
            caption_rows(bad)
        assert e.value.reason == MISSING_CAPTION


def test_sample_key_is_stable_unique_and_dot_free():
    keys = {sample_key(s) for s in ("clips/a.b.mp4", "clips/a_b.mp4", "other/a.b.mp4")}
    assert len(keys) == 3 and all("." not in k and "/" not in k for k in keys)
    assert sample_key("clips/a.b.mp4") == sample_key("clips/a.b.mp4") and sample_key("x/a.b.mp4").startswith("a_b-")


# ---------------------------------------------------------------- manifest, shards, resume

def fake(source: str) -> Encoded:
    key = sample_key(source)
    return Encoded(source, key, {"__key__": key, "json": json.dumps({"source": source}).encode()})


def write_shards(out: Path, sources: list[str], per_shard: int) -> Manifest:
    manifest, _ = Manifest.open(out, SETTINGS, resume=True)
    writer = ShardWriter(manifest, per_shard)
    for s in sources:
        writer.add(fake(s))
    writer.close()
    return manifest


def test_shards_and_manifest(tmp_path):
    manifest = write_shards(tmp_path, [f"c{i}.mp4" for i in range(5)], per_shard=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl", "prepare.json", "shard-000000.tar",
                                                         "shard-000001.tar", "shard-000002.tar"]
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [(e["shard"], e["samples"], e["sources"]) for e in lines] == [
        ("shard-000000.tar", 2, ["c0.mp4", "c1.mp4"]), ("shard-000001.tar", 2, ["c2.mp4", "c3.mp4"]),
        ("shard-000002.tar", 1, ["c4.mp4"])]
    assert manifest.samples == 5 and manifest.next_index == 3
    import webdataset

    keys = [s["__key__"] for s in webdataset.WebDataset(str(tmp_path / "shard-00000{0..2}.tar"), shardshuffle=False)]
    assert keys == [sample_key(f"c{i}.mp4") for i in range(5)]


def test_output_folder_needs_resume_and_the_same_settings(tmp_path):
    write_shards(tmp_path, ["a.mp4"], 2)
    with pytest.raises(PrepareError, match="already holds a dataset.*pass --resume"):
        Manifest.open(tmp_path, SETTINGS, resume=False)
    with pytest.raises(PrepareError, match=r"other settings.*fps: was 24, now 30"):
        Manifest.open(tmp_path, {**SETTINGS, "fps": 30}, resume=True)
    manifest, notes = Manifest.open(tmp_path, SETTINGS, resume=True)
    assert manifest.sources == {"a.mp4"} and notes == []


def test_resume_redoes_missing_and_interrupted_shards(tmp_path):
    write_shards(tmp_path, ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4"], 2)
    (tmp_path / "shard-000002.tar").unlink()  # deleted by hand (or a crash between manifest line and rename)
    (tmp_path / "shard-000003.tar.partial").write_bytes(b"half a shard")  # a run that died mid-shard
    manifest, notes = Manifest.open(tmp_path, SETTINGS, resume=True)
    assert manifest.sources == {"a.mp4", "b.mp4", "c.mp4", "d.mp4"} and manifest.next_index == 2
    assert not (tmp_path / "shard-000003.tar.partial").exists()
    assert any("shard-000002.tar is in the manifest but missing" in n for n in notes)
    assert any("discarded the interrupted shard shard-000003.tar.partial" in n for n in notes)
    # The manifest is rewritten without the dead line, so the next shard can take its number.
    writer = ShardWriter(manifest, 2)
    writer.add(fake("e.mp4"))
    writer.close()
    assert writer.written == ["shard-000002.tar"]
    again, _ = Manifest.open(tmp_path, SETTINGS, resume=True)
    assert sorted(s for e in again.entries for s in e["sources"]) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4"]


def test_manifest_damage(tmp_path):
    write_shards(tmp_path, ["a.mp4", "b.mp4"], 1)
    path = tmp_path / "manifest.jsonl"
    good = path.read_text()
    path.write_text(good + '{"shard": "shard-000002.tar", "sam')  # a crash while appending: not committed
    manifest, notes = Manifest.open(tmp_path, SETTINGS, resume=True)
    assert manifest.sources == {"a.mp4", "b.mp4"} and any("incomplete last line" in n for n in notes)
    path.write_text("garbage\n" + good)
    with pytest.raises(PrepareError, match=r"manifest\.jsonl:1: not a manifest entry"):
        Manifest.open(tmp_path, SETTINGS, resume=True)
    path.write_text(good.splitlines()[0] + "\n")  # shard-000001.tar is now unaccounted for
    with pytest.raises(PrepareError, match=r"shard-000001\.tar not recorded in manifest\.jsonl"):
        Manifest.open(tmp_path, SETTINGS, resume=True)


def test_abort_leaves_no_partial_shard(tmp_path):
    manifest, _ = Manifest.open(tmp_path, SETTINGS, resume=False)
    writer = ShardWriter(manifest, 10)
    writer.add(fake("a.mp4"))
    assert (tmp_path / "shard-000000.tar.partial").exists()
    writer.abort()
    assert not any(p.name.startswith("shard-") for p in tmp_path.iterdir()) and manifest.entries == []


# ---------------------------------------------------------------- synthetic videos

def test_synthetic_clip_captions():
    clip = make_clip(np.random.default_rng(3), 64, 48, 60, 24)
    assert clip.frames.shape == (60, 48, 64, 3) and len(clip.captions) == 3  # seconds 0, 1 and a partial 2
    assert clip.captions[0].startswith(("a ", "an ")) and "background" in clip.captions[0]
    assert all(c.startswith("the ") and "background" not in c for c in clip.captions[1:])
    assert any(w in clip.captions[0] for w in ("circle", "square", "triangle"))
    again = make_clip(np.random.default_rng(3), 64, 48, 60, 24)
    assert np.array_equal(clip.frames, again.frames) and clip.captions == again.captions


def test_synthetic_option_parsing():
    assert parse_sizes("64x48, 32x32") == [(64, 48), (32, 32)]
    assert parse_seconds("1-3") == (1.0, 3.0) and parse_seconds("2") == (2.0, 2.0)
    with pytest.raises(ValueError, match="even"):
        parse_sizes("63x48")
    with pytest.raises(ValueError, match="range"):
        parse_seconds("3-1")


def test_synthetic_dataset_is_a_function_of_the_seed(tmp_path):
    from magi_train.data.synthetic_video import make_dataset

    def make(out: Path, seed: int) -> dict[str, bytes]:
        make_dataset(out, num_videos=2, num_images=1, fps=24, seconds=(1.0, 1.5), sizes=[(32, 32), (48, 32)],
                     seed=seed, sidecars=True)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    first, again, other = make(tmp_path / "a", 0), make(tmp_path / "b", 0), make(tmp_path / "c", 1)
    assert sorted(first) == ["captions.jsonl", "clip_0000.json", "clip_0000.mp4", "clip_0001.json", "clip_0001.mp4",
                             "image_0000.json", "image_0000.png"]
    assert first == again and first["captions.jsonl"] != other["captions.jsonl"]
    entries = [json.loads(line) for line in first["captions.jsonl"].decode().splitlines()]
    items = read_inputs(tmp_path / "a" / "captions.jsonl")  # the list is one prepare_dataset reads
    assert [i.source for i in items] == ["clip_0000.mp4", "clip_0001.mp4", "image_0000.png"]
    assert [list(i.captions) for i in items] == [e["captions"] for e in entries]
    assert read_video(tmp_path / "a" / "clip_0001.mp4", 24, 32, 48).shape[1:] == (32, 48, 3)  # sizes cycle


def test_text_encoder_specs():
    from magi_train.data.prepare import HashCaptions, PrepareError, parse_text_encoder

    assert parse_text_encoder("hash:32") == ("hash", "32")
    assert parse_text_encoder("hash_bigram:64") == ("hash_bigram", "64")
    for bad in ("hash", "hash:0", "hash_bigram:x", "bigram:8", "t5:"):
        with pytest.raises(PrepareError, match="hash_bigram:DIM"):
            parse_text_encoder(bad)
    texts = ["a red circle moves left on the right"]
    plain, plain_lengths = HashCaptions(16, 32).encode(texts)
    pairs, pair_lengths = HashCaptions(16, 32, bigrams=True).encode(texts)
    assert plain.shape == pairs.shape == (1, 8, 16) and plain_lengths.tolist() == pair_lengths.tolist() == [8]
    assert not torch.allclose(plain, pairs)
