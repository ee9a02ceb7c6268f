"""The KV cache and the cache-free oracle are bounded by the attention window, not by the video: cache bytes,
tokens read per call and tokens fed to the model per call are counted for 2, 8 and 32 chunks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import magi_train.diffusion.sampler as sampler_module
from magi_train.config.schema import SamplerConfig
from magi_train.diffusion.kv_cache import KVCache, cache_window
from magi_train.diffusion.sampler import StaircaseSampler
from magi_train.diffusion.schedule import staircase
from tests.unit.test_sampler import captions, tiny_model

# Released lookbacks (noise2clean 5,4,3,2; clean chunks attend to themselves), 8 steps per chunk, window 4
# (2 per stage: the second call of a stage reads the chunk before it from the cache).
FAST = dict(num_steps=8, window_size=4)
CASES = {"distill": dict(distill=True, cfg=dict(cfg_number=1, **FAST)),
         "cfg3": dict(distill=False, cfg=dict(cfg_number=3, **FAST))}


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's small ops are fastest on one thread, and so is a CPU shared with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(model, n: int, **cfg):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 16, 6 * n, 4, 4, generator=g)
    sampler = StaircaseSampler(model, dataclasses.replace(SamplerConfig(), **cfg))
    chunks = [c.latent for c in sampler.sample(noise, captions(n, model, g))]
    return sampler, chunks


@pytest.mark.parametrize("name", sorted(CASES))
def test_cache_bytes_and_tokens_read_per_call_do_not_grow_with_the_video(name, single_process_group):
    case = CASES[name]
    model = tiny_model(case["distill"], single_process_group)
    runs = {n: generate(model, n, **case["cfg"])[0] for n in (2, 8, 32)}
    tokens = runs[2]._tokens
    cache = {n: s._cache for n, s in runs.items()}
    # 8 and 32 chunks: the same buffers and the same reads; 2 chunks (shorter than the window) hold less.
    assert cache[8].nbytes() == cache[32].nbytes() > 0 and cache[2].nbytes() < cache[8].nbytes()
    assert cache[8].capacity == cache[32].capacity == (6 if case["distill"] else 5) < 8
    assert set(cache[8].read_tokens) == set(cache[32].read_tokens) == {0, tokens}  # the lookback: one chunk
    assert max(cache[2].read_tokens) <= tokens
    # Nothing is copied but the current tokens: the window slides at a clean re-forward, which itself rewrites
    # the one chunk later calls read, so a slide moves nothing; the window did slide along the video.
    assert cache[8].copied_tokens == cache[32].copied_tokens == 0
    assert cache[32].base > cache[8].base > 0
    # Per call the model sees the window only.
    assert set(runs[8].fed_tokens) == set(runs[32].fed_tokens)


def test_the_cache_free_oracle_prepends_only_the_lookback_window(single_process_group):
    model = tiny_model(True, single_process_group)
    runs = {n: generate(model, n, kv_cache=False, **CASES["distill"]["cfg"])[0] for n in (8, 32)}
    tokens = runs[8]._tokens
    assert runs[8].fed_tokens.keys() == runs[32].fed_tokens.keys()
    # 4 chunks + the nearly-clean duplicate + the clean re-forward, or (later in the stage) the one chunk of
    # lookback recomputed in its place; the old oracle prepended every earlier chunk (up to 35 for 32 chunks).
    assert max(runs[32].fed_tokens) == max(runs[8].fed_tokens) == 6 * tokens


def test_a_sliding_window_gives_the_whole_video_cache_bitwise(single_process_group, monkeypatch):
    """The bounded window (slides, in-place and offloaded) against one buffer over the whole video."""
    model = tiny_model(True, single_process_group)
    cfg = CASES["distill"]["cfg"]
    bounded = generate(model, 8, **cfg)
    offloaded = generate(model, 8, kv_offload=True, **cfg)
    whole = lambda *a, **k: dataclasses.replace(cache_window(*a, **k), capacity=9)  # noqa: E731
    monkeypatch.setattr(sampler_module, "cache_window", whole)
    unbounded = generate(model, 8, **cfg)
    assert bounded[0]._cache.capacity == 6 and unbounded[0]._cache.capacity == 9
    assert bounded[0]._cache.base > 0 and unbounded[0]._cache.base == 0
    for a, b, c in zip(bounded[1], unbounded[1], offloaded[1]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_window_follows_the_lookbacks():
    plans = staircase(16, 4, 8, 0, (5, 4, 3, 2), 1)
    assert cache_window(plans).capacity == 5 and cache_window(plans).max_read == 1
    wide = staircase(16, 4, 8, 0, (8, 8, 8, 8), 1)  # lookback 8: the oldest chunk reads the 7 before it
    assert cache_window(wide).max_read == 7 and cache_window(wide).capacity == 7 - 1 + 5  # + clean + 4 chunks
    everything = staircase(16, 4, 8, 0, (), 1)  # noise2clean_kvrange=[]: all earlier chunks, the whole video
    assert cache_window(everything).capacity == 16
    # a long prefix: only its chunks within reach of the first generated ones are stored
    prefixed = staircase(16, 4, 8, 10, (5, 4, 3, 2), 1)
    assert cache_window(prefixed, 10).prefix_keep == 6


def test_reads_outside_the_window_fail_clearly():
    cache = KVCache(num_layers=1, chunk_tokens=2, capacity=3)
    k = torch.zeros(2, 1, 4)
    cache.hook(first=0, lo=0, current=1, write=1)(0, k, k)
    with pytest.raises(RuntimeError, match=r"only 1 were written"):
        cache.hook(first=2, lo=1, current=1)
    for first in (1, 2, 3):
        cache.hook(first=first, lo=first - 1, current=1, write=1, keep=first - 1)(0, k, k)
    with pytest.raises(RuntimeError, match="window starts at chunk 2"):
        cache.hook(first=4, lo=0, current=1)
    with pytest.raises(ValueError, match="got 4 key tokens"):
        cache.hook(first=4, lo=3, current=1)(0, torch.zeros(4, 1, 4), torch.zeros(4, 1, 4))
