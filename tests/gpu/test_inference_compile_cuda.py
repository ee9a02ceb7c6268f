"""Inference's speed path on a GPU: the sampler with the DiT under torch.compile (inductor, and reduce-overhead =
CUDA graphs) equals eager on the tiny model, with the bounded KV cache; the decode worker on its own CUDA stream
gives the in-line result. Prints eager and compiled seconds per chunk (figures, not assertions)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from magi_infer.compile import compiled_forward
from magi_infer.overlap import ChunkWorker
from magi_train.config.schema import ModelConfig, SamplerConfig
from magi_train.diffusion.sampler import Captions, StaircaseSampler
from magi_train.model.dit import build_dit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CHUNKS = 8


def _tiny(distill: bool) -> torch.nn.Module:
    cfg = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=256, num_attention_heads=2, num_query_groups=1,
                      kv_channels=128, caption_channels=32, caption_max_length=60, distill=distill,
                      params_dtype="float32")
    torch.manual_seed(0)
    model = build_dit(cfg, device=torch.device("cuda"))
    with torch.no_grad():
        model.final_linear.linear.weight.normal_(0, 0.05)
    return model.eval()


def _generate(model, forward=None):
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    noise = torch.randn(1, cfg.in_channels, cfg.chunk_width * CHUNKS, 8, 8, generator=g).cuda()
    y = torch.randn(2, CHUNKS, cfg.caption_max_length, cfg.caption_channels, generator=g).cuda()
    mask = torch.ones(2, CHUNKS, cfg.caption_max_length, device="cuda")
    s = dataclasses.replace(SamplerConfig(), num_steps=8, window_size=4, cfg_number=1 if cfg.distill else 3)
    torch.cuda.synchronize()
    start = time.perf_counter()
    chunks = [c.latent for c in StaircaseSampler(model, s, forward=forward).sample(noise, Captions(y, mask))]
    torch.cuda.synchronize()
    return chunks, (time.perf_counter() - start) / CHUNKS


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("distill", [True, False])
def test_compiled_sampler_equals_eager(mode, distill):
    model = _tiny(distill)
    eager, eager_s = _generate(model)
    forward = compiled_forward(model, mode)
    _generate(model, forward)  # compiles every distinct call
    compiled, compiled_s = _generate(model, forward)
    print(f"distill={distill} compile={mode}: eager {eager_s:.4f} s/chunk, compiled {compiled_s:.4f} s/chunk")
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_the_decode_worker_on_its_own_stream_gives_the_in_line_result():
    def decode(latent):  # a stand-in decoder: enough kernels to run beside the main stream's work
        out = latent
        for _ in range(20):
            out = torch.tanh(out @ out.transpose(-1, -2) / out.shape[-1]) @ out
        return out.cpu()

    latents = [torch.randn(64, 512, 512, device="cuda") for _ in range(4)]
    expected = [decode(x) for x in latents]
    got = []
    with ChunkWorker(lambda x: got.append(decode(x))) as worker:
        for x in latents:
            y = x * 1.0  # made on the main stream just before submit: the side stream must wait for it
            worker.submit(y, y)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
