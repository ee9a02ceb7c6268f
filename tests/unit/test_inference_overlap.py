"""Decode and mp4 writing of chunk n run beside the denoising of chunk n+1 (magi_infer/overlap.py), with the
sequential result; a failure in the worker reaches the caller. The `compile` option's selection and wiring."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from magi_infer.compile import compiled_forward
from magi_infer.config import register_generate_config, to_generate_config
from magi_infer.engine import InferenceEngine, Request
from magi_infer.overlap import ChunkWorker
from magi_train.config import ConfigError, compose
from magi_train.data.video_io import StreamingMp4Writer
from tests.configs import tiny_model
from tests.tiny_assets import make_released_dit

FRAMES = 72  # 3 chunks of the tiny preset (6 latent frames = 24 frames each)
GUARD_S = 300  # a deadlock guard only: the handshake completes as soon as the threads run side by side


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_released_dit(tmp_path_factory.mktemp("tiny"), tiny_model())


def config(ckpt: Path, out: Path, *more: str):
    register_generate_config()
    return to_generate_config(compose("generate", ["model=tiny", f"ckpt.dir={ckpt}", f"output={out}", "progress=false",
                                                   "prompt=a red blob moves right", f"num_frames={FRAMES}", *more]))


@pytest.fixture(scope="module")
def engine(ckpt, tmp_path_factory):
    return InferenceEngine(config(ckpt, tmp_path_factory.mktemp("out") / "unused.mp4"))


def record_writes(monkeypatch) -> list:
    written = []
    write = StreamingMp4Writer.write

    def recording(self, frames):
        written.append(frames.clone())
        return write(self, frames)

    monkeypatch.setattr(StreamingMp4Writer, "write", recording)
    return written


def test_decode_of_a_chunk_runs_while_the_next_one_denoises(engine, tmp_path, monkeypatch):
    events, lock = [], threading.Lock()
    emitted, stepped = threading.Event(), threading.Event()
    decode, step = engine.vae.decode_latents, engine.sampler._step

    def log(what):
        with lock:
            events.append((what, threading.current_thread().name))

    def slow_first_decode(latent):
        first = not emitted.is_set()
        log("decode enter")
        emitted.set()
        if first:  # chunk 0's decode holds until the main thread has run a denoising step after it began
            log(f"handshake {stepped.wait(GUARD_S)}")
        out = decode(latent)
        log("decode exit")
        return out

    def watched_step(plan):
        watch = emitted.is_set() and not stepped.is_set()
        if watch:
            log(f"denoise enter {plan.chunks}")
        step(plan)
        if watch:
            log("denoise exit")
            stepped.set()

    written = record_writes(monkeypatch)
    monkeypatch.setattr(engine.vae, "decode_latents", slow_first_decode)
    monkeypatch.setattr(engine.sampler, "_step", watched_step)
    result = engine.generate(Request(["a red blob moves right"], num_frames=FRAMES, output=str(tmp_path / "o.mp4")))
    names = [e[0] for e in events]
    # decode(0) entered, the next chunk's denoising entered and left on the main thread, then decode(0) left
    i = names.index("decode enter")
    j = next(k for k, n in enumerate(names) if n.startswith("denoise enter"))
    assert i < j < names.index("denoise exit") < names.index("decode exit")
    assert "handshake True" in names and "1" in names[j]  # chunk 1 was among the chunks denoised
    assert events[i][1] == "decode-and-write" and events[j][1] == threading.current_thread().name
    assert result.frames == FRAMES and len(result.chunk_seconds) == 3

    # The same frames as decoding in line.
    monkeypatch.undo()
    overlapped = [f for f in written]
    written = record_writes(monkeypatch)
    engine.cfg.overlap_decode = False
    try:
        engine.generate(Request(["a red blob moves right"], num_frames=FRAMES, output=str(tmp_path / "s.mp4")))
    finally:
        engine.cfg.overlap_decode = True
    assert len(written) == len(overlapped) == 3
    assert all(torch.equal(a, b) for a, b in zip(written, overlapped))


def test_a_failing_decode_reaches_the_caller_and_publishes_nothing(engine, tmp_path, monkeypatch):
    decode, calls = engine.vae.decode_latents, []

    def fails_on_chunk_1(latent):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("decoder broke on chunk 1")
        return decode(latent)

    monkeypatch.setattr(engine.vae, "decode_latents", fails_on_chunk_1)
    with pytest.raises(ValueError, match="decoder broke on chunk 1"):
        engine.generate(Request(["a"], num_frames=FRAMES, output=str(tmp_path / "x.mp4")))
    assert not (tmp_path / "x.mp4").exists() and len(calls) == 2  # chunk 2 was dropped, not decoded


def test_the_worker_keeps_order_and_raises_at_submit_or_finish():
    done = []
    with ChunkWorker(done.append, depth=1) as worker:
        for i in range(5):
            worker.submit(i)
    assert done == [0, 1, 2, 3, 4]

    failed = threading.Event()

    def boom(i):
        if i == 1:
            failed.set()
            raise KeyError("chunk 1")

    worker = ChunkWorker(boom, depth=1)
    worker.submit(0)
    worker.submit(1)
    assert failed.wait(GUARD_S)
    with pytest.raises(KeyError, match="chunk 1"):
        for i in range(2, 100):  # raises at the latest once the failure is seen
            worker.submit(i)
    with pytest.raises(KeyError):
        worker.finish()


def test_compile_selection(monkeypatch, ckpt, tmp_path):
    model = torch.nn.Linear(2, 2)
    assert compiled_forward(model, "none") is None
    with pytest.raises(ValueError, match="compile='fast' is not one of"):
        compiled_forward(model, "fast")
    with pytest.raises(ValueError, match="mode of the inductor backend"):
        compiled_forward(model, "reduce-overhead", backend="aot_eager")
    with pytest.raises(ConfigError, match="compile='fast' is not one of"):
        config(ckpt, tmp_path / "o.mp4", "compile=fast")
    # The engine hands the sampler the compiled forward (torch.compile stood in for: compiling costs minutes).
    seen = {}

    def fake_compile(m, **kwargs):
        seen.update(kwargs, model=m)
        return m

    monkeypatch.setattr(torch, "compile", fake_compile)
    engine = InferenceEngine(config(ckpt, tmp_path / "o.mp4", "compile=max-autotune"))
    assert seen == dict(backend="inductor", dynamic=False, mode="max-autotune", model=engine.model)
    assert engine.sampler._dit is not engine.model  # the wrapper
    out = engine.generate(Request(["a"], num_frames=8, output=str(tmp_path / "c.mp4")))
    assert out.frames == 8
