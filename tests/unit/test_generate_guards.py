"""Generate checks every input before its expensive work and never overwrites or mixes outputs.

`magi_infer/generate.py run()` is driven with its process group and engine replaced: the engine stands for
everything expensive, so a check that fires before it is a check made before any model is built or weight read.
The engine's own checks (API users) run on the tiny preset's random weights in the released layout."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

import magi_infer.engine as engine_module
import magi_infer.generate as generate_module
import magi_infer.memory as memory_module
import magi_train.parallel.groups as groups_module
from magi_infer.config import register_generate_config, to_generate_config
from magi_infer.engine import InferenceEngine, Request
from magi_infer.preflight import PreflightError, preflight, request_problems
from magi_train.checkpoint.magi1 import MANIFEST_NAME
from magi_train.config import ConfigError, compose
from magi_train.data.video_io import StreamingMp4Writer, probe_video
from tests.configs import tiny_model
from tests.tiny_assets import make_released_dit

GIB = 2**30


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """The tiny preset's random weights in the released layout (inference_weight/, two shards + index)."""
    return make_released_dit(tmp_path_factory.mktemp("tiny"), tiny_model())


def overrides(ckpt: Path, out: Path, *more: str) -> list[str]:
    return ["model=tiny", f"ckpt.dir={ckpt}", f"output={out}", "prompt=a red blob moves right", "progress=false",
            "num_frames=8", *more]


def composed(*items: str):
    register_generate_config()
    return compose("generate", list(items))


def typed(*items: str):
    return to_generate_config(composed(*items))


class Reached(Exception):
    """The engine was constructed: every check before it passed."""


