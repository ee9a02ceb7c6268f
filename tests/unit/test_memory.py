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
    sampler = StaircaseSampler(model, SamplerConfig(num_steps=4, window_size=2, noise2clean_kvrange=[2]))
    n, h, w = 3, 4, 6
    y = torch.zeros(2, n, 60, 32)
    mask = torch.ones(2, n, 60)
    list(sampler.sample(torch.randn(1, 16, 6 * n, h, w), Captions(y, mask)))
    est = estimate(cfg, h * 8, w * 8, num_frames=4 * 6 * n, window=2, fp8=False)
    assert est.kv_cache == sampler._cache.nbytes()


def test_t5_xxl_size():
    assert t5_xxl_encoder_params() == 4_762_310_656
