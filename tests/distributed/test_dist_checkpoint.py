"""Distributed checkpoints reshard: saved under TP2 x PP2 and resumed under TP2 x DP2 (replicated KV head,
ZeRO over 2), DP4, CP2 x DP2, TP1 (whole model per rank), two virtual-pipeline chunks and a one-process
layout, and saved under DP4 and resumed under TP2 x PP2, with every parameter and Adam moment bitwise equal
to the saved ones; a failed save (a rank's disk full: the error says so) or an interrupted one never becomes
the latest checkpoint; a different model fails naming the key and the file.

The checkpoints also carry an "ema" set of extra weights (`extra_weights`, values unlike the model's): it
reshards the same way (every local EMA tensor equals the full EMA's slice, bitwise), loads that do not ask
for it still work, a checkpoint without it fails naming the checkpoint and the prefix, a float64 set keeps
its dtype, and bad prefixes or sets that do not match the model fail naming the prefix and the parameter.

The reference is a TP=1 model with an unsharded AdamW: every layout initialises the same full weights
(layout-independent init) and takes one AdamW step with the same full-size random gradients, and AdamW is
elementwise, so every layout's state is the reference's, sliced (checked for the saving layout itself,
so "equals the reference" means "equals what was saved"). All of it runs in one 4-rank launch.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from magi_train.parallel.plan import shard_spec
from tests.distributed.common import single_process_parallel, singleton_groups, tiny
from tests.distributed.launch import run_ranks

# SwiGLU (2-piece shards), 4 layers for 2 pipeline stages, 1 KV head (replicated on both TP ranks at TP2).
CFG = dict(num_layers=4, gated_linear_unit=True, num_query_groups=1)
SEED, OTHER_SEED = 3, 11  # the saved model's init; the init of models that are then overwritten by a load
EXTRA = {"step": 1, "data": {"epoch": 0, "sample": 7}}


def _opt_cfg():
    from magi_train.config.schema import OptimizerConfig

    return OptimizerConfig(lr=1e-2, weight_decay=0.1)


def _stage(par, seed: int, layers=None, pre: bool | None = None, post: bool | None = None):
    """This rank's pipeline stage (or the given layers) of the tiny model."""
    from magi_train.parallel.parallelize import build_parallel_dit

    cfg = tiny(**CFG)
    if layers is None:
        stage = (par.pp_rank, par.pp) if par.pp > 1 else None
    else:
        stage = (layers[0] // len(layers), cfg.num_layers // len(layers))
    model = build_parallel_dit(cfg, par, stage=stage, init_seed=seed)
    assert (pre is None or model.pre_process == pre) and (post is None or model.post_process == post)
    return model


def _optimizer(models, group):
    from magi_train.parallel.zero import ShardedAdamW

    return ShardedAdamW([np for m in models for np in m.named_parameters()], _opt_cfg(), group=group)


def _full_shapes() -> dict:
    from magi_train.model.dit import full_shapes

    return {k: torch.Size(v) for k, v in full_shapes(tiny(**CFG)).items()}


def _full_ema(name: str, shape) -> torch.Tensor:
    """The full "ema" tensor of parameter `name`: random, unlike the model's weights."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(f"ema.{name}".encode())))


def _ema(models, fill: float | None = None, dtype=torch.float32) -> list:
    """One "ema" dict per model: the local slices of the full EMA, or tensors of `fill` (load targets)."""
    from magi_train.parallel.sharding import local_from_full

    full = _full_shapes()
    return [{name: (local_from_full(_full_ema(name, full[name]), shard_spec(model, name, full[name])).clone()
                    if fill is None else torch.full(p.shape, fill)).to(dtype)
             for name, p in model.named_parameters()} for model in models]


def _ema_mismatches(models, ema) -> list:
    """Names whose local "ema" tensor differs from the full EMA's slice (bitwise; NaN = never filled)."""
    from magi_train.parallel.sharding import local_from_full

    full = _full_shapes()
    expected = {name: local_from_full(_full_ema(name, full[name]), shard_spec(model, name, full[name]))
                for model in models for name, _ in model.named_parameters()}
    return [f"ema {name}" for tensors in ema for name, t in tensors.items()
            if not torch.equal(t, expected[name].to(t.dtype))]


def _error(fn) -> str | None:
    """The message of the ValueError `fn` raises (None if it returns)."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _train_step(models, optimizer) -> None:
    """One AdamW step with full-size gradients drawn per parameter name, sliced for the layout."""
    from magi_train.parallel.sharding import local_from_full

    full = _full_shapes()
    for model in models:
        for name, p in model.named_parameters():
            g = torch.randn(full[name], generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
            p.grad = local_from_full(g, shard_spec(model, name, full[name])).to(p.dtype)
    optimizer.step()


def _reference():
    """The TP=1 model and unsharded optimizer after the step (on this rank alone)."""
    from magi_train.model.dit import build_dit

    model = build_dit(tiny(**CFG), tp_group=singleton_groups()[torch.distributed.get_rank()], init_seed=SEED)
    optimizer = _optimizer([model], None)
    _train_step([model], optimizer)
    return model, optimizer


def _mismatches(models, optimizer, reference) -> list:
    """Names whose local parameter or owned Adam state differs from the reference's slice (bitwise)."""
    from magi_train.parallel.sharding import local_from_full

    ref_model, ref_opt = reference
    full = dict(ref_model.named_parameters())
    ref_state = ref_opt.owned_state()
    specs, bad = {}, []
    for model in models:
        for name, p in model.named_parameters():
            specs[name] = shard_spec(model, name, full[name].shape)
            if not torch.equal(p.detach(), local_from_full(full[name].detach(), specs[name])):
                bad.append(f"param {name}")
    owned = {n for n in optimizer.params if optimizer.owner[n] == optimizer.rank}
    state = optimizer.owned_state()
    if set(state) != owned:
        bad.append(f"owned state for {sorted(set(state) ^ owned)[:3]}")
    for name in set(state) & owned:
        for moment in ("exp_avg", "exp_avg_sq"):
            if not torch.equal(state[name][moment], local_from_full(ref_state[name][moment], specs[name])):
                bad.append(f"{moment} {name}")
        if not torch.equal(state[name]["step"], ref_state[name]["step"]):
            bad.append(f"step {name}")
    return bad


def _local_snapshot(models, optimizer) -> dict:
    snap = {f"model.{n}": p.detach().clone() for m in models for n, p in m.named_parameters()}
    for name, s in optimizer.owned_state().items():
        snap.update({f"optim.{name}.{k}": v.clone() for k, v in s.items()})
    return snap


def _load_into(path, par, reference, ema: bool = False) -> tuple:
    """A fresh stage for layout `par` (another init) loaded from `path` (with its "ema" set if `ema`): what
    differs from the reference and the full EMA, and the saved trainer state."""
    from magi_train.checkpoint.distributed import load_train_state

    model = _stage(par, OTHER_SEED)
    optimizer = _optimizer([model], par.groups.dp_cp)
    sets = {"ema": _ema([model], fill=float("nan"))} if ema else None
    extra = load_train_state(path, [model], optimizer, par, extra_weights=sets)
    return _mismatches([model], optimizer, reference) + (_ema_mismatches([model], sets["ema"]) if ema else []), extra


def _round_trips(root: str, root2: str) -> dict:
    import errno
    import os

    from magi_train.checkpoint.distributed import load_train_state, read_full_model_state, save_train_state
    from magi_train.checkpoint.manager import CheckpointManager
    from magi_train.config.schema import ParallelConfig
    from magi_train.model.dit import build_dit
    from magi_train.parallel.groups import init_parallel

    rank = torch.distributed.get_rank()
    reference = _reference()
    out = {}

    # ---- saved under TP2 x PP2 (KV head replicated on both TP ranks)
    par = init_parallel(ParallelConfig(tp=2, pp=2))
    model = _stage(par, SEED)
    optimizer = _optimizer([model], par.groups.dp_cp)
    _train_step([model], optimizer)
    manager = CheckpointManager(root, keep_last=2, read_only=rank != 0)
    # Sets that do not fit fail on every rank before anything is written.
    good = _ema([model])[0]
    # A TP-sharded parameter of this stage: local shape (512, 256), full (1024, 256).
    name = out["fc1_name"] = f"videodit_blocks.layers.{2 * par.pp_rank}.mlp.linear_fc1.weight"
    bad_sets = {
        "prefix_model": {"model": [good]}, "prefix_optim": {"optim": [good]}, "prefix_trainer": {"trainer": [good]},
        "prefix_dash": {"my-ema": [good]}, "prefix_dot": {"ema.x": [good]},
        "missing_name": {"ema": [{k: v for k, v in good.items() if k != name}]},
        "unexpected_name": {"ema": [{**good, "not_a_param": good[name]}]},
        "full_shape": {"ema": [{**good, name: torch.zeros(1024, 256)}]},
        "two_dicts": {"ema": [good, good]},
    }
    out["save_errors"] = {label: _error(lambda sets=sets: save_train_state(manager, 1, [model], optimizer, EXTRA, par,
                                                                            extra_weights=sets))
                          for label, sets in bad_sets.items()}

    path = save_train_state(manager, 1, [model], optimizer, EXTRA, par, extra_weights={"ema": _ema([model])})
    out["path"] = str(path)
    out["trained_vs_reference"] = _mismatches([model], optimizer, reference)

    # The saving layout's own reload is bitwise.
    saved = _local_snapshot([model], optimizer)
    fresh = _stage(par, OTHER_SEED)
    fresh_opt = _optimizer([fresh], par.groups.dp_cp)
    out["extra"] = load_train_state(path, [fresh], fresh_opt, par)
    reloaded = _local_snapshot([fresh], fresh_opt)
    out["reload_differs"] = sorted(k for k in saved.keys() | reloaded.keys()
                                   if k not in saved or k not in reloaded or not torch.equal(saved[k], reloaded[k]))

    # A rank whose disk fills up fails the save on every rank, saying so; the temporary directory is removed.
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    if rank == 1:
        os.write = full_disk
    try:
        save_train_state(manager, 2, [model], optimizer, EXTRA, par)
        out["failed_save_error"] = None
    except Exception as e:  # noqa: BLE001
        out["failed_save_error"] = str(e)
    finally:
        os.write = real_write
    out["after_failed_save"] = sorted(os.listdir(root))

    # Rank 0 "dies" after every rank wrote its files, before the marker: no marker, no clean-up.
    def dying_finish(*args, **kwargs):
        raise OSError("killed (simulated)")

    manager.finish_save, manager.abort_save = dying_finish, lambda tmp: None
    try:
        save_train_state(manager, 2, [model], optimizer, EXTRA, par)
        out["died_save_error"] = None
    except Exception as e:  # noqa: BLE001
        out["died_save_error"] = str(e)

    # ---- resumed under other layouts
    layouts = {"tp2_dp2": {"tp": 2}, "dp4": {}, "cp2_dp2": {"cp": 2}}
    pars = {label: init_parallel(ParallelConfig(**layout)) for label, layout in layouts.items()}
    for label, par in pars.items():  # the "ema" set with TP (a replicated KV head) and CP; DP4 without it
        out[label] = _load_into(path, par, reference, ema=label != "dp4")[0]
    # Two virtual-pipeline chunks per rank.
    chunks = [_stage(pars["dp4"], OTHER_SEED, layers=[0, 1], pre=True, post=False),
              _stage(pars["dp4"], OTHER_SEED, layers=[2, 3], pre=False, post=True)]
    optimizer = _optimizer(chunks, pars["dp4"].groups.dp_cp)
    ema = _ema(chunks, fill=float("nan"))
    load_train_state(path, chunks, optimizer, pars["dp4"], extra_weights={"ema": ema})
    out["two_chunks"] = _mismatches(chunks, optimizer, reference) + _ema_mismatches(chunks, ema)
    # TP1 x PP1 on each rank: the whole model and an unsharded optimizer.
    whole = build_dit(tiny(**CFG), tp_group=singleton_groups()[rank], init_seed=OTHER_SEED)
    optimizer = _optimizer([whole], None)
    whole_ema = _ema([whole], fill=float("nan"))
    load_train_state(path, [whole], optimizer, pars["dp4"], extra_weights={"ema": whole_ema})
    out["tp1_whole_model"] = _mismatches([whole], optimizer, reference) + _ema_mismatches([whole], whole_ema)
    # Asking for a set the checkpoint lacks, or with a dict that does not fit, fails on every rank.
    out["load_missing_prefix"] = _error(lambda: load_train_state(
        path, [whole], _optimizer([whole], None), pars["dp4"], extra_weights={"swa": _ema([whole])}))
    out["load_missing_name"] = _error(lambda: load_train_state(
        path, [whole], _optimizer([whole], None), pars["dp4"],
        extra_weights={"ema": [{k: v for k, v in _ema([whole])[0].items() if k != out["fc1_name"]}]}))
    # A one-process layout inside the larger job (the tests' oracles): each rank saves and loads alone,
    # here with a float64 "ema" set (the extra weights' own dtype is stored).
    alone = single_process_parallel()
    own = save_train_state(CheckpointManager(f"{root2}_rank{rank}", keep_last=1), 3, [whole], optimizer, EXTRA, alone,
                           extra_weights={"ema": [{k: v.double() for k, v in whole_ema[0].items()}]})
    whole2 = build_dit(tiny(**CFG), tp_group=singleton_groups()[rank], init_seed=OTHER_SEED)
    optimizer2 = _optimizer([whole2], None)
    ema64 = _ema([whole2], fill=float("nan"), dtype=torch.float64)
    load_train_state(own, [whole2], optimizer2, alone, extra_weights={"ema": ema64})
    out["alone"] = _mismatches([whole2], optimizer2, reference) + _ema_mismatches([whole2], ema64)
    out["load_wrong_dtype"] = _error(lambda: load_train_state(
        own, [whole2], _optimizer([whole2], None), alone, extra_weights={"ema": _ema([whole2])}))

    # ---- saved under DP4 (ZeRO: each rank owns a quarter), resumed under TP2 x PP2
    again = save_train_state(CheckpointManager(root2, keep_last=1, read_only=rank != 0), 5, [whole], optimizer,
                             EXTRA, pars["dp4"], extra_weights={"ema": whole_ema})
    out["dp4_to_tp2_pp2"], extra = _load_into(again, init_parallel(ParallelConfig(tp=2, pp=2)), reference, ema=True)
    out["dp4_layout"] = extra["layout"]

    # ---- a different model fails on every rank, naming the key and the file
    for label, changes in (("more_layers", {"num_layers": 5}), ("no_swiglu", {"gated_linear_unit": False})):
        other = build_dit(tiny(**{**CFG, **changes}), tp_group=singleton_groups()[rank], init_seed=OTHER_SEED)
        try:
            load_train_state(path, [other], _optimizer([other], None), pars["dp4"])
            out[f"error_{label}"] = None
        except ValueError as e:
            out[f"error_{label}"] = str(e)

    if rank == 0:
        # One process alone, even with a process group present.
        full = read_full_model_state(path)
        expected = reference[0].state_dict()
        out["full_state_keys_equal"] = sorted(full) == sorted(expected)
        out["full_state_differs"] = [k for k in expected if k in full and not torch.equal(full[k], expected[k])]
        out["reference_state"] = {k: v.clone() for k, v in expected.items()}
    return out


def test_save_tp2_pp2_resume_under_other_layouts(tmp_path: Path):
    from magi_train.checkpoint.distributed import (checkpoint_has, load_train_state, read_full_model_state,
                                                   read_full_weights)
    from magi_train.checkpoint.manager import CheckpointManager, find_checkpoint
    from magi_train.model.dit import build_dit

    root = tmp_path / "ckpt"
    results = run_ranks(4, _round_trips, str(root), str(tmp_path / "ckpt_dp4"))
    step1 = root / "step_00000001"
    for rank, out in enumerate(results):
        assert out["path"] == str(step1)
        for label in ("trained_vs_reference", "reload_differs", "tp2_dp2", "dp4", "cp2_dp2", "two_chunks",
                      "tp1_whole_model", "alone", "dp4_to_tp2_pp2"):
            assert out[label] == [], (rank, label, out[label][:5])
        assert out["extra"] == {**EXTRA, "layout": {"tp": 2, "cp": 1, "pp": 2, "dp": 1, "vpp": 1, "world_size": 4}}
        assert out["dp4_layout"] == {"tp": 1, "cp": 1, "pp": 1, "dp": 4, "vpp": 1, "world_size": 4}
        # Every rank raises: the failing one its own error, the others naming it.
        failed = out["failed_save_error"]
        assert failed is not None and "no space left on device" in failed and "step_00000002" in failed, failed
        assert rank == 1 or "rank 1 failed" in failed, failed
        assert out["died_save_error"] is not None and "killed" in out["died_save_error"], out["died_save_error"]
        more = out["error_more_layers"]
        assert more is not None and "missing keys" in more and "model.videodit_blocks.layers.4." in more, more
        assert str(step1 / "index.json") in more, more
        fc1 = out["error_no_swiglu"]
        assert fc1 is not None and "model.videodit_blocks.layers.0.mlp.linear_fc1.weight: expected (512, 256)" in fc1, fc1
        # Extra weight sets: every bad one raises ValueError on every rank, naming the prefix and the parameter.
        fc1_name = out["fc1_name"]
        assert fc1_name == f"videodit_blocks.layers.{0 if rank < 2 else 2}.mlp.linear_fc1.weight", fc1_name
        errors = out["save_errors"]
        for label, prefix in (("prefix_model", "'model'"), ("prefix_optim", "'optim'"), ("prefix_trainer", "'trainer'"),
                              ("prefix_dash", "'my-ema'"), ("prefix_dot", "'ema.x'")):
            assert errors[label] is not None and f"prefix {prefix} is not allowed" in errors[label], (label, errors[label])
        assert errors["missing_name"] is not None and f"extra_weights['ema'][0] lacks parameter '{fc1_name}'" \
            in errors["missing_name"], errors["missing_name"]
        assert errors["unexpected_name"] is not None and "'ema'" in errors["unexpected_name"] \
            and "'not_a_param'" in errors["unexpected_name"], errors["unexpected_name"]
        assert errors["full_shape"] is not None and f"extra_weights['ema'][0] parameter '{fc1_name}': expected local " \
            "shape (512, 256), got (1024, 256)" in errors["full_shape"], errors["full_shape"]
        assert errors["two_dicts"] is not None and "one dict per model (1)" in errors["two_dicts"], errors["two_dicts"]
        missing = out["load_missing_prefix"]
        assert missing is not None and f"checkpoint {step1} holds no 'swa' weights" in missing, missing
        assert out["load_missing_name"] is not None and f"lacks parameter '{fc1_name}'" in out["load_missing_name"]
        wrong = out["load_wrong_dtype"]
        assert wrong is not None and "dtype mismatches" in wrong and "ema.x_embedder.weight: expected " \
            "torch.float32, checkpoint has torch.float64" in wrong, wrong
    assert results[0]["after_failed_save"] == ["step_00000001"]  # the failed save's temporary dir is gone
    assert results[0]["full_state_keys_equal"] and results[0]["full_state_differs"] == []

    # The interrupted save left a directory without marker: never taken, then tidied up.
    leftovers = [p.name for p in root.iterdir() if p.name != "step_00000001"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp_new_00000002_"), leftovers
    assert find_checkpoint(root) == step1
    assert CheckpointManager(root, keep_last=0, read_only=True).resolve_resume("auto") == step1
    CheckpointManager(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]

    # The converter's and inference's path: one process, no process group.
    full = read_full_model_state(step1)
    reference = results[0]["reference_state"]
    assert sorted(full) == sorted(reference)  # the model weights only, not the "ema" set
    assert all(torch.equal(full[k], reference[k]) and full[k].dtype == reference[k].dtype for k in reference)
    assert torch.equal(read_full_weights(step1, "model")["final_linear.linear.weight"],
                       reference["final_linear.linear.weight"])
    # The exporter's path for the EMA: the full set, as saved (and float64 where it was saved so).
    ema = read_full_weights(step1, "ema")
    assert sorted(ema) == sorted(reference)
    assert all(torch.equal(ema[k], _full_ema(k, reference[k].shape)) and ema[k].dtype == torch.float32 for k in ema)
    ema64 = read_full_weights(tmp_path / "ckpt_dp4_rank0" / "step_00000003", "ema")
    assert all(ema64[k].dtype == torch.float64 and torch.equal(ema64[k], _full_ema(k, reference[k].shape).double())
               for k in reference)
    assert checkpoint_has(step1, "ema") and checkpoint_has(step1, "model") and not checkpoint_has(step1, "swa")
    assert "holds no 'swa' weights" in _error(lambda: read_full_weights(step1, "swa"))
    assert "is not allowed" in _error(lambda: read_full_weights(step1, "optim"))

    # TP1 in this process alone (no process group): the EMA of the TP2 x PP2 save, in place.
    whole = build_dit(tiny(**CFG), init_seed=OTHER_SEED)
    ema_targets = _ema([whole], fill=float("nan"))
    load_train_state(step1, [whole], _optimizer([whole], None), None, extra_weights={"ema": ema_targets})
    assert _ema_mismatches([whole], ema_targets) == []
    assert all(torch.equal(p.detach(), reference[k]) for k, p in whole.named_parameters())
