"""One training step on packed webdataset sequences under each parallel layout gives the single-process loss
and gradients (tiny model, fp32, gloo ranks); DP2 trains like one process reading both streams, and its
checkpoint holds the position of every stream.

Why the layouts see the same numbers: with data.num_streams=2 and data.global_batch_size=2, a dp=1 trainer
reads stream 0 then stream 1 (round robin) as its two micro-batches, while dp=2 gives rank r stream r and one
micro-batch. Sample j of micro-batch k on dp rank r draws its objective from position
(r * num_micro + k) * max_rows + j, which is the same sample either way. tp/cp/pp peers of a dp rank read
identical loaders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tests.distributed.common import check_steps, grad_errors, nonzero_output_layer, single_process_parallel
from tests.distributed.launch import run_ranks
from tests.shard_helpers import CAPTION_DIM, CHANNELS, write_dataset

CHUNK = 2  # latent frames per chunk of the test model


def _config(shards: str, out_dir: str, layout: dict, global_batch: int = 2, max_steps: int = 3):
    from magi_train.config import validate
    from magi_train.config.schema import (DataConfig, DiffusionConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                                          TrainConfig, TrainerConfig, WandbConfig)

    # 4 heads in 2 query groups: whole heads for tp2 x cp2 (ulysses).
    model = ModelConfig(in_channels=CHANNELS, out_channels=CHANNELS, caption_channels=CAPTION_DIM, caption_max_length=8,
                        null_caption_length=4, chunk_width=CHUNK, num_layers=2, hidden_size=64, ffn_hidden_size=128,
                        num_attention_heads=4, num_query_groups=2, kv_channels=16)
    data = DataConfig(kind="webdataset", shards=shards, seq_length=96, max_rows_per_sequence=8, pack_pool=6,
                      shuffle_buffer=4, num_streams=2, num_workers=0, latent_channels=CHANNELS,
                      latent_frames_per_chunk=CHUNK, caption_length=6, micro_batch_size=1,
                      global_batch_size=global_batch, seed=5)
    return validate(TrainConfig(
        model=model, parallel=ParallelConfig(**layout), data=data,
        # Every objective branch: clean context chunks, image-to-video, caption dropout.
        diffusion=DiffusionConfig(clean_prefix_prob=0.3, i2v_prob=0.3, caption_dropout=0.2),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=0),
        trainer=TrainerConfig(max_steps=max_steps, output_dir=out_dir, progress_bar=False, num_threads=1,
                              wandb=WandbConfig(mode="disabled"))))


def _trainers(shards: str, out_dir: str, layout: dict, global_batch: int = 2):
    """{"parallel": the layout's trainer, "oracle": one process (dp 1) on this rank}, output layers non-zero."""
    import torch.distributed as dist

    from magi_train.config.schema import ParallelConfig
    from magi_train.parallel.groups import init_parallel
    from magi_train.training.trainer import Trainer

    cfg = _config(shards, f"{out_dir}/parallel", layout, global_batch)
    oracle_cfg = replace(cfg, parallel=ParallelConfig(),
                         trainer=replace(cfg.trainer, output_dir=f"{out_dir}/oracle{dist.get_rank()}"))
    trainers = {"parallel": Trainer(cfg, init_parallel(ParallelConfig(**layout))),
                "oracle": Trainer(oracle_cfg, single_process_parallel())}
    for trainer in trainers.values():
        nonzero_output_layer(trainer.models)
    return trainers


def _one_step_errors(shards: str, out_dir: str, layout: dict, global_batch: int = 2):

    trainers = _trainers(shards, out_dir, layout, global_batch)
    out = {}
    for name, trainer in trainers.items():
        trainer.optimizer.zero_grad()
        micro = trainer.step_micro_batches(0)
        loss = trainer._sum_loss(trainer.forward_backward(micro))
        trainer.reduce_grads()
        out[name] = (loss, trainer.grad_norm())
    assert out["oracle"][0] > 0, out
    return {"loss": abs(out["parallel"][0] - out["oracle"][0]) / abs(out["oracle"][0]),
            "grad_norm": abs(out["parallel"][1] - out["oracle"][1]) / out["oracle"][1],
            "tokens": (trainers["parallel"].last_tokens, trainers["oracle"].last_tokens),
            **grad_errors(trainers["parallel"].models, trainers["oracle"].model)}


def _dp2_train_and_save(shards: str, out_dir: str):
    """Three optimizer steps with DP2 and with one process, then a DP2 checkpoint."""
    trainers = _trainers(shards, out_dir, {})
    losses = {name: [trainer.train_step()["loss"] for _ in range(3)] for name, trainer in trainers.items()}
    path = trainers["parallel"].save()
    return {"losses": losses, "checkpoint": str(path),
            "oracle_state": trainers["oracle"].loader.state_dict(),
            "moved": float(trainers["parallel"].model.final_linear.linear.weight.detach().abs().max())}


def _two_rank_suite(shards: str, out_dir: str, cases):
    steps = {name: _one_step_errors(shards, f"{out_dir}/{name}", layout) for name, layout in cases}
    return {"steps": steps, "dp2_train": _dp2_train_and_save(shards, f"{out_dir}/dp2_train")}


def _four_rank_suite(shards: str, out_dir: str, cases):
    return {name: _one_step_errors(shards, f"{out_dir}/{name}", layout, global_batch)
            for name, layout, global_batch in cases}


CASES_2 = [
    ("dp2", {}),
    ("tp2_sp", {"tp": 2, "sequence_parallel": True}),
    ("cp2", {"cp": 2, "cp_impl": "ulysses"}),
    ("pp2_1f1b", {"pp": 2}),
]
# (name, layout, data.global_batch_size). Not pp2 x dp2: the pipeline needs 2 micro-batches per dp rank
# (global batch 4), and with more than one micro-batch per dp rank a sequence's position (dp_rank, k) is
# not the one it has in the single process's round robin over the streams, so its draws differ.
CASES_4 = [("tp2_sp_dp2", {"tp": 2, "sequence_parallel": True}, 2), ("pp2_dp2", {"pp": 2}, 4)]


def _shards(tmp_path: Path) -> str:
    write_dataset(tmp_path / "shards", shards=4, per_shard=6, chunk_width=CHUNK, seed=1)
    return str(tmp_path / "shards")


def _check(per_rank):
    check_steps(per_rank)
    for rank, results in enumerate(per_rank):
        for name, err in results.items():
            # Every real token of the step (over all dp ranks) is counted, the same as the oracle's.
            assert err["tokens"][0] == err["tokens"][1] > 0, (rank, name, err["tokens"])


def test_two_rank_layouts_match_single_process_on_packed_sequences(tmp_path):
    shards = _shards(tmp_path)
    per_rank = run_ranks(2, _two_rank_suite, shards, str(tmp_path / "runs"), CASES_2)
    _check([r["steps"] for r in per_rank])

    for rank, r in enumerate(per_rank):
        train = r["dp2_train"]
        assert train["moved"] > 0
        for a, b in zip(train["losses"]["parallel"], train["losses"]["oracle"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (rank, train["losses"])
    # Rank 0 wrote the checkpoint: both dp ranks' stream positions, merged, equal to the oracle's after the
    # same three steps (which read both streams in one process).
    saved = json.loads((Path(per_rank[0]["dp2_train"]["checkpoint"]) / "trainer.json").read_text())
    state = saved["data_loader"]
    assert state["format"] == "magi.webdataset_loader/1" and state["num_streams"] == 2
    assert sorted(state["streams"]) == ["0", "1"]
    assert state["streams"] == per_rank[0]["dp2_train"]["oracle_state"]["streams"]
    for position in state["streams"].values():
        assert position["done"] or position["partial"], state  # three steps consumed something of each stream


def test_four_rank_layout_matches_single_process_on_packed_sequences(tmp_path):
    shards = _shards(tmp_path)
    _check(run_ranks(4, _four_rank_suite, shards, str(tmp_path / "runs"), CASES_4))

