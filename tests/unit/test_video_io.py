"""Video input/output: the streamed fragmented mp4, the i2v image, the v2v prefix video and its fps resampling."""

from __future__ import annotations

import math
import os
import stat
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from magi_train.data.video_io import StreamingMp4Writer, probe_video, read_image, read_video

W, H = 64, 48
LEVEL = 8  # grey level step per frame index in the index-coded clips; survives h264 comfortably


def moving_square(n: int) -> np.ndarray:
    """n frames (n, H, W, 3): a red 12x12 square moving right across a blue-green gradient."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    frames[..., 1] = np.linspace(40, 200, W, dtype=np.uint8)[None, None, :]
    frames[..., 2] = 120
    for i in range(n):
        x = 2 + i * (W - 16) // max(n - 1, 1)
        frames[i, 18:30, x : x + 12] = (230, 20, 20)
    return frames


def index_coded(n: int) -> np.ndarray:
    """n grey frames whose level encodes their index: LEVEL * i."""
    return np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * LEVEL, H * W * 3).reshape(n, H, W, 3)


def decoded_indices(video: torch.Tensor) -> list[int]:
    return [round(frame.float().mean().item() / LEVEL) for frame in video]


def write_clip(path: Path, frames: np.ndarray, fps: float, crf: int | None = None, overwrite: bool = False) -> Path:
    with StreamingMp4Writer(path, W, H, fps, crf=crf, overwrite=overwrite) as writer:
        writer.write(frames)
    return path


def write_plain_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """An ordinary (moov at the end, not fragmented) mp4, written with PyAV directly."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_image(path: Path, rgb: np.ndarray, codec: str, pix_fmt: str) -> None:
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream(codec)
        stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], pix_fmt
        container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)))
        container.mux(stream.encode(None))


def ffmpeg_fps_filter_indices(path: Path, fps: Fraction) -> list[int]:
    """Which frames ffmpeg's own `fps` filter picks, run through libavfilter: the oracle for read_video."""
    picked = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        graph.link_nodes(graph.add_buffer(template=stream), graph.add("fps", str(fps)), graph.add("buffersink"))
        graph.configure()

        def drain() -> None:
            while True:
                try:
                    frame = graph.vpull()
                except (av.BlockingIOError, av.EOFError):
                    return
                picked.append(round(frame.to_ndarray(format="rgb24").mean() / LEVEL))

        for frame in container.decode(stream):
            graph.vpush(frame)
            drain()
        graph.vpush(None)
        drain()
    return picked


# ---------------------------------------------------------------------------------------------------------------
# Writer