@pytest.fixture
def run(monkeypatch):
    """generate.run(overrides) with a one-process stand-in group and an engine that must not be reached."""
    parallel = SimpleNamespace(dp=1, world_size=1, tp=1, cp=1, pp=1, is_main=True, device=torch.device("cpu"))
    # generate.run imports these when called (its module stays light for --help): replace them at their source.
    monkeypatch.setattr(groups_module, "init_parallel", lambda cfg: parallel)
    monkeypatch.setattr(groups_module, "shutdown", lambda: None)

    def engine(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(engine_module, "InferenceEngine", engine)
    return lambda *items: generate_module.run(composed(*items))


def fails(run, *items: str) -> str:
    with pytest.raises((PreflightError, ConfigError)) as info:
        run(*items)
    return str(info.value)


# ---------------------------------------------------------------------------- output


def test_an_existing_output_is_kept_and_the_error_comes_before_any_model(run, ckpt, tmp_path):
    out = tmp_path / "fox.mp4"
    out.write_bytes(b"yesterday's video")
    message = fails(run, *overrides(ckpt, out))
    assert f"output={out}" in message and "already exists" in message and "overwrite=true" in message
    assert out.read_bytes() == b"yesterday's video"
    with pytest.raises(Reached):
        run(*overrides(ckpt, out, "overwrite=true"))


@pytest.mark.parametrize("name, expected", [
    ("notes.txt", "extension '.txt' is not a video container"),
    ("clip.mkv", "extension '.mkv'"),
    ("a_dir.mp4", "a_dir.mp4 is a directory"),
    ("missing/x.mp4", "missing does not exist"),
])
def test_bad_output_paths_fail_naming_the_field(run, ckpt, tmp_path, name, expected):
    (tmp_path / "a_dir.mp4").mkdir()
    message = fails(run, *overrides(ckpt, tmp_path / name, "overwrite=true"))
    assert f"output={tmp_path / name}" in message and expected in message


def test_several_problems_are_reported_at_once(run, ckpt, tmp_path):
    message = fails(run, *overrides(tmp_path / "no_ckpt", tmp_path / "notes.txt", "prompt=' '"))
    assert "ckpt.dir=" in message and "output=" in message and "prompt=' ' is empty" in message


# ---------------------------------------------------------------------------- config and inputs


@pytest.mark.parametrize("extra, expected", [
    (["video.height=72"], "video.height=72 and video.width=64 must be multiples of 16"),
    (["video.crf=60"], "video.crf=60 must lie in [0, 51]"),
    (["mode=i2v", "image=cat.png"], "vae.kind=preview only decodes latents"),
    (["mode=v2v", "prefix_video=clip.mp4"], "vae.kind=preview only decodes latents"),
    (["prefix_frames=0"], "prefix_frames=0 must be >= 1"),
])
def test_config_errors_come_before_the_engine(run, ckpt, tmp_path, extra, expected):
    assert expected in fails(run, *overrides(ckpt, tmp_path / "o.mp4", *extra))


def test_bad_overrides_fail_with_the_key(run, ckpt, tmp_path):
    # A key the config does not have: Hydra refuses it while composing, naming it.
    with pytest.raises(ConfigCompositionException, match="num_stepz"):
        run(*overrides(ckpt, tmp_path / "o.mp4", "sampler.num_stepz=3"))
    # A value that does not fit the model: the base tiny preset samples with three-pass guidance.
    assert "sampler.cfg_number=1 does not fit model=tiny" in fails(run, *overrides(ckpt, tmp_path / "o.mp4",
                                                                                  "sampler.cfg_number=1"))


def test_missing_text_and_vae_dirs_of_a_released_preset_are_both_named(run, ckpt, tmp_path):
    # model=magi1_4.5b needs the T5 encoder and the VAE: both missing directories in one report, before any model.
    # (check_memory=false: whether a 4.5B model fits this machine is not the point.)
    message = fails(run, "model=magi1_4.5b", f"ckpt.dir={ckpt}", f"output={tmp_path / 'o.mp4'}", "prompt=x",
                    "text.t5_dir=/nonexistent", "vae.dir=/nonexistent", "check_memory=false")
    assert "text.t5_dir=/nonexistent" in message and "vae.dir=/nonexistent" in message


def test_missing_or_undecodable_conditioning_inputs(run, ckpt, tmp_path):
    vit = ["vae.kind=vit", f"vae.dir={tmp_path / 'vae'}"]
    message = fails(run, *overrides(ckpt, tmp_path / "o.mp4", "mode=i2v", f"image={tmp_path / 'cat.png'}", *vit))
    assert f"image={tmp_path / 'cat.png'}: image not found" in message
    assert f"vae.dir={tmp_path / 'vae'} lacks config.json" in message
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    assert f"image={junk}: cannot" in fails(run, *overrides(ckpt, tmp_path / "o.mp4", "mode=i2v", f"image={junk}", *vit))
    message = fails(run, *overrides(ckpt, tmp_path / "o.mp4", "mode=v2v", f"prefix_video={tmp_path / 'clip.mp4'}", *vit))
    assert f"prefix_video={tmp_path / 'clip.mp4'}: video not found" in message


def test_checkpoint_and_manifest_inputs(run, ckpt, tmp_path):
    message = fails(run, *overrides(ckpt, tmp_path / "o.mp4", f"ckpt.sha256={tmp_path / 'w.sha256'}"))
    assert f"ckpt.sha256: sha256 manifest {tmp_path / 'w.sha256'} does not exist" in message
    assert f"ckpt.dir={tmp_path / 'gone'} is not a directory" in fails(run, *overrides(tmp_path / "gone", tmp_path / "o.mp4"))
    # The variant is resolved by name up front: base weights are never sampled as a distilled model.
    message = fails(run, *overrides(ckpt, tmp_path / "o.mp4", "model.distill=true", "sampler.cfg_number=1"))
    assert f"ckpt.dir={ckpt} has no inference_weight.distill/" in message and "inference_weight -> model=<size>" in message


# ---------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("prompt, expected", [
    ("prompt=''", "prompt='' is empty"),
    ("prompt='   '", "prompt='   ' is empty"),
    ("prompt=[a blob, '']", "prompt[1]='' is empty"),
    ("prompt='!!! ...'", "prompt='!!! ...' is empty after cleaning"),  # the hash encoder finds no word
])
def test_an_empty_prompt_needs_allow_empty_prompt(run, ckpt, tmp_path, prompt, expected):
    message = fails(run, *overrides(ckpt, tmp_path / "o.mp4", prompt, "num_frames=30"))
    assert expected in message and "allow_empty_prompt=true" in message
    with pytest.raises(Reached):
        run(*overrides(ckpt, tmp_path / "o.mp4", prompt, "num_frames=30", "allow_empty_prompt=true"))


def test_more_prompts_than_generated_chunks(run, ckpt, tmp_path):
    # 8 frames = 2 latent frames: one chunk of 6
    assert "2 prompts for 1 generated chunk" in fails(run, *overrides(ckpt, tmp_path / "o.mp4", "prompt=[a, b]"))


# ---------------------------------------------------------------------------- memory


