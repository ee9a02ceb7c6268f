"""TP / SP / CP forward and gradients of the DiT equal the single-process model (tiny preset, fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.common import emulated_magi_cp, grad_errors, inputs, nonzero_output_layer, rel_err, tiny
from tests.distributed.launch import run_ranks


def _compare(layout: dict, gated: bool):
    with emulated_magi_cp(layout):
        return _compare_layout(layout, gated)


def _compare_layout(layout: dict, gated: bool):
    from magi_train.config.schema import ParallelConfig
    from magi_train.model.dit import build_dit
    from magi_train.parallel.dispatch import MagiDispatchLayout
    from magi_train.parallel.grads import finalize_model_grads
    from magi_train.parallel.groups import init_parallel
    from magi_train.parallel.parallelize import build_parallel_dit
    from magi_train.parallel.plan import shard_spec
    from magi_train.parallel.sharding import local_from_full

    cfg = tiny(gated_linear_unit=gated)
    par = init_parallel(ParallelConfig(**layout))
    oracle = build_dit(cfg, init_seed=3)
    model = build_parallel_dit(cfg, par, cp_impl=layout.get("cp_impl", "ulysses"), init_seed=3)
    if layout.get("cp_impl") == "magi":
        assert isinstance(model.token_layout, MagiDispatchLayout)
    nonzero_output_layer([oracle, model])
    x, t, caption, mask, ranges, weight = inputs(cfg)
    dropped = torch.tensor([False, True])

    errors = {}
    for name, net in (("oracle", oracle), ("parallel", model)):
        out = net(x, t, caption, mask, ranges, adaln_uncond=dropped)
        (out * weight).sum().backward()
        errors[name] = out.detach()
    finalize_model_grads([model], par.groups.dp_cp)
    errors = {"output": rel_err(errors["parallel"], errors["oracle"])}
    full = dict(oracle.named_parameters())
    for name, p in model.named_parameters():
        # The parameters themselves are the oracle's slices (layout-independent initialisation).
        assert torch.equal(p.detach(), local_from_full(full[name].detach(), shard_spec(model, name, full[name].shape))), name
    errors.update(grad_errors([model], oracle))
    return errors


def _compare_all(cases):
    return {name: _compare(layout, gated) for name, layout, gated in cases}


CASES = {
    2: [
        ("tp2", {"tp": 2}, False),
        ("tp2_swiglu", {"tp": 2}, True),
        ("tp2_sp", {"tp": 2, "sequence_parallel": True}, True),
        ("cp2", {"cp": 2}, False),
        # MagiAttention's dispatch (emulated API): non-contiguous token sets, whole heads per rank.
        ("cp2_magi", {"cp": 2, "cp_impl": "magi"}, True),
    ],
    4: [
        ("tp4_kv_replicated_sp", {"tp": 4, "sequence_parallel": True}, False),
        ("cp4_kv_replicated", {"cp": 4}, True),
        ("tp2_cp2_sp", {"tp": 2, "cp": 2, "sequence_parallel": True}, True),
        ("cp4_magi", {"cp": 4, "cp_impl": "magi"}, False),
        ("tp2_cp2_sp_magi", {"tp": 2, "cp": 2, "sequence_parallel": True, "cp_impl": "magi"}, True),
    ],
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_forward_and_grads_match_single_process(world):
    # One spawn per world size (rank start-up dominates); every layout of that size runs in it.
    for rank, errors in enumerate(run_ranks(world, _compare_all, CASES[world])):
        for name, err in errors.items():
            assert err["output"] < 1e-5, (rank, name, err)
            assert err["grad"] < 1e-5, (rank, name, err)
