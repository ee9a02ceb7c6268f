"""The sampler reproduces a complete t2v generation of the released MAGI-1 code (tests/fixtures/magi1_gelu):
3 chunks, 8 steps per chunk, window 4, three-pass guidance, KV cache, clean re-forwards.

Tolerance (conformance README): an exact implementation with other kernels is within ~5e-2 max / 3e-2 rms
relative of the released latents (the released code computes in bf16).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from magi_train.config.schema import SamplerConfig
from magi_train.diffusion.sampler import Captions, StaircaseSampler
from magi_train.checkpoint.magi1 import load_magi1_state_dict
from magi_train.config.released import load_released_config
from magi_train.model.dit import build_dit

FIX = Path(__file__).resolve().parents[1] / "fixtures"
GELU = FIX / "magi1_gelu"
MAX_TOL, RMS_TOL = 5e-2, 3e-2


def rel(a: torch.Tensor, b: torch.Tensor):
    scale = b.abs().max()
    return ((a - b).abs().max() / scale).item(), ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def released_sampler_config(raw: dict) -> SamplerConfig:
    rc, ec = raw["runtime_config"], raw["engine_config"]
    return SamplerConfig(cfg_number=rc["cfg_number"], cfg_t_range=rc["cfg_t_range"], prev_chunk_scales=rc["prev_chunk_scales"],
                         text_scales=rc["text_scales"], noise2clean_kvrange=rc["noise2clean_kvrange"],
                         clean_chunk_kvrange=rc["clean_chunk_kvrange"], clean_t=rc["clean_t"], num_steps=rc["num_steps"],
                         window_size=rc["window_size"], nearly_clean_threshold=ec["distill_nearly_clean_chunk_threshold"])


def fixture_captions(model) -> Captions:
    """Rows as the released pipeline builds them: [DURATION_k, HQ, T5 rows...] (fp16-rounded tokens), null rows."""
    inputs = safetensors.torch.load_file(GELU / "inputs.safetensors")
    t2v = safetensors.torch.load_file(GELU / "t2v.safetensors")
    tokens = np.load(FIX / "special_tokens.npz")
    other = torch.from_numpy(tokens["other_tokens"].astype(np.float16)).float()
    L = model.cfg.caption_max_length
    n = 3
    cond = []
    for i in range(n):
        duration = other[7 + min(n - i - 1, 7)]
        cond.append(torch.cat([duration[None], other[1][None], inputs["caption_embs"][0, 0]])[:L])
    null = model.y_embedder.null_caption_embedding.detach().float()
    y = torch.stack([torch.stack(cond), null[None].expand(n, -1, -1)])
    mask = t2v["t2v.emb_masks_processed"]
    assert torch.equal(y[0, :, :3], t2v["t2v.y_cond_first_rows"]), "caption rows differ from the released ones"
    assert torch.equal(mask[1].sum(-1), torch.full((n,), 50.0))
    return Captions(y, mask)


@pytest.fixture(scope="module")
def released(single_process_group):
    raw = json.loads((GELU / "config.json").read_text())
    model = build_dit(load_released_config(GELU / "config.json"), tp_group=single_process_group)
    model.load_state_dict(load_magi1_state_dict(GELU / "inference_weight"), strict=True)
    return model.eval(), released_sampler_config(raw)


def run(model, cfg, record=None):
    t2v = safetensors.torch.load_file(GELU / "t2v.safetensors")
    sampler = StaircaseSampler(model, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = []
        chunks = {c.index: c.latent for c in sampler.sample(t2v["t2v.noise"], fixture_captions(model),
                                                          on_step=lambda plan: steps.append(sampler._x.clone()))}
    finally:
        torch.set_num_threads(threads)
    return chunks, steps, t2v


def test_t2v_matches_released_generation(released):
    model, cfg = released
    chunks, steps, t2v = run(model, cfg)
    assert sorted(chunks) == [0, 1, 2] and len(steps) == 12
    for i, x in enumerate(steps):
        mx, rms = rel(x[0], t2v["t2v.latent_after_each_step"][i])
        assert mx <= MAX_TOL and rms <= RMS_TOL, f"step {i}: max {mx:.3e} rms {rms:.3e}"
    for c in range(3):
        mx, rms = rel(chunks[c], t2v[f"t2v.chunk_{c}"])
        print(f"chunk {c}: max rel {mx:.3e} rms rel {rms:.3e}")
        assert mx <= MAX_TOL and rms <= RMS_TOL, f"chunk {c}: max {mx:.3e} rms {rms:.3e}"


def test_one_guidance_step_matches_released_dispatcher(released):
    """`out_dispatcher`: one cfg-3 step on two chunks (t = 0.3, 0.05), text rows + null rows, the released
    combination (with cfg_t_range buckets: s_prev 1.0 / s_text 0 for the first chunk, 1.5 / 7.5 for the second)."""
    from magi_train.diffusion.schedule import StepPlan

    model, cfg = released
    inputs = safetensors.torch.load_file(GELU / "inputs.safetensors")
    golden = safetensors.torch.load_file(GELU / "forward.safetensors")["out_dispatcher"]
    null = model.y_embedder.null_caption_embedding.detach().float()
    y = torch.stack([inputs["fwd.y"][:, 0], null[None].expand(2, -1, -1)])
    null_mask = (torch.arange(null.shape[0]) < 50).float()
    mask = torch.stack([inputs["fwd.xattn_mask"][:, 0].float(), null_mask[None].expand(2, -1)])
    sampler = StaircaseSampler(model, cfg)
    sampler.prepare(torch.zeros(1, 16, 12, 8, 12), Captions(y, mask))
    plan = StepPlan(step=0, chunks=(0, 1), step_index=(0, 0), clean_chunk=None, kv_chunks=((0, 1), (0, 2)), emit=None,
                    extract_prefix=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        v = sampler.velocity(plan, inputs["fwd.x"], inputs["fwd.t"][0], idx=0)
    finally:
        torch.set_num_threads(threads)
    mx, _ = rel(v, golden[:1])
    print(f"dispatcher: max rel {mx:.3e}")
    assert mx <= 1.5e-2, f"guidance step: max rel {mx:.3e}"
    # the comparison is sharp: text guidance off moves it far away
    off = dataclasses.replace(cfg, text_scales=[0.0] * 5)
    sampler = StaircaseSampler(model, off)
    sampler.prepare(torch.zeros(1, 16, 12, 8, 12), Captions(y, mask))
    assert rel(sampler.velocity(plan, inputs["fwd.x"], inputs["fwd.t"][0], idx=0), golden[:1])[0] > 0.1
