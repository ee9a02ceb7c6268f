"""LoRA under each layout gives the single-process LoRA run's loss and adapter gradients (tiny preset, fp32,
gloo ranks): TP2 (and SwiGLU under sequence parallel, the caption KV linear adapted too), CP2, PP2, DP2 on two
ranks; TP2 x CP2 with sequence parallel and TP4 (more ranks than KV heads: replicated KV adapters' rows) on four.
Three LoRA steps under TP2 with sequence parallelism equal one process's, and its checkpoint resumes in one.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import torch

from tests.distributed.common import nonzero_output_layer, single_process_parallel, train_config
from tests.distributed.launch import run_ranks

# Every default target plus the caption KV linear (a column layer that sequence parallelism does not split).
TARGETS = ["*.self_attention.linear_qkv.q", "*.self_attention.linear_qkv.k", "*.self_attention.linear_qkv.v",
           "*.self_attention.linear_qkv.qx", "*.self_attention.linear_proj", "*.mlp.linear_fc1", "*.mlp.linear_fc2",
           "*.self_attention.linear_kv_xattn"]


def lora_config(out_dir, layout: dict, global_batch: int, **model):
    from magi_train.config import validate
    from magi_train.config.schema import LoraConfig

    cfg = train_config(out_dir, layout, global_batch=global_batch, **model)
    return validate(replace(cfg, lora=LoraConfig(rank=4, alpha=8.0, targets=TARGETS)))


@torch.no_grad()
def nonzero_adapters(models) -> None:
    """The same random A and B in every layout (drawn whole per name; held whole on every rank): with B = 0
    (a fresh adapter) A's gradient would be exactly zero and only B's would be compared."""
    from magi_train.model.lora import is_lora_parameter

    for model in models:
        for name, p in model.named_parameters():
            if is_lora_parameter(name):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def adapter_grad_errors(models, oracle) -> dict:
    """Worst adapter-gradient error against the oracle, relative to that parameter's largest gradient (floored
    at 1e-4 of the largest adapter gradient); the frozen base must have no gradient anywhere."""
    full = {n: p for n, p in oracle.named_parameters() if p.grad is not None}
    assert full and all(".lora_" in n for n in full), sorted(full)[:3]
    floor = 1e-4 * max(float(p.grad.abs().max()) for p in full.values())
    worst, worst_name, seen = 0.0, "", 0
    for model in models:
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            assert ".lora_" in name, name  # a frozen base parameter got a gradient
            expected = full[name].grad.double()  # adapters are held whole on every rank
            err = float((p.grad.double() - expected).abs().max()) / max(float(expected.abs().max()), floor)
            if err >= worst:
                worst, worst_name = err, name
            seen += 1
    return {"grad": worst, "worst_grad": worst_name, "params_checked": seen}


def _step_errors(out_dir: str, cases):
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    import torch.distributed as dist
    results = {}
    for name, layout, model in cases:
        par = init_parallel(ParallelConfig(**layout))
        batch = 16 if layout.get("pp", 1) * layout.get("dp", 1) > 2 else 8
        cfg = lora_config(f"{out_dir}/{name}", layout, batch, **model)
        trainers = {
            "parallel": Trainer(cfg, par),
            "oracle": Trainer(replace(cfg, parallel=ParallelConfig(),
                                      trainer=replace(cfg.trainer, output_dir=f"{out_dir}/{name}/oracle{dist.get_rank()}")),
                              single_process_parallel()),
        }
        out = {}
        for key, trainer in trainers.items():
            nonzero_output_layer(trainer.models)
            nonzero_adapters(trainer.models)
            trainer.optimizer.zero_grad()
            loss = trainer._sum_loss(trainer.forward_backward(trainer.step_micro_batches(0)))
            trainer.reduce_grads()
            out[key] = (loss, trainer.grad_norm())
        results[name] = {"loss": abs(out["parallel"][0] - out["oracle"][0]) / abs(out["oracle"][0]),
                         "grad_norm": abs(out["parallel"][1] - out["oracle"][1]) / out["oracle"][1],
                         **adapter_grad_errors(trainers["parallel"].models, trainers["oracle"].model)}
        for trainer in trainers.values():
            trainer.close()
    return results


def _tp2_trains_and_reshards(out_dir: str):
    """Three LoRA steps under TP2 (from a trained base: trainer.init_from) against one process, and the TP2
    checkpoint of step 2 resumed by one process: the same third step."""
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    import torch.distributed as dist
    base = f"{out_dir}/base"
    # A base whose output layer has left zero (so that the adapters get gradients), trained by both ranks (DP2).
    Trainer(train_config(base, {}, max_steps=3), init_parallel(ParallelConfig())).fit()
    alone = single_process_parallel()
    layout = {"tp": 2, "sequence_parallel": True}

    def cfg(out, parallel, **trainer):
        c = lora_config(out, parallel, 8)
        return replace(c, trainer=replace(c.trainer, init_from=base, max_steps=3, **trainer))

    tp2 = [r["loss"] for r in Trainer(cfg(f"{out_dir}/tp2", layout, save_every=2), init_parallel(ParallelConfig(**layout))).fit()]
    me = dist.get_rank()
    one = [r["loss"] for r in Trainer(cfg(f"{out_dir}/one{me}", {}), alone).fit()]
    resumed = Trainer(cfg(f"{out_dir}/resumed{me}", {}, resume=f"{out_dir}/tp2/checkpoints/step_00000002"), alone)
    assert resumed.step == 2
    again = [r["loss"] for r in resumed.fit()]
    return {"tp2": tp2, "one": one, "resumed": again}


def _dropout_refused(out_dir: str) -> str:
    """lora.dropout > 0 on a column linear whose input is replicated over TP2 (no sequence parallel): refused."""
    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    cfg = lora_config(out_dir, {"tp": 2}, 8)
    try:
        Trainer(replace(cfg, lora=replace(cfg.lora, dropout=0.1)), init_parallel(ParallelConfig(tp=2)))
    except NotImplementedError as e:
        return str(e)
    return "not refused"


def _two_rank_suite(out_dir: str, cases):
    return {"steps": _step_errors(out_dir, cases), "train": _tp2_trains_and_reshards(f"{out_dir}/train"),
            "dropout": _dropout_refused(f"{out_dir}/dropout")}


def check(per_rank) -> None:
    for rank, results in enumerate(per_rank):
        for name, err in results.items():
            assert err["params_checked"] > 0, (rank, name)
            assert err["loss"] < 1e-5 and err["grad_norm"] < 1e-5 and err["grad"] < 1e-5, (rank, name, err)


CASES_2 = [
    ("tp2", {"tp": 2}, {}),
    ("tp2_sp_swiglu", {"tp": 2, "sequence_parallel": True}, {"gated_linear_unit": True}),
    ("cp2", {"cp": 2}, {}),
    ("pp2", {"pp": 2}, {}),
    ("dp2", {}, {}),
]
CASES_4 = [
    ("tp2_cp2_sp", {"tp": 2, "cp": 2, "sequence_parallel": True}, {}),
    ("tp4_kv_replicas", {"tp": 4}, {}),
]


def test_lora_two_rank_layouts_match_single_process(tmp_path):
    per_rank = run_ranks(2, _two_rank_suite, str(tmp_path), CASES_2)
    check([r["steps"] for r in per_rank])
    for rank, r in enumerate(per_rank):
        tp2, one, resumed = r["train"]["tp2"], r["train"]["one"], r["train"]["resumed"]
        assert len(tp2) == len(one) == 3 and len(resumed) == 1, r["train"]
        assert len(set(tp2)) == 3  # the adapters train: every step's loss differs
        for a, b in zip(tp2, one):
            assert abs(a - b) <= 1e-5 * abs(b), (rank, r["train"])
        assert abs(resumed[0] - tp2[2]) <= 1e-5 * abs(tp2[2]), (rank, r["train"])
        assert "lora.dropout=0.1" in r["dropout"] and "replicated" in r["dropout"], r["dropout"]


def test_lora_four_rank_layouts_match_single_process(tmp_path):
    check(run_ranks(4, _step_errors, str(tmp_path), CASES_4))