def test_round_trip_in_several_writes(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    frames = moving_square(30)
    with StreamingMp4Writer(path, W, H, 24) as writer:
        writer.write(frames[:7])
        writer.write(torch.from_numpy(frames[7:8]))  # a torch tensor, a single frame
        writer.write(frames[8:20])
        writer.write(torch.from_numpy(frames[20:]))
        assert writer.frames_written == 30

    info = probe_video(path)
    assert (info.frames, info.width, info.height, info.fps) == (30, W, H, 24.0)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")

    back = read_video(path, 24, H, W)  # same rate: every frame exactly once
    assert back.shape == (30, H, W, 3) and back.dtype == torch.uint8
    mae = (back.float() - torch.from_numpy(frames).float()).abs().mean().item()
    print(f"round-trip mean abs error at x264 default quality (crf 23): {mae:.2f} / 255")
    assert mae < 4.0, mae
    # The square is where it should be in every frame: its red centre of mass is within half a pixel of the
    # drawn centre (it moves 1.66 pixels a frame, so a dropped, repeated or reordered frame shows).
    red = back[:, 18:30, :, 0].float().mean(dim=1)  # (T, W)
    centre = (red * torch.arange(W)).sum(dim=1) / red.sum(dim=1)
    drawn = torch.tensor([2 + i * (W - 16) // 29 + 5.5 for i in range(30)])
    assert (centre - drawn).abs().max() < 0.5, (centre - drawn).abs().max()

    # Streamable layout: an empty moov up front, then fragments.
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"moof") < data.index(b"mdat")
    assert data.count(b"moof") >= 30


def test_partial_file_is_a_live_preview(tmp_path: Path) -> None:
    path = tmp_path / "live.mp4"
    frames = moving_square(30)
    with StreamingMp4Writer(path, W, H, 24) as writer:
        partial = writer.partial_path
        assert partial.parent == tmp_path and partial.name.startswith(".live.mp4.") and partial.suffix == ".partial"
        assert partial.exists()
        for start in (0, 10, 20):
            writer.write(frames[start : start + 10])
            preview = probe_video(partial)
            # Each frame is its own fragment, flushed when the next one starts: all but the newest are readable.
            assert preview.frames == writer.frames_written - 1
            assert (preview.width, preview.height, preview.codec) == (W, H, "h264")
            assert not path.exists()
    assert path.exists() and not partial.exists()
    assert probe_video(path).frames == 30


def test_error_inside_writer_leaves_no_final_file(tmp_path: Path) -> None:
    path = tmp_path / "crash.mp4"
    with pytest.raises(RuntimeError, match="generation failed"):
        with StreamingMp4Writer(path, W, H, 24) as writer:
            writer.write(moving_square(10))
            raise RuntimeError("generation failed")
    assert not path.exists()
    # The .partial file is finished with the frames written before the error.
    assert probe_video(writer.partial_path).frames == 10


def test_error_keeps_an_older_file_at_the_final_path(tmp_path: Path) -> None:
    path = tmp_path / "old.mp4"
    path.write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt):
        with StreamingMp4Writer(path, W, H, 24, overwrite=True) as writer:
            writer.write(moving_square(3))
            raise KeyboardInterrupt
    assert path.read_bytes() == b"previous result"


@pytest.mark.parametrize("width, height", [(63, 48), (64, 47), (0, 48)])
def test_odd_or_empty_size_is_rejected(tmp_path: Path, width: int, height: int) -> None:
    with pytest.raises(ValueError, match="even width and height"):
        StreamingMp4Writer(tmp_path / "odd.mp4", width, height, 24)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, H, W, 4), np.uint8),  # RGBA
        np.zeros((2, W, H, 3), np.uint8),  # transposed
        np.zeros((H, W, 3), np.uint8),  # no time axis
        np.zeros((2, H, W, 3), np.float32),  # not uint8
    ],
)
def test_wrong_frames_are_rejected_naming_the_expected_shape(tmp_path: Path, frames: np.ndarray) -> None:
    with StreamingMp4Writer(tmp_path / "bad.mp4", W, H, 24) as writer:
        with pytest.raises(ValueError, match=r"\(T, 48, 64, 3\)"):
            writer.write(frames)
        writer.write(moving_square(1))
    assert probe_video(tmp_path / "bad.mp4").frames == 1


def test_write_after_close_is_an_error(tmp_path: Path) -> None:
    writer = StreamingMp4Writer(tmp_path / "done.mp4", W, H, 24)
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(moving_square(1))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_every_accepted_extension_is_a_playable_video_of_its_kind(tmp_path: Path) -> None:
    for name, brand in [("clip.mp4", b"iso"), ("clip.m4v", b"M4V "), ("clip.mov", b"qt  ")]:
        path = write_clip(tmp_path / name, moving_square(6), 24)
        info = probe_video(path)
        assert (info.frames, info.codec, info.width, info.height) == (6, "h264", W, H), name
        assert path.read_bytes()[8:12].startswith(brand), name  # ftyp's major brand
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["notes.txt", "clip.mkv", "clip", "clip.mp4.partial"])
def test_an_extension_that_is_not_our_container_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"extension .* is not a video container this writer makes"):
        StreamingMp4Writer(tmp_path / name, W, H, 24)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_kept_without_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "taken.mp4"
    path.write_bytes(b"someone's video")
    with pytest.raises(FileExistsError, match="taken.mp4 already exists .* without overwrite=true"):
        StreamingMp4Writer(path, W, H, 24, overwrite=False)
    assert path.read_bytes() == b"someone's video" and leftovers(tmp_path) == []
    old = os.umask(0o022)
    try:  # the temporary file is created private (0600); the published video gets the usual mode
        write_clip(path, moving_square(2), 24, overwrite=True)
    finally:
        os.umask(old)
    assert probe_video(path).frames == 2 and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_directory_or_a_missing_parent_is_refused_before_encoding(tmp_path: Path) -> None:
    (tmp_path / "d.mp4").mkdir()
    for overwrite in (False, True):
        with pytest.raises(IsADirectoryError, match="d.mp4 is a directory"):
            StreamingMp4Writer(tmp_path / "d.mp4", W, H, 24, overwrite=overwrite)
    with pytest.raises(FileNotFoundError, match="directory .*nowhere does not exist"):
        StreamingMp4Writer(tmp_path / "nowhere" / "x.mp4", W, H, 24)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mp4"]


