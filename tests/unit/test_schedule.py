"""The staircase schedule of MAGI-1 inference (model/README.md §2.4), checked against the released trace and the call
sequence recorded from the released sampler (tests/fixtures/magi1_gelu/t2v.json)."""

import json
from pathlib import Path

import pytest
import torch

from magi_train.diffusion.schedule import staircase
from magi_train.diffusion.time_grid import TimeGrid

T2V = Path(__file__).resolve().parents[1] / "fixtures" / "magi1_gelu" / "t2v.json"


def test_spec_trace_n4_w4_s8():
    plans = staircase(num_chunks=4, window=4, steps=8)
    assert len(plans) == 14  # ps * (n + W - 1) = 2 * 7; step 13 is the last
    p = {pl.step: pl for pl in plans}
    assert (p[0].chunks, p[0].step_index) == ((0,), (0,))
    assert (p[2].chunks, p[2].step_index) == ((0, 1), (2, 0))
    assert (p[6].chunks, p[6].step_index, p[6].kv_chunks) == ((0, 1, 2, 3), (6, 4, 2, 0), ((0, 1), (0, 2), (0, 3), (0, 4)))
    assert (p[8].clean_chunk, p[8].chunks, p[8].step_index) == (0, (1, 2, 3), (6, 4, 2))
    assert p[8].kv_chunks == ((0, 1), (0, 2), (0, 3), (0, 4))
    assert (p[10].clean_chunk, p[10].chunks, p[10].kv_chunks) == (1, (2, 3), ((1, 2), (1, 3), (1, 4)))
    assert [pl.emit for pl in plans if pl.emit is not None] == [0, 1, 2, 3]
    assert plans[-1].emit == 3


@pytest.mark.parametrize("n, window, steps, prefix", [(1, 4, 8, 0), (5, 4, 16, 0), (6, 2, 4, 1), (3, 4, 64, 0), (7, 4, 8, 3)])
def test_invariants(n, window, steps, prefix):
    plans = staircase(n, window, steps, prefix_chunks=prefix)
    ps = steps // window
    assert len(plans) == ps * (n + window - 1 - prefix)
    seen = {c: [] for c in range(n)}
    for pl in plans:
        assert 1 <= len(pl.chunks) <= window
        assert list(pl.step_index) == sorted(pl.step_index, reverse=True)  # oldest chunk most denoised
        for c, k in zip(pl.chunks, pl.step_index):
            seen[c].append(k)
        for (start, end), c in zip(pl.kv_chunks, pl.forwarded):
            assert end == c + 1 and 0 <= start <= c  # block-causal: never a later chunk
        if pl.clean_chunk is not None:
            assert pl.kv_chunks[0] == (pl.clean_chunk, pl.clean_chunk + 1)  # clean re-forward sees itself only
    for c in range(n):
        # every generated chunk walks the grid 0..S-1 once, in order; prefix chunks are never denoised
        assert seen[c] == (list(range(steps)) if c >= prefix else [])
    assert [pl.emit for pl in plans if pl.emit is not None] == list(range(prefix, n))
    assert plans[0].extract_prefix == (prefix > 0) and not any(pl.extract_prefix for pl in plans[1:])


def test_matches_released_sampler_calls():
    rec = json.loads(T2V.read_text())["t2v"]
    ts = TimeGrid(8).t
    clean_t = torch.tensor(0.9999, dtype=torch.float32).item()
    tokens = 144
    plans = staircase(rec["chunk_num"], 4, 8)
    assert len(plans) == rec["total_forward_steps"] == len(rec["dispatcher_calls"])
    for pl, call in zip(plans, rec["dispatcher_calls"]):
        t = ([clean_t] if pl.clean_chunk is not None else []) + [ts[k].item() for k in pl.step_index]
        assert t == call["t"]
        assert [[s * tokens, e * tokens] for s, e in pl.kv_chunks] == call["kv_range"]
        assert pl.slice_point == call["slice_point"]
        assert pl.range_num == call["range_num"]
        assert len(pl.forwarded) == call["denoising_range_num"]
        assert (pl.clean_chunk is not None) == call["fwd_extra_1st_chunk"]
    assert [pl.emit for pl in plans if pl.emit is not None] == rec["emitted_chunks"]


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by window"):
        staircase(3, 4, 6)
    with pytest.raises(ValueError, match="prefix_chunks"):
        staircase(3, 4, 8, prefix_chunks=3)
