"""data.prefetch: the next steps' samples and noise are built in a background thread, bit-identical to building
them on the step's critical path, keyed by step (out-of-order steps are rebuilt), errors raised by the caller,
and the thread stopped by close() or when its builder is dropped."""

import gc
import threading
from dataclasses import replace

import pytest
import torch

from magi_train.config import validate
from magi_train.config.schema import TrainConfig
from magi_train.parallel.groups import init_parallel
from magi_train.training.batches import BatchBuilder, Prefetcher
from magi_train.training.objectives.flow_matching import FlowMatching
from magi_train.training.trainer import Trainer
from tests.configs import tiny_train_config


@pytest.fixture(scope="module")
def parallel():
    return init_parallel(TrainConfig().parallel)


def _config(tmp_path, prefetch: int, **trainer):
    cfg = tiny_train_config(tmp_path, **trainer)
    return replace(cfg, data=replace(cfg.data, prefetch=prefetch, global_batch_size=4))


def _builder(cfg, parallel) -> BatchBuilder:
    return BatchBuilder(cfg, parallel, FlowMatching(cfg.diffusion), 4, 2)


def _flat(micro):
    return [v for inputs, target in micro for v in (*inputs, target)]


def test_prefetched_batches_equal_unprefetched_ones_in_any_step_order(tmp_path, parallel):
    """Consecutive steps (served ahead), a jump forward (a resume), a step again and a jump back (evaluation-like
    reruns): every tensor equals the one built without prefetch, bit for bit."""
    order = [0, 1, 2, 7, 8, 8, 3, 4]
    plain = _builder(_config(tmp_path, 0), parallel)
    assert plain._prefetch is None
    ahead = _builder(_config(tmp_path, 2), parallel)
    try:
        for step in order:
            want, got = _flat(plain.step(step)), _flat(ahead.step(step))
            assert len(want) == len(got) == 2 * 7
            for a, b in zip(want, got):
                assert a.dtype == b.dtype and torch.equal(a, b), f"step {step}"
    finally:
        ahead.close()
    assert ahead._prefetch._thread is None


def test_training_with_prefetch_equals_training_without(tmp_path, parallel):
    runs = {}
    for prefetch in (0, 1):
        trainer = Trainer(_config(tmp_path / str(prefetch), prefetch, max_steps=3), parallel)
        history = trainer.fit()
        runs[prefetch] = ([h["loss"] for h in history], {k: v.clone() for k, v in trainer.model.state_dict().items()})
        trainer.batches.close()
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


class _Source:
    """A build function with a log of the keys it built, on which thread."""

    def __init__(self, fail_at=None):
        self.built, self.fail_at = [], fail_at

    def build(self, key):
        self.built.append((key, threading.current_thread() is threading.main_thread()))
        if key == self.fail_at:
            raise KeyError(f"bad sample at step {key}")
        return key * 10


def test_prefetcher_builds_ahead_within_its_depth_and_rebuilds_on_a_jump():
    src = _Source()
    pre = Prefetcher(src.build, depth=2)

    def get(key):
        value = pre.get(key)
        pre.schedule_after(key)
        return value

    try:
        assert get(0) == 0  # nothing was ahead: built on the caller's thread
        assert get(1) == 10 and get(2) == 20
        assert get(9) == 90  # a jump: the caller builds it, the worker goes on from 10
        assert get(10) == 100
    finally:
        pre.close()
    on_caller = [k for k, main in src.built if main]
    assert on_caller == [0, 9]
    assert (1, False) in src.built and (2, False) in src.built and (10, False) in src.built
    # Bounded: never more than `depth` keys past the last one asked for.
    assert max(k for k, _ in src.built) <= 12


def test_a_worker_exception_is_raised_by_get_and_the_prefetcher_goes_on():
    src = _Source(fail_at=1)
    pre = Prefetcher(src.build, depth=1)
    try:
        assert pre.get(0) == 0
        pre.schedule_after(0)
        with pytest.raises(KeyError, match="bad sample at step 1"):
            pre.get(1)  # built by the worker, raised here
        assert (1, False) in src.built
        pre.schedule_after(1)
        assert pre.get(2) == 20  # the steps after it are served
    finally:
        pre.close()


def test_close_stops_the_thread_and_a_later_get_starts_another():
    src = _Source()
    pre = Prefetcher(src.build, depth=1)
    pre.get(0)
    pre.schedule_after(0)
    first = pre._thread
    assert first.daemon and first.is_alive()
    pre.close()
    assert not first.is_alive()
    assert pre.get(5) == 50  # a new thread, the key built at once
    assert pre._thread is not first and pre._thread.is_alive()
    pre.close()


def test_a_dropped_builder_ends_its_thread():
    src = _Source()
    pre = Prefetcher(src.build, depth=1)
    pre.get(0)
    pre.schedule_after(0)
    thread = pre._thread
    del pre
    gc.collect()
    thread.join(timeout=60)  # not a speed check: the thread must end at all
    assert not thread.is_alive()


def test_prefetch_must_not_be_negative(tmp_path):
    cfg = tiny_train_config(tmp_path)
    with pytest.raises(ValueError, match=r"data\.prefetch \(-1\) must be >= 0"):
        validate(replace(cfg, data=replace(cfg.data, prefetch=-1)))


def test_dense_batches_weigh_moving_content_with_motion_weight(tmp_path, parallel):
    """The synthetic (dense) path under diffusion.motion_weight: the same inputs and velocity target, the loss
    weight of every element multiplied by motion_weight of its sample's clean latent."""
    from magi_train.diffusion.objective import motion_weight

    cfg = _config(tmp_path, 0)
    weighted = replace(cfg, diffusion=replace(cfg.diffusion, motion_weight=2.0))
    builder = _builder(cfg, parallel)
    plain, moving = builder.step(0), _builder(weighted, parallel).step(0)
    samples = builder._step_samples(0)
    assert len(samples) == len(plain) == len(moving)
    for (inputs_a, target_a), (inputs_b, target_b), s in zip(plain, moving, samples):
        assert all(torch.equal(a, b) for a, b in zip(inputs_a, inputs_b))
        assert torch.equal(target_a[:, :-1], target_b[:, :-1])
        w = motion_weight(s.latent, weighted.diffusion)[:, None]
        assert float(w.max()) > 1.5, "the synthetic blobs move: some elements must weigh more"
        torch.testing.assert_close(target_b[:, -1:], target_a[:, -1:] * w, rtol=1e-6, atol=0)