def test_a_symlink_planted_at_the_old_partial_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    planted = tmp_path / "out.mp4.partial"
    planted.symlink_to(victim)
    write_clip(tmp_path / "out.mp4", moving_square(4), 24)
    assert victim.read_bytes() == b"precious"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    assert probe_video(tmp_path / "out.mp4").frames == 4


def test_a_symlink_at_the_output_name_is_replaced_or_refused_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.mp4"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.mp4"
    out.symlink_to(victim)
    with pytest.raises(FileExistsError, match="a symlink"):
        StreamingMp4Writer(out, W, H, 24, overwrite=False)
    dangling = tmp_path / "dangling.mp4"
    dangling.symlink_to(tmp_path / "absent.mp4")
    with pytest.raises(FileExistsError, match="dangling.mp4 already exists"):
        StreamingMp4Writer(dangling, W, H, 24, overwrite=False)
    assert not (tmp_path / "absent.mp4").exists()

    with StreamingMp4Writer(out, W, H, 24, overwrite=True) as writer:
        writer.write(moving_square(3))
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink() and probe_video(out).frames == 3


def test_two_writers_to_one_path_publish_exactly_one_complete_video(tmp_path: Path) -> None:
    path = tmp_path / "race.mp4"
    first = StreamingMp4Writer(path, W, H, 24, overwrite=False, low_latency=True)
    second = StreamingMp4Writer(path, W, H, 24, overwrite=False)
    assert first.partial_path != second.partial_path
    first.write(index_coded(5))
    second.write(index_coded(7)[::-1].copy())
    first.close()
    with pytest.raises(FileExistsError, match=rf"race.mp4 appeared .*kept at {second.partial_path}"):
        second.close()
    assert decoded_indices(read_video(path, 24, H, W)) == [0, 1, 2, 3, 4]  # the first writer's, complete
    assert decoded_indices(read_video(second.partial_path, 24, H, W)) == [6, 5, 4, 3, 2, 1, 0]
    assert leftovers(tmp_path) == [second.partial_path.name]


# ---------------------------------------------------------------------------------------------------------------
# Image


QUADRANTS = {
    "top_left": (255, 0, 0),
    "top_right": (0, 255, 0),
    "bottom_left": (0, 0, 255),
    "bottom_right": (255, 255, 255),
}


def quadrant_image(height: int, width: int) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    img[:h, :w], img[:h, w:] = QUADRANTS["top_left"], QUADRANTS["top_right"]
    img[h:, :w], img[h:, w:] = QUADRANTS["bottom_left"], QUADRANTS["bottom_right"]
    return img


@pytest.mark.parametrize(
    "ext, codec, pix_fmt, tolerance", [("png", "png", "rgb24", 2), ("jpg", "mjpeg", "yuvj420p", 8)]
)
def test_read_image_resizes_without_keeping_aspect(
    tmp_path: Path, ext: str, codec: str, pix_fmt: str, tolerance: int
) -> None:
    path = tmp_path / f"quadrants.{ext}"
    write_image(path, quadrant_image(30, 100), codec, pix_fmt)  # 10:3 source into a 4:3 target
    img = read_image(path, H, W)
    assert img.shape == (1, H, W, 3) and img.dtype == torch.uint8
    # "fit" stretches: each quadrant still fills exactly a quarter of the target, so the centre of each
    # target quarter has that quadrant's colour.
    centres = {"top_left": (12, 16), "top_right": (12, 48), "bottom_left": (36, 16), "bottom_right": (36, 48)}
    for name, (y, x) in centres.items():
        got = img[0, y, x].int()
        assert (got - torch.tensor(QUADRANTS[name])).abs().max() <= tolerance, (name, got.tolist())


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png", H, W)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="junk.png"):
        read_image(junk, H, W)


# ---------------------------------------------------------------------------------------------------------------
# Video


