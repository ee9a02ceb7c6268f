"""The pipeline under model parallelism (2 gloo ranks, cp=2): the same video as one process, and a live prompt or
a cancel decided on rank 0 alone reaches every rank at the same step (the engine broadcasts rank 0's decision)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.multirank

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_base"
STEPS = 4
PROMPT, LATER = "a red blob moves right", "a green blob moves left"


def _ranks() -> dict:
    import torch.distributed as dist

    from magi_infer import Cancelled, LivePrompts, MagiPipeline
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel

    parallel = init_parallel(ParallelConfig(cp=2))
    pipe = MagiPipeline.from_pretrained(TINY, parallel=parallel, overrides={"progress": False, "parallel.cp": 2})
    main = dist.get_rank() == 0
    live = LivePrompts()  # every rank passes one; only rank 0's is ever set

    def on_step(step, total):
        if main and step == 1:
            live.set(LATER)

    out = pipe(PROMPT, num_frames=72, seed=2, num_steps=STEPS, live=live, callback=on_step)
    cancel, steps = threading.Event(), []

    def cancel_at_2(step, total):
        steps.append(step)
        if main and step == 2:
            cancel.set()

    try:
        pipe(PROMPT, num_frames=72, num_steps=STEPS, callback=cancel_at_2, cancel=cancel)
        cancelled = "not cancelled"
    except Cancelled as e:
        cancelled = str(e)
    return {"frames": None if out.frames is None else out.frames.tolist(), "prompts": out.prompts,
            "applied": live.applied, "cancelled": cancelled, "steps": steps}


def test_live_prompts_and_cancel_under_two_ranks():
    from magi_infer import MagiPipeline

    results = run_ranks(2, _ranks)
    torch.set_num_threads(1)
    one = MagiPipeline.from_pretrained(TINY, overrides={"progress": False})
    static = one([PROMPT, LATER], num_frames=72, seed=2, num_steps=STEPS)
    r0, r1 = results
    # Rank 0's prompt, broadcast: every rank records it.
    assert r0["applied"] == r1["applied"] == [(1, LATER)]
    assert r0["prompts"] == r1["prompts"] == [PROMPT, LATER, LATER]
    frames = np.asarray(r0["frames"], dtype=np.uint8)
    assert r1["frames"] is None  # only rank 0 returns frames
    # cp=2 splits attention over ranks: the video equals one process's to the last bit of uint8 frames.
    assert frames.shape == static.frames.shape and np.abs(frames.astype(int) - static.frames).max() <= 1
    for r in results:
        assert r["cancelled"] == "generation cancelled after sampler step 2 of 6" and r["steps"] == [1, 2]
