"""The Python API (magi_infer/pipeline.py): built once from a model directory, then called, streamed, live-prompted.

The model is tests/fixtures/tiny_base (a trained tiny DiT in the released layout), so nothing is trained here."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from magi_infer import Cancelled, LivePrompts, MagiPipeline
from magi_infer.resolve import released_overrides
from magi_train.data.video_io import probe_video, read_video

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_base"
STEPS = 4  # window_size 4: a new chunk starts at every step


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return MagiPipeline.from_pretrained(TINY, overrides={"progress": False})


def test_the_preset_is_inferred_from_the_weights(pipe):
    c = pipe.config
    assert (c.model.name, c.model.distill, c.text.encoder, c.vae.kind) == ("tiny", False, "hash", "preview")
    assert c.ckpt.dir == str(TINY) and pipe.chunk_frames == 24
    assert pipe.num_chunks(48) == 2 and pipe.num_chunks(49) == 3


def test_text_encoder_hash_bigram_is_the_pairs_encoder(pipe):
    assert pipe.engine.text_encoder.bigrams is False
    bigram = MagiPipeline.from_pretrained(TINY, overrides={"progress": False, "text.encoder": "hash_bigram"})
    assert bigram.config.text.encoder == "hash_bigram" and bigram.engine.text_encoder.bigrams is True
    a = pipe(["a red blob moves left"], num_frames=24, num_steps=STEPS, seed=0)
    b = bigram(["a red blob moves left"], num_frames=24, num_steps=STEPS, seed=0)
    assert not np.array_equal(a.frames, b.frames)  # the captions reach the DiT through the other encoder


def test_call_returns_the_frames_and_stream_yields_the_same_chunk_by_chunk(pipe):
    prompts = ["a red blob moves right", "a blue blob moves down"]
    whole = pipe(prompts, num_frames=40, seed=3, num_steps=STEPS)
    assert whole.frames.dtype == np.uint8 and whole.frames.shape == (40, 64, 64, 3)
    assert whole.prompts == prompts and whole.seed == 3
    chunks = list(pipe.stream(prompts, num_frames=40, seed=3, num_steps=STEPS))
    assert [(c.index, len(c.frames), c.prompt, c.num_chunks) for c in chunks] == [(0, 24, prompts[0], 2),
                                                                                 (1, 16, prompts[1], 2)]
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)
    assert chunks[0].seconds <= chunks[1].seconds
    # Another seed is another video; the same seed as a generator is the same one.
    assert not np.array_equal(pipe(prompts, num_frames=40, seed=4, num_steps=STEPS).frames, whole.frames)
    gen = torch.Generator().manual_seed(3)
    assert np.array_equal(pipe(prompts, num_frames=40, generator=gen, num_steps=STEPS).frames, whole.frames)


def test_output_types(pipe):
    pt = pipe("a red blob", num_frames=24, num_steps=STEPS, output_type="pt")
    assert isinstance(pt.frames, torch.Tensor) and pt.frames.dtype == torch.uint8
    latent = pipe("a red blob", num_frames=24, num_steps=STEPS, output_type="latent")
    assert latent.frames is None and latent.latents.shape == (1, 16, 6, 8, 8)
    # The latents are what the decoder turns into the frames.
    assert torch.equal(pipe.engine.vae.decode_latents(latent.latents), pt.frames)


def test_output_writes_the_mp4_and_a_sidecar(pipe, tmp_path):
    out = tmp_path / "blob.mp4"
    video = pipe(["a red blob moves right", "the red blob moves down"], num_frames=30, seed=5, num_steps=STEPS,
                 output=out)
    assert video.output == out and video.frames.shape == (30, 64, 64, 3)
    info = probe_video(out)
    assert (info.frames, info.width, info.height) == (30, 64, 64)
    # Decoded from the mp4 (lossy x264) it is close to the frames returned.
    decoded = read_video(out, 24, 64, 64).numpy().astype(np.int16)
    assert np.abs(decoded - video.frames.astype(np.int16)).mean() < 4
    side = json.loads((tmp_path / "blob.mp4.json").read_text())
    assert side["prompts"] == ["a red blob moves right", "the red blob moves down"] and side["seed"] == 5
    assert side["num_frames"] == 30 and side["num_steps"] == STEPS and side["config"]["model"]["name"] == "tiny"
    assert side["version"] and side["weights"].startswith("released weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.mp4", "blob.mp4.json"]
    # The file-writing path returns the same frames as the in-memory one (overlap decode on its worker).
    assert np.array_equal(pipe(["a red blob moves right", "the red blob moves down"], num_frames=30, seed=5,
                               num_steps=STEPS).frames, video.frames)
    # An existing output is kept unless overwrite is asked for.
    with pytest.raises(ValueError, match="already exists"):
        pipe("a red blob", num_frames=8, num_steps=STEPS, output=out)
    pipe("a red blob", num_frames=8, num_steps=STEPS, output=out, overwrite=True)
    assert probe_video(out).frames == 8


def test_stream_writes_the_mp4_as_chunks_arrive(pipe, tmp_path):
    out = tmp_path / "live.mp4"
    seen = []
    for chunk in pipe.stream("a red blob moves right", num_frames=48, num_steps=STEPS, output=out):
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        seen.append((chunk.index, len(partial), out.exists()))
    assert seen == [(0, 1, False), (1, 1, False)]  # a live temporary file while it grows, published at the end
    assert probe_video(out).frames == 48 and (tmp_path / "live.mp4.json").is_file()


@pytest.mark.parametrize("steps", [4, 8])
def test_a_live_prompt_conditions_the_next_chunk_exactly(pipe, steps):
    """A prompt set while chunk 0 denoises reaches chunk 1 (the first that has not started) and every chunk after:
    the video equals, bit for bit, the static request with that prompt list."""
    live = LivePrompts()
    first_of_chunk1 = steps // 4  # per stage: steps / window_size; chunk 1 starts after one stage

    def on_step(step, total):
        if step == first_of_chunk1:  # after the last step before chunk 1 starts
            live.set("a green blob moves left")

    got = pipe("a red blob moves right", num_frames=72, seed=2, num_steps=steps, live=live, callback=on_step)
    assert live.applied == [(1, "a green blob moves left")]
    assert got.prompts == ["a red blob moves right"] + ["a green blob moves left"] * 2
    static = pipe(["a red blob moves right", "a green blob moves left"], num_frames=72, seed=2, num_steps=steps)
    assert np.array_equal(got.frames, static.frames)
    unchanged = pipe("a red blob moves right", num_frames=72, seed=2, num_steps=steps)
    assert np.array_equal(got.frames[:24], unchanged.frames[:24]) and not np.array_equal(got.frames, unchanged.frames)


def test_a_live_prompt_set_late_conditions_nothing_and_one_set_early_conditions_all(pipe):
    late = LivePrompts()
    got = pipe("a red blob", num_frames=48, seed=2, num_steps=STEPS, live=late,
               callback=lambda step, total: late.set("a blue blob") if step == total - 1 else None)
    assert late.applied == [] and got.prompts == ["a red blob"] * 2
    early = LivePrompts()
    early.set("a blue blob")
    got = pipe("a red blob", num_frames=48, seed=2, num_steps=STEPS, live=early)
    assert early.applied == [(0, "a blue blob")]
    assert np.array_equal(got.frames, pipe("a blue blob", num_frames=48, seed=2, num_steps=STEPS).frames)
    with pytest.raises(ValueError, match="non-empty string"):
        early.set("  ")


def test_cancel_stops_between_steps(pipe, tmp_path):
    cancel = threading.Event()
    steps = []

    def on_step(step, total):
        steps.append(step)
        if step == 2:
            cancel.set()

    with pytest.raises(Cancelled, match="after sampler step 2"):
        pipe("a red blob", num_frames=72, num_steps=STEPS, callback=on_step, cancel=cancel, output=tmp_path / "c.mp4")
    assert steps == [1, 2] and not (tmp_path / "c.mp4").exists()


def test_bad_arguments_name_the_problem(pipe):
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe(["a", 3])
    with pytest.raises(ValueError, match="output_type='video'"):
        pipe("a blob", output_type="video")
    with pytest.raises(ValueError, match="seed or generator"):
        pipe("a blob", seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="num_steps=0"):
        pipe("a blob", num_steps=0)
    with pytest.raises(ValueError, match="num_steps=6 must be a positive multiple of sampler.window_size=4"):
        pipe("a blob", num_steps=6)
    with pytest.raises(ValueError, match="3 prompts for 1 generated chunk"):
        pipe(["a", "b", "c"], num_frames=24, num_steps=STEPS)


def _released_dir(tmp_path: Path, runtime: dict, engine: dict) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    shutil.copytree(TINY / "inference_weight", model / "inference_weight")
    from magi_train.config.compose import load_model_preset

    m = load_model_preset("tiny")
    model_config = {k: getattr(m, k) for k in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
        "layernorm_epsilon", "apply_layernorm_1p", "x_rescale_factor", "half_channel_vae", "patch_size",
        "t_patch_size", "in_channels", "out_channels", "cond_hidden_ratio", "caption_channels", "caption_max_length",
        "xattn_cond_hidden_ratio", "cond_gating_ratio", "gated_linear_unit")}
    model_config["params_dtype"] = "torch.float32"
    (model / "config.json").write_text(json.dumps({"model_config": model_config, "runtime_config": runtime,
                                                   "engine_config": engine}))
    return model


def test_a_released_config_json_gives_the_sampler_defaults(tmp_path):
    runtime = {"cfg_number": 3, "cfg_t_range": [0.0, 0.05, 0.2, 0.5, 0.999], "prev_chunk_scales": [1.0] * 5,
               "text_scales": [5.0, 5.0, 4.0, 0.0, 0.0], "noise2clean_kvrange": [3, 2], "clean_chunk_kvrange": 1,
               "clean_t": 0.999, "seed": 77, "num_frames": 48, "video_size_h": 48, "video_size_w": 80,
               "num_steps": 8, "window_size": 2, "fps": 12, "chunk_width": 6, "t5_device": "cpu",
               "scale_factor": 0.18215, "temporal_downsample_factor": 4}
    engine = {"distill": False, "fp8_quant": False, "kv_offload": False, "shortcut_mode": "8,16,16",
              "distill_nearly_clean_chunk_threshold": 0.3}
    model = _released_dir(tmp_path, runtime, engine)
    found = released_overrides(model)
    assert found["model"] == "tiny" and found["sampler.text_scales"] == "[5.0, 5.0, 4.0, 0.0, 0.0]"
    pipe = MagiPipeline.from_pretrained(model, overrides={"progress": False})
    s, v = pipe.config.sampler, pipe.config.video
    assert (s.num_steps, s.window_size, s.text_scales, s.noise2clean_kvrange, s.clean_t) == \
        (8, 2, [5.0, 5.0, 4.0, 0.0, 0.0], [3, 2], 0.999)
    assert (v.height, v.width, v.fps, pipe.config.seed, pipe.config.num_frames) == (48, 80, 12, 77, 48)
    out = pipe("a red blob")
    assert out.frames.shape == (48, 48, 80, 3) and out.seed == 77
    # The caller's overrides come last.
    pipe = MagiPipeline.from_pretrained(model, overrides=["sampler.num_steps=4", "progress=false"])
    assert pipe.config.sampler.num_steps == 4 and pipe.config.sampler.window_size == 2


def test_from_pretrained_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MagiPipeline.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no released weights"):
        MagiPipeline.from_pretrained(tmp_path)
    both = tmp_path / "both"
    for name in ("inference_weight", "inference_weight.distill"):
        shutil.copytree(TINY / "inference_weight", both / name)
    with pytest.raises(ValueError, match=r"several variants \(base, distill\); pass model=PRESET"):
        MagiPipeline.from_pretrained(both)
    bad = _released_dir(tmp_path, {"temporal_downsample_factor": 8}, {})
    with pytest.raises(ValueError, match="temporal_downsample_factor=8"):
        MagiPipeline.from_pretrained(bad)
    with pytest.raises(ValueError, match="overrides must be a mapping"):
        MagiPipeline.from_pretrained(TINY, overrides="video.height=32")


def test_a_run_that_changed_the_presets_architecture_loads_as_trained(tmp_path):
    """model.num_layers=3 on the command line of a tiny run: its checkpoint names preset tiny (2 layers), and
    from_pretrained takes the recorded architecture, so the 3-layer weights load without an override."""
    from dataclasses import replace

    from magi_train.config import validate
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer
    from tests.configs import tiny_train_config

    cfg = tiny_train_config(tmp_path / "run", max_steps=1)
    cfg = validate(replace(cfg, model=replace(cfg.model, num_layers=3, null_caption_length=12)))
    with Trainer(cfg, init_parallel(cfg.parallel)) as trainer:
        trainer.fit()
        trained = {n: p.detach().clone() for n, p in trainer.models[0].named_parameters()}
    found = released_overrides(tmp_path / "run" / "checkpoints")
    assert found["model"] == "tiny" and found["model.num_layers"] == "3" and found["model.null_caption_length"] == "12"
    assert "model.hidden_size" not in found  # only what differs from the preset
    pipe = MagiPipeline.from_pretrained(tmp_path / "run" / "checkpoints", overrides={"progress": False})
    served = pipe.engine.model.state_dict()
    assert pipe.engine.model.cfg.num_layers == 3
    assert all(torch.equal(served[n].float(), value.float()) for n, value in trained.items())


def test_v2v_continues_from_cached_latents(pipe):
    """An extension from a finished video's latents: its first output chunk follows the prefix, and continuing
    the latents of the first part of a video gives a valid, different continuation per seed."""
    first = pipe("a red blob moves right", num_frames=24, seed=1, num_steps=STEPS, output_type="latent")
    more = pipe("the red blob moves down", mode="v2v", prefix_latents=first.latents, num_frames=24, seed=2,
                num_steps=STEPS)
    assert more.frames.shape == (24, 64, 64, 3) and more.prompts == ["the red blob moves down"]
    chunks = list(pipe.stream("the red blob moves down", mode="v2v", prefix_latents=first.latents, num_frames=24,
                              seed=2, num_steps=STEPS))
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), more.frames)
    with pytest.raises(ValueError, match=r"prefix_latents must be a float tensor of shape \(1, 16, T >= 1, 8, 8\)"):
        pipe("x", mode="v2v", prefix_latents=torch.zeros(1, 16, 6, 4, 4), num_steps=STEPS)
    with pytest.raises(ValueError, match="not both"):
        pipe("x", mode="v2v", prefix_latents=first.latents, prefix_video="a.mp4", num_steps=STEPS)


def test_i2v_takes_an_array_as_it_takes_the_same_image_file(tmp_path):
    """With a (tiny, released-format) ViT VAE: image=array conditions exactly as image=the PNG of that array,
    and the first output frame group is the image's."""
    from magi_train.data.synthetic_video import write_png
    from tests.tiny_assets import make_vae

    vae = make_vae(tmp_path / "vae")
    pipe = MagiPipeline.from_pretrained(TINY, vae_dir=vae, overrides={"vae.kind": "vit", "progress": False})
    rgb = np.zeros((40, 56, 3), np.uint8)  # another size than the video: resized the same way either way
    rgb[:, :28] = (200, 30, 30)
    rgb[:, 28:] = (20, 40, 220)
    write_png(tmp_path / "cond.png", rgb)
    from_file = pipe("a red blob", mode="i2v", image=str(tmp_path / "cond.png"), num_frames=24, num_steps=STEPS)
    from_array = pipe("a red blob", mode="i2v", image=rgb, num_frames=24, num_steps=STEPS)
    assert from_array.frames.shape == (24, 64, 64, 3)
    assert np.array_equal(from_array.frames, from_file.frames)
    with pytest.raises(ValueError, match=r"image must be uint8 RGB of shape \(H, W, 3\), got shape \(4, 4\)"):
        pipe("a red blob", mode="i2v", image=np.zeros((4, 4), np.uint8), num_steps=STEPS)


def test_a_generation_imports_only_what_it_uses():
    """One process, hash text encoder, preview decoder: no megatron-core, wandb, transformers, sympy or torch's
    compiler stack (torch._dynamo alone costs ~3 s of CPU; the KV cache's compile guard once imported it at the
    first cache write)."""
    import subprocess
    import sys

    code = ("import sys, torch; torch.set_num_threads(1)\n"
            "from magi_infer import MagiPipeline\n"
            f"pipe = MagiPipeline.from_pretrained({str(TINY)!r}, overrides={{'progress': False}})\n"
            "pipe('a red blob', num_frames=48, num_steps=4)\n"
            "print(sorted(m for m in ('megatron.core', 'wandb', 'transformers', 'sympy', 'torch._dynamo') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
