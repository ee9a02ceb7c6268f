"""Inference under model parallelism equals one process (tiny preset, fp32, gloo ranks).

* The sampler's latents under CP2, PP2, TP2, TP2 + SP (2 ranks) and TP2 x CP2, CP2 x PP2 (4 ranks) equal the
  single-process latents to 1e-5 relative: three-pass guidance with the KV cache, and a distilled model
  with a prefix and no cache (every past chunk recomputed). Each rank caches only its heads of its layers.
* A released-layout checkpoint loads under TP2 (GELU and SwiGLU) and TP4 (KV heads replicated), sliced from
  the full state dict, and gives the TP1 DiT output; a broken one is refused naming the key. A released fp8
  model splits into two pipeline stages.
* The VAE tiles spread over ranks decode (and encode) bitwise like the one-process tile loop.
* `generate.py` under `torchrun --nproc_per_node 2 ... parallel.cp=2` writes the one-process video, once.

Each spawn batches all checks of one world size (spawned ranks are slow to import on small machines); a
module fixture runs it once and the tests read its measurements.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from magi_infer.config import GenerateConfig, SamplerConfig, VideoConfig, validate_generate
from magi_train.config import ConfigError
from magi_train.config.schema import ParallelConfig
from tests import tiny_assets
from tests.distributed.common import inputs, rel_err, singleton_groups, tiny
from tests.distributed.launch import run_ranks

TOL = 1e-5
LAYOUTS = {"cp2": dict(cp=2), "pp2": dict(pp=2), "tp2": dict(tp=2), "tp2_sp": dict(tp=2, sequence_parallel=True),
           "tp2_cp2": dict(tp=2, cp=2), "cp2_pp2": dict(cp=2, pp=2)}
CASES = {
    # three-pass guidance, KV cache, 3 chunks (window 4: the clean re-forward and cache reads happen)
    "cfg3_kv_cache": dict(distill=False, sampler=dict(cfg_number=3, num_steps=8), chunks=3, prefix=0),
    # distilled, one pass + nearly-clean blend, a 1-chunk-and-2-frames prefix, no cache (recomputed context)
    "distill_prefix_no_cache": dict(distill=True, sampler=dict(cfg_number=1, num_steps=4, window_size=2,
                                                              noise2clean_kvrange=[3, 2], kv_cache=False),
                                    chunks=3, prefix=8),
}


# ------------------------------------------------------------------ what each rank runs


def _oracle_state(cfg, group) -> dict:
    """A full state dict whose model gives non-trivial velocities (the output layer starts at zero)."""
    model = _whole_model(cfg, group)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.final_linear.linear.weight.normal_(0, 0.05, generator=g)
        model.y_embedder.null_caption_embedding.normal_(0, 1.0, generator=g)
    return model.state_dict()


def _whole_model(cfg, group):
    from magi_train.model.dit import build_dit

    return build_dit(cfg, tp_group=group, init_seed=3).eval()


def _sample(model, case: dict):
    """(final latents of a whole generation (every emitted chunk, in order), the initial noise, KV-cache bytes)."""
    from magi_train.diffusion.sampler import Captions, StaircaseSampler

    cfg = model.cfg
    g = torch.Generator().manual_seed(11)
    n, L, C = case["chunks"], cfg.caption_max_length, cfg.caption_channels
    noise = torch.randn(1, cfg.in_channels, cfg.chunk_width * n, 4, 4, generator=g)
    y = torch.randn(2, n, L, C, generator=g)
    mask = torch.zeros(2, n, L)
    mask[0, :, :17] = 1
    mask[1, :, :cfg.null_caption_length] = 1
    prefix = torch.randn(1, cfg.in_channels, case["prefix"], 4, 4, generator=g) if case["prefix"] else None
    sampler = StaircaseSampler(model, dataclasses.replace(SamplerConfig(), **case["sampler"]))
    chunks = list(sampler.sample(noise, Captions(y, mask), prefix))
    cache = 0 if sampler._cache is None else sampler._cache.nbytes()
    return torch.cat([c.latent for c in chunks], dim=2), noise, cache


def _sampler_errors(layouts, singles) -> dict:
    """Per layout and case: max relative error of the final latents against one process on this rank, and
    the KV cache this rank holds relative to one process. Per case: how far the latents moved from the noise."""
    from magi_infer.engine import build_model
    from magi_train.parallel.groups import init_parallel

    single = singles[dist.get_rank()]
    oracles = {name: _oracle_state(tiny(distill=case["distill"]), single) for name, case in CASES.items()}
    expected, out = {}, {}
    for name, case in CASES.items():
        whole = _whole_model(tiny(distill=case["distill"]), single)
        whole.load_state_dict(oracles[name])
        expected[name] = _sample(whole, case)
        latents, noise, _ = expected[name]
        out[f"{name}/moved"] = rel_err(latents, noise[:, :, -latents.shape[2]:])
    for key in layouts:
        par = init_parallel(ParallelConfig(**LAYOUTS[key]))
        for name, case in CASES.items():
            model = build_model(tiny(distill=case["distill"]), oracles[name], "test", par).eval()
            latents, _, cache = _sample(model, case)
            out[f"{key}/{name}"] = rel_err(latents, expected[name][0])
            out[f"{key}/{name}/cache"] = cache / max(1, expected[name][2])
    return out


def _tp_load_errors(released: dict, tp: int, singles) -> dict:
    """DiT output of a released checkpoint loaded under TP=tp vs TP=1, and the refusal of a broken one."""
    from magi_infer.engine import build_model
    from magi_train.checkpoint.weights import load_into, load_weights
    from magi_train.parallel.groups import init_parallel

    par = init_parallel(ParallelConfig(tp=tp))
    errors = {}
    for name, (cfg, directory) in released.items():
        state, source = load_weights(directory, cfg, fp8=False)
        whole = _whole_model(cfg, singles[dist.get_rank()])
        load_into(whole, state, source)
        model = build_model(cfg, state, source, par).eval()
        x, t, caption, mask, ranges, _ = inputs(cfg)
        uncond = torch.tensor([False, True])
        with torch.no_grad():
            errors[f"tp{tp}/{name}"] = rel_err(model(x, t, caption, mask, ranges, adaln_uncond=uncond),
                                               whole(x, t, caption, mask, ranges, adaln_uncond=uncond))
        broken = dict(state)
        broken.pop("videodit_blocks.layers.1.mlp.linear_fc2.weight")
        try:
            build_model(cfg, broken, "broken", par)
            errors[f"tp{tp}/{name}/broken"] = "loaded"
        except ValueError as err:
            errors[f"tp{tp}/{name}/broken"] = str(err)
    return errors


def _fp8_pipeline_error(singles) -> float:
    """A released-layout fp8 model (layers 1 .. L-2 fp8) split into two pipeline stages vs one process."""
    from magi_infer.engine import build_model
    from magi_train.model.fp8 import convert_dit_to_fp8, quantize_dit_state_dict
    from magi_train.checkpoint.magi1 import cast_like_released
    from magi_train.parallel.groups import init_parallel

    cfg = tiny(distill=True, params_dtype="bfloat16", num_layers=4)
    state = quantize_dit_state_dict(cast_like_released(_oracle_state(cfg, singles[dist.get_rank()])), cfg.num_layers)
    whole = convert_dit_to_fp8(_whole_model(cfg, singles[dist.get_rank()]))
    whole.load_state_dict(state)
    model = build_model(cfg, state, "test", init_parallel(ParallelConfig(pp=2)), fp8=True).eval()
    x, t, caption, mask, ranges, _ = inputs(cfg)
    with torch.no_grad():
        return rel_err(model(x, t, caption, mask, ranges, distill_dt=8.0), whole(x, t, caption, mask, ranges, distill_dt=8.0))


def _vae_split(vae_dir: str) -> dict:
    """Tile-split decode and encode vs the one-process tile loop (fp32 CPU): equal bit for bit?"""
    from magi_train.model.vae import VaeCodec, ViTVAE
    from magi_train.parallel.vae_tiles import SplitTiles

    vae = ViTVAE.from_pretrained(vae_dir, dtype=torch.float32, device=torch.device("cpu"))
    # 16-fps tiles of 8 frames (2 latents) x 32 px (4 latents, stride 3): 2 x 3 x 3 = 18 tiles, short edges.
    single = VaeCodec(vae, fps=16, tile_px=32)
    split = VaeCodec(vae, fps=16, tile_px=32, tile_map=SplitTiles(dist.group.WORLD))
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(1, 16, 4, 8, 8, generator=g)
    frames = torch.randint(0, 256, (16, 64, 64, 3), generator=g, dtype=torch.uint8)
    a, b = single.decode_latents(latent), split.decode_latents(latent)
    c, d = single.encode_frames(frames), split.encode_frames(frames)
    return {"decode_equal": torch.equal(a, b), "decode_shape": tuple(b.shape),
            "encode_equal": torch.equal(c, d), "encode_shape": tuple(d.shape)}


def _two_ranks(released: dict, vae_dir: str) -> dict:
    singles = singleton_groups()
    out = _sampler_errors(["cp2", "pp2", "tp2", "tp2_sp"], singles)
    out.update(_tp_load_errors(released, 2, singles))
    out.update(_vae_split(vae_dir))
    out["pp2/fp8"] = _fp8_pipeline_error(singles)
    return out


def _four_ranks(released: dict) -> dict:
    singles = singleton_groups()
    out = _sampler_errors(["tp2_cp2", "cp2_pp2"], singles)
    out.update(_tp_load_errors(released, 4, singles))
    return out


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def released(tmp_path_factory, single_process_group):
    root = tmp_path_factory.mktemp("released")
    return {name: (cfg, str(tiny_assets.make_released_dit(root / name, cfg)))
            for name, cfg in (("gelu", tiny()), ("swiglu", tiny(gated_linear_unit=True)))}


@pytest.fixture(scope="module")
def two_ranks(released, tmp_path_factory):
    vae_dir = tiny_assets.make_vae(tmp_path_factory.mktemp("vae") / "vae")
    return run_ranks(2, _two_ranks, released, str(vae_dir))


# ------------------------------------------------------------------ tests


# The KV cache one rank holds, relative to one process: its heads (4 query, 2 KV heads; with tp2 x cp2 each
# tp rank's KV head is replicated over its cp pair) of its stage's layers.
CACHE_SHARE = {"cp2": 0.5, "pp2": 0.5, "tp2": 0.5, "tp2_sp": 0.5, "tp2_cp2": 0.5, "cp2_pp2": 0.25}


def _check_sampler(results, layout: str, case: str) -> None:
    for rank, result in enumerate(results):
        assert result[f"{case}/moved"] > 1e-2, "the generation must move away from the noise"
        assert result[f"{layout}/{case}"] <= TOL, (rank, result[f"{layout}/{case}"])
        share = CACHE_SHARE[layout] if CASES[case]["sampler"].get("kv_cache", True) else 0.0
        assert result[f"{layout}/{case}/cache"] == share, (rank, result[f"{layout}/{case}/cache"])


@pytest.mark.parametrize("layout", ["cp2", "pp2", "tp2", "tp2_sp"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_latents_equal_one_process_on_two_ranks(two_ranks, layout, case):
    _check_sampler(two_ranks, layout, case)


def test_released_checkpoint_loads_under_tp2(two_ranks):
    for rank, result in enumerate(two_ranks):
        for name in ("gelu", "swiglu"):
            assert result[f"tp2/{name}"] <= TOL, (rank, name, result[f"tp2/{name}"])
            assert "missing keys" in result[f"tp2/{name}/broken"] and "layers.1.mlp.linear_fc2" in result[f"tp2/{name}/broken"]


def test_fp8_model_splits_into_pipeline_stages(two_ranks):
    for rank, result in enumerate(two_ranks):
        assert result["pp2/fp8"] <= TOL, (rank, result["pp2/fp8"])


def test_tile_split_vae_equals_one_process_bitwise(two_ranks):
    for result in two_ranks:
        assert result["decode_equal"] and result["decode_shape"] == (16, 64, 64, 3)
        assert result["encode_equal"] and result["encode_shape"] == (1, 16, 4, 8, 8)


@pytest.mark.slow
def test_four_rank_layouts(released):
    results = run_ranks(4, _four_ranks, released)
    for layout in ("tp2_cp2", "cp2_pp2"):
        for case in CASES:
            _check_sampler(results, layout, case)
    for rank, result in enumerate(results):
        for name in ("gelu", "swiglu"):  # 4 query heads, 2 KV heads: each KV head on two TP ranks
            assert result[f"tp4/{name}"] <= TOL, (rank, name, result[f"tp4/{name}"])


def test_misconfigured_layouts_fail_naming_the_field():
    def check(match: str, **changes):
        parallel = dataclasses.replace(ParallelConfig(), **changes.pop("parallel", {}))
        cfg = GenerateConfig(model=tiny(), parallel=parallel, **changes)
        with pytest.raises(ConfigError, match=match):
            validate_generate(cfg)

    check(r"model.num_attention_heads \(4\) must be divisible by parallel.tp \(3\)", parallel=dict(tp=3))
    check(r"parallel.dp=2: inference runs one request", parallel=dict(dp=2))
    check(r"parallel.cp_impl=magi: inference splits context with Ulysses", parallel=dict(cp=2, cp_impl="magi"))
    check(r"model.num_layers \(2\) must be divisible by parallel.pp", parallel=dict(pp=4))
    # 48 x 48 pixels: 6 x 3 x 3 = 54 tokens per chunk, not a multiple of 4
    check(r"tokens per chunk \(54 .*parallel.cp \(4\)", parallel=dict(cp=4), video=VideoConfig(height=48, width=48))
    fp8 = tiny(distill=True, params_dtype="bfloat16", num_layers=4)
    with pytest.raises(ConfigError, match=r"sampler.fp8=true with parallel.tp=2"):
        validate_generate(GenerateConfig(model=fp8, parallel=ParallelConfig(tp=2),
                                         sampler=SamplerConfig(cfg_number=1, fp8=True)))
    validate_generate(GenerateConfig(model=tiny(), parallel=ParallelConfig(tp=2, cp=2, pp=2)))  # a fitting layout


# ------------------------------------------------------------------ the real program


REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _generate(nproc: int, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "magi_infer/generate.py", "model=tiny",
           f"output={out}", "num_frames=30", "video.fps=12", "seed=3", "progress=false",
           "prompt=[a red blob moves right, the red blob moves down]", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_generate_cli_with_context_parallel_writes_the_one_process_video(released, tmp_path):
    from magi_train.data.video_io import probe_video, read_video

    ckpt = f"ckpt.dir={released['gelu'][1]}"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    run = _generate(1, one / "video.mp4", ckpt)
    assert run.returncode == 0, run.stderr[-3000:]
    run = _generate(2, two / "video.mp4", ckpt, "parallel.cp=2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote") == 1 and "2 chunks" in run.stdout  # only rank 0 prints
    # The video and its sidecar, no leftovers of other ranks.
    assert sorted(p.name for p in two.iterdir()) == ["video.mp4", "video.mp4.json"]
    assert probe_video(two / "video.mp4").frames == 30
    a, b = (read_video(d / "video.mp4", 12, 64, 64) for d in (one, two))
    assert a.shape == b.shape == (30, 64, 64, 3)
    assert torch.equal(a, b), f"max |difference| {(a.int() - b.int()).abs().max().item()}"
    # A layout that does not fit is refused by validate_generate (test_misconfigured_layouts_fail_naming_the_field);
    # a multi-rank program failing at start-up is shown by tests/e2e/test_train_cli.py's world-size test.