def expected_fps_indices(n_source: int, source_fps: Fraction, fps: Fraction) -> list[int]:
    """ffmpeg's fps filter, from its definition: source frame i sits in slot round(i * fps / source_fps), halves
    up; output k shows the last frame whose slot is <= k; the output lasts round(n_source * fps / source_fps)."""
    slots = [math.floor(Fraction(i) * fps / source_fps + Fraction(1, 2)) for i in range(n_source)]
    n_out = math.floor(Fraction(n_source) * fps / source_fps + Fraction(1, 2))
    return [max(i for i in range(n_source) if slots[i] <= k) for k in range(n_out)]


def test_read_video_resamples_30_to_24_fps(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "coded30.mp4", index_coded(30), 30, crf=0)
    video = read_video(path, 24, H, W)
    assert video.shape == (24, H, W, 3)
    picked = decoded_indices(video)
    assert picked == expected_fps_indices(30, Fraction(30), Fraction(24))
    # Spelled out: one source frame in five is dropped, starting with frame 2.
    assert picked[:8] == [0, 1, 3, 4, 5, 6, 8, 9]


@pytest.mark.parametrize("n, source_fps, fps", [(30, 30, 24), (24, 24, 30), (25, 25, 24), (10, 10, 24), (7, 60, 24)])
def test_read_video_matches_ffmpeg_fps_filter(tmp_path: Path, n: int, source_fps: int, fps: int) -> None:
    path = write_clip(tmp_path / "coded.mp4", index_coded(n), source_fps, crf=0)
    picked = decoded_indices(read_video(path, fps, H, W))
    assert picked == expected_fps_indices(n, Fraction(source_fps), Fraction(fps))
    assert picked == ffmpeg_fps_filter_indices(path, Fraction(fps))


def test_read_video_scales_and_limits_frames(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "coded.mp4", index_coded(30), 30, crf=0)
    full = read_video(path, 24, 24, 32)
    assert full.shape == (24, 24, 32, 3)
    first5 = read_video(path, 24, 24, 32, max_frames=5)
    assert torch.equal(first5, full[:5])
    assert torch.equal(read_video(path, 24, 24, 32, max_frames=1000), full)
    with pytest.raises(ValueError, match="max_frames"):
        read_video(path, 24, H, W, max_frames=0)


def test_read_video_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4", 24, H, W)

    plain = tmp_path / "truncated.mp4"
    write_plain_mp4(plain, moving_square(20), 24)
    plain.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])  # loses the moov at the end
    with pytest.raises(ValueError, match="truncated.mp4"):
        read_video(plain, 24, H, W)

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="junk.mp4"):
        probe_video(junk)

    empty = tmp_path / "empty.mp4"
    StreamingMp4Writer(empty, W, H, 24).close()  # a valid container with no frames
    with pytest.raises(ValueError, match="empty.mp4 contains no decodable frames"):
        read_video(empty, 24, H, W)


def test_truncated_fragmented_file_keeps_the_complete_fragments(tmp_path: Path) -> None:
    path = write_clip(tmp_path / "frag.mp4", moving_square(30), 24)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: data.index(b"moof", len(data) // 2) - 4])  # cut at a fragment boundary
    info = probe_video(cut)
    assert 0 < info.frames < 30
    assert read_video(cut, 24, H, W).shape[0] == info.frames


def test_probe_video_tells_a_truncated_file_and_the_frames_read_video_yields(tmp_path: Path) -> None:
    plain = tmp_path / "faststart.mp4"
    with av.open(str(plain), "w", format="mp4", options={"movflags": "faststart"}) as container:  # moov up front
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        noise = np.random.default_rng(0).integers(0, 256, (30, H, W, 3), dtype=np.uint8)  # frames of similar size
        for i, rgb in enumerate(noise):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    whole = probe_video(plain)
    assert (whole.frames, whole.header_frames, whole.truncated) == (30, 30, False)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(plain.read_bytes()[: plain.stat().st_size * 6 // 10])
    info = probe_video(cut)
    assert info.header_frames == 30 and 0 < info.frames < 30 and info.truncated
    for fps in (24, 12, 30):
        assert info.frames_at(fps) == read_video(cut, fps, H, W).shape[0]
        assert whole.frames_at(fps) == read_video(plain, fps, H, W).shape[0]
