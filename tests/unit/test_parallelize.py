"""`parallelize_dit` on the meta device (no communication): invariants first with the config fields named,
then TP shapes that follow the shard specs, the pipeline stage's modules, and the recorded full layout."""

from __future__ import annotations

import pytest
import torch

from magi_train.mcore import ProcessGroupCollection
from magi_train.model.dit import build_dit, full_shapes, meta_dit
from magi_train.parallel.groups import Parallel
from magi_train.parallel.parallelize import check_invariants, parallelize_dit
from magi_train.parallel.plan import shard_spec
from magi_train.parallel.sequence import UlyssesLayout
from tests.distributed.common import tiny

# megatron's linears read the group's size only once torch.distributed is initialised (a one-rank job here).
pytestmark = pytest.mark.usefixtures("single_process_group")


class FakeGroup:
    """Sizes and ranks only: building and sharding on the meta device never communicates."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def fake_parallel(tp: int = 1, cp: int = 1, tp_rank: int = 0, sequence_parallel: bool = False) -> Parallel:
    tp_g, cp_g, one = FakeGroup(tp, tp_rank), FakeGroup(cp), FakeGroup(1)
    groups = ProcessGroupCollection(tp=tp_g, cp=cp_g, pp=one, dp=one, dp_cp=cp_g, tp_cp=one, mp=one, tp_dp_cp=one)
    return Parallel(groups, rank=tp_rank, world_size=tp * cp, device=torch.device("cpu"), tp=tp, cp=cp,
                    sequence_parallel=sequence_parallel)


@pytest.mark.parametrize("kwargs,field", [
    (dict(tp=3, cp=1, stages=1), "model.num_attention_heads=4 is not divisible by parallel.tp=3"),
    (dict(tp=1, cp=8, stages=1), "parallel.cp=8"),
    (dict(tp=1, cp=1, stages=4), "model.num_layers=2 is not divisible by parallel.pp x parallel.vpp = 4"),
])
def test_invariants_name_the_fields(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("=", "=")):
        check_invariants(tiny(), cp_impl="ulysses", **kwargs)


def test_cp_impl_must_be_known():
    with pytest.raises(ValueError, match="parallel.cp_impl='ring' is not one of ulysses, magi"):
        check_invariants(tiny(), 1, 1, 1, "ring")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tp,tp_rank", [(2, 1), (4, 3)])  # tp4: more ranks than the 2 KV heads
def test_tp_shapes_follow_the_shard_specs(gated, tp, tp_rank):
    cfg = tiny(gated_linear_unit=gated)
    model = parallelize_dit(meta_dit(cfg), fake_parallel(tp=tp, tp_rank=tp_rank, sequence_parallel=True))
    full = full_shapes(cfg)
    assert model.parallel_plan.full_shapes == full  # recorded before sharding
    local = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert set(local) == set(full)
    for name, shape in local.items():
        assert shape == shard_spec(model, name, full[name]).local_shape, name
    assert local["videodit_blocks.layers.0.self_attention.linear_qkv.q.weight"] == (256 // tp, 256)
    assert isinstance(model.token_layout, UlyssesLayout) and model.token_layout.split == tp
    assert model.videodit_blocks.layers[0].self_attention.proj_groups == cfg.proj_interleave_groups // tp


def test_pipeline_stage_keeps_its_layers_and_the_full_names():
    cfg = tiny(num_layers=4)
    first = parallelize_dit(meta_dit(cfg), fake_parallel(), stage=(0, 2))
    last = parallelize_dit(meta_dit(cfg), fake_parallel(), stage=(1, 2))
    assert first.pre_process and not first.post_process and not last.pre_process and last.post_process
    names = [n for m in (first, last) for n, _ in m.named_parameters()]
    assert sorted(names) == sorted(full_shapes(cfg)) and len(names) == len(set(names))
    assert list(first.videodit_blocks.layers._modules) == ["0", "1"]
    assert list(last.videodit_blocks.layers._modules) == ["2", "3"]
    assert first.parallel_plan.full_shapes == last.parallel_plan.full_shapes == full_shapes(cfg)


def test_a_materialised_model_is_refused():
    with pytest.raises(ValueError, match="meta device"):
        parallelize_dit(build_dit(tiny()), fake_parallel(tp=2))


def test_build_dit_refuses_a_tensor_parallel_group():
    with pytest.raises(ValueError, match="parallelize_dit"):
        build_dit(tiny(), tp_group=FakeGroup(2), device="meta")