def test_an_enormous_request_fails_fast_with_the_estimate(run, ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: 8 * GIB)
    message = fails(run, *overrides(ckpt, tmp_path / "o.mp4", "num_frames=4000000"))
    assert "does not fit in memory" in message and "GiB free" in message
    assert "KV cache" in message and "DiT weights" in message
    assert "num_frames (now 4000000)" in message and "parallel.cp" in message and "check_memory=false" in message
    with pytest.raises(Reached):
        run(*overrides(ckpt, tmp_path / "o.mp4", "num_frames=4000000", "check_memory=false"))


def test_the_tiny_preset_at_its_size_fits(run, ckpt, tmp_path, monkeypatch):
    with pytest.raises(Reached):  # the real free memory of this machine
        run(*overrides(ckpt, tmp_path / "o.mp4", "num_frames=72"))
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: GIB // 4)
    with pytest.raises(Reached):
        run(*overrides(ckpt, tmp_path / "o.mp4", "num_frames=72"))


def test_the_estimate_counts_this_ranks_share(ckpt, tmp_path):
    one = typed(*overrides(ckpt, tmp_path / "o.mp4", "num_frames=960"))
    split = typed(*overrides(ckpt, tmp_path / "o.mp4", "num_frames=960", "parallel.cp=2", "parallel.pp=2"))
    rows = {r.name.split(" (")[0]: r for r in memory_module.generation_rows(one, "cuda")}
    shared = {r.name.split(" (")[0]: r for r in memory_module.generation_rows(split, "cuda")}
    assert shared["DiT weights"].nbytes == rows["DiT weights"].nbytes // 2
    assert shared["KV cache"].nbytes == rows["KV cache"].nbytes // 4  # 2 KV heads over cp=2, layers over pp=2
    assert rows["KV cache"].pool == memory_module.DEVICE
    offload = typed(*overrides(ckpt, tmp_path / "o.mp4", "num_frames=960", "sampler.kv_offload=true"))
    assert {r.name.split(" (")[0]: r for r in memory_module.generation_rows(offload, "cuda")}["KV cache"].pool == "host"


def test_ranks_sharing_the_host_each_count_their_host_memory(ckpt, tmp_path, monkeypatch):
    cfg = typed(*overrides(ckpt, tmp_path / "o.mp4", "num_frames=960"))
    one_rank, _ = memory_module.peak(memory_module.generation_rows(cfg, "cpu"), memory_module.HOST)
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: int(one_rank * 1.5))
    preflight(cfg)  # one process fits
    four = SimpleNamespace(world_size=4, is_main=True, device=torch.device("cpu"))  # a 4-rank gloo job
    with pytest.raises(PreflightError, match=r"host memory: .* GiB needed while .* \(4 ranks on this host"):
        preflight(cfg, four)


# ---------------------------------------------------------------------------- the engine (API users)


def must_not_be_called(*args, **kwargs):
    raise AssertionError("must not be called")


def test_the_engine_checks_before_reading_weights(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "load_weights", must_not_be_called)
    monkeypatch.setattr(engine_module, "build_model", must_not_be_called)
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: GIB)
    with pytest.raises(PreflightError, match="does not fit in memory"):
        InferenceEngine(typed(*overrides(ckpt, tmp_path / "o.mp4", "num_frames=4000000")))
    with pytest.raises(PreflightError, match="vae.dir is required for vae.kind=vit"):
        InferenceEngine(typed(*overrides(ckpt, tmp_path / "o.mp4", "vae.kind=vit")))


def test_the_engine_checks_the_manifest_before_reading_weights(ckpt, tmp_path, monkeypatch):
    weights = ckpt / "inference_weight"
    shards = sorted(p.name for p in weights.iterdir() if p.name.startswith("model-"))
    manifest = tmp_path / "weights.sha256"
    manifest.write_text("".join(f"{hashlib.sha256((weights / n).read_bytes()).hexdigest()}  {n}\n" for n in shards))
    cfg = typed(*overrides(ckpt, tmp_path / "o.mp4", f"ckpt.sha256={manifest}"))
    assert InferenceEngine(cfg).source == f"released weights {weights}"  # a matching manifest loads
    manifest.write_text(manifest.read_text().replace(manifest.read_text()[:8], "00000000", 1))
    monkeypatch.setattr(engine_module, "load_weights", must_not_be_called)
    with pytest.raises(ValueError, match=rf"ckpt.sha256={manifest}: .*{shards[0]} does not match its sha256"):
        InferenceEngine(cfg)
    assert not (weights / MANIFEST_NAME).exists()


