"""tools/make_synthetic_dataset.py and tools/prepare_dataset.py run as users run them: real mp4s and a PNG in, shards
out; bad inputs skipped and reported; an interrupted dataset resumed without duplicates."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset

from magi_train.model.vae import VaeCodec, ViTVAE
from magi_train.data.video_io import read_image, read_video
from magi_train.data.shards import Sample, decode_sample
from magi_train.data.synthetic_video import write_mp4
from magi_train.model.text.hash import HashTextEncoder, tokenize
from tests.tiny_assets import make_t5, make_vae

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BUCKETS = "48x64,64x48,64x64"
CHUNK = 24  # pixel frames per chunk; the tiny VAE has patch_length 4 and patch_size 8, like the released one
BAD = {"garbage.mp4": "undecodable", "truncated.mp4": "undecodable", "short.mp4": "too short",
       "nocaption.mp4": "missing caption"}


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, str(REPO / "tools" / name), *args], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    return run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    data = root / "data"
    made = tool("make_synthetic_dataset.py", "--out", str(data), "--num-videos", "5", "--num-images", "1",
                "--seconds", "1-2.6", "--size", "64x48,48x64,64x64", "--seed", "1", "--sidecars")
    assert made.returncode == 0, made.stderr[-3000:]
    entries = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]

    # Inputs that must be skipped, none of them with a sidecar caption file.
    (data / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    whole = (data / "clip_0000.mp4").read_bytes()
    (data / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    write_mp4(data / "short.mp4", np.full((12, 48, 64, 3), 90, np.uint8), 24)
    (data / "nocaption.mp4").write_bytes((data / "clip_0001.mp4").read_bytes())
    extra = [{"path": "garbage.mp4", "caption": "noise"}, {"path": "truncated.mp4", "caption": "cut off"},
             {"path": "short.mp4", "caption": "half a second"}, {"path": "nocaption.mp4"}]
    with open(data / "list.jsonl", "w") as f:
        for entry in entries + extra:
            f.write(json.dumps(entry) + "\n")
    return {"root": root, "data": data, "entries": {e["path"]: e for e in entries},
            "vae": make_vae(root / "vae")}


def prepare(assets, out: Path, *args: str, workers: int = 2) -> subprocess.CompletedProcess:
    return tool("prepare_dataset.py", "--out", str(out), "--vae", str(assets["vae"]), "--buckets", BUCKETS,
                "--workers", str(workers), "--batch-size", "2", "--samples-per-shard", "2", "--no-progress", *args)


def read_samples(out: Path) -> list[Sample]:
    shards = sorted(glob.glob(str(out / "shard-*.tar")))
    return [decode_sample(raw) for raw in webdataset.WebDataset(shards, shardshuffle=False)]


def expected_rows(entry: dict, frames: int) -> list[str]:
    """One row per chunk with two or more per-chunk captions, else the whole-clip caption (data/README.md)."""
    return entry["captions"][: frames // CHUNK] if len(entry["captions"]) >= 2 else [entry["caption"]]


def check_latents_and_captions(samples: list[Sample], assets) -> None:
    codec = VaeCodec(ViTVAE.from_pretrained(assets["vae"]), fps=24)
    for s in samples:
        m = s.meta
        entry = assets["entries"][m["source"]]
        H, W, T = m["height"], m["width"], m["frames"]
        assert m["bucket"] == f"{H}x{W}" and f"{H}x{W}" in BUCKETS.split(",")
        path = assets["data"] / m["source"]
        if m["kind"] == "image":
            assert T == 1 and s.latent.shape == (16, 1, H // 8, W // 8)
            frames = read_image(path, H, W)
        else:
            # Synthetic clips come in the bucket sizes at 24 fps: no resize and no resampling, so the inference
            # reader gives the very frames the tool encoded.
            assert T % CHUNK == 0 and s.latent.shape == (16, T // 4, H // 8, W // 8)
            frames = read_video(path, 24, H, W)
            assert len(frames) // CHUNK * CHUNK == T or len(entry["captions"]) * CHUNK == T
            frames = frames[:T]
        reference = codec.encode_frames(frames)[0]
        assert reference.abs().max() > 0.01
        torch.testing.assert_close(s.latent, reference, atol=1e-4, rtol=1e-3)  # stored as float16
        assert m["captions"] == expected_rows(entry, T)


@pytest.mark.slow
def test_prepare_jsonl_skips_bad_inputs_and_resumes(assets, tmp_path):
    out = tmp_path / "shards"
    run = prepare(assets, out, "--input", str(assets["data"] / "list.jsonl"), "--text-encoder", "hash:32")
    assert run.returncode == 0, run.stderr[-3000:]
    good = sorted(assets["entries"])
    assert f"wrote {len(good)} clips in {(len(good) + 1) // 2} shards" in run.stdout
    speed = re.search(r"([0-9.]+) clips/s", run.stdout)
    assert speed and float(speed.group(1)) > 0
    assert f"skipped {len(BAD)} inputs" in run.stdout
    for reason in set(BAD.values()):
        names = sorted(n for n, r in BAD.items() if r == reason)
        block = re.search(rf"^  {reason} \({len(names)}\):\n((?:    .*\n?)+)", run.stdout, re.M)
        assert block, run.stdout
        assert sorted(re.findall(r"^    (\S+):", block.group(1), re.M)) == names

    samples = read_samples(out)
    sources = [s.meta["source"] for s in samples]
    assert sorted(sources) == good  # every clip exactly once
    check_latents_and_captions(samples, assets)
    encoder = HashTextEncoder(dim=32, max_length=800)
    for s in samples:
        features, mask = encoder.encode(s.meta["captions"])
        assert s.caption_lengths.tolist() == [len(tokenize(c)) for c in s.meta["captions"]]
        torch.testing.assert_close(s.caption, features[:, : s.caption.shape[1]], atol=2e-3, rtol=1e-3)
        assert torch.equal(s.caption_mask(), mask[:, : s.caption.shape[1]])

    # Without --resume the folder is refused; with it, a deleted shard's clips are redone, nothing else.
    refused = prepare(assets, out, "--input", str(assets["data"] / "list.jsonl"), "--text-encoder", "hash:32")
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    shards = sorted(out.glob("shard-*.tar"))
    lost = {json.loads(raw["json"])["source"] for raw in webdataset.WebDataset(str(shards[-1]), shardshuffle=False)}
    shards[-1].unlink()
    again = prepare(assets, out, "--input", str(assets["data"] / "list.jsonl"), "--text-encoder", "hash:32",
                    "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"wrote {len(lost)} clips" in again.stdout
    assert f"{len(good) - len(lost)} inputs were already in completed shards" in again.stdout
    assert f"{shards[-1].name} is in the manifest but missing" in again.stdout
    resumed = read_samples(out)
    assert sorted(s.meta["source"] for s in resumed) == good  # the same set, no duplicates
    before = {s.key: s for s in samples}
    for s in resumed:
        torch.testing.assert_close(s.latent, before[s.key].latent, atol=1e-4, rtol=1e-3)
        assert s.meta == before[s.key].meta


@pytest.mark.slow
def test_prepare_folder_with_t5(assets, tmp_path):
    t5_dir = make_t5(tmp_path / "t5", d_model=16)
    out = tmp_path / "shards"
    # --workers 0 encodes in the main process: one T5 load instead of two on a small CI machine.
    run = prepare(assets, out, "--input", str(assets["data"]), "--text-encoder", f"t5:{t5_dir}",
                  "--text-length", "64", workers=0)
    assert run.returncode == 0, run.stderr[-3000:]
    # In a folder, the bad files have no caption sidecar: all four are skipped for that before decoding.
    assert f"missing caption ({len(BAD)})" in run.stdout
    samples = read_samples(out)
    assert sorted(s.meta["source"] for s in samples) == sorted(assets["entries"])
    check_latents_and_captions(samples, assets)

    from magi_train.model.text.t5 import T5TextEncoder

    t5 = T5TextEncoder(t5_dir, max_length=64)
    for s in samples:
        features, mask = t5.encode(s.meta["captions"])
        lengths = mask.sum(dim=1)
        assert s.caption.shape == (len(s.meta["captions"]), int(lengths.max()), 16)
        assert s.caption_lengths.tolist() == lengths.tolist()
        torch.testing.assert_close(s.caption, features[:, : s.caption.shape[1]], atol=2e-3, rtol=2e-3)
