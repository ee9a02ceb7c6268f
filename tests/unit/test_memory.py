"""The memory estimate's weight and KV-cache terms equal what a real model and a real generation allocate."""

import dataclasses

import torch

from magi_train.config.schema import SamplerConfig
from magi_train.model.fp8 import convert_dit_to_fp8
from magi_infer.memory import dit_weight_bytes, estimate, measured_weight_bytes, t5_xxl_encoder_params
from magi_train.diffusion.sampler import Captions, StaircaseSampler
from magi_train.config.schema import ModelConfig
from magi_train.model.dit import build_dit

CFG = ModelConfig(num_layers=3, hidden_size=256, ffn_hidden_size=256, num_attention_heads=2, num_query_groups=1,
                  kv_channels=128, caption_channels=32, caption_max_length=60, params_dtype="bfloat16")


def test_weight_bytes_match_a_built_model(single_process_group):
    model = build_dit(CFG, tp_group=single_process_group)
    assert dit_weight_bytes(CFG, fp8=False) == measured_weight_bytes(model)
    convert_dit_to_fp8(model)
    measured = measured_weight_bytes(model)
    # fp8 scales are counted as an upper bound (both scale vectors of the per-tensor / per-channel layouts)
    assert measured <= dit_weight_bytes(CFG, fp8=True) <= measured * 1.02


def test_kv_cache_bytes_match_a_generation(single_process_group):
    cfg = dataclasses.replace(CFG, params_dtype="float32")
    model = build_dit(cfg, tp_group=single_process_group).eval()
    s = SamplerConfig(num_steps=4, window_size=2, noise2clean_kvrange=[2])
    sampler = StaircaseSampler(model, s)
    n, h, w = 5, 4, 6
    y = torch.zeros(2, n, 60, 32)
    mask = torch.ones(2, n, 60)
    list(sampler.sample(torch.randn(1, 16, 6 * n, h, w), Captions(y, mask)))
    est = estimate(cfg, h * 8, w * 8, num_frames=4 * 6 * n, window=2, fp8=False, sampler=s)
    assert est.kv_cache == sampler._cache.nbytes()
    # the window (clean re-forward + 2 denoising chunks), not the 5 chunks of the video
    chunk = cfg.num_layers * (h // 2) * (w // 2) * 6 * 2 * 128 * 4
    assert est.kv_cache == 3 * chunk


def test_kv_cache_estimate_stops_growing_with_the_video():
    """24B distill at 720p: the cache holds a window of chunks, however long the video (it held 158 GiB at
    960 frames when it spanned the whole video)."""
    from magi_infer.memory import kv_window
    from magi_train.config import compose
    from magi_infer.config import register_generate_config, to_generate_config

    register_generate_config()
    g = to_generate_config(compose("generate", ["model=magi1_24b_distill"]))
    sizes = {frames: estimate(g.model, 720, 1280, frames, 4, False, released_text_and_vae=False,
                              sampler=g.sampler).kv_cache for frames in (96, 240, 960, 3840)}
    assert sizes[240] == sizes[960] == sizes[3840] < 30 * 2**30
    assert sizes[96] < sizes[240]  # a video shorter than the window holds only its own chunks
    assert kv_window(g.model, g.sampler, 40).capacity == 6  # clean re-forward + 4 chunks + nearly-clean duplicate


def test_t5_xxl_size():
    assert t5_xxl_encoder_params() == 4_762_310_656