@pytest.fixture(scope="module")
def engine(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return InferenceEngine(typed(*overrides(ckpt, out / "unused.mp4")))


def test_generate_checks_the_request_before_sampling(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(engine.sampler, "sample", must_not_be_called)
    taken = tmp_path / "taken.mp4"
    taken.write_bytes(b"keep me")
    with pytest.raises(PreflightError) as info:
        engine.generate(Request([""], num_frames=8, output=str(taken)))
    assert "prompt='' is empty" in str(info.value) and f"output={taken}" in str(info.value)
    assert taken.read_bytes() == b"keep me"
    with pytest.raises(PreflightError, match="image=.*image not found"):
        engine.generate(Request(["a"], "i2v", num_frames=8, image=str(tmp_path / "no.png"), output=str(tmp_path / "i.mp4")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4"]


def test_generate_overwrites_only_when_asked_and_warns_about_long_prompts(engine, tmp_path, caplog):
    out = tmp_path / "blob.mp4"
    out.write_bytes(b"old")
    long_prompt = " ".join(f"word{i}" for i in range(100))  # 100 words; the tiny caption row holds 64
    with caplog.at_level(logging.INFO):
        result = engine.generate(Request([long_prompt], num_frames=8, output=str(out), overwrite=True))
    assert probe_video(out).frames == result.frames == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("prompt 0 has 100 words (hash encoder); only the first 64 condition the video" in w for w in warnings)
    assert any(".blob.mp4." in r.getMessage() and ".partial" in r.getMessage() for r in caplog.records)  # preview named
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.mp4"]


def test_an_output_that_appears_while_generating_is_not_replaced(engine, tmp_path, monkeypatch):
    out = tmp_path / "race.mp4"
    decode = engine.vae.decode_latents

    def another_run_publishes_first(latent):
        if not out.exists():
            out.write_bytes(b"the other run's video")
        return decode(latent)

    monkeypatch.setattr(engine.vae, "decode_latents", another_run_publishes_first)
    with pytest.raises(FileExistsError, match=r"race.mp4 appeared .*kept at .*\.race\.mp4\..*\.partial"):
        engine.generate(Request(["a red blob"], num_frames=8, output=str(out)))
    assert out.read_bytes() == b"the other run's video"
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(kept) == 1 and probe_video(kept[0]).frames == 8  # this run's complete video, under its temp name


# ---------------------------------------------------------------------------- the v2v prefix


def write_faststart(path: Path, frames: int) -> Path:
    """An mp4 whose moov (with its frame count) comes first, so a cut copy still states the full count."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        noise = np.random.default_rng(0).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)
        for i, rgb in enumerate(noise):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_a_truncated_or_short_prefix_warns_and_a_tiny_one_is_an_error(ckpt, tmp_path, caplog):
    cfg = typed(*overrides(ckpt, tmp_path / "o.mp4", "video.fps=24"))
    whole = write_faststart(tmp_path / "whole.mp4", 30)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    decoded = probe_video(cut).frames
    with caplog.at_level(logging.WARNING):
        assert request_problems(cfg, Request(["a"], "v2v", num_frames=8, prefix_video=str(cut), prefix_frames=32,
                                             output=str(tmp_path / "o.mp4"))) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"prefix_video={cut} looks truncated: {decoded} frames decode (its container states 30 frames)" in m
               for m in messages)
    assert any(f"prefix_frames=32, but prefix_video={cut} yields only {decoded} frames at video.fps=24" in m
               for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert request_problems(cfg, Request(["a"], "v2v", num_frames=8, prefix_video=str(whole),
                                             output=str(tmp_path / "o.mp4"))) == []
    assert not caplog.records  # a whole prefix, all of it used: nothing to say

    with StreamingMp4Writer(tmp_path / "three.mp4", 64, 64, 24) as writer:
        writer.write(torch.zeros(3, 64, 64, 3, dtype=torch.uint8))
    errors = request_problems(cfg, Request(["a"], "v2v", num_frames=8, prefix_video=str(tmp_path / "three.mp4"),
                                           output=str(tmp_path / "o.mp4")))
    assert errors == [f"prefix_video={tmp_path / 'three.mp4'} has 3 frames at video.fps=24; v2v needs at least 4"]


def test_preflight_checks_only_rank_0s_output(ckpt, tmp_path):
    out = tmp_path / "taken.mp4"
    out.write_bytes(b"x")
    cfg = typed(*overrides(ckpt, out))
    other_rank = SimpleNamespace(world_size=2, is_main=False, device=torch.device("cpu"))
    preflight(cfg, other_rank, Request.from_config(cfg))  # only rank 0 writes
    with pytest.raises(PreflightError, match="already exists"):
        preflight(cfg, None, Request.from_config(cfg))
